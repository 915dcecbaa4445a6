"""ExactAllocation on a hand-made plan, against brute force over every (w, a) combination of every layer.

The reference enumerates all allocations and prices each one with the plan's own accounting (``plan_energy``,
``QuantPlan.weight_size_mb``, ``bit_ops``, ``average_weight_bits``, ``average_act_bits``) after ``plan.set_bits``,
so it shares no code with the policy's constraint construction.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re

import numpy as np
import pytest

import lit_mpq.allocation
from lit_mpq.allocation import ExactAllocation, Policy
from lit_mpq.allocation.solver import InfeasibleBudgetError
from lit_mpq.energy import HorowitzEnergyModel, plan_energy, uniform_energy
from lit_mpq.plan import LayerPlan, LayerSpec, QuantPlan

ALL_BITS = [2, 3, 4, 6, 8]
W_CANDIDATES = [2, 4, 8]
A_CANDIDATES = [4, 8]
SPECS = [
    LayerSpec(name="conv1", kind="conv2d", params=432, macs=442_368, act_in=3_072, act_out=16_384),
    LayerSpec(name="conv2", kind="conv2d", params=9_216, macs=2_359_296, act_in=16_384, act_out=8_192),
    LayerSpec(name="conv3", kind="conv2d", params=36_864, macs=2_359_296, act_in=8_192, act_out=4_096),
    LayerSpec(name="conv4", kind="conv2d", params=147_456, macs=2_359_296, act_in=4_096, act_out=2_048),
    LayerSpec(name="fc", kind="linear", params=5_120, macs=5_120, act_in=512, act_out=10),
]
NAMES = [spec.name for spec in SPECS]
PJ_PER_UJ = 1e6


def make_plan(
    probed: list[int] = ALL_BITS, pinned: dict[str, tuple[int | None, int | None]] | None = None
) -> QuantPlan:
    """Five layers; sensitivities fall by about 4x per extra bit, with a random scale per layer and kind."""
    rng = np.random.default_rng(42)
    layers = {}
    for name in NAMES:
        w_scale, a_scale = rng.uniform(0.1, 10.0, size=2)
        sens = {
            "w": {b: float(w_scale * 4.0 ** (-b) * rng.uniform(0.8, 1.2)) for b in probed},
            "a": {b: float(a_scale * 4.0 ** (-b) * rng.uniform(0.8, 1.2)) for b in probed},
        }
        layers[name] = LayerPlan(sensitivity=sens)
    for name, (w_bits, a_bits) in (pinned or {}).items():
        layers[name].w_bits, layers[name].a_bits, layers[name].pinned = w_bits, a_bits, True
    return QuantPlan(SPECS, layers)


def objective(plan: QuantPlan, allocation: dict[str, tuple[int, int]], act_weight: float = 1.0) -> float:
    return sum(
        plan[name].sensitivity["w"][w] + act_weight * plan[name].sensitivity["a"][a]
        for name, (w, a) in allocation.items()
    )


def metrics(plan: QuantPlan, allocation: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Every budgeted quantity of the plan with ``allocation`` applied, from the plan's own accounting."""
    trial = copy.deepcopy(plan)
    trial.set_bits(allocation)
    return {
        "energy": plan_energy(trial, HorowitzEnergyModel()).total_pj / PJ_PER_UJ,
        "size": trial.weight_size_mb(),
        "bit_ops": trial.bit_ops() / 1e9,
        "avg_weight_bits": trial.average_weight_bits(),
        "avg_act_bits": trial.average_act_bits(),
    }


def enumerate_all(plan: QuantPlan) -> list[tuple[dict[str, tuple[int, int]], float, dict[str, float]]]:
    """Every allocation of the non-pinned layers with its objective and metrics (6^5 = 7776 for the full plan)."""
    free = [name for name in plan if not plan[name].pinned]
    options = list(itertools.product(W_CANDIDATES, A_CANDIDATES))
    rows = []
    for combo in itertools.product(options, repeat=len(free)):
        allocation = dict(zip(free, combo, strict=True))
        rows.append((allocation, objective(plan, allocation), metrics(plan, allocation)))
    return rows


@pytest.fixture(scope="module")
def table() -> list[tuple[dict[str, tuple[int, int]], float, dict[str, float]]]:
    return enumerate_all(make_plan())


