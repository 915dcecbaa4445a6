"""Exact, budget-constrained bit allocation: the optimal ``(weight bits, activation bits)`` of every layer.

Every non-pinned layer ``l`` gets one pair ``(b_w, b_a)`` from ``w_candidates x a_candidates``. The pairs minimise
the summed sensitivity ::

    sum_l  S_w[l][b_w] + act_weight * S_a[l][b_a]

subject to every budget the user sets, all at once:

============================  ==================  ===========================================================
option                        unit                total over all layers (pinned ones at their fixed bits)
============================  ==================  ===========================================================
``energy_uj``                 µJ per image        ``energy_model.layer(spec, b_w, b_a).total_pj / 1e6``
``energy_relative_to``        µJ per image        budget = ``energy_ratio`` x energy with every layer at that
                                                  uniform setting (:func:`lit_mpq.energy.uniform_energy`)
``size_mb``                   MB (10^6 bytes)     ``params * b_w / 8 / 1e6`` (:meth:`QuantPlan.weight_size_mb`)
``bit_ops_g``                 G bit-ops / image   ``macs * b_w * b_a / 1e9`` (:meth:`QuantPlan.bit_ops`)
``avg_weight_bits``           bits                ``params``-weighted mean of ``b_w`` (``average_weight_bits``)
``avg_act_bits``              bits                ``act_in``-weighted mean of ``b_a`` (``average_act_bits``)
============================  ==================  ===========================================================

This is a multiple-choice knapsack with several constraints, solved exactly as a MILP by
:func:`lit_mpq.allocation.solver.solve_multiple_choice` (``scipy.optimize.milp``, HiGHS); 50 layers with 15 options
each take well under a second.

Example:
    >>> from lit_mpq.plan import LayerPlan, LayerSpec, QuantPlan
    >>> spec = LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10)
    >>> sens = {"w": {4: 2.0, 8: 0.1}, "a": {4: 1.0, 8: 0.1}}
    >>> plan = QuantPlan([spec], {"fc": LayerPlan(sensitivity=sens)})
    >>> policy = ExactAllocation(w_candidates=[4, 8], a_candidates=[4, 8], energy_relative_to="W8A4")
    >>> policy.allocate(plan)
    {'fc': (8, 4)}
    >>> policy.describe()
    'ExactAllocation(energy<=1.00xW8A4)'
"""

from __future__ import annotations

import math
import re
from time import perf_counter
from typing import Any

import numpy as np

from lit_mpq.allocation.base import Allocation, Policy
from lit_mpq.allocation.solver import Constraint, InfeasibleBudgetError, solve_multiple_choice
from lit_mpq.energy import HorowitzEnergyModel, uniform_energy
from lit_mpq.energy.models import EnergyModel
from lit_mpq.plan import LayerSpec, QuantPlan, effective_bits, validate_bits

__all__ = ["ExactAllocation", "parse_uniform_setting"]

PJ_PER_UJ = 1e6
"""Picojoules in one microjoule."""

BUDGET_OPTIONS = ("energy_uj", "energy_relative_to", "size_mb", "bit_ops_g", "avg_weight_bits", "avg_act_bits")
"""Constructor arguments that set a budget; at least one is required."""

_SETTING = re.compile(r"W(\d+|FP)A(\d+|FP)", re.IGNORECASE)


def parse_uniform_setting(setting: str) -> tuple[int | None, int | None]:
    """Parse a uniform setting name such as ``"W4A8"`` into ``(4, 8)``; ``"FP"`` stands for FP32 (``None``).

    Args:
        setting: ``"W<weight bits>A<activation bits>"``, case-insensitive, e.g. ``"W4A4"``, ``"W8A8"``, ``"WFPAFP"``.

    Returns:
        ``(w_bits, a_bits)``.

    Raises:
        ValueError: If the string does not have that form or names an unsupported bit width.
    """
    match = _SETTING.fullmatch(setting.strip()) if isinstance(setting, str) else None
    if match is None:
        raise ValueError(
            f"energy_relative_to={setting!r} is not a uniform setting: write it as 'W<weight bits>A<activation bits>', "
            "e.g. 'W4A4', 'W4A8' or 'W8A8' ('FP' for an FP32 tensor, e.g. 'WFPAFP')"
        )
    bits = [None if group.upper() == "FP" else int(group) for group in match.groups()]
    return (
        validate_bits(bits[0], f"weight bits of energy_relative_to={setting!r}"),
        validate_bits(bits[1], f"activation bits of energy_relative_to={setting!r}"),
    )


