"""The post-LayerNorm treatment inside a quantized ViT: found by tracing, and equal to the folded integer model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from lit_mpq.quant.apply import (
    QuantSettings,
    apply_plan,
    apply_post_layernorm,
    invalidate_qparams,
    measure_model,
    post_layernorm_layers,
    quantize_model,
    set_mode,
)
from lit_mpq.quant.layernorm import ChannelwiseActivationQuantizer, fold_layernorm

timm = pytest.importorskip("timm")


def reparameterized_vit(seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False).eval()
    with torch.no_grad():  # channel-varying LayerNorm outputs, as in trained ViTs
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight.mul_(torch.rand_like(norm.weight) * 4 + 0.1)
                norm.bias.add_(torch.randn_like(norm.bias))
                norm.weight[:2] *= 20
    quantize_model(model, QuantSettings(act_observer="minmax"))
    example = torch.zeros(1, 3, 32, 32)
    plan = measure_model(model, example)
    names = apply_post_layernorm(model, example)
    x = torch.randn(4, 3, 32, 32)
    set_mode(model, weights="off", activations="observe")
    with torch.no_grad():
        model(x)
    set_mode(model, weights="off", activations="off")
    invalidate_qparams(model)
    return model, plan, names, x


def test_the_layers_fed_by_a_layernorm_are_found_by_tracing():
    model, _, names, _ = reparameterized_vit()
    depth = len(model.blocks)
    expected = {f"blocks.{i}.attn.qkv": f"blocks.{i}.norm1" for i in range(depth)}
    expected |= {f"blocks.{i}.mlp.fc1": f"blocks.{i}.norm2" for i in range(depth)}
    assert post_layernorm_layers(model, torch.zeros(1, 3, 32, 32)) == expected
    assert sorted(names) == sorted(expected)
    assert isinstance(model.blocks[0].attn.qkv.input_quantizer, ChannelwiseActivationQuantizer)
    assert not isinstance(model.blocks[0].attn.proj.input_quantizer, ChannelwiseActivationQuantizer)


@pytest.mark.parametrize("w_bits,a_bits", [(None, 4), (8, 6), (4, 4)])
def test_reparameterized_layer_equals_the_folded_integer_model(w_bits, a_bits):
    """fc1 in the fake-quantized model vs. the deployment: folded LayerNorm, per-tensor input, Q(W') (torch.ao)."""
    model, plan, _, x = reparameterized_vit(seed=1)
    for layer in plan.layers.values():
        layer.w_bits, layer.a_bits = None, None
    plan["blocks.1.mlp.fc1"].w_bits, plan["blocks.1.mlp.fc1"].a_bits = w_bits, a_bits
    apply_plan(model, plan)
    block = model.blocks[1]
    captured = {}
    hooks = [
        block.norm2.register_forward_pre_hook(lambda m, a: captured.update(norm_in=a[0])),
        block.mlp.fc1.register_forward_hook(lambda m, a, o: captured.update(out=o)),
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()

    rep = block.mlp.fc1.input_quantizer.reparameterization(a_bits)
    plain = torch.nn.Linear(block.mlp.fc1.in_features, block.mlp.fc1.out_features)
    plain.load_state_dict({"weight": block.mlp.fc1.weight, "bias": block.mlp.fc1.bias})
    norm, linear = fold_layernorm(block.norm2, plain, rep)
    with torch.no_grad():
        folded_input = rep.fake_quantize(norm(captured["norm_in"]))  # one scale and zero point for the tensor
        weight = linear.weight
        if w_bits is not None:
            qmax = 2 ** (w_bits - 1) - 1
            observer = PerChannelMinMaxObserver(
                ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-qmax - 1, quant_max=qmax
            )
            observer(weight)
            scale, zero_point = observer.calculate_qparams()
            weight = torch.fake_quantize_per_channel_affine(weight, scale, zero_point.int(), 0, -qmax - 1, qmax)
        expected = F.linear(folded_input, weight, linear.bias)
    torch.testing.assert_close(captured["out"], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_reparameterized_inputs_quantize_better_than_per_tensor():
    """At 4 bits the folded per-channel treatment keeps the model closer to float than per-tensor inputs do."""
    errors = {}
    for treatment in ("per_tensor", "reparam"):
        model, plan, _, x = reparameterized_vit(seed=2) if treatment == "reparam" else _per_tensor_vit(seed=2)
        with torch.no_grad():
            reference = model(x)
        for name, layer in plan.layers.items():
            layer.w_bits, layer.a_bits = None, (4 if name.endswith(("qkv", "fc1")) else None)
        apply_plan(model, plan)
        with torch.no_grad():
            errors[treatment] = float(((model(x) - reference) ** 2).mean())
    assert errors["reparam"] < 0.5 * errors["per_tensor"]


def _per_tensor_vit(seed: int):
    model, plan, _, x = reparameterized_vit(seed)
    # Same model and data, but per-tensor inputs: rebuild the quantizers and calibrate again.
    torch.manual_seed(seed)
    fresh = timm.create_model("test_vit", pretrained=False).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "quantizer" not in k}, strict=False)
    quantize_model(fresh, QuantSettings(act_observer="minmax"))
    plan = measure_model(fresh, torch.zeros(1, 3, 32, 32))
    set_mode(fresh, weights="off", activations="observe")
    with torch.no_grad():
        fresh(x)
    set_mode(fresh, weights="off", activations="off")
    invalidate_qparams(fresh)
    return fresh, plan, [], x


def test_the_folded_weight_is_cached_and_recomputed_when_what_it_depends_on_changes():
    """The layer keeps Q(W diag(r1)) between forwards; new bits, ranges or weights give what a fresh layer gives."""
    model, plan, _, x = reparameterized_vit(seed=2)
    fc1 = model.blocks[0].mlp.fc1
    tokens = torch.randn(2, 5, fc1.in_features) * 3

    def fresh_output() -> torch.Tensor:  # the uncached computation, from the definitions
        from lit_mpq.quant.layernorm import simulated_linear_params

        rep = fc1.input_quantizer.reparameterization()
        bits = fc1.weight_quantizer.bits
        weight, bias = simulated_linear_params(fc1, rep, lambda w: fc1._fake_quantize_uncached(w, bits))
        return F.linear(fc1.input_quantizer(tokens), weight, bias)

    def check(calls_expected: int) -> None:
        calls = []
        original = fc1._fake_quantize_uncached
        fc1._fake_quantize_uncached = lambda w, b: calls.append(b) or original(w, b)
        try:
            with torch.no_grad():
                out = fc1(tokens)
        finally:
            del fc1._fake_quantize_uncached
        assert len(calls) == calls_expected
        assert torch.equal(out, fresh_output())

    plan["blocks.0.mlp.fc1"].w_bits, plan["blocks.0.mlp.fc1"].a_bits = 6, 6
    apply_plan(model, plan)
    check(1)
    check(0)  # served from the cache
    plan["blocks.0.mlp.fc1"].w_bits = 4
    apply_plan(model, plan)
    check(1)
    plan["blocks.0.mlp.fc1"].a_bits = 8  # other input ranges: other r1
    apply_plan(model, plan)
    check(1)
    fc1.input_quantizer.set_range_factor(8, 0.5)
    check(1)
    with torch.no_grad():
        fc1.weight.mul_(1.5)  # an in-place update bumps the weight's version
    check(1)
    check(0)
