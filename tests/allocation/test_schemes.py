"""The seed's two mixed schemes (Linear-INT4/rest-FP16, low-variance layers INT4) against hand-worked plans."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_mpq.allocation import LinearLowBits, Policy, VarianceMixed, pin_layers, weight_variances
from lit_mpq.energy import HorowitzEnergyModel, plan_energy
from lit_mpq.plan import LayerSpec, QuantPlan


def spec(name: str, kind: str, params: int = 16) -> LayerSpec:
    """A row of ``kind`` with ``params`` weights (a matmul has none and a right-hand operand instead)."""
    if kind == "matmul":
        return LayerSpec(name, "matmul", 0, 64, 16, 16, act_other=16)
    return LayerSpec(name, kind, params, 10 * params, 16, 16, weight_shape=(params,))


def vit_like_plan() -> QuantPlan:
    """A patch-embedding convolution, two Linear layers around an attention matmul, and a Linear head."""
    return QuantPlan(
        [
            spec("patch_embed", "conv2d"),
            spec("qkv", "linear"),
            spec("attn.matmul_qk", "matmul"),
            spec("fc", "linear"),
            spec("head", "linear"),
        ]
    )


def test_linear_low_bits_by_hand() -> None:
    plan = vit_like_plan()
    before = plan.to_dict()
    assert LinearLowBits().allocate(plan) == {
        "patch_embed": (16, 16),
        "qkv": (4, 16),
        "attn.matmul_qk": (16, 16),  # both operands are activations: a_bits each
        "fc": (4, 16),
        "head": (4, 16),
    }
    assert plan.to_dict() == before  # allocate must not change the plan
    assert LinearLowBits(linear_bits=2, other_bits=None, a_bits=8).allocate(plan) == {
        "patch_embed": (None, 8),
        "qkv": (2, 8),
        "attn.matmul_qk": (8, 8),
        "fc": (2, 8),
        "head": (2, 8),
    }


def test_linear_low_bits_leaves_pinned_layers_out() -> None:
    plan = vit_like_plan()
    assert pin_layers(plan, first_last_bits=8) == ["patch_embed", "head"]
    assert LinearLowBits().allocate(plan) == {"qkv": (4, 16), "attn.matmul_qk": (16, 16), "fc": (4, 16)}


def test_linear_low_bits_energy_sits_between_the_uniform_settings() -> None:
    # 16 is an accepted width of the energy model: with Linear weights at 4 bits the plan must cost more than
    # uniform W4A16 and less than uniform W16A16 (the convolution and the matmul are at 16 in both).
    model = HorowitzEnergyModel()
    costs = {}
    for name, bits in {"mixed": None, "W4A16": (4, 16), "W16A16": (16, 16)}.items():
        plan = vit_like_plan()
        if bits is None:
            plan.set_bits(LinearLowBits().allocate(plan))
        else:
            plan.set_bits({n: (bits[0] if s.kind != "matmul" else 16, bits[1]) for n, s in plan.specs.items()})
        costs[name] = plan_energy(plan, model).total_pj
    assert costs["W4A16"] < costs["mixed"] < costs["W16A16"]


def test_linear_low_bits_refuses_a_model_without_linear_layers() -> None:
    plan = QuantPlan([spec("c1", "conv2d"), spec("c2", "conv2d")])
    with pytest.raises(ValueError, match="no Linear layer"):
        LinearLowBits().check_plan(plan)
    LinearLowBits().check_plan(vit_like_plan())  # fine with Linear layers


def test_variance_mixed_median_by_hand() -> None:
    # variances 1, 2, 3, 4 over the four weight layers: the median is 2.5, so the two below it get 4 bits.
    plan = vit_like_plan()
    variances = {"patch_embed": 3.0, "qkv": 1.0, "fc": 4.0, "head": 2.0}
    assert VarianceMixed(variances=variances).allocate(plan) == {
        "patch_embed": (8, 8),
        "qkv": (4, 8),
        "attn.matmul_qk": (8, 8),
        "fc": (8, 8),
        "head": (4, 8),
    }
    # The 25 % quantile of 1..4 (linear interpolation) is 1.75: only the variance-1 layer is below it.
    low = VarianceMixed(quantile=0.25, low_bits=3, high_bits=None, a_bits=None, variances=variances).allocate(plan)
    assert low == {
        "patch_embed": (None, None),
        "qkv": (3, None),
        "attn.matmul_qk": (None, None),
        "fc": (None, None),
        "head": (None, None),
    }


def test_variance_mixed_threshold_ignores_pinned_layers() -> None:
    # patch_embed (variance 100) and head (variance 0.01) are pinned; over qkv=1, fc=3 the median is 2: qkv only.
    plan = vit_like_plan()
    pin_layers(plan, first_last_bits=8)
    policy = VarianceMixed(variances={"patch_embed": 100.0, "qkv": 1.0, "fc": 3.0, "head": 0.01})
    assert policy.allocate(plan) == {"qkv": (4, 8), "attn.matmul_qk": (8, 8), "fc": (8, 8)}


class TwoLayers(nn.Module):
    """A convolution and a Linear layer with weights whose variances are known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1))  # mean 2, variance 1
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 4.0]]))  # mean 1, variance (1+1+1+9)/4 = 3
            self.fc.bias.fill_(100.0)  # biases do not count