def brute_force(rows, **budgets: float) -> float:
    """Best objective among the allocations that meet every budget (to 1e-9 relative), or NaN if none does."""
    feasible = [obj for _, obj, m in rows if all(m[key] <= limit * (1 + 1e-9) for key, limit in budgets.items())]
    return min(feasible) if feasible else math.nan


def solve(policy: ExactAllocation, plan: QuantPlan) -> tuple[dict[str, tuple[int, int]], float, dict[str, float]]:
    allocation = policy.allocate(plan)
    return allocation, objective(plan, allocation, policy.act_weight), metrics(plan, allocation)


def exact(**kwargs) -> ExactAllocation:
    return ExactAllocation(w_candidates=W_CANDIDATES, a_candidates=A_CANDIDATES, **kwargs)


# ------------------------------------------------------------------------------------------------ budgets
def test_energy_relative_to_w4a4_is_met_and_optimal(table) -> None:
    plan = make_plan()
    before = plan.to_dict()
    budget = uniform_energy(plan, HorowitzEnergyModel(), 4, 4).total_pj / PJ_PER_UJ
    policy = exact(energy_relative_to="W4A4", energy_ratio=1.0)
    allocation, obj, used = solve(policy, plan)
    assert plan.to_dict() == before  # allocate must not change the plan
    assert list(allocation) == NAMES
    assert used["energy"] <= budget * (1 + 1e-9)
    assert obj == pytest.approx(brute_force(table, energy=budget), rel=1e-9)
    # Mixed precision beats (or ties) the uniform W4A4 it is budgeted against.
    assert obj <= objective(plan, dict.fromkeys(NAMES, (4, 4))) + 1e-12
    info = policy.last_solution_info
    assert info["objective"] == pytest.approx(obj, rel=1e-12)
    assert info["budgets"]["energy"]["budget"] == pytest.approx(budget, rel=1e-12)
    assert info["budgets"]["energy"]["used"] == pytest.approx(used["energy"], rel=1e-9)
    assert info["budgets"]["energy"]["unit"] == "µJ/image"
    assert info["solve_seconds"] >= 0 and info["layers"] == 5 and info["options_per_layer"] == 6


def test_looser_energy_budget_never_gives_a_higher_objective(table) -> None:
    plan = make_plan()
    values = []
    for ratio in np.linspace(0.7, 2.0, 14):
        _, obj, _ = solve(exact(energy_relative_to="W4A4", energy_ratio=float(ratio)), plan)
        values.append(obj)
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(values))
    assert values[-1] < values[0]


def test_absolute_energy_budget(table) -> None:
    plan = make_plan()
    budget = 0.5 * (min(m["energy"] for _, _, m in table) + max(m["energy"] for _, _, m in table))
    _, obj, used = solve(exact(energy_uj=budget), plan)
    assert used["energy"] <= budget * (1 + 1e-9)
    assert obj == pytest.approx(brute_force(table, energy=budget), rel=1e-9)


@pytest.mark.parametrize(
    ("option", "key", "value"),
    [
        ("size_mb", "size", 0.06),
        ("bit_ops_g", "bit_ops", 0.2),
        ("avg_weight_bits", "avg_weight_bits", 3.5),
        ("avg_act_bits", "avg_act_bits", 5.0),
    ],
)
def test_single_budgets_are_met_and_optimal(table, option: str, key: str, value: float) -> None:
    plan = make_plan()
    policy = exact(**{option: value})
    _, obj, used = solve(policy, plan)
    assert used[key] <= value * (1 + 1e-9)
    reference = brute_force(table, **{key: value})
    assert not math.isnan(reference)
    assert obj == pytest.approx(reference, rel=1e-9)
    assert policy.last_solution_info["budgets"][key]["used"] == pytest.approx(used[key], rel=1e-9)


def test_two_budgets_at_once(table) -> None:
    plan = make_plan()
    energy = uniform_energy(plan, HorowitzEnergyModel(), 4, 8).total_pj / PJ_PER_UJ
    size = 0.05
    _, obj, used = solve(exact(energy_relative_to="W4A8", size_mb=size), plan)
    assert used["energy"] <= energy * (1 + 1e-9) and used["size"] <= size * (1 + 1e-9)
    both = brute_force(table, energy=energy, size=size)
    assert obj == pytest.approx(both, rel=1e-9)
    # The second budget binds: with the energy budget alone the optimum is strictly better.
    assert brute_force(table, energy=energy) < both - 1e-12


