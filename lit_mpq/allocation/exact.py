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
each take well under a second. A budget no allocation meets raises :class:`InfeasibleBudgetError` (a ``ValueError``)
that gives each budget's smallest achievable value, rounded up so that it can be copied back into the config, and,
for a budget set with ``energy_relative_to``, as an ``energy_ratio``.

A kind (weights or activations) with a single candidate width gives every layer the same bits, so its sensitivity
cannot change the choice and need not be probed.

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
from time import perf_counter
from typing import Any

import numpy as np

from lit_mpq.allocation.base import Allocation, Policy
from lit_mpq.allocation.solver import Constraint, InfeasibleBudgetError, solve_multiple_choice
from lit_mpq.bits import effective_bits, format_setting, parse_setting, validate_candidates
from lit_mpq.bits import parse_setting as parse_uniform_setting  # the name it had here, kept for old imports
from lit_mpq.energy import HorowitzEnergyModel, uniform_energy
from lit_mpq.energy.models import EnergyModel
from lit_mpq.plan import LayerSpec, QuantPlan
from lit_mpq.quant.targets import QuantTarget, pair_allowed

__all__ = ["ExactAllocation", "InfeasibleBudgetError", "parse_uniform_setting"]

PJ_PER_UJ = 1e6
"""Picojoules in one microjoule."""

BUDGET_OPTIONS = ("energy_uj", "energy_relative_to", "size_mb", "bit_ops_g", "avg_weight_bits", "avg_act_bits")
"""Constructor arguments that set a budget; at least one is required."""

TENSOR = {"w": "weight", "a": "activation"}


def _positive(value: float | None, what: str, budget: bool = True) -> float | None:
    """``value`` as a float if finite and positive (``None`` passes for a ``budget``); ``ValueError`` otherwise."""
    if value is None and budget:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        also = " (or null for no budget)" if budget else ""
        raise ValueError(f"{what}={value!r} must be a finite positive number{also}")
    return float(value)


