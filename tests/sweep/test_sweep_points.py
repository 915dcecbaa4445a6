"""lit_mpq.sweep.points: the sweep's settings, budgets and points, on a hand-made plan (no Trainer)."""

from __future__ import annotations

import itertools

import pytest

from lit_mpq.allocation import ExactAllocation, RandomAllocation, SensitivityPercentile, Uniform
from lit_mpq.energy import HorowitzEnergyModel, plan_energy, uniform_energy
from lit_mpq.plan import LayerPlan, LayerSpec, QuantPlan
from lit_mpq.sweep import SweepSettings, budget_ratios, energy_span, sweep_points

SPECS = [
    LayerSpec(name="stem", kind="conv2d", params=432, macs=442368, act_in=3072, act_out=16384),
    LayerSpec(name="body", kind="conv2d", params=2304, macs=2359296, act_in=16384, act_out=16384),
    LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10),
]


def make_plan(pinned_stem: bool = False) -> QuantPlan:
    layers = {spec.name: LayerPlan(w_bits=8, a_bits=8) for spec in SPECS}
    layers["stem"].pinned = pinned_stem
    return QuantPlan(SPECS, layers)


def test_energy_span_is_the_cheapest_and_dearest_allocation_by_brute_force():
    model = HorowitzEnergyModel()
    plan = make_plan(pinned_stem=True)
    bits = [(w, a) for w in (2, 4, 8) for a in (4, 8)]
    totals = []
    for choice in itertools.product(bits, repeat=2):  # the pinned stem keeps W8A8
        trial = make_plan(pinned_stem=True)
        trial.set_bits({"body": choice[0], "fc": choice[1]})
        totals.append(plan_energy(trial, model).total_pj / 1e6)
    low, high = energy_span(plan, model, [2, 4, 8], [4, 8])
    assert low == pytest.approx(min(totals), rel=1e-12) and high == pytest.approx(max(totals), rel=1e-12)


def test_spread_budgets_run_from_the_cheapest_to_the_dearest_allocation():
    model = HorowitzEnergyModel()
    plan = make_plan()
    settings = SweepSettings(num_budgets=5, relative_to="W6A6")
    ratios = budget_ratios(plan, model, settings, [4, 6, 8], [4, 6, 8])
    unit = uniform_energy(plan, model, 6, 6).total_pj / 1e6
    low, high = energy_span(plan, model, [4, 6, 8], [4, 6, 8])
    assert len(ratios) == 5 and ratios == sorted(ratios)
    assert ratios[0] * unit == pytest.approx(low) and ratios[-1] * unit == pytest.approx(high)
    # One budget: the cheapest allocation, here in units of uniform W4A4 (the default).
    (ratio,) = budget_ratios(plan, model, SweepSettings(num_budgets=1), [4, 8], [4, 8])
    assert ratio * uniform_energy(plan, model, 4, 4).total_pj / 1e6 == pytest.approx(
        energy_span(plan, model, [4, 8], [4, 8])[0]
    )
    assert budget_ratios(plan, model, SweepSettings(budgets=[1.2, 0.8]), [4], [4]) == [1.2, 0.8]


def test_points_in_order_with_unique_names_and_the_candidates():
    settings = SweepSettings(num_budgets=2, baselines=["w8a8", "W4A4"], num_random=2, w_candidates=[8, 4])
    points = sweep_points(settings, make_plan(), HorowitzEnergyModel(), probe_bits=[4, 6, 8])
    assert [p.name for p in points] == [
        "budget_00",
        "budget_01",
        "uniform_W8A8",
        "uniform_W4A4",
        "seed_rule",
        "random_0",
        "random_1",
    ]
    assert [p.kind for p in points] == ["budget", "budget", "uniform", "uniform", "seed_rule", "random", "random"]
    budget = points[0].policy
    assert isinstance(budget, ExactAllocation) and budget.energy_ratio == points[0].budget_ratio
    assert budget.w_candidates == [4, 8] and budget.a_candidates == [4, 6, 8]  # a: the probe's
    assert isinstance(points[2].policy, Uniform) and (points[2].policy.w_bits, points[2].policy.a_bits) == (8, 8)
    assert isinstance(points[4].policy, SensitivityPercentile)
    assert isinstance(points[6].policy, RandomAllocation) and points[6].policy.seed == 1
    assert points[6].budget_ratio == 1.0 and points[2].budget_ratio is None
    assert settings.expected_points == 1 + len(points)


def test_the_config_allocators_candidates_are_the_default_and_options_override_them():
    plan, model = make_plan(), HorowitzEnergyModel()
    config = ([2, 4, 8], [4, 8])  # an energy config that keeps activations at 4 bits or more
    points = sweep_points(SweepSettings(num_budgets=2, num_random=1), plan, model, [2, 4, 6, 8], config)
    budget, random = points[0].policy, points[-1].policy
    assert (budget.w_candidates, budget.a_candidates) == ([2, 4, 8], [4, 8])
    assert (random.w_candidates, random.a_candidates) == ([2, 4, 8], [4, 8])
    # The cheapest budget is the cheapest allocation within the config's candidates, not the probe's (A2 here).
    assert points[0].budget_ratio * uniform_energy(plan, model, 4, 4).total_pj / 1e6 == pytest.approx(
        energy_span(plan, model, [2, 4, 8], [4, 8])[0]
    )
    chosen = sweep_points(SweepSettings(num_budgets=1, a_candidates=[6, 8]), plan, model, [2, 4, 6, 8], config)
    assert (chosen[0].policy.w_candidates, chosen[0].policy.a_candidates) == ([2, 4, 8], [6, 8])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budgets": [0.8, 0.0]}, "must be positive"),
        ({"budgets": [float("nan")]}, "must be positive"),
        ({"budgets": []}, "must be positive"),
        ({"num_budgets": 0}, "num_budgets must be a positive integer"),
        ({"num_random": -1}, "num_random must be a non-negative"),
        ({"relative_to": "4bit"}, "W<weight bits>A<activation bits>"),
        ({"baselines": ["W8A8", "w8a8"]}, "repeat"),
        ({"baselines": ["W8A9x"]}, "W<weight bits>A<activation bits>"),
        ({"w_candidates": []}, "at least one bit width"),
        ({"a_candidates": [None]}, "FP32"),
        ({"w_candidates": [1]}, "w_candidates"),
    ],
)
def test_bad_settings_are_refused_with_their_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SweepSettings(**kwargs)
