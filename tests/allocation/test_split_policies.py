"""The Asc / Desc weight splits against hand-made plans with the expected allocation worked out by hand."""

from __future__ import annotations

import json

import pytest

import lit_mpq.allocation
from lit_mpq.allocation import Ascending, Descending, Policy, WeightSplit, pin_layers
from lit_mpq.allocation.split import first_half
from lit_mpq.energy import HorowitzEnergyModel, plan_energy
from lit_mpq.plan import LayerSpec, QuantPlan
from lit_mpq.sweep import SweepSettings, sweep_points


def spec(name: str, params: int, kind: str = "conv2d") -> LayerSpec:
    """A row with ``params`` weights (a matmul has none and a right-hand operand instead)."""
    if kind == "matmul":
        return LayerSpec(name, "matmul", 0, 64, 16, 16, act_other=16)
    return LayerSpec(name, kind, params, 10 * params, 16, 16, weight_shape=(params,))


def make_plan() -> QuantPlan:
    """Stem and head pinned by ``first_last_bits=8``; a matmul in the middle; 1000 weights in the decided layers.

    Cumulative weights of the decided layers (the pinned stem's 5000 do not count): ``l1`` 0..200, ``l2`` 200..450,
    ``l3`` 450..850, ``l4`` 850..1000. Half of 1000 is 500: ``l1`` and ``l2`` lie wholly before it; ``l3`` straddles
    it with 50 of its weights before and 350 after, so it joins the second half with ``l4``.
    """
    specs = [
        spec("stem", 5000),
        spec("l1", 200),
        spec("l2", 250),
        spec("attn.matmul_qk", 0, kind="matmul"),
        spec("l3", 400, kind="linear"),
        spec("l4", 150, kind="linear"),
        spec("head", 70, kind="linear"),
    ]
    plan = QuantPlan(specs)
    assert pin_layers(plan, first_last_bits=8) == ["stem", "head"]
    return plan


def test_ascending_by_hand() -> None:
    plan = make_plan()
    before = plan.to_dict()
    assert Ascending().allocate(plan) == {
        "l1": (3, 8),
        "l2": (3, 8),
        "attn.matmul_qk": (8, 8),  # both operands are activations: a_bits for each
        "l3": (5, 8),  # straddles the half: 50 weights before, 350 after
        "l4": (5, 8),
    }
    assert plan.to_dict() == before  # allocate must not change the plan


def test_descending_by_hand() -> None:
    assert Descending(low_bits=4, high_bits=6, a_bits=6).allocate(make_plan()) == {
        "l1": (6, 6),
        "l2": (6, 6),
        "attn.matmul_qk": (6, 6),
        "l3": (4, 6),
        "l4": (4, 6),
    }


def test_applied_allocation_keeps_the_pins() -> None:
    plan = make_plan()
    plan.set_bits(Ascending(a_bits=None).allocate(plan))
    assert plan.bits() == {
        "stem": (8, 8),
        "l1": (3, None),
        "l2": (3, None),
        "attn.matmul_qk": (None, None),
        "l3": (5, None),
        "l4": (5, None),
        "head": (8, 8),
    }


def test_the_straddling_layer_goes_where_most_of_its_weights_are() -> None:
    # 1000 weights: "b" spans 200..600, 300 before the half and 100 after: first half.
    plan = QuantPlan([spec("a", 200), spec("b", 400), spec("c", 400)])
    assert first_half(plan) == {"a": True, "b": True, "c": False}
    assert Ascending().allocate(plan) == {"a": (3, 8), "b": (3, 8), "c": (5, 8)}
    assert Descending().allocate(plan) == {"a": (5, 8), "b": (5, 8), "c": (3, 8)}
    # 400 weights: "b" spans 100..300, exactly 100 on each side of 200: a tie goes to the first half.
    assert first_half(QuantPlan([spec("a", 100), spec("b", 200), spec("c", 100)])) == {"a": True, "b": True, "c": False}
    # One layer holds most of the weights: "big" spans 30..990, 470 before the half and 490 after: second half.
    plan = QuantPlan([spec("a", 30), spec("big", 960), spec("c", 10)])
    assert first_half(plan) == {"a": True, "big": False, "c": False}
    # A layer that ends exactly at the half is wholly in the first half, the next wholly in the second.
    assert first_half(QuantPlan([spec("a", 50), spec("b", 50)])) == {"a": True, "b": False}


def test_pinned_rows_do_not_count_towards_the_half() -> None:
    # Unpinned, the 5000-weight stem alone would be the first half and every other layer the second.
    plan = make_plan()
    for name in ("stem", "head"):
        plan[name].pinned = False
    assert first_half(plan) == {"stem": True, "l1": False, "l2": False, "l3": False, "l4": False, "head": False}
    assert first_half(make_plan()) == {"l1": True, "l2": True, "l3": False, "l4": False}