def test_act_weight_zero_ignores_activation_sensitivity_and_needs_none() -> None:
    plan = make_plan()
    for name in NAMES:
        del plan[name].sensitivity["a"]
    allocation = exact(act_weight=0.0, avg_weight_bits=8.0, avg_act_bits=8.0).allocate(plan)
    # Without a cost for activation bits the cheapest-unconstrained choice is the most accurate weights.
    assert {w for w, _ in allocation.values()} == {8}


def test_default_energy_model_is_horowitz_and_a_given_one_is_used() -> None:
    plan = make_plan()
    macs_only = HorowitzEnergyModel(dram_pj_per_bit=0.0)  # memory is free: only w_bits * a_bits per MAC matters
    policy = exact(energy_relative_to="W4A4")
    allocation = policy.allocate(plan, macs_only)
    trial = copy.deepcopy(plan)
    trial.set_bits(allocation)
    budget = uniform_energy(plan, macs_only, 4, 4).total_pj
    assert plan_energy(trial, macs_only).total_pj <= budget * (1 + 1e-9)
    assert policy.last_solution_info["budgets"]["energy"]["budget"] == pytest.approx(budget / PJ_PER_UJ)
    default = policy.allocate(plan)
    assert policy.last_solution_info["budgets"]["energy"]["budget"] == pytest.approx(
        uniform_energy(plan, HorowitzEnergyModel(), 4, 4).total_pj / PJ_PER_UJ
    )
    assert default == policy.allocate(plan, HorowitzEnergyModel()) != allocation


# ------------------------------------------------------------------------------------------------ pinned layers
def test_pinned_layers_are_untouched_and_counted() -> None:
    pins = {"conv1": (8, 8), "fc": (None, None)}  # first layer at 8 bits, last in FP32
    plan = make_plan(pinned=pins)
    rows = enumerate_all(plan)  # 6^3 allocations of the three free layers, pinned ones priced by set_bits
    budget = 0.5 * (min(m["energy"] for _, _, m in rows) + max(m["energy"] for _, _, m in rows))
    policy = exact(energy_uj=budget, size_mb=0.1)
    allocation, obj, used = solve(policy, plan)
    assert set(allocation) == {"conv2", "conv3", "conv4"}
    assert plan.bits()["conv1"] == (8, 8) and plan.bits()["fc"] == (None, None)
    assert used["energy"] <= budget * (1 + 1e-9) and used["size"] <= 0.1 * (1 + 1e-9)
    assert obj == pytest.approx(brute_force(rows, energy=budget, size=0.1), rel=1e-9)
    assert policy.last_solution_info["budgets"]["energy"]["used"] == pytest.approx(used["energy"], rel=1e-9)


def test_pinned_cost_alone_over_budget_is_infeasible() -> None:
    plan = make_plan(pinned={"conv4": (8, 8)})
    pinned_mb = 147_456 * 8 / 8 / 1e6
    smallest = pinned_mb + sum(spec.params * 2 for spec in SPECS if spec.name != "conv4") / 8 / 1e6
    assert smallest == 0.160364  # 0.147456 + (432 + 9216 + 36864 + 5120) * 2 / 8e6, exact at six digits
    with pytest.raises(InfeasibleBudgetError) as info:
        exact(size_mb=0.1).allocate(plan)
    assert "smallest achievable size_mb=0.160364 MB, requested size_mb=0.1 MB" in str(info.value)


def test_all_layers_pinned_gives_an_empty_allocation() -> None:
    plan = make_plan(pinned=dict.fromkeys(NAMES, (4, 4)))
    assert exact(energy_relative_to="W4A4").allocate(plan) == {}


# ------------------------------------------------------------------------------------------------ errors
def test_infeasible_budget_message(table) -> None:
    plan = make_plan()
    smallest = min(m["energy"] for _, _, m in table)  # every layer at W2A4 (all Horowitz terms grow with bits)
    budget = 0.5 * uniform_energy(plan, HorowitzEnergyModel(), 4, 4).total_pj / PJ_PER_UJ
    assert budget < smallest
    with pytest.raises(InfeasibleBudgetError) as info:
        exact(energy_relative_to="W4A4", energy_ratio=0.5).allocate(plan)
    message = str(info.value)
    assert message.startswith("ExactAllocation(energy<=0.50xW4A4) over 5 free layers: no choice meets every budget")
    # A budget set as a ratio is answered as a ratio, with the energy beside it.
    reference = 2 * budget
    shown = re.search(r"smallest achievable energy_ratio=([0-9.]+) \(([0-9.]+) µJ/image\)", message)
    assert shown is not None, message
    assert float(shown.group(1)) == pytest.approx(smallest / reference, abs=1e-4)
    assert float(shown.group(2)) == pytest.approx(smallest, rel=1e-5)
    assert f"requested energy_ratio=0.5 ({budget:.6g} µJ/image)" in message
    assert isinstance(info.value, ValueError)