def _positive(value: float | None, what: str) -> float | None:
    """``value`` as a float if it is ``None`` or a finite positive number; raise ``ValueError`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"ExactAllocation.{what}={value!r} must be a finite positive number (or null for no budget)")
    return float(value)


def _candidates(values: list[int], what: str) -> list[int]:
    """Sorted, de-duplicated candidate bit widths; every one supported and not ``None``."""
    if not values:
        raise ValueError(f"ExactAllocation.{what} must list at least one bit width, e.g. [4, 6, 8]")
    for bits in values:
        if validate_bits(bits, f"ExactAllocation.{what}") is None:
            raise ValueError(f"ExactAllocation.{what} must be integers; null (FP32) is not a candidate")
    return sorted(set(values))


def _energy_uj(energy_model: EnergyModel, spec: LayerSpec, w_bits: int, a_bits: int) -> float:
    """Energy of one option of one layer, µJ per image; a model that cannot price it raises a clear error."""
    try:
        return energy_model.layer(spec, w_bits, a_bits).total_pj / PJ_PER_UJ
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"energy model {type(energy_model).__name__} cannot price W{w_bits}A{a_bits} for layer {spec.name!r} "
            f"({err}); remove those bits from ExactAllocation.w_candidates / a_candidates or use another model"
        ) from err


class ExactAllocation(Policy):
    """Optimal per-layer weight and activation bits under one or more budgets (energy, size, bit-ops, avg bits).

    Args:
        w_candidates: Weight bit widths a layer may get; each needs a probed ``"w"`` sensitivity.
        a_candidates: Activation bit widths a layer may get; each needs a probed ``"a"`` sensitivity.
        energy_uj: Energy budget, µJ per image (analytic, from the run's energy model).
        energy_relative_to: Energy budget relative to a uniform setting, e.g. ``"W4A4"``: ``energy_ratio`` times
            the energy with every layer (pinned ones included) at that setting. Excludes ``energy_uj``.
        energy_ratio: Multiplier for ``energy_relative_to`` (1.0 = the same energy as that uniform setting).
        size_mb: Weight-size budget, MB (10^6 bytes), over all layers.
        bit_ops_g: Bit-operation budget, 10^9 bit-ops per image (``sum macs * b_w * b_a``).
        avg_weight_bits: Budget on the parameter-weighted average weight bit width.
        avg_act_bits: Budget on the input-element-weighted average activation bit width.
        act_weight: Weight of the activation sensitivity in the objective (0 ignores it).

    Raises:
        ValueError: If no budget is given, if both ``energy_uj`` and ``energy_relative_to`` are, if
            ``energy_ratio`` is set without ``energy_relative_to``, on an unsupported or empty candidate list, a
            malformed uniform setting, or a non-positive budget.

    Attributes:
        last_solution_info: After :meth:`allocate`: ``objective`` (summed sensitivity of the non-pinned layers),
            ``budgets`` (``{name: {"used", "budget", "unit"}}``, totals over all layers), ``solve_seconds``,
            ``layers`` (non-pinned layers decided) and ``options_per_layer``.
    """

    requires_sensitivity = True

    def __init__(
        self,
        w_candidates: list[int] = [4, 6, 8],  # noqa: B006 - jsonargparse shows list defaults; = the probe default
        a_candidates: list[int] = [4, 6, 8],  # noqa: B006
        energy_uj: float | None = None,
        energy_relative_to: str | None = None,
        energy_ratio: float = 1.0,
        size_mb: float | None = None,
        bit_ops_g: float | None = None,
        avg_weight_bits: float | None = None,
        avg_act_bits: float | None = None,
        act_weight: float = 1.0,
    ) -> None:
        self.w_candidates = _candidates(w_candidates, "w_candidates")
        self.a_candidates = _candidates(a_candidates, "a_candidates")
        if energy_uj is not None and energy_relative_to is not None:
            raise ValueError(
                "ExactAllocation: give either energy_uj (absolute µJ per image) or energy_relative_to "
                f"(with energy_ratio), not both; got energy_uj={energy_uj!r}, energy_relative_to={energy_relative_to!r}"
            )
        self.energy_uj = _positive(energy_uj, "energy_uj")
        self.energy_relative_to = energy_relative_to
        self.reference_bits = parse_uniform_setting(energy_relative_to) if energy_relative_to is not None else None
        self.energy_ratio = _positive(energy_ratio, "energy_ratio")
        if energy_relative_to is None and self.energy_ratio != 1.0:
            raise ValueError(
                f"ExactAllocation.energy_ratio={energy_ratio!r} needs energy_relative_to (e.g. 'W4A4') to say what it "
                "is a ratio of"
            )
        self.size_mb = _positive(size_mb, "size_mb")
        self.bit_ops_g = _positive(bit_ops_g, "bit_ops_g")
        self.avg_weight_bits = _positive(avg_weight_bits, "avg_weight_bits")
        self.avg_act_bits = _positive(avg_act_bits, "avg_act_bits")
        if isinstance(act_weight, bool) or not isinstance(act_weight, (int, float)) or not 0 <= act_weight < math.inf:
            raise ValueError(f"ExactAllocation.act_weight={act_weight!r} must be a finite number >= 0")
        self.act_weight = float(act_weight)
        if all(getattr(self, option) is None for option in BUDGET_OPTIONS):
            raise ValueError(f"ExactAllocation needs at least one budget: set one or more of {list(BUDGET_OPTIONS)}")
        self.last_solution_info: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def options(self) -> list[tuple[int, int]]:
        """The ``(w_bits, a_bits)`` pairs a layer may get, in the solver's column order."""
        return [(bw, ba) for bw in self.w_candidates for ba in self.a_candidates]

    def _objective(self, plan: QuantPlan, names: list[str]) -> np.ndarray:
        """``[L, K]`` summed sensitivity of every option of every free layer.

        Raises:
            ValueError: If a layer lacks a sensitivity for a candidate bit width, or a sensitivity is not finite.
        """
        needed = [("w", self.w_candidates)] + ([("a", self.a_candidates)] if self.act_weight > 0 else [])
        for kind, candidates in needed:
            missing = {name: [b for b in candidates if b not in plan[name].sensitivity.get(kind, {})] for name in names}
            missing = {name: bits for name, bits in missing.items() if bits}
            if missing:
                name, bits = next(iter(missing.items()))
                probed = sorted(plan[name].sensitivity.get(kind, {}))
                others = f" ({len(missing) - 1} more layers likewise)" if len(missing) > 1 else ""
                option = "w_candidates" if kind == "w" else "a_candidates"
                if not probed:
                    raise ValueError(
                        f"layer {name!r} has no {kind!r} sensitivity{others}: add a SensitivityProbe callback (with "
                        f"candidate_bits covering {bits}) before BitAllocator"
                    )
                raise ValueError(
                    f"layer {name!r} has no {kind!r} sensitivity for bits {bits} (probed: {probed}){others}: add "
                    f"{bits} to SensitivityProbe.candidate_bits, or remove them from ExactAllocation.{option}"
                )
        objective = np.empty((len(names), len(self.options)))
        for i, name in enumerate(names):
            sens = plan[name].sensitivity
            for k, (bw, ba) in enumerate(self.options):
                value = sens["w"][bw] + (self.act_weight * sens["a"][ba] if self.act_weight > 0 else 0.0)
                if not math.isfinite(value):
                    raise ValueError(f"layer {name!r}: sensitivity at W{bw}A{ba} is {value}; probe it again")
                objective[i, k] = value
        return objective

    def _constraints(self, plan: QuantPlan, names: list[str], energy_model: EnergyModel) -> list[Constraint]:
        """The budgets as solver constraints over the free layers, with the pinned layers as constant offsets."""
        free = [plan.specs[name] for name in names]
        pinned = [(spec, lp) for spec, lp in plan.items() if lp.pinned]
        options = self.options
        w = np.array([bw for bw, _ in options], dtype=np.float64)
        a = np.array([ba for _, ba in options], dtype=np.float64)
        params = np.array([spec.params for spec in free], dtype=np.float64)[:, None]
        macs = np.array([spec.macs for spec in free], dtype=np.float64)[:, None]
        act_in = np.array([spec.act_in for spec in free], dtype=np.float64)[:, None]
        shape = (len(free), len(options))
        constraints = []
        energy_budget = self.energy_uj
        if self.reference_bits is not None:
            energy_budget = self.energy_ratio * uniform_energy(plan, energy_model, *self.reference_bits).total_pj
            energy_budget /= PJ_PER_UJ
        if energy_budget is not None:
            coeffs = np.array([[_energy_uj(energy_model, spec, bw, ba) for bw, ba in options] for spec in free])
            coeffs = coeffs.reshape(shape)
            offset = sum(energy_model.layer(spec, lp.w_bits, lp.a_bits).total_pj for spec, lp in pinned) / PJ_PER_UJ
            constraints.append(Constraint("energy", coeffs, energy_budget, "µJ/image", offset))
        if self.size_mb is not None:
            offset = sum(spec.params * effective_bits(lp.w_bits) for spec, lp in pinned) / 8 / 1e6
            constraints.append(Constraint("size", params * w / 8 / 1e6, self.size_mb, "MB", offset))
        if self.bit_ops_g is not None:
            offset = sum(spec.macs * effective_bits(lp.w_bits) * effective_bits(lp.a_bits) for spec, lp in pinned)
            constraints.append(
                Constraint("bit_ops", macs * w * a / 1e9, self.bit_ops_g, "G bit-ops/image", offset / 1e9)
            )
        if self.avg_weight_bits is not None:
            total = max(sum(spec.params for spec in plan.specs.values()), 1)
            offset = sum(spec.params * effective_bits(lp.w_bits) for spec, lp in pinned) / total
            coeffs = params * w / total
            constraints.append(Constraint("avg_weight_bits", coeffs, self.avg_weight_bits, "bits", offset))
        if self.avg_act_bits is not None:
            total = max(sum(spec.act_in for spec in plan.specs.values()), 1)
            offset = sum(spec.act_in * effective_bits(lp.a_bits) for spec, lp in pinned) / total
            coeffs = act_in * a / total
            constraints.append(Constraint("avg_act_bits", coeffs, self.avg_act_bits, "bits", offset))
        for con in constraints:
            assert con.coeffs.shape == shape, (con.name, con.coeffs.shape, shape)
        return constraints

    # ------------------------------------------------------------------------------------------------ policy
    def allocate(self, plan: QuantPlan, energy_model: Any = None) -> Allocation:
        """The optimal bits of every non-pinned layer; pinned layers keep theirs and count towards the budgets.

        Args:
            plan: Layers, pins and sensitivities (a ``SensitivityProbe`` must have run).
            energy_model: Prices each option; default :class:`~lit_mpq.energy.HorowitzEnergyModel`.

        Returns:
            ``{name: (w_bits, a_bits)}`` for the non-pinned layers, in model order. Also sets
            :attr:`last_solution_info`.

        Raises:
            ValueError: If a sensitivity is missing for a candidate bit width (the message names the layer, the
                kind and the bits).
            InfeasibleBudgetError: If no allocation meets every budget; the message gives each budget's smallest
                achievable value and the requested one, with units.
        """
        energy_model = energy_model if energy_model is not None else HorowitzEnergyModel()
        names = [name for name in plan if not plan[name].pinned]
        objective = self._objective(plan, names)
        constraints = self._constraints(plan, names, energy_model)
        start = perf_counter()
        try:
            choice = solve_multiple_choice(objective, constraints)
        except InfeasibleBudgetError as err:
            raise InfeasibleBudgetError(f"{self.describe()} over {len(names)} free layers: {err}") from None
        seconds = perf_counter() - start
        options = self.options
        self.last_solution_info = {
            "objective": float(objective[np.arange(len(names)), choice].sum()),
            "budgets": {
                con.name: {"used": con.total(choice), "budget": float(con.upper), "unit": con.unit}
                for con in constraints
            },
            "solve_seconds": seconds,
            "layers": len(names),
            "options_per_layer": len(options),
        }
        return {name: options[int(k)] for name, k in zip(names, choice, strict=True)}

    def describe(self) -> str:
        """E.g. ``ExactAllocation(energy<=1.00xW4A4, size<=2 MB)``."""
        parts = []
        if self.energy_relative_to is not None:
            parts.append(f"energy<={self.energy_ratio:.2f}x{self.energy_relative_to.strip().upper()}")
        if self.energy_uj is not None:
            parts.append(f"energy<={self.energy_uj:g} µJ/image")
        if self.size_mb is not None:
            parts.append(f"size<={self.size_mb:g} MB")
        if self.bit_ops_g is not None:
            parts.append(f"bit_ops<={self.bit_ops_g:g} G")
        if self.avg_weight_bits is not None:
            parts.append(f"avg_w_bits<={self.avg_weight_bits:g}")
        if self.avg_act_bits is not None:
            parts.append(f"avg_a_bits<={self.avg_act_bits:g}")
        return f"ExactAllocation({', '.join(parts)})"