def test_plans_without_weight_layers() -> None:
    assert Ascending().allocate(QuantPlan([spec("qk", 0, kind="matmul")])) == {"qk": (8, 8)}
    plan = QuantPlan([spec("only", 10)])
    pin_layers(plan, first_last_bits=8)
    assert Descending().allocate(plan) == {}


def test_weight_split_with_an_order_is_the_named_policies() -> None:
    plan = make_plan()
    assert WeightSplit("asc").allocate(plan) == Ascending().allocate(plan)
    assert WeightSplit("desc", 2, 8, None).allocate(plan) == Descending(2, 8, None).allocate(plan)
    assert WeightSplit("desc").describe() == Descending().describe() == "Descending(W5->W3 by weight count, A8)"
    assert Ascending(a_bits=None).describe() == "Ascending(W3->W5 by weight count, AFP)"
    assert not Ascending.requires_sensitivity and not Ascending.overrides_pins
    assert {"Ascending", "Descending", "WeightSplit"} <= set(lit_mpq.allocation.__all__)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: WeightSplit(order="up"), r"WeightSplit.order='up' is unknown: choose one of \['asc', 'desc'\]"),
        (lambda: Ascending(low_bits=5, high_bits=3), "Ascending.low_bits=5 must be below high_bits=3"),
        (lambda: Descending(low_bits=4, high_bits=4), "Descending.low_bits=4 must be below high_bits=4"),
        (lambda: Ascending(low_bits=1), r"Ascending.low_bits=1 is not supported: use one of \[2, 3"),
        (lambda: Descending(high_bits=None), "Descending.high_bits=None is not supported"),
        (lambda: Ascending(high_bits=True), "Ascending.high_bits=True is not supported"),
        (lambda: Ascending(a_bits=9), "Ascending.a_bits=9 is not supported.*null"),
    ],
)
def test_bad_arguments_are_refused_with_their_name(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_constructed_from_a_lightning_cli_style_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--policy", type=Policy)
    config = {"class_path": "lit_mpq.allocation.Ascending", "init_args": {"low_bits": 3, "high_bits": 5, "a_bits": 8}}
    policy = parser.instantiate_classes(parser.parse_args(["--policy", json.dumps(config)])).policy
    assert isinstance(policy, Ascending) and (policy.low_bits, policy.high_bits, policy.a_bits) == (3, 5, 8)
    minimal = {"class_path": "lit_mpq.allocation.Descending"}
    policy = parser.instantiate_classes(parser.parse_args(["--policy", json.dumps(minimal)])).policy
    assert isinstance(policy, Descending) and policy.order == "desc"
    assert (policy.first_bits, policy.second_bits) == (5, 3)


# ------------------------------------------------------------------------------------------------------ sweep
def test_sweep_evaluates_the_splits_next_to_the_baselines() -> None:
    settings = SweepSettings(num_budgets=2, baselines=["W4A8"], splits=["asc", "Desc"], num_random=1)
    plan, model = make_plan(), HorowitzEnergyModel()
    points = sweep_points(settings, plan, model, probe_bits=[4, 6, 8])
    assert [(p.name, p.kind) for p in points] == [
        ("budget_00", "budget"),
        ("budget_01", "budget"),
        ("uniform_W4A8", "uniform"),
        ("seed_rule", "seed_rule"),
        ("split_asc", "split"),
        ("split_desc", "split"),
        ("random_0", "random"),
    ]
    assert settings.expected_points == 1 + len(points)
    asc, desc = points[4].policy, points[5].policy
    assert isinstance(asc, WeightSplit) and asc.allocate(plan) == Ascending().allocate(plan)
    assert isinstance(desc, WeightSplit) and desc.allocate(plan) == Descending().allocate(plan)
    assert points[4].budget_ratio is None
    # Priced like any other point: Asc and Desc hold the same weights at 3 and 5 bits, in opposite halves.
    energies = []
    for point in points[4:6]:
        trial = make_plan()
        trial.set_bits(point.policy.allocate(trial))
        energies.append(plan_energy(trial, model).total_pj)
    assert energies[0] != energies[1] and all(e > 0 for e in energies)


def test_sweep_split_widths_and_default() -> None:
    assert SweepSettings().splits == () and SweepSettings().split_bits == (3, 5)
    settings = SweepSettings(splits=["desc"], split_bits=[6, 4])
    (point,) = [p for p in sweep_points(settings, make_plan(), HorowitzEnergyModel(), [4, 8]) if p.kind == "split"]
    assert point.name == "split_desc" and point.policy.describe() == "Descending(W6->W4 by weight count, A8)"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"splits": ["up"]}, "splits must list each of"),
        ({"splits": ["asc", "ASC"]}, "at most once"),
        ({"split_bits": [4]}, "two different bit widths"),
        ({"split_bits": [4, 4]}, "two different bit widths"),
        ({"split_bits": [3, 5, 8]}, "two different bit widths"),
        ({"split_bits": [1, 5]}, "split_bits"),
    ],
)
def test_bad_split_settings_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SweepSettings(**kwargs)