def test_infeasible_bit_ops_with_a_feasible_second_budget() -> None:
    # Every budget here grows with the bit widths, so the all-lowest allocation is the smallest for all of them at
    # once: budgets that are feasible one by one are feasible together (the solver tests cover the joint case).
    with pytest.raises(InfeasibleBudgetError) as info:
        exact(avg_weight_bits=2.0, bit_ops_g=0.05).allocate(make_plan())
    message = str(info.value)
    assert "bit_ops: smallest achievable bit_ops_g=" in message and "G bit-ops/image (infeasible on its own)" in message
    assert "avg_weight_bits: smallest achievable avg_weight_bits=2 bits, requested avg_weight_bits=2 bits " in message
    assert "(feasible on its own)" in message


def test_missing_sensitivity_names_layer_kind_and_bits() -> None:
    plan = make_plan(probed=[4, 6, 8])
    with pytest.raises(ValueError, match=r"layer 'conv1' has no 'w' sensitivity for bits \[2, 3\]") as info:
        ExactAllocation(w_candidates=[2, 3, 4, 6, 8], energy_relative_to="W4A4").allocate(plan)
    assert "SensitivityProbe.candidate_bits" in str(info.value) and "4 more layers" in str(info.value)
    with pytest.raises(ValueError, match=r"'a' sensitivity for bits \[2\]"):
        ExactAllocation(w_candidates=[4, 8], a_candidates=[2, 8], size_mb=1.0).allocate(plan)
    empty = QuantPlan(SPECS)
    with pytest.raises(ValueError, match="add a SensitivityProbe"):
        exact(size_mb=1.0).allocate(empty)


def shown_minimum(message: str, option: str) -> str:
    """The smallest achievable value the message gives for ``option``, as written."""
    found = re.search(rf"smallest achievable {option}=([0-9.e+-]+)", message)
    assert found is not None, message
    return found.group(1)


def one_digit_less(text: str) -> float:
    """``text`` minus one unit in its last significant digit (``"0.5682"`` -> 0.5681)."""
    digits = len(text.replace(".", "").lstrip("0"))
    exponent = math.floor(math.log10(float(text)))
    return float(text) - 10.0 ** (exponent - digits + 1)


def test_infeasible_ratio_budget_is_answered_with_a_ratio_that_can_be_copied_back(table) -> None:
    plan = make_plan()
    reference = uniform_energy(plan, HorowitzEnergyModel(), 4, 4).total_pj / PJ_PER_UJ
    lowest = min(m["energy"] for _, _, m in table) / reference  # 0.568121...: 4 digits to the nearest would be 0.5681
    assert float(f"{lowest:.4g}") < lowest
    with pytest.raises(InfeasibleBudgetError) as info:
        exact(energy_relative_to="W4A4", energy_ratio=0.5).allocate(plan)
    shown = shown_minimum(str(info.value), "energy_ratio")
    assert shown == "0.5682"
    # Copied back, the shown minimum is feasible (and the lowest-energy allocation is the only choice there) ...
    _, obj, used = solve(exact(energy_relative_to="W4A4", energy_ratio=float(shown)), plan)
    assert used["energy"] <= float(shown) * reference * (1 + 1e-9)
    assert obj == pytest.approx(brute_force(table, energy=float(shown) * reference), rel=1e-9)
    # ... and it is tight: one unit less in its last digit is not.
    with pytest.raises(InfeasibleBudgetError):
        exact(energy_relative_to="W4A4", energy_ratio=one_digit_less(shown)).allocate(plan)


def test_infeasible_absolute_budget_shows_a_minimum_that_can_be_copied_back(table) -> None:
    plan = make_plan()
    lowest = min(m["bit_ops"] for _, _, m in table)  # 0.060203008 G: six digits to the nearest would be 0.060203
    assert float(f"{lowest:.6g}") < lowest
    with pytest.raises(InfeasibleBudgetError) as info:
        exact(bit_ops_g=0.05).allocate(plan)
    shown = shown_minimum(str(info.value), "bit_ops_g")
    assert shown == "0.0602031"
    _, _, used = solve(exact(bit_ops_g=float(shown)), plan)
    assert used["bit_ops"] == pytest.approx(lowest, rel=1e-12)
    with pytest.raises(InfeasibleBudgetError):
        exact(bit_ops_g=one_digit_less(shown)).allocate(plan)


