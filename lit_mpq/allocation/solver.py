"""Exact multiple-choice knapsack with several budgets, solved as a MILP with ``scipy.optimize.milp`` (HiGHS).

Every layer ``l`` picks exactly one option ``k`` (for bit allocation: one ``(weight bits, activation bits)``
pair). The choice minimises ``sum_l objective[l, k_l]`` subject to one or more budgets
``offset + sum_l coeffs[l, k_l] <= upper``. Pure NumPy/SciPy: no torch, no Lightning, no plan.

Formulation: binary variables ``x[l, k]``, one equality ``sum_k x[l, k] = 1`` per layer, one inequality row per
budget. Options marked ``np.inf`` in the objective are unavailable: their variables get the upper bound 0.

Exactness:

* ``mip_rel_gap`` is set to 0, and the objective is shifted and scaled (a per-layer constant and one positive
  factor, which do not change the optimum) so that HiGHS' absolute gap of 1e-6 is about 1e-10 of the largest
  per-layer spread of the objective.
* Budget rows are divided by their largest magnitude, so budgets in pJ and in bits are equally well conditioned.
* When each layer's best option already meets every budget, that choice is returned without calling HiGHS.
* HiGHS accepts a constraint violation of up to about 1e-6 of a scaled row. Every solution is therefore checked
  against the budgets in double precision (tolerance :data:`RELATIVE_TOLERANCE`); a solution that fails the check
  is excluded with a cut that forbids exactly that combination, and the MILP is solved again.

Example:
    >>> import numpy as np
    >>> objective = np.array([[3.0, 1.0], [4.0, 0.0]])          # option 1 is better for both layers...
    >>> cost = Constraint("size", np.array([[1.0, 2.0], [1.0, 2.0]]), upper=3.0, unit="MB")  # ...but costs more
    >>> solve_multiple_choice(objective, [cost]).tolist()
    [0, 1]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array, csr_array, vstack

__all__ = [
    "BRUTE_FORCE_MAX_COMBINATIONS",
    "RELATIVE_TOLERANCE",
    "Constraint",
    "InfeasibleBudgetError",
    "brute_force_multiple_choice",
    "round_up",
    "solve_multiple_choice",
]

RELATIVE_TOLERANCE = 1e-9
"""A budget is met when ``offset + total <= upper + RELATIVE_TOLERANCE * scale`` (see :meth:`Constraint.limit`);
so a budget equal to an achievable total is feasible despite rounding."""

BRUTE_FORCE_MAX_COMBINATIONS = 1_000_000
"""Largest number of combinations :func:`brute_force_multiple_choice` enumerates."""

_OBJECTIVE_SPREAD = 1e4
"""The shifted objective is scaled so that its largest per-layer spread is this; HiGHS' absolute MIP gap (1e-6)
is then 1e-10 of it."""

_MAX_CUTS = 100
"""Most re-solves after solutions that HiGHS accepted within its tolerance but that break a budget exactly."""


_HIGHS_OPTIONS = {"disp": False, "mip_rel_gap": 0.0, "presolve": False}
"""No solver log; prove optimality (no relative gap); no presolve, which brings nothing to a multiple-choice problem.