def two_layer_plan() -> QuantPlan:
    return QuantPlan(
        [
            LayerSpec("conv", "conv2d", 2, 2, 1, 2, weight_shape=(2, 1, 1, 1)),
            LayerSpec("fc", "linear", 4, 4, 2, 2, weight_shape=(2, 2)),
        ]
    )


def test_weight_variances_are_population_variances() -> None:
    variances = weight_variances(TwoLayers(), two_layer_plan())
    assert variances == pytest.approx({"conv": 1.0, "fc": 3.0})


def test_variance_mixed_observes_the_model() -> None:
    policy = VarianceMixed()
    assert policy.requires_weights
    with pytest.raises(ValueError, match="no weight variances"):
        policy.allocate(two_layer_plan())
    policy.observe(TwoLayers(), two_layer_plan())
    # median of {1, 3} is 2: the convolution (variance 1) gets 4 bits, the Linear layer (3) 8.
    assert policy.allocate(two_layer_plan()) == {"conv": (4, 8), "fc": (8, 8)}


def test_weight_variances_name_a_missing_module() -> None:
    plan = QuantPlan([LayerSpec("missing", "linear", 4, 4, 2, 2, weight_shape=(2, 2))])
    with pytest.raises(ValueError, match="'missing'"):
        weight_variances(TwoLayers(), plan)


def test_variance_mixed_names_layers_without_a_variance() -> None:
    with pytest.raises(ValueError, match="no weight variance for layers \\['fc'\\]"):
        VarianceMixed(variances={"conv": 1.0}).allocate(two_layer_plan())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: VarianceMixed(quantile=1.0), "quantile"),
        (lambda: VarianceMixed(quantile=0.0), "quantile"),
        (lambda: VarianceMixed(low_bits=None), "low_bits"),
        (lambda: VarianceMixed(high_bits=1), "high_bits"),
        (lambda: VarianceMixed(variances={"a": -1.0}), "non-negative"),
        (lambda: LinearLowBits(linear_bits=9), "linear_bits"),
        (lambda: LinearLowBits(other_bits=32), "other_bits"),
        (lambda: LinearLowBits(a_bits=1), "a_bits"),
    ],
)
def test_bad_arguments_are_refused_with_their_name(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_descriptions() -> None:
    assert LinearLowBits().describe() == "LinearLowBits(linear W4, other W16, A16)"
    assert LinearLowBits(other_bits=None, a_bits=None).describe() == "LinearLowBits(linear W4, other WFP, AFP)"
    assert VarianceMixed().describe() == "VarianceMixed(var<q0.5: W4, else W8, A8)"


def test_constructed_from_a_lightning_cli_style_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--policy", type=Policy)
    for config, kind in [
        ({"class_path": "lit_mpq.allocation.LinearLowBits", "init_args": {"linear_bits": 4, "other_bits": 8}}, 8),
        ({"class_path": "lit_mpq.allocation.VarianceMixed", "init_args": {"quantile": 0.3, "high_bits": 6}}, 6),
    ]:
        policy = parser.instantiate_classes(parser.parse_object({"policy": config})).policy
        assert isinstance(policy, (LinearLowBits, VarianceMixed))
        assert (policy.other_bits if isinstance(policy, LinearLowBits) else policy.high_bits) == kind