def test_a_weights_only_probe_is_named_with_its_fix(table) -> None:
    plan = make_plan()
    for name in NAMES:
        del plan[name].sensitivity["a"]  # SensitivityProbe(kinds=["w"])
    with pytest.raises(ValueError) as info:
        exact(size_mb=1.0).allocate(plan)
    message = str(info.value)
    assert "layer 'conv1' has no activation ('a') sensitivity (4 more layers likewise)" in message
    assert "measured only weights" in message and "SensitivityProbe.kinds" in message
    assert "ExactAllocation.a_candidates a single value" in message
    assert "add a SensitivityProbe" not in message
    # The fix it names works: with one activation width the weights are ranked alone, optimally.
    size = 0.06
    allocation = ExactAllocation(w_candidates=W_CANDIDATES, a_candidates=[8], size_mb=size).allocate(plan)
    assert {a for _, a in allocation.values()} == {8}
    weights_only = [
        (alloc, sum(plan[n].sensitivity["w"][w] for n, (w, _) in alloc.items()), m)
        for alloc, _, m in table
        if all(a == 8 for _, a in alloc.values())
    ]
    best = brute_force(weights_only, size=size)
    assert sum(plan[n].sensitivity["w"][w] for n, (w, _) in allocation.items()) == pytest.approx(best, rel=1e-9)


def test_an_activations_only_probe_is_named_with_its_fix() -> None:
    plan = make_plan()
    for name in NAMES:
        del plan[name].sensitivity["w"]  # SensitivityProbe(kinds=["a"])
    with pytest.raises(ValueError) as info:
        exact(size_mb=1.0).allocate(plan)
    message = str(info.value)
    assert "has no weight ('w') sensitivity" in message and "measured only activations" in message
    assert "'w' to SensitivityProbe.kinds" in message and "ExactAllocation.w_candidates a single value" in message
    allocation = ExactAllocation(w_candidates=[8], a_candidates=A_CANDIDATES, avg_act_bits=8.0).allocate(plan)
    assert allocation == dict.fromkeys(NAMES, (8, 8))  # activations ranked alone; no budget binds


def test_candidate_errors_do_not_advise_null() -> None:
    for bad in ([4, 9], [None, 8], [], [4, 8.0]):
        with pytest.raises(ValueError) as info:
            ExactAllocation(w_candidates=bad, size_mb=1.0)
        assert "or null" not in str(info.value) and "ExactAllocation.w_candidates" in str(info.value)
    with pytest.raises(ValueError, match=r"RandomAllocation.a_candidates=\[3, 1\] lists 1"):
        lit_mpq.allocation.RandomAllocation(a_candidates=[3, 1], size_mb=1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "at least one budget.*energy_uj.*energy_relative_to.*size_mb.*bit_ops_g.*avg_weight_bits.*avg_act_bits"),
        ({"energy_uj": 10.0, "energy_relative_to": "W4A4"}, "either energy_uj .* or energy_relative_to"),
        ({"energy_relative_to": "W4X4"}, r"'W4X4' is not a uniform setting.*W<weight bits>A<activation bits>"),
        ({"energy_relative_to": "W5A9"}, "not supported"),
        ({"energy_relative_to": "W4A4", "energy_ratio": 0.0}, "energy_ratio=0.0 must be a finite positive number$"),
        ({"energy_relative_to": "W4A4", "energy_ratio": None}, "energy_ratio=None must be a finite positive number$"),
        ({"energy_ratio": 0.8, "size_mb": 1.0}, "energy_ratio=0.8 needs energy_relative_to"),
        ({"size_mb": -1.0}, "size_mb=-1.0 must be a finite positive"),
        ({"bit_ops_g": math.inf}, "bit_ops_g=inf"),
        ({"size_mb": 1.0, "w_candidates": []}, "w_candidates must list at least one"),
        ({"size_mb": 1.0, "w_candidates": [4, 9]}, r"ExactAllocation.w_candidates=\[4, 9\] lists 9, which is not"),
        ({"size_mb": 1.0, "a_candidates": [None, 8]}, "lists null, but FP32 is not a candidate"),
        ({"size_mb": 1.0, "a_candidates": 8}, "must be a list of bit widths"),
        ({"size_mb": 1.0, "act_weight": -1.0}, "act_weight=-1.0"),
    ],
)
def test_argument_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ExactAllocation(**kwargs)


