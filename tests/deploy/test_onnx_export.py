"""QDQ ONNX export run by ONNX Runtime: the stored codes are the packed ones; ORT computes the fake-quantized model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_mpq.deploy.checkpoint import QuantizedExportError, quantized_weight
from lit_mpq.deploy.onnx_export import QDQInput, export_onnx, module_to_onnx
from lit_mpq.quant.apply import QuantSettings, quant_layers
from lit_mpq.quant.functional import fake_quantize, quant_range

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_thread")


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


@pytest.mark.parametrize("bits,symmetric", [(3, False), (4, True), (8, False)])
def test_one_qdq_input_in_onnx_runtime_is_the_b_bit_fake_quantizer(tmp_path, bits, symmetric):
    scale, zero_point = 0.0371, (0 if symmetric else 2)
    module = torch.nn.Sequential(QDQInput(scale, zero_point, bits, symmetric))
    x = torch.randn(4, 3, 8, 8) * 0.4
    path = tmp_path / "qdq.onnx"
    module_to_onnx(module, x, path)
    qmin, qmax = quant_range(bits, symmetric)
    expected = fake_quantize(x, torch.tensor(scale), torch.tensor(zero_point), qmin, qmax)
    got = run_onnx(path, x)
    # ORT divides by the scale, torch multiplies by its reciprocal: they may differ by one level at exact ties only.
    level = torch.round((got - expected).abs() / scale)
    assert int((level > 0).sum()) <= 1 and int(level.max()) <= 1
    assert (
        float(got.min()) >= (qmin - zero_point) * scale - 1e-6
        and float(got.max()) <= (qmax - zero_point) * scale + 1e-6
    )


def test_resnet_export_holds_the_packed_codes_and_onnx_runtime_agrees(tmp_path, calibrated_resnet):
    model, plan, x, _ = calibrated_resnet(seed=5)
    with torch.no_grad():
        reference = model(x)
    path = export_onnx(model, tmp_path / "model.onnx", (3, 32, 32))
    graph = onnx.load(str(path)).graph
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    layers = quant_layers(model)
    for name, layer in layers.items():
        codes, scale, _, _, _ = quantized_weight(name, layer, layer.weight_quantizer.bits)
        stored = initializers[f"{name}.weight_qdq.codes"]
        assert stored.dtype == np.int8
        np.testing.assert_array_equal(stored, codes.numpy())
        np.testing.assert_array_equal(initializers[f"{name}.weight_qdq.scale"], scale.numpy())
    kinds = [node.op_type for node in graph.node]
    assert kinds.count("QuantizeLinear") == len(layers)  # one per quantized input
    assert "BatchNormalization" not in kinds  # folded
    got = run_onnx(path, x)
    assert float((got.argmax(1) == reference.argmax(1)).float().mean()) >= 0.9
    assert float((got - reference).abs().mean()) <= 0.05 * float(reference.abs().mean())


def test_a_vit_with_plain_quantizers_exports_its_attention_matmuls(tmp_path, calibrated):
    timm = pytest.importorskip("timm")

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    _, x = calibrated(model, QuantSettings(act_observer="minmax"), 32, seed=6, a_bits=(8,))
    with torch.no_grad():
        reference = model(x)
    path = export_onnx(model, tmp_path / "vit.onnx", (3, 32, 32))
    kinds = [node.op_type for node in onnx.load(str(path)).graph.node]
    matmul_inputs = 4 * len(model.blocks)  # q, k, softmax output, v
    assert kinds.count("QuantizeLinear") == len(quant_layers(model)) - 2 * len(model.blocks) + matmul_inputs
    got = run_onnx(path, x)
    assert float((got - reference).abs().max()) <= 0.05 * float(reference.abs().max())


def test_a_quantizer_without_a_qdq_form_is_named(tmp_path, calibrated):
    timm = pytest.importorskip("timm")

    model = timm.create_model("test_vit", pretrained=False).eval()
    calibrated(model, QuantSettings(softmax_quantizer="log2"), 32, seed=7, a_bits=(4,))
    with pytest.raises(QuantizedExportError, match=r"blocks\.0\.attn\.matmul_av \(left operand\): a LogQuantizer"):
        export_onnx(model, tmp_path / "vit.onnx", (3, 32, 32))