def _energy_uj(energy_model: EnergyModel, spec: LayerSpec, w_bits: int | None, a_bits: int | None, fix: str) -> float:
    """Energy of one option of one layer, µJ per image; a model that cannot price it raises a clear error.

    Args:
        energy_model: The run's energy model.
        spec: The layer.
        w_bits: Weight bits.
        a_bits: Activation bits.
        fix: What the user can change, for the message.
    """
    try:
        return energy_model.layer(spec, w_bits, a_bits).total_pj / PJ_PER_UJ
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"energy model {type(energy_model).__name__} cannot price {format_setting(w_bits, a_bits)} for layer "
            f"{spec.name!r} ({err}); {fix} or use another energy model"
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
        owner = type(self).__name__  # RandomAllocation shares this constructor; messages name the class in use
        self.w_candidates = validate_candidates(w_candidates, f"{owner}.w_candidates")
        self.a_candidates = validate_candidates(a_candidates, f"{owner}.a_candidates")
        if energy_uj is not None and energy_relative_to is not None:
            raise ValueError(
                f"{owner}: give either energy_uj (absolute µJ per image) or energy_relative_to "
                f"(with energy_ratio), not both; got energy_uj={energy_uj!r}, energy_relative_to={energy_relative_to!r}"
            )
        self.energy_uj = _positive(energy_uj, f"{owner}.energy_uj")
        self.energy_relative_to = energy_relative_to
        self.reference_bits = (
            parse_setting(energy_relative_to, f"{owner}.energy_relative_to") if energy_relative_to is not None else None
        )
        self.energy_ratio = _positive(energy_ratio, f"{owner}.energy_ratio", budget=False)
        if energy_relative_to is None and self.energy_ratio != 1.0:
            raise ValueError(
                f"{owner}.energy_ratio={energy_ratio!r} needs energy_relative_to (e.g. 'W4A4') to say what it "
                "is a ratio of"
            )
        self.size_mb = _positive(size_mb, f"{owner}.size_mb")
        self.bit_ops_g = _positive(bit_ops_g, f"{owner}.bit_ops_g")
        self.avg_weight_bits = _positive(avg_weight_bits, f"{owner}.avg_weight_bits")
        self.avg_act_bits = _positive(avg_act_bits, f"{owner}.avg_act_bits")
        if isinstance(act_weight, bool) or not isinstance(act_weight, (int, float)) or not 0 <= act_weight < math.inf:
            raise ValueError(f"{owner}.act_weight={act_weight!r} must be a finite number >= 0")
        self.act_weight = float(act_weight)
        if all(getattr(self, option) is None for option in BUDGET_OPTIONS):
            raise ValueError(f"{owner} needs at least one budget: set one or more of {list(BUDGET_OPTIONS)}")
        self.last_solution_info: dict[str, Any] = {}
        self.hardware_target: QuantTarget | None = None
        """The run's hardware target (set by ``BitAllocator`` from ``Calibration.target``): options its
        ``bit_pairs`` do not allow are unavailable to the solver."""

    # ------------------------------------------------------------------------------------------------ helpers
    def _unavailable(self, plan: QuantPlan, names: list[str]) -> np.ndarray:
        """``[L, K]`` True where the hardware target does not allow option ``k`` for layer ``l``."""
        mask = np.zeros((len(names), len(self.options)), dtype=bool)
        target = self.hardware_target
        if target is None or target.bit_pairs is None:
            return mask
        for i, name in enumerate(names):
            kind = plan.specs[name].kind
            for k, (w_bits, a_bits) in enumerate(self.options):
                mask[i, k] = not pair_allowed(target, kind, w_bits, a_bits)
        blocked = [names[i] for i in np.flatnonzero(mask.all(axis=1))]
        if blocked:
            raise ValueError(
                f"{type(self).__name__}: no candidate pair of {blocked[0]!r} ({len(blocked)} layers likewise) is among "
                f"the target {target.name!r}'s bit_pairs {[list(p) for p in target.bit_pairs]}; add candidates that "
                "form allowed pairs"
            )
        return mask

    @property
    def options(self) -> list[tuple[int, int]]:
        """The ``(w_bits, a_bits)`` pairs a layer may get, in the solver's column order."""
        return [(bw, ba) for bw in self.w_candidates for ba in self.a_candidates]

    def _missing(self, plan: QuantPlan, kind: str, missing: dict[str, list[int]]) -> ValueError:
        """The error for layers without a ``kind`` sensitivity at some candidate bits, with what to change.

        Args:
            plan: The plan.
            kind: ``"w"`` or ``"a"``.
            missing: ``{layer: [candidate bits without a sensitivity]}``, non-empty, in model order.
        """
        name, bits = next(iter(missing.items()))
        table = plan[name].sensitivity
        probed = sorted(table.get(kind, {}))
        others = f" ({len(missing) - 1} more layers likewise)" if len(missing) > 1 else ""
        option = f"{type(self).__name__}.{kind}_candidates"
        if not any(table.values()):
            return ValueError(
                f"layer {name!r} has no sensitivity{others}: add a SensitivityProbe callback before BitAllocator"
            )
        if not probed:
            other = TENSOR["a" if kind == "w" else "w"]
            return ValueError(
                f"layer {name!r} has no {TENSOR[kind]} ({kind!r}) sensitivity{others}: the SensitivityProbe measured "
                f"only {other}s. Add {kind!r} to SensitivityProbe.kinds, or give {option} a single value "
                f"(e.g. [8]), which needs no ranking"
            )
        return ValueError(
            f"layer {name!r} has no {kind!r} sensitivity for bits {bits} (probed: {probed}){others}: add "
            f"{bits} to SensitivityProbe.candidate_bits, or remove them from {option}"
        )

    def _objective(self, plan: QuantPlan, names: list[str]) -> np.ndarray:
        """``[L, K]`` summed sensitivity of every option of every free layer.

        A kind with a single candidate width gives every layer the same bits, so its sensitivity cannot change the
        choice: when it was not probed, its term is left out.

        Raises:
            ValueError: If a layer lacks a sensitivity for a candidate bit width (of a kind with several), or a
                sensitivity is not finite.
        """
        objective = np.zeros((len(names), len(self.options)))
        unavailable = self._unavailable(plan, names)
        for kind, candidates, weight in (("w", self.w_candidates, 1.0), ("a", self.a_candidates, self.act_weight)):
            if weight == 0 or not names:
                continue
            missing = {name: [b for b in candidates if b not in plan[name].sensitivity.get(kind, {})] for name in names}
            missing = {name: bits for name, bits in missing.items() if bits}
            if missing and len(candidates) == 1:
                continue
            if missing:
                raise self._missing(plan, kind, missing)
            for i, name in enumerate(names):
                scores = plan[name].sensitivity[kind]
                for k, option in enumerate(self.options):
                    bits = option[0] if kind == "w" else option[1]
                    score = scores[bits]
                    if not math.isfinite(score):
                        raise ValueError(
                            f"layer {name!r}: {TENSOR[kind]} sensitivity at {bits} bits is {score}; probe it again"
                        )
                    objective[i, k] += weight * score
        objective[unavailable] = np.inf
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
        act_other = np.array([spec.act_other for spec in free], dtype=np.float64)[:, None]  # a matmul's k or v
        shape = (len(free), len(options))
        owner = type(self).__name__
        constraints = []
        if self.energy_uj is not None or self.reference_bits is not None:
            fix = f"remove those bits from {owner}.w_candidates / a_candidates"
            coeffs = np.array([[_energy_uj(energy_model, spec, bw, ba, fix) for bw, ba in options] for spec in free])
            fix = "change the layer's pinned bits (BitAllocator.first_last_bits / overrides)"
            offset = sum(_energy_uj(energy_model, spec, lp.w_bits, lp.a_bits, fix) for spec, lp in pinned)
            if self.reference_bits is not None:
                # The budget is a multiple of a uniform setting's energy: messages give it as that ratio too.
                reference = uniform_energy(plan, energy_model, *self.reference_bits).total_pj / PJ_PER_UJ
                energy = Constraint(
                    "energy",
                    coeffs.reshape(shape),
                    self.energy_ratio * reference,
                    "µJ/image",
                    offset,
                    ratio_of=("energy_ratio", reference),
                )
            else:
                energy = Constraint("energy", coeffs.reshape(shape), self.energy_uj, "µJ/image", offset, "energy_uj")
            constraints.append(energy)
        if self.size_mb is not None:
            offset = sum(spec.params * effective_bits(lp.w_bits) for spec, lp in pinned) / 8 / 1e6
            constraints.append(Constraint("size", params * w / 8 / 1e6, self.size_mb, "MB", offset, "size_mb"))
        if self.bit_ops_g is not None:
            offset = sum(spec.macs * effective_bits(lp.w_bits) * effective_bits(lp.a_bits) for spec, lp in pinned)
            constraints.append(
                Constraint("bit_ops", macs * w * a / 1e9, self.bit_ops_g, "G bit-ops/image", offset / 1e9, "bit_ops_g")
            )
        if self.avg_weight_bits is not None:
            total = max(sum(spec.params for spec in plan.specs.values()), 1)
            offset = sum(spec.params * effective_bits(lp.w_bits) for spec, lp in pinned) / total
            coeffs = params * w / total
            constraints.append(
                Constraint("avg_weight_bits", coeffs, self.avg_weight_bits, "bits", offset, "avg_weight_bits")
            )
        if self.avg_act_bits is not None:
            total = max(sum(spec.act_in + spec.act_other for spec in plan.specs.values()), 1)
            offset = sum(
                spec.act_in * effective_bits(lp.a_bits) + spec.act_other * effective_bits(lp.w_bits)
                for spec, lp in pinned
            )
            offset /= total
            coeffs = (act_in * a + act_other * w) / total
            constraints.append(Constraint("avg_act_bits", coeffs, self.avg_act_bits, "bits", offset, "avg_act_bits"))
        for con in constraints:
            assert con.coeffs.shape == shape, (con.name, con.coeffs.shape, shape)
        return constraints

    # ------------------------------------------------------------------------------------------------ policy
    def check_plan(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> None:
        """Fail before calibration and probing when no allocation can meet the budgets.

        Whether a budget can be met depends only on the layers, the pins, the candidates and the energy model, not
        on the sensitivities, so a feasibility solve (zero objective) answers it at setup.

        Raises:
            InfeasibleBudgetError: With the smallest achievable value of each budget, ready to copy back.
        """
        energy_model = energy_model if energy_model is not None else HorowitzEnergyModel()
        names = [name for name in plan if not plan[name].pinned]
        constraints = self._constraints(plan, names, energy_model)
        try:
            solve_multiple_choice(np.where(self._unavailable(plan, names), np.inf, 0.0), constraints)
        except InfeasibleBudgetError as err:
            raise InfeasibleBudgetError(f"{self.describe()} over {len(names)} free layers: {err}") from None

    def allocate(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> Allocation:
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
            parts.append(f"energy<={self.energy_ratio:.2f}x{format_setting(*self.reference_bits)}")
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
