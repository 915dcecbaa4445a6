"""QDQ ONNX export run by ONNX Runtime: the stored codes are the packed ones; ORT computes the fake-quantized model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_mpq.deploy.checkpoint import quantized_weight
from lit_mpq.deploy.onnx_export import (
    PerChannelInput,
    QDQInput,
    export_onnx,
    module_to_onnx,
    onnx_model_for_export,
    onnx_session,
)
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


def test_the_vit_recipe_exports_with_its_special_quantizers_simulated_in_float(tmp_path, calibrated, vit_recipe):
    """configs/deit.yaml's quantizers: log-sqrt2 softmax with its mean zero code, twin-uniform fc2 inputs, RepQ-ViT."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    _, x = calibrated(model, vit_recipe, 32, seed=8, a_bits=(4,))
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(onnx_model_for_export(model)(x), reference)  # the exported module is the run's model
    path = export_onnx(model, tmp_path / "vit.onnx", (3, 32, 32))
    kinds = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "Log" in kinds or "Exp" in kinds  # logarithmic softmax levels, as float ops
    # Under EXACT_SESSION_CONFIG ONNX Runtime computes the run's logits on this model (ties could differ elsewhere:
    # ORT divides by a scale where torch multiplies by its reciprocal).
    session = onnx_session(path)
    got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    assert float((got - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    # ORT's default accuracy level quantizes the activations of its fused 4-bit MatMulNBits kernels to int8.
    default = torch.from_numpy(onnx_session(path, exact=False).run(["logits"], {"images": x.numpy()})[0])
    assert float((default - reference).abs().max()) > 100 * float((got - reference).abs().max())


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_a_per_channel_input_in_onnx_runtime_equals_torch_bit_for_bit(tmp_path, bits):
    from lit_mpq.quant.layernorm import ChannelwiseActivationQuantizer, ChannelwiseMinMaxObserver

    quantizer = ChannelwiseActivationQuantizer(ChannelwiseMinMaxObserver(6, symmetric=False), bits)
    quantizer.set_mode("observe")
    x = torch.randn(2, 5, 6) * torch.tensor([0.1, 1, 3, 0.5, 2, 8])
    quantizer(x)
    quantizer.set_mode("quant")
    path = module_to_onnx(
        torch.nn.Sequential(PerChannelInput(*quantizer.qparams(bits), bits, False)), x, tmp_path / "c.onnx"
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert torch.equal(got, quantizer.quantize(x, bits))
