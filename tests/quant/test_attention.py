"""Attention matmuls as quantized, costed rows of the plan (timm ViT/DeiT), on the fused and the unfused path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from lit_mpq.energy.models import HorowitzEnergyModel
from lit_mpq.quant.apply import (
    QuantSettings,
    apply_plan,
    invalidate_qparams,
    measure_model,
    quant_layers,
    quantize_model,
    quantizers_mode,
    set_mode,
)
from lit_mpq.quant.attention import QuantMatmul, is_quant_attention
from lit_mpq.quant.functional import fake_quantize, qparams_from_range, quant_range
from lit_mpq.sensitivity.output_error import probe_output_error

timm = pytest.importorskip("timm")


def small_vit(fused: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def calibrated(model: torch.nn.Module, settings: QuantSettings, x: torch.Tensor):
    quantize_model(model, settings)
    plan = measure_model(model, x[:1])
    set_mode(model, weights="off", activations="observe")
    with torch.no_grad():
        model(x)
    set_mode(model, weights="off", activations="off")
    invalidate_qparams(model)
    return plan


def test_deit_tiny_attention_matmul_macs_match_a_hand_count():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    quantize_model(model, QuantSettings())
    plan = measure_model(model, torch.zeros(1, 3, 224, 224))
    # Hand count: 3 heads of width 64 over 14 x 14 patches + the class token; each matmul is N x N x 64 per head.
    heads, tokens, head_dim = 3, 14 * 14 + 1, 64
    matmuls = [spec for spec in plan.specs.values() if spec.kind == "matmul"]
    assert [spec.name for spec in matmuls[:2]] == ["blocks.0.attn.matmul_qk", "blocks.0.attn.matmul_av"]
    assert len(matmuls) == 2 * 12
    for spec in matmuls:
        assert spec.macs == heads * tokens * tokens * head_dim == 7_451_328
        assert spec.params == 0 and spec.weight_shape == ()
    qk, av = plan.specs["blocks.0.attn.matmul_qk"], plan.specs["blocks.0.attn.matmul_av"]
    assert (qk.act_in, qk.act_other, qk.act_out) == (tokens * 192, tokens * 192, heads * tokens * tokens)
    assert (av.act_in, av.act_other, av.act_out) == (heads * tokens * tokens, tokens * 192, tokens * 192)
    # The 14 % of the issue: 24 x 7.45 M of DeiT-Tiny's 1.254 G MACs (patch embedding, Linears and matmuls).
    share = sum(s.macs for s in matmuls) / sum(s.macs for s in plan.specs.values())
    assert share == pytest.approx(0.1426, abs=5e-4)
    # Rows in execution order within a block.
    names = plan.names
    assert names.index("blocks.0.attn.qkv") < names.index("blocks.0.attn.matmul_qk") < names.index("blocks.0.attn.proj")


@pytest.mark.parametrize("fused", [True, False])
def test_quantizers_off_reproduce_timm_bit_for_bit(fused):
    model = small_vit(fused)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    calibrated(model, QuantSettings(), x)
    assert any(is_quant_attention(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("softmax_bits", [None, 6])
def test_fused_and_unfused_attention_give_the_same_quantized_output(softmax_bits):
    x = torch.randn(4, 3, 32, 32)
    outputs = []
    for fused in (True, False):
        model = small_vit(fused, seed=3)
        plan = calibrated(model, QuantSettings(), x)
        for name, layer in plan.layers.items():
            layer.w_bits, layer.a_bits = 6, 6
            if name.endswith("matmul_av"):
                layer.a_bits = softmax_bits
        apply_plan(model, plan)
        with torch.no_grad():
            outputs.append(model(x))
    fused_out, unfused_out = outputs
    assert not torch.equal(fused_out, torch.zeros_like(fused_out))
    torch.testing.assert_close(fused_out, unfused_out, rtol=1e-4, atol=1e-4)


def test_quantized_attention_equals_a_hand_written_quantized_attention():
    """One block's attention against a literal re-implementation with torch's own fake-quantize kernel."""
    model = small_vit(False, seed=1)
    x = torch.randn(3, 3, 32, 32)
    plan = calibrated(model, QuantSettings(act_observer="minmax"), x)
    bits = 4
    for layer in plan.layers.values():
        layer.w_bits, layer.a_bits = None, None
    plan["blocks.0.attn.matmul_qk"].a_bits = plan["blocks.0.attn.matmul_qk"].w_bits = bits
    plan["blocks.0.attn.matmul_av"].a_bits = plan["blocks.0.attn.matmul_av"].w_bits = bits
    apply_plan(model, plan)
    attention = model.blocks[0].attn
    captured = {}
    handle = model.blocks[0].attn.register_forward_hook(lambda m, i, o: captured.update(x=i[0], y=o))
    with torch.no_grad():
        model(x)
    handle.remove()

    def fq(t: torch.Tensor, observer) -> torch.Tensor:  # asymmetric per-tensor, from the observed min and max
        scale, zp = qparams_from_range(observer.min_val, observer.max_val, bits, symmetric=False)
        return torch.fake_quantize_per_tensor_affine(t, float(scale), int(zp), *quant_range(bits, False))

    tokens = captured["x"]
    batch, n, channels = tokens.shape
    heads = attention.num_heads
    qkv = F.linear(tokens, attention.qkv.weight, attention.qkv.bias).reshape(batch, n, 3, heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    qk, av = attention.matmul_qk, attention.matmul_av
    scores = fq(q, qk.input_quantizer.observer) * attention.scale @ fq(k, qk.other_quantizer.observer).transpose(-2, -1)
    probs = fq(scores.softmax(dim=-1), av.input_quantizer.observer)
    mixed = (probs @ fq(v, av.other_quantizer.observer)).transpose(1, 2).reshape(batch, n, channels)
    expected = F.linear(mixed, attention.proj.weight, attention.proj.bias)
    torch.testing.assert_close(captured["y"], expected, rtol=1e-5, atol=1e-5)


def test_matmul_rows_are_costed_with_both_operands_and_no_weights():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    quantize_model(model, QuantSettings())
    plan = measure_model(model, torch.zeros(1, 3, 224, 224))
    spec = plan.specs["blocks.3.attn.matmul_av"]
    energy = HorowitzEnergyModel()
    terms = energy.layer(spec, 4, 8)  # v at 4 bits, softmax output at 8
    assert terms.weight_mem_pj == 0
    assert terms.act_mem_pj == pytest.approx((spec.act_in * 8 + spec.act_other * 4) * energy.dram_pj_per_bit)
    assert terms.mac_pj == pytest.approx(spec.macs * energy.mac_pj(4, 8))
    # Matmuls store nothing: the plan's weight size is that of the same model with attention left in float.
    float_attention = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    quantize_model(float_attention, QuantSettings(attention=False))
    assert plan.weight_size_mb() == measure_model(float_attention, torch.zeros(1, 3, 224, 224)).weight_size_mb()


def test_output_error_probe_of_a_matmul_matches_brute_force():
    model = small_vit(False, seed=2)
    x = torch.randn(3, 3, 32, 32)
    calibrated(model, QuantSettings(act_observer="minmax"), x)
    stats = probe_output_error(model, [x], [4, 8])
    layer: QuantMatmul = quant_layers(model)["blocks.1.attn.matmul_av"]
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.update(a=i[0], b=i[1], y=o))
    with torch.no_grad(), quantizers_mode(model, "off"):
        model(x)
    handle.remove()
    a, b, y = captured["a"], captured["b"], captured["y"]
    for bits in (4, 8):
        scale, zp = layer.input_quantizer.qparams(bits)
        a_q = fake_quantize(a, scale, zp, *quant_range(bits, False))
        assert stats.act_sq["blocks.1.attn.matmul_av"][bits] == pytest.approx(float(((a_q @ b - y) ** 2).sum()), 1e-4)
        scale, zp = layer.other_quantizer.qparams(bits)
        b_q = fake_quantize(b, scale, zp, *quant_range(bits, False))
        assert stats.weight_sq["blocks.1.attn.matmul_av"][bits] == pytest.approx(
            float(((a @ b_q - y) ** 2).sum()), 1e-4
        )


def test_attention_can_be_left_in_float_and_is_then_listed():
    model = small_vit(True)
    quantize_model(model, QuantSettings(attention=False))
    plan = measure_model(model, torch.zeros(1, 3, 32, 32))
    assert not any(spec.kind == "matmul" for spec in plan.specs.values())
    assert "QuantSettings.attention is off" in plan.float_layers["blocks.0.attn"]


def test_quantized_attention_survives_deepcopy_and_back_to_float():
    model = small_vit(True)
    x = torch.randn(2, 3, 32, 32)
    plan = calibrated(model, QuantSettings(), x)
    apply_plan(model, plan)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(copied(x), model(x))
    attention = model.blocks[0].attn
    back = attention.to_float()
    assert type(back) is type(attention).float_class and not hasattr(back, "matmul_qk")


def test_a_uniform_setting_puts_both_matmul_operands_at_the_activation_width():
    from lit_mpq.allocation import Uniform
    from lit_mpq.energy.accounting import uniform_energy

    model = small_vit(True)
    quantize_model(model, QuantSettings())
    plan = measure_model(model, torch.zeros(1, 3, 32, 32))
    bits = Uniform(4, 8).allocate(plan)
    assert bits["blocks.0.attn.matmul_qk"] == bits["blocks.0.attn.matmul_av"] == (8, 8)
    assert bits["blocks.0.attn.qkv"] == (4, 8)
    # The reference energy of "uniform W4A8" is that allocation's energy, matmuls at 8 bits.
    energy = HorowitzEnergyModel()
    by_hand = sum(energy.layer(plan.specs[name], *pair).total_pj for name, pair in bits.items())
    assert uniform_energy(plan, energy, 4, 8).total_pj == pytest.approx(by_hand)
