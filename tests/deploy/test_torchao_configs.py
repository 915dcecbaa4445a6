"""A plan's Linear widths run by torchao: which tensor subclass each layer gets, and outputs within a bound
derived from each layer's bit width (worst-case rounding error of the weights and, when quantized, the inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from lit_mpq.deploy.torchao_configs import apply_torchao_plan, torchao_config_name, torchao_plan  # noqa: E402
from lit_mpq.plan import LayerSpec, QuantPlan  # noqa: E402

IN, OUT = 64, 48
WIDTHS = {
    "w8a8": (8, 8),
    "w8": (8, None),
    "w4": (4, None),
    "w4a8": (4, 8),
    "w3": (3, 16),
    "fp": (None, 8),
    "w16": (16, 16),
}
SUBCLASS = {
    "w8a8": "Int8Tensor",
    "w8": "Int8Tensor",
    "w4": "Int4OpaqueTensor",
    "w4a8": "IntxUnpackedToInt8Tensor",
    "w3": "IntxUnpackedToInt8Tensor",
    "fp": "Parameter",
    "w16": "Parameter",
}


class Layers(nn.Module):
    """Independent Linear layers (one per width pair), plus a convolution that torchao must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({name: nn.Linear(IN, OUT) for name in WIDTHS})
        self.conv = nn.Conv2d(3, 4, 3)


def layer_plan() -> QuantPlan:
    specs = [LayerSpec(f"layers.{n}", "linear", IN * OUT, IN * OUT, IN, OUT, weight_shape=(OUT, IN)) for n in WIDTHS]
    specs.append(LayerSpec("conv", "conv2d", 108, 108, 27, 4, weight_shape=(4, 3, 3, 3)))
    plan = QuantPlan(specs)
    plan.set_bits({f"layers.{n}": bits for n, bits in WIDTHS.items()} | {"conv": (4, 4)})
    return plan


def error_bound(weight: torch.Tensor, x: torch.Tensor, w_bits: int | None, a_bits: int | None) -> torch.Tensor:
    """Worst-case |y - y_float| per output element from rounding alone, ``[tokens, out]``.

    A weight row quantized symmetrically at ``b`` bits errs by at most half a step, ``max|w_row| / (2^(b-1) - 1) / 2``;
    asymmetric groups (int4 weight-only) by ``(max - min) / (2^b - 1) / 2 <= max|w_row| / (2^b - 1)``, the same order.
    Inputs quantized per token at 8 bits err by ``max|x_token| / 127 / 2``. The product's error is then at most
    ``sum_k |x_k| dw_j + sum_k |w_jk| dx + K dx dw_j``; a factor 2 covers torchao's low-precision scales.
    """
    if w_bits in (None, 16):
        return torch.full((x.shape[0], weight.shape[0]), 1e-5)
    row = weight.abs().amax(dim=1)
    dw = torch.maximum(row / (2 ** (w_bits - 1) - 1) / 2, row / (2**w_bits - 1))  # [out]
    bound = x.abs().sum(dim=1, keepdim=True) * dw
    if a_bits not in (None, 16):
        dx = x.abs().amax(dim=1, keepdim=True) / 127 / 2  # [tokens, 1]
        bound = bound + dx * weight.abs().sum(dim=1) + weight.shape[1] * dx * dw
    return 2.0 * bound + 1e-5


def test_config_names_follow_the_table() -> None:
    assert torchao_config_name(8, 8) == "Int8DynamicActivationInt8WeightConfig"
    assert torchao_config_name(8, 4) == "Int8DynamicActivationInt8WeightConfig"  # activations run at 8
    assert torchao_config_name(8, None) == torchao_config_name(8, 16) == "Int8WeightOnlyConfig"
    assert torchao_config_name(4, None, in_features=64) == "PrototypeInt4WeightOnlyConfig"
    assert torchao_config_name(4, None, in_features=40) == "IntxWeightOnlyConfig"  # 40 is no multiple of 32
    assert torchao_config_name(4, None, in_features=64, out_features=10) == "IntxWeightOnlyConfig"  # 10: not 16k
    assert torchao_config_name(2, 8) == "Int8DynamicActivationIntxWeightConfig"
    assert torchao_config_name(None, 8) is None and torchao_config_name(16, 16) is None


def test_plan_rows_get_their_tensor_subclass_and_outputs_stay_within_the_bound() -> None:
    model = Layers().eval()
    reference = {
        name: (layer.weight.detach().clone(), layer.bias.detach().clone()) for name, layer in model.layers.items()
    }
    conv_weight = model.conv.weight.detach().clone()
    x = torch.randn(16, IN)
    report = apply_torchao_plan(model, layer_plan())
    assert [r.name for r in report] == [f"layers.{n}" for n in WIDTHS]
    assert {r.name.split(".")[1]: r.tensor for r in report} == SUBCLASS
    int8 = {n: model.layers[n].weight for n in ("w8a8", "w8")}
    assert int8["w8a8"].act_quant_kwargs is not None and int8["w8"].act_quant_kwargs is None  # dynamic vs weight-only
    assert torch.equal(model.conv.weight, conv_weight)  # not a Linear: untouched
    with torch.inference_mode():
        for name, (w_bits, a_bits) in WIDTHS.items():
            weight, bias = reference[name]
            expected = x @ weight.T + bias
            error = (model.layers[name](x) - expected).abs()
            bound = error_bound(weight, x, w_bits, a_bits)
            assert bool((error <= bound).all()), f"{name}: error {float(error.max()):.4g} above its bound"
            if w_bits not in (None, 16):
                assert float(error.max()) > 0  # really quantized


def test_lower_widths_err_more() -> None:
    x = torch.randn(32, IN)
    errors = {}
    for w_bits in (8, 4, 2):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(IN, OUT))
        expected = model(x).detach()
        apply_torchao_plan(model, {"0": (w_bits, None)})
        with torch.inference_mode():
            errors[w_bits] = float((model(x) - expected).abs().mean())
    assert errors[8] < errors[4] < errors[2]


def test_torchao_plan_keeps_linear_rows_only() -> None:
    plan = layer_plan()
    assert torchao_plan(plan) == {f"layers.{n}": bits for n, bits in WIDTHS.items()}
    assert "conv" not in torchao_plan(plan, Layers())


def test_names_that_are_not_linear_modules_are_refused() -> None:
    with pytest.raises(ValueError, match="conv"):
        apply_torchao_plan(Layers(), {"conv": (8, 8)})
    with pytest.raises(ValueError, match="nope"):
        apply_torchao_plan(Layers(), {"nope": (8, 8)})
