"""The MILP multiple-choice solver against brute-force enumeration on small random instances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import lit_mpq.allocation.solver as solver_module
from lit_mpq.allocation.solver import (
    Constraint,
    InfeasibleBudgetError,
    brute_force_multiple_choice,
    round_up,
    solve_multiple_choice,
)

VALUES = st.floats(min_value=0.0, max_value=100.0, allow_nan=False, allow_infinity=False)


def objective_of(objective: np.ndarray, choice: np.ndarray) -> float:
    return float(objective[np.arange(len(choice)), choice].sum())


def total_of(con: Constraint, choice: np.ndarray) -> float:
    return con.offset + float(np.asarray(con.coeffs)[np.arange(len(choice)), choice].sum())


def assert_meets(con: Constraint, choice: np.ndarray, available: np.ndarray) -> None:
    """Independent check of a budget: the total may exceed ``upper`` by at most 1e-9 of the quantities involved."""
    coeffs = np.where(available, np.asarray(con.coeffs), 0.0)
    scale = max(abs(con.upper), abs(con.offset) + float(np.abs(coeffs).max(axis=1).sum()))
    assert total_of(con, choice) <= con.upper + 1e-9 * scale, (con.name, total_of(con, choice), con.upper)


@st.composite
def instances(draw: st.DrawFn) -> tuple[np.ndarray, list[Constraint]]:
    """Random instance: L <= 6 layers, K <= 5 options, some options unavailable, 1-3 budgets between min and max."""
    num_layers = draw(st.integers(1, 6))
    num_options = draw(st.integers(1, 5))
    objective = draw(arrays(np.float64, (num_layers, num_options), elements=VALUES))
    unavailable = draw(arrays(np.bool_, (num_layers, num_options)))
    unavailable[:, draw(st.integers(0, num_options - 1))] = False  # every layer keeps at least one option
    objective[unavailable] = np.inf
    available = ~unavailable
    constraints = []
    for j in range(draw(st.integers(1, 3))):
        magnitude = draw(st.sampled_from([1e-6, 1.0, 1e3, 1e9]))  # budgets in pJ, MB, bits ... all conditioned
        coeffs = draw(arrays(np.float64, (num_layers, num_options), elements=VALUES)) * magnitude
        low = float(np.where(available, coeffs, np.inf).min(axis=1).sum())
        high = float(np.where(available, coeffs, -np.inf).max(axis=1).sum())
        fraction = draw(st.floats(0.0, 1.0))
        constraints.append(Constraint(f"c{j}", coeffs, low + fraction * (high - low), "u"))
    return objective, constraints


@settings(max_examples=150, deadline=None, database=None)
@given(instances())
def test_milp_matches_brute_force(instance: tuple[np.ndarray, list[Constraint]]) -> None:
    objective, constraints = instance
    available = np.isfinite(objective)
    try:
        reference = brute_force_multiple_choice(objective, constraints)
    except InfeasibleBudgetError:
        # Budgets are drawn independently, so several at once may exclude each other; the MILP must agree.
        with pytest.raises(InfeasibleBudgetError):
            solve_multiple_choice(objective, constraints)
        return
    choice = solve_multiple_choice(objective, constraints)
    assert choice.shape == (objective.shape[0],) and choice.dtype.kind == "i"
    assert available[np.arange(len(choice)), choice].all()  # np.inf options are never chosen
    for con in constraints:
        assert_meets(con, choice, available)
    # Ties may pick different options: compare objective values, to 1e-9 of the objective's magnitude.
    scale = float(np.abs(objective[available]).max())
    assert math.isclose(
        objective_of(objective, choice), objective_of(objective, reference), rel_tol=1e-9, abs_tol=1e-9 * scale
    )


def test_hand_made_trade_off() -> None:
    # Layer 0 loses 2 by going cheap, layer 1 loses 4: with room for one expensive option, layer 1 gets it.
    objective = np.array([[3.0, 1.0], [4.0, 0.0]])
    size = Constraint("size", np.array([[1.0, 2.0], [1.0, 2.0]]), upper=3.0, unit="MB")
    assert solve_multiple_choice(objective, [size]).tolist() == [0, 1]
    assert brute_force_multiple_choice(objective, [size]).tolist() == [0, 1]
    loose = Constraint("size", size.coeffs, upper=4.0, unit="MB")
    assert solve_multiple_choice(objective, [loose]).tolist() == [1, 1]


def test_budget_equal_to_the_minimum_is_feasible() -> None:
    rng = np.random.default_rng(0)
    objective = rng.random((6, 5))
    # Irrational-looking coefficients, so the minimum is not exactly representable as a tidy float sum.
    coeffs = rng.random((6, 5)) * 1e6 / 3.0
    upper = float(coeffs.min(axis=1).sum())
    choice = solve_multiple_choice(objective, [Constraint("energy", coeffs, upper, "µJ/image")])
    assert choice.tolist() == coeffs.argmin(axis=1).tolist()


def test_infeasible_message_gives_the_smallest_achievable_value() -> None:
    coeffs = np.array([[1.5, 2.0], [2.25, 4.0], [0.125, 9.0]])
    smallest = 1.5 + 2.25 + 0.125
    con = Constraint("energy", coeffs, upper=3.0, unit="µJ/image")
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_multiple_choice(np.zeros((3, 2)), [con])
    message = str(info.value)
    assert "energy: smallest achievable 3.875 µJ/image, requested 3 µJ/image (infeasible on its own)" in message
    assert smallest == 3.875
    assert isinstance(info.value, ValueError)
    with pytest.raises(InfeasibleBudgetError, match="3.875 µJ/image"):
        brute_force_multiple_choice(np.zeros((3, 2)), [con])


def test_jointly_infeasible_budgets_say_so() -> None:
    # Option 0 is cheap in energy, option 1 cheap in size: each budget alone is met, both at once are not.
    energy = Constraint("energy", np.array([[1.0, 10.0], [1.0, 10.0]]), upper=2.0, unit="µJ/image")
    size = Constraint("size", np.array([[10.0, 1.0], [10.0, 1.0]]), upper=2.0, unit="MB")
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_multiple_choice(np.zeros((2, 2)), [energy, size])
    message = str(info.value)
    assert "energy: smallest achievable 2 µJ/image" in message and "size: smallest achievable 2 MB" in message
    assert "jointly infeasible" in message


def test_offset_counts_towards_the_budget() -> None:
    coeffs = np.array([[1.0, 2.0]])
    assert solve_multiple_choice(np.array([[1.0, 0.0]]), [Constraint("e", coeffs, 7.0, "u", offset=5.0)]) == [1]
    assert solve_multiple_choice(np.array([[1.0, 0.0]]), [Constraint("e", coeffs, 6.5, "u", offset=5.0)]) == [0]
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable 6 u"):
        solve_multiple_choice(np.array([[1.0, 0.0]]), [Constraint("e", coeffs, 5.5, "u", offset=5.0)])


def test_inf_options_are_never_chosen_even_if_best() -> None:
    objective = np.array([[np.inf, 5.0, 6.0], [1.0, np.inf, 2.0]])
    coeffs = np.zeros((2, 3))
    coeffs[0, 0] = np.inf  # coefficients of unavailable options are ignored
    choice = solve_multiple_choice(objective, [Constraint("c", coeffs, 0.0, "u")])
    assert choice.tolist() == [1, 0]


def test_solutions_within_highs_tolerance_but_over_budget_are_cut() -> None:
    # All-expensive costs 6; a budget 1e-7 below it is within HiGHS' feasibility tolerance but not ours: the
    # solver must find that out and return the best choice that really fits (two expensive options, total 5).
    objective = np.array([[1.0, 0.0]] * 3)
    coeffs = np.array([[1.0, 2.0]] * 3)
    calls = []
    real_milp = solver_module.milp

    def spy(*args, **kwargs):
        calls.append(1)
        return real_milp(*args, **kwargs)

    solver_module.milp = spy
    try:
        choice = solve_multiple_choice(objective, [Constraint("e", coeffs, 6.0 * (1 - 1e-7), "u")])
    finally:
        solver_module.milp = real_milp
    assert sorted(choice.tolist()) == [0, 1, 1]
    assert len(calls) >= 1


def test_malformed_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="no available option"):
        solve_multiple_choice(np.array([[np.inf, np.inf], [0.0, 1.0]]), [])
    with pytest.raises(ValueError, match="shape"):
        solve_multiple_choice(np.zeros((2, 2)), [Constraint("c", np.zeros((2, 3)), 1.0, "u")])
    with pytest.raises(ValueError, match="NaN"):
        solve_multiple_choice(np.array([[np.nan, 1.0]]), [])
    with pytest.raises(ValueError, match="finite"):
        solve_multiple_choice(np.zeros((1, 2)), [Constraint("c", np.array([[np.inf, 1.0]]), 1.0, "u")])
    with pytest.raises(ValueError, match="small instances"):
        brute_force_multiple_choice(np.zeros((30, 5)), [])


def test_no_constraints_picks_the_best_option_per_layer() -> None:
    rng = np.random.default_rng(1)
    objective = rng.random((8, 4))
    assert solve_multiple_choice(objective, []).tolist() == objective.argmin(axis=1).tolist()


# ------------------------------------------------------------------------------------------------ messages
@pytest.mark.parametrize(
    ("value", "digits", "shown"),
    [
        (3.875, 6, "3.875"),  # exact at the precision: unchanged
        (2.0, 6, "2"),
        (0.060203008, 6, "0.0602031"),  # to the nearest would be 0.060203, below the value
        (0.5681216680022928, 4, "0.5682"),
        (9.999994, 6, "10"),  # rounding up carries into a new digit
        (1.2345649e-7, 6, "1.23457e-07"),
        (123456789.0, 3, "1.24e+08"),
        (0.0, 6, "0"),
        (-1.2345649, 6, "-1.23456"),  # up is towards +inf
    ],
)
def test_round_up_never_shows_less_than_the_value(value: float, digits: int, shown: str) -> None:
    assert round_up(value, digits) == shown
    assert float(shown) >= value


def test_infeasible_minimum_copied_back_is_feasible() -> None:
    coeffs = np.array([[0.5, 2.0], [0.5, 4.0], [0.1234549, 9.0]])  # smallest 1.1234549: to the nearest, 1.12345
    con = Constraint("energy", coeffs, upper=1.0, unit="µJ/image", option="energy_uj")
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_multiple_choice(np.zeros((3, 2)), [con])
    message = str(info.value)
    assert "energy: smallest achievable energy_uj=1.12346 µJ/image, requested energy_uj=1 µJ/image" in message
    copied = Constraint("energy", coeffs, upper=1.12346, unit="µJ/image")
    assert solve_multiple_choice(np.zeros((3, 2)), [copied]).tolist() == [0, 0, 0]
    # The minimum to the nearest digit, as the message used to give it, is not a budget that can be met.
    with pytest.raises(InfeasibleBudgetError):
        solve_multiple_choice(np.zeros((3, 2)), [Constraint("energy", coeffs, upper=1.12345, unit="µJ/image")])


def test_a_ratio_budget_is_shown_as_its_ratio() -> None:
    coeffs = np.array([[10.0, 20.0], [13.0, 40.0]])  # smallest 23 of a reference 40: ratio 0.575
    con = Constraint("energy", coeffs, upper=20.0, unit="µJ/image", ratio_of=("energy_ratio", 40.0))
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_multiple_choice(np.zeros((2, 2)), [con])
    message = str(info.value)
    assert "smallest achievable energy_ratio=0.575 (23 µJ/image), requested energy_ratio=0.5 (20 µJ/image)" in message
    assert con.show(23.0000001, up=True) == "energy_ratio=0.5751 (23.0001 µJ/image)"
    assert Constraint("size", coeffs, 1.0, "MB").show(0.25) == "0.25 MB"


def test_budgets_that_do_not_bind_are_decided_without_highs(monkeypatch) -> None:
    objective = np.array([[3.0, 1.0, np.inf], [0.0, 4.0, 2.0]])
    loose = Constraint("size", np.array([[1.0, 2.0, np.inf], [1.0, 2.0, 3.0]]), upper=10.0, unit="MB")

    def no_milp(*args, **kwargs):
        raise AssertionError("HiGHS was called for a budget that does not bind")

    monkeypatch.setattr(solver_module, "milp", no_milp)
    assert solve_multiple_choice(objective, [loose]).tolist() == [1, 0]
    assert solve_multiple_choice(objective, []).tolist() == [1, 0]


def test_the_solver_writes_nothing_to_the_terminal(capfd):
    # HiGHS 1.12 (SciPy 1.17) printed from C during binding solves; the process's output must stay clean.
    rng = np.random.default_rng(0)
    for _ in range(200):
        objective = rng.random((20, 12)) * rng.random((20, 1)) * 10
        cost = rng.random((20, 12)) * 5
        low, high = cost.min(1).sum(), cost.max(1).sum()
        budget = Constraint(name="energy", coeffs=cost, upper=low + (high - low) * 0.5 * rng.random(), unit="µJ")
        solve_multiple_choice(objective, [budget])
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
