"""Block-output range search: the blocks found, the search against brute force, and its promises.

The references are computed here, independently of :mod:`lit_mpq.quant.block_ranges`: the float network's block
outputs and the quantized network's block outputs are read with forward hooks on full forward passes, the squared
error is taken by hand, and the best factor of a block with one quantizer is found by trying every candidate on the
whole model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_mpq.models.cifar_resnet import cifar_resnet20
from lit_mpq.quant.apply import (
    QuantSettings,
    apply_plan,
    calibrate,
    measure_model,
    quant_layers,
    quantize_model,
    quantizers_mode,
)
from lit_mpq.quant.block_ranges import block_quantizers, find_blocks, refine_block_ranges

timm = pytest.importorskip("timm")

CANDIDATES = (0.4, 0.6, 0.8, 1.25)


def two_block_mlp(a_bits: int = 3) -> tuple[nn.Module, torch.Tensor]:
    """Two blocks of Linear-ReLU-Linear, calibrated, every weight FP32 and every input at ``a_bits``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)),
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
    ).eval()
    quantize_model(model, QuantSettings(act_observer="minmax"))
    plan = measure_model(model, torch.zeros(1, 8))
    images = torch.randn(24, 8)
    calibrate(model, [images])
    plan.set_bits({name: (None, a_bits) for name in plan.names})
    apply_plan(model, plan)
    return model, images