def test_uniform_setting_parsing_and_describe() -> None:
    policy = ExactAllocation(energy_relative_to="w8a4", energy_ratio=0.75, size_mb=2.0)
    assert policy.reference_bits == (8, 4)
    assert policy.describe() == "ExactAllocation(energy<=0.75xW8A4, size<=2 MB)"
    assert ExactAllocation(energy_relative_to="W4A4").describe() == "ExactAllocation(energy<=1.00xW4A4)"
    assert ExactAllocation(energy_relative_to="WFPAFP").reference_bits == (None, None)
    assert ExactAllocation(w_candidates=[8, 4, 4], a_candidates=[8], bit_ops_g=1.0).w_candidates == [4, 8]
    assert (
        ExactAllocation(bit_ops_g=1.5, avg_act_bits=6.0).describe() == "ExactAllocation(bit_ops<=1.5 G, avg_a_bits<=6)"
    )
    described = ExactAllocation(energy_uj=12.5, avg_weight_bits=4).describe()
    assert described == "ExactAllocation(energy<=12.5 µJ/image, avg_w_bits<=4)"
    assert ExactAllocation.requires_sensitivity and not ExactAllocation.overrides_pins
    assert "ExactAllocation" in lit_mpq.allocation.__all__


def test_constructed_from_a_lightning_cli_style_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--policy", type=Policy)
    config = {
        "class_path": "lit_mpq.allocation.ExactAllocation",
        "init_args": {"energy_relative_to": "W4A4", "energy_ratio": 0.9, "size_mb": 0.5, "w_candidates": [4, 8]},
    }
    policy = parser.instantiate_classes(parser.parse_args(["--policy", json.dumps(config)])).policy
    assert isinstance(policy, ExactAllocation)
    assert policy.energy_ratio == 0.9 and policy.size_mb == 0.5 and policy.w_candidates == [4, 8]
    assert policy.a_candidates == [4, 6, 8]  # the default, visible to jsonargparse
    minimal = {"class_path": "lit_mpq.allocation.ExactAllocation", "init_args": {"energy_relative_to": "W4A4"}}
    assert isinstance(
        parser.instantiate_classes(parser.parse_args(["--policy", json.dumps(minimal)])).policy, ExactAllocation
    )


# ------------------------------------------------------------------------------------------------ stdout
def synthetic_plan(num_layers: int, seed: int) -> QuantPlan:
    """The plan of ``benchmarks/solver_speed.py``: random conv layers, all five w and three a bit widths probed."""
    rng = np.random.default_rng(seed)
    specs, layers = [], {}
    for i in range(num_layers):
        c_in, c_out = (int(c) for c in rng.choice([16, 32, 64, 128, 256, 512], size=2))
        kernel = int(rng.choice([1, 3]))
        side = int(rng.choice([7, 14, 28, 56]))
        params = c_in * c_out * kernel * kernel
        name = f"layer{i:02d}"
        specs.append(LayerSpec(name, "conv2d", params, params * side * side, c_in * side * side, c_out * side * side))
        w_scale, a_scale = 10.0 ** rng.uniform(-2, 1, size=2)
        sens = {
            "w": {b: float(w_scale * 4.0 ** (-b) * rng.uniform(0.7, 1.3)) for b in ALL_BITS},
            "a": {b: float(a_scale * 4.0 ** (-b) * rng.uniform(0.7, 1.3)) for b in [4, 6, 8]},
        }
        layers[name] = LayerPlan(sensitivity=sens)
    return QuantPlan(specs, layers)


def test_the_solver_leaves_the_process_stdout_alone(monkeypatch) -> None:
    # This instance makes HiGHS 1.12 repair an incumbent, the case a redirect of file descriptor 1 used to hide; the
    # solver must not touch the process's stdout (other threads write there too).
    import os

    calls = []
    plan = synthetic_plan(10, 2)
    size = 0.5 * sum(spec.params * 10 for spec, _ in plan.items()) / 8 / 1e6
    policy = ExactAllocation(energy_relative_to="W8A8", energy_ratio=0.4591838966647891, size_mb=size)
    with monkeypatch.context() as patch:
        for name in ("dup", "dup2"):
            real = getattr(os, name)
            patch.setattr(os, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
        allocation = policy.allocate(plan)
    assert len(allocation) == 10
    assert calls == []