The process's stdout is left alone. HiGHS 1.12 (bundled with SciPy 1.17) still prints one stray debug line,
``HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();``, when it repairs an incumbent, whatever
the options (https://github.com/ERGO-Code/HiGHS/issues/2783; the ``printf`` is gone from HiGHS 1.13). Redirecting
file descriptor 1 around the call would hide it, but for every thread of the process, so it is not done; budgets
that do not bind never reach HiGHS (see :func:`solve_multiple_choice`)."""

_SHOWN_DIGITS = 6
"""Significant digits of the budget totals in messages."""

_SHOWN_RATIO_DIGITS = 4
"""Significant digits of budget ratios (e.g. ``energy_ratio``) in messages."""


def round_up(value: float, digits: int = _SHOWN_DIGITS) -> str:
    """``value`` written with ``digits`` significant digits, rounded up, so the shown number is never below it.

    A smallest achievable total shown this way can be copied back as a budget and is feasible.

    Example:
        >>> round_up(3.875101), round_up(2.0), round_up(0.61234, 3)
        ('3.87511', '2', '0.613')
    """
    text = f"{value:.{digits}g}"
    if float(text) >= value:
        return text
    shown = Decimal(text)
    # One unit in the last shown digit up; Decimal keeps the step exact where float arithmetic would not.
    step = Decimal(1).scaleb(shown.adjusted() - digits + 1)
    return f"{float(shown + step):.{digits}g}"


class InfeasibleBudgetError(ValueError):
    """No choice of options meets every budget; the message gives the smallest achievable value of each.

    A ``ValueError``, so a command line reports it like any other configuration error; its own type, so that a
    sweep over budgets can tell an unreachable budget (skip the point) from a configuration error (stop).
    """


@dataclass(frozen=True)
class Constraint:
    """One budget: ``offset + sum_l coeffs[l, choice_l] <= upper``.

    Attributes:
        name: Short name shown in messages, e.g. ``"energy"``.
        coeffs: ``[L, K]`` cost of option ``k`` for layer ``l``; must be finite for every available option
            (entries of unavailable options are ignored).
        upper: The budget, in ``unit``.
        unit: Unit of ``coeffs``, ``offset`` and ``upper``, e.g. ``"µJ/image"``.
        offset: Constant part of the total (e.g. layers whose options are fixed), in ``unit``.
        option: The user's option that sets ``upper`` (e.g. ``"size_mb"``); messages then write budgets as
            ``option=value``, ready to copy into a config.
        ratio_of: ``(option, reference)`` when the user set the budget as a multiple of ``reference`` (in ``unit``),
            e.g. ``("energy_ratio", 38.8)``; messages then write budgets as that option's ratio, the total beside it.
    """

    name: str
    coeffs: np.ndarray
    upper: float
    unit: str = ""
    offset: float = 0.0
    option: str = ""
    ratio_of: tuple[str, float] | None = None

    def show(self, value: float, up: bool = False) -> str:
        """A total of this budget as the user would write it, e.g. ``energy_ratio=0.6124 (23.79 µJ/image)``.

        Args:
            value: The total, in ``unit``.
            up: Round up (for smallest achievable totals, so that the shown value is feasible when copied).
        """
        unit = f" {self.unit}" if self.unit else ""
        total = round_up(value) if up else f"{value:.{_SHOWN_DIGITS}g}"
        if self.ratio_of is not None:
            option, reference = self.ratio_of
            ratio = value / reference
            shown = round_up(ratio, _SHOWN_RATIO_DIGITS) if up else f"{ratio:.{_SHOWN_RATIO_DIGITS}g}"
            return f"{option}={shown} ({total}{unit})"
        return f"{self.option}={total}{unit}" if self.option else f"{total}{unit}"

    def scale(self, available: np.ndarray | None = None) -> float:
        """Magnitude of the quantities in this budget: the largest of ``|upper|`` and ``|offset| + sum_l max_k |c|``.

        Args:
            available: Optional ``[L, K]`` boolean mask of the options that count.
        """
        coeffs = np.abs(np.asarray(self.coeffs, dtype=np.float64))
        if available is not None:
            coeffs = np.where(available, coeffs, 0.0)
        terms = float(coeffs.max(axis=1).sum()) if coeffs.size else 0.0
        return max(abs(float(self.upper)), abs(float(self.offset)) + terms)

    def limit(self, available: np.ndarray | None = None) -> float:
        """The largest total that meets the budget: ``upper`` plus :data:`RELATIVE_TOLERANCE` times :meth:`scale`.

        Args:
            available: Optional ``[L, K]`` boolean mask of the options that count.
        """
        return float(self.upper) + RELATIVE_TOLERANCE * self.scale(available)

    def total(self, choice: np.ndarray) -> float:
        """``offset + sum_l coeffs[l, choice[l]]`` for a choice of one option per layer."""
        choice = np.asarray(choice, dtype=np.int64)
        coeffs = np.asarray(self.coeffs, dtype=np.float64)
        return float(self.offset) + float(coeffs[np.arange(len(choice)), choice].sum())

    def smallest(self, available: np.ndarray) -> float:
        """Smallest achievable total: ``offset`` plus, per layer, the cheapest available option."""
        coeffs = np.where(available, np.asarray(self.coeffs, dtype=np.float64), np.inf)
        return float(self.offset) + float(coeffs.min(axis=1).sum()) if coeffs.size else float(self.offset)


# --------------------------------------------------------------------------------------------------- checks
def _check(objective: np.ndarray, constraints: Sequence[Constraint]) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and values; return the objective as float64 and the ``[L, K]`` mask of available options.

    Raises:
        ValueError: On a shape mismatch, NaN or ``-inf`` in the objective, a layer without an available option,
            a non-finite budget, or a non-finite coefficient of an available option.
    """
    objective = np.asarray(objective, dtype=np.float64)
    if objective.ndim != 2:
        raise ValueError(f"objective must be a 2-D [layers, options] array, got shape {objective.shape}")
    if np.isnan(objective).any() or np.isneginf(objective).any():
        raise ValueError("objective must not contain NaN or -inf; mark unavailable options with +inf")
    available = np.isfinite(objective)
    empty = np.flatnonzero(~available.any(axis=1)) if objective.shape[1] else np.arange(objective.shape[0])
    if empty.size:
        raise ValueError(f"layers {empty.tolist()} have no available option (every objective entry is +inf)")
    for con in constraints:
        coeffs = np.asarray(con.coeffs, dtype=np.float64)
        if coeffs.shape != objective.shape:
            raise ValueError(
                f"constraint {con.name!r}: coeffs shape {coeffs.shape} differs from objective shape {objective.shape}"
            )
        if not math.isfinite(con.upper) or not math.isfinite(con.offset):
            raise ValueError(f"constraint {con.name!r}: upper and offset must be finite, got {con.upper}, {con.offset}")
        if not np.isfinite(coeffs[available]).all():
            raise ValueError(f"constraint {con.name!r}: coefficients of available options must be finite")
    return objective, available


def _violated(constraints: Sequence[Constraint], choice: np.ndarray, available: np.ndarray) -> list[Constraint]:
    """The constraints that ``choice`` breaks (beyond the tolerance of :meth:`Constraint.limit`)."""
    return [con for con in constraints if con.total(choice) > con.limit(available)]


def _infeasible(constraints: Sequence[Constraint], available: np.ndarray) -> InfeasibleBudgetError:
    """The error for budgets that no choice meets, with each budget's smallest achievable value and request.

    The smallest values are rounded up at the precision shown, so that each can be copied back as a budget.
    """
    lines, alone_ok = [], True
    for con in constraints:
        smallest = con.smallest(available)
        ok = smallest <= con.limit(available)
        alone_ok &= ok
        verdict = "feasible on its own" if ok else "infeasible on its own"
        lines.append(
            f"  {con.name}: smallest achievable {con.show(smallest, up=True)}, requested {con.show(con.upper)} "
            f"({verdict})"
        )
    if alone_ok and len(constraints) > 1:
        advice = "Each budget is feasible on its own but they are jointly infeasible: loosen at least one of them."
    else:
        advice = "Raise each infeasible budget to at least its smallest achievable value, or add cheaper options."
    return InfeasibleBudgetError("no choice meets every budget:\n" + "\n".join(lines) + "\n" + advice)


# --------------------------------------------------------------------------------------------------- solvers
def solve_multiple_choice(objective: np.ndarray, constraints: Sequence[Constraint]) -> np.ndarray:
    """Choose one option per layer minimising the summed objective subject to every budget, exactly.

    Args:
        objective: ``[L, K]`` cost of option ``k`` for layer ``l`` (lower is better); ``np.inf`` marks an option
            that is unavailable for that layer.
        constraints: Budgets that must all hold.

    Returns:
        ``[L]`` integer array: the chosen option of each layer. Among equally good choices any one may be returned.

    Raises:
        InfeasibleBudgetError: If no choice meets every budget; the message gives, for each budget, the smallest
            achievable value and the requested bound, in the budget's unit.
        ValueError: On malformed input (see :func:`_check`).
        RuntimeError: If HiGHS fails for another reason (the message carries its status).
    """
    objective, available = _check(objective, constraints)
    num_layers, num_options = objective.shape
    if num_layers == 0:
        if _violated(constraints, np.zeros(0, dtype=np.int64), available):
            raise _infeasible(constraints, available)
        return np.zeros(0, dtype=np.int64)
    if any(con.smallest(available) > con.limit(available) for con in constraints):
        raise _infeasible(constraints, available)  # no need to ask the solver
    best = objective.argmin(axis=1)  # unavailable options are +inf, never the minimum
    if not _violated(constraints, best, available):
        return best.astype(np.int64)  # the budgets do not bind: each layer's best option is optimal

    # Objective: subtract each layer's best value (a constant, since exactly one option is chosen per layer) and
    # scale, so the MIP gap tolerance is tiny against the differences that matter.
    shifted = np.where(available, objective - np.where(available, objective, np.inf).min(axis=1, keepdims=True), 0.0)
    spread = float(shifted.max())
    cost = (shifted / spread * _OBJECTIVE_SPREAD if spread > 0 else shifted).ravel()

    num_vars = num_layers * num_options
    rows = np.repeat(np.arange(num_layers), num_options)
    one_hot = csr_array((np.ones(num_vars), (rows, np.arange(num_vars))), shape=(num_layers, num_vars))
    budget_rows, budget_rhs = [], []
    for con in constraints:
        coeffs = np.where(available, np.asarray(con.coeffs, dtype=np.float64), 0.0)
        rhs = con.limit(available) - float(con.offset)
        scale = max(float(np.abs(coeffs).max()), abs(rhs)) or 1.0
        budget_rows.append(coeffs.ravel() / scale)
        budget_rhs.append(rhs / scale)
    cuts: list[np.ndarray] = []
    bounds = Bounds(np.zeros(num_vars), available.ravel().astype(np.float64))

    for _ in range(_MAX_CUTS + 1):
        linear = [LinearConstraint(one_hot, 1.0, 1.0)]
        if budget_rows:
            linear.append(LinearConstraint(csr_array(np.vstack(budget_rows)), -np.inf, np.asarray(budget_rhs)))
        if cuts:
            # No-good cut: at most L-1 of the L chosen variables of an excluded combination may be 1 again.
            cut_rows = [
                coo_array((np.ones(num_layers), (np.zeros(num_layers, dtype=np.int64), c)), shape=(1, num_vars))
                for c in cuts
            ]
            linear.append(LinearConstraint(vstack(cut_rows).tocsr(), -np.inf, num_layers - 1.0))
        result = milp(cost, integrality=np.ones(num_vars), bounds=bounds, constraints=linear, options=_HIGHS_OPTIONS)
        if result.status == 2:
            raise _infeasible(constraints, available)
        if result.x is None or not result.success:
            raise RuntimeError(f"HiGHS did not solve the allocation MILP: status {result.status}, {result.message}")
        x = result.x.reshape(num_layers, num_options)
        choice = x.argmax(axis=1)
        assert np.allclose(x.sum(axis=1), 1.0, atol=1e-6) and available[np.arange(num_layers), choice].all()
        if not _violated(constraints, choice, available):
            return choice.astype(np.int64)
        cuts.append(choice + np.arange(num_layers) * num_options)
    raise RuntimeError(
        f"the allocation MILP kept returning choices that break a budget by less than HiGHS' tolerance "
        f"({_MAX_CUTS} re-solves); loosen a budget by a relative 1e-6"
    )


def brute_force_multiple_choice(objective: np.ndarray, constraints: Sequence[Constraint]) -> np.ndarray:
    """Reference solver for tests: enumerate every combination of available options.

    Feasibility uses the same tolerance as :func:`solve_multiple_choice` (:meth:`Constraint.limit`). Among equal
    objectives the first combination in ``itertools.product`` order wins, which may differ from the MILP's choice:
    compare objective values, not choices.

    Args:
        objective: ``[L, K]``, ``np.inf`` for unavailable options.
        constraints: Budgets that must all hold.

    Returns:
        ``[L]`` integer array of the chosen options.

    Raises:
        ValueError: If there are more than :data:`BRUTE_FORCE_MAX_COMBINATIONS` combinations, or on malformed input.
        InfeasibleBudgetError: If no combination meets every budget.
    """
    objective, available = _check(objective, constraints)
    per_layer = [np.flatnonzero(row) for row in available]
    if sum(math.log(len(opts)) for opts in per_layer) > math.log(BRUTE_FORCE_MAX_COMBINATIONS):
        raise ValueError(f"brute force is for small instances: more than {BRUTE_FORCE_MAX_COMBINATIONS} combinations")
    layers = np.arange(objective.shape[0])
    combos = list(itertools.product(*per_layer))
    combos = np.array(combos, dtype=np.int64).reshape(len(combos), objective.shape[0])
    feasible = np.ones(len(combos), dtype=bool)
    for con in constraints:
        totals = float(con.offset) + np.asarray(con.coeffs, dtype=np.float64)[layers, combos].sum(axis=1)
        feasible &= totals <= con.limit(available)
    values = np.where(feasible, objective[layers, combos].sum(axis=1), np.inf)
    best = int(np.argmin(values)) if feasible.any() else None
    if best is None:
        raise _infeasible(constraints, available)
    return combos[best]