def block_output(model: nn.Module, block: str, images: torch.Tensor) -> torch.Tensor:
    stored = []
    handle = dict(model.named_modules())[block].register_forward_hook(lambda m, i, o: stored.append(o.detach()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return stored[0]


def block_error(model: nn.Module, block: str, images: torch.Tensor) -> float:
    with quantizers_mode(model, "off"):
        target = block_output(model, block, images)
    return float(((block_output(model, block, images) - target) ** 2).mean())


def test_finds_the_transformer_blocks_and_the_residual_blocks():
    vit = timm.create_model("test_vit").eval()
    quantize_model(vit, QuantSettings())
    assert find_blocks(vit) == [f"blocks.{i}" for i in range(len(vit.blocks))]
    resnet = cifar_resnet20()
    quantize_model(resnet, QuantSettings())
    # The stages' residual blocks, not the stages, and not a shortcut (a conv and a BatchNorm: not all quantized).
    assert find_blocks(resnet) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    mlp, _ = two_block_mlp()
    assert find_blocks(mlp) == ["0", "1"]


def test_a_block_with_one_quantizer_gets_the_brute_force_best_factor():
    model, images = two_block_mlp()
    # Only the second Linear of each block quantizes its input: one quantizer per block.
    for name, layer in quant_layers(model).items():
        if name.endswith(".0"):
            layer.input_quantizer.bits = None
    expected = {}
    for block in ("0", "1"):  # in order: block 1's search sees block 0's chosen range
        quantizer = dict(model.named_modules())[f"{block}.2"].input_quantizer
        errors = {}
        for factor in (1.0, *CANDIDATES):
            quantizer.set_range_factor(3, factor)
            errors[factor] = block_error(model, block, images)
        expected[block] = min(errors, key=lambda f: (errors[f], f != 1.0))  # ties keep the observer's range
        quantizer.set_range_factor(3, expected[block])
    for layer in quant_layers(model).values():
        layer.input_quantizer.range_factors.clear()
        layer.input_quantizer._cache.clear()

    report = refine_block_ranges(
        model, [images], candidates=CANDIDATES, rounds=1, max_images=24, chunk_size=10, target="float_network"
    )
    assert {b.name: b.factors for b in report.blocks} == {
        block: {"2.input_quantizer": factor} for block, factor in expected.items()
    }
    assert any(f != 1.0 for f in expected.values())  # the search had something to find
    for block in report.blocks:
        assert block.error_after == pytest.approx(block_error(model, block.name, images), rel=1e-5)


def test_float_block_target_is_the_float_block_on_the_same_quantized_input():
    model, images = two_block_mlp(a_bits=2)
    modules = dict(model.named_modules())
    for block in ("0", "1"):
        modules[f"{block}.0"].input_quantizer.set_range_factor(2, 0.6)  # upstream error for block 1 to inherit
    inputs = []
    handle = modules["1"].register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    with torch.no_grad():
        quantized_output = modules["1"](inputs[0])
        with quantizers_mode(modules["1"], "off"):
            float_block_output = modules["1"](inputs[0])
    expected = float(((quantized_output - float_block_output) ** 2).mean())
    network_error = block_error(model, "1", images)
    assert abs(network_error - expected) > 1e-3 * expected  # the two targets differ here
    report = refine_block_ranges(model, [images], blocks=["1"], candidates=(0.6,), rounds=1)
    assert report.settings["target"] == "float_block"
    assert report.blocks[0].error_before == pytest.approx(expected, rel=1e-5)


def test_errors_are_the_block_outputs_squared_error_and_never_grow():
    model, images = two_block_mlp(a_bits=2)
    first_before = block_error(model, "0", images[:20])  # every range factor still 1
    report = refine_block_ranges(
        model, [images[:10], images[10:]], candidates=CANDIDATES, rounds=2, max_images=20, target="float_network"
    )
    assert report.images == 20
    assert report.blocks[0].error_before == pytest.approx(first_before, rel=1e-5)
    for block in report.blocks:
        assert block.error_after <= block.error_before
        assert block.error_after == pytest.approx(block_error(model, block.name, images[:20]), rel=1e-5)
    assert any(block.error_after < block.error_before for block in report.blocks)


def test_channel_normalized_error_weights_each_channel_by_its_inverse_float_variance():
    model, images = two_block_mlp(a_bits=2)
    with quantizers_mode(model, "off"):
        target = block_output(model, "0", images).double().numpy()
    output = block_output(model, "0", images).double().numpy()
    expected = (((output - target) ** 2) / target.var(axis=0)).mean()  # numpy: population variance per column
    report = refine_block_ranges(model, [images], blocks=["0"], candidates=(0.5,), objective="channel_normalized")
    assert report.blocks[0].error_before == pytest.approx(expected, rel=1e-4)
    assert report.settings["objective"] == "channel_normalized"


def test_float_weights_searches_the_activations_error_alone_and_restores_the_weights():
    model, images = two_block_mlp(a_bits=2)
    for layer in quant_layers(model).values():
        layer.weight_quantizer.bits = 2
        layer.weight_quantizer.set_mode("quant")
    with_weights = block_error(model, "0", images)
    for layer in quant_layers(model).values():
        layer.weight_quantizer.set_mode("off")
    activations_alone = block_error(model, "0", images)
    for layer in quant_layers(model).values():
        layer.weight_quantizer.set_mode("quant")
    assert activations_alone < with_weights  # 2-bit weights add error: the two differ
    report = refine_block_ranges(model, [images], blocks=["0"], candidates=(0.5,), float_weights=True)
    assert report.blocks[0].error_before == pytest.approx(activations_alone, rel=1e-5)
    assert all(layer.weight_quantizer.mode == "quant" for layer in quant_layers(model).values())


def test_factors_are_stored_at_each_quantizers_plan_width_only():
    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    quantize_model(model, QuantSettings(act_observer="minmax"))
    plan = measure_model(model, torch.zeros(1, 3, 32, 32))
    images = torch.randn(8, 3, 32, 32)
    calibrate(model, [images])
    plan.set_bits({name: ((3, 4) if "matmul" in name else (8, 4)) for name in plan.names})
    apply_plan(model, plan)
    report = refine_block_ranges(model, [images], candidates=(0.5, 0.8), rounds=1, max_images=8)
    qk = model.blocks[0].attn.matmul_qk
    assert set(qk.input_quantizer.range_factors) <= {4} and set(qk.other_quantizer.range_factors) <= {3}
    searched = set(block_quantizers(model.blocks[0]))
    assert set(report.blocks[0].factors) == searched
    assert {"attn.qkv.input_quantizer", "attn.matmul_qk.other_quantizer", "mlp.fc2.input_quantizer"} <= searched


def test_bad_input_says_what_was_wrong():
    model, images = two_block_mlp()
    with pytest.raises(ValueError, match="no module named"):
        refine_block_ranges(model, [images], blocks=["blocks.0"])
    with pytest.raises(ValueError, match="no images"):
        refine_block_ranges(model, [])
    with pytest.raises(ValueError, match="positive factors"):
        refine_block_ranges(model, [images], candidates=(0.5, 0.0))
    with pytest.raises(ValueError, match="target must be one of"):
        refine_block_ranges(model, [images], target="float")
    with pytest.raises(ValueError, match="objective must be one of"):
        refine_block_ranges(model, [images], objective="kl")
    with pytest.raises(ValueError, match="rounds"):
        refine_block_ranges(model, [images], rounds=0)
    flat = nn.Sequential(nn.Linear(4, 4)).eval()
    quantize_model(flat, QuantSettings())
    with pytest.raises(ValueError, match="found no blocks"):
        refine_block_ranges(flat, [torch.randn(2, 4)])
