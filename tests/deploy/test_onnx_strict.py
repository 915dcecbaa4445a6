"""ONNX export under the integer-only target: a QuantizeLinear/DequantizeLinear pair on every activation tensor."""

from __future__ import annotations

import pytest
import torch

from lit_mpq.deploy.onnx_export import export_onnx
from lit_mpq.quant.apply import QuantSettings

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# Operations that move or select values of a quantized tensor without computing new ones: a QDQ pair before them
# still stands for the tensor after them.
_PASS_THROUGH = {"Clip", "Slice", "Pad", "Reshape", "Flatten", "Transpose", "Relu", "Squeeze", "Unsqueeze", "Identity"}


def _dequantized(name: str, producers: dict) -> bool:
    """Whether tensor ``name`` is the output of a DequantizeLinear fed by a QuantizeLinear (through pass-throughs)."""
    node = producers.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return False
    source = producers.get(node.input[0])
    while source is not None and source.op_type in _PASS_THROUGH:
        source = producers.get(source.input[0])
    return source is not None and source.op_type == "QuantizeLinear"


def test_integer_only_resnet_exports_a_qdq_pair_on_every_activation_and_onnx_runtime_agrees(
    tmp_path, calibrated_resnet
):
    model, plan, x, _ = calibrated_resnet(seed=3, settings=QuantSettings(act_observer="mse", target="integer_only"))
    assert sum(plan.specs[name].kind == "add" for name in plan) == 9
    with torch.no_grad():
        reference = model(x)
    path = export_onnx(model, tmp_path / "model.onnx", (3, 32, 32))
    graph = onnx.load(str(path)).graph
    producers = {output: node for node in graph.node for output in node.output}
    checked = 0
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            assert _dequantized(node.input[0], producers), f"{node.name}: float input"
            checked += 1
        if node.op_type == "Add" and not any(i in {init.name for init in graph.initializer} for i in node.input):
            assert all(_dequantized(i, producers) for i in node.input), f"{node.name}: a float operand"
            checked += 2
    assert checked == 20 + 18  # 19 convolutions and the classifier, 9 adds of two operands
    assert _dequantized(graph.output[0].name, producers)  # the logits leave quantized
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert float((got.argmax(1) == reference.argmax(1)).float().mean()) >= 0.9
    assert float((got - reference).abs().mean()) <= 0.05 * float(reference.abs().mean())


@pytest.mark.slow
def test_the_integer_only_config_ships_an_onnx_model_that_reproduces_its_top1(shared_data, tmp_path, monkeypatch):
    """configs/resnet20_integer_only.yaml as it stands (shared ResNet-20, 1,000 lossless test images)."""
    import json
    from pathlib import Path

    import yaml

    from lit_mpq.cli import main

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    main(
        [
            "validate",
            "--config",
            "configs/resnet20_integer_only.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    onnx_result = results["export"]["onnx"]
    assert onnx_result["images"] == 1000
    assert abs(onnx_result["top1"] - results["metrics"]["val/top1"]) <= 0.3  # the tolerance
    card = yaml.safe_load(next(tmp_path.rglob("card.yaml")).read_text())
    assert card["target"]["name"] == "integer_only" and card["target"]["fold_batchnorm"] is True
