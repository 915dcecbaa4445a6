"""The points of a sweep: its settings, its energy budgets, and the allocation policies it evaluates.

The budgets are spread between the cheapest and the dearest allocation the candidates allow; the points after the
config's own are the budgets, the uniform baselines, the seed rule, the Asc/Desc weight splits and random allocations.

Pure: a plan, an energy model and settings in, points out; no Lightning, no files.

Example:
    >>> settings = SweepSettings(num_budgets=3, baselines=["W8A8"], seed_rule=False)
    >>> settings.expected_points  # the config's own allocation, 3 budgets, 1 uniform baseline
    5
    >>> SweepSettings(budgets=[0.8, -1.0])
    Traceback (most recent call last):
    ...
    ValueError: sweep budgets are multiples of W4A4's energy and must be positive numbers, got [0.8, -1.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lit_mpq.allocation import ExactAllocation, Policy, RandomAllocation, SensitivityPercentile, Uniform, WeightSplit
from lit_mpq.allocation.exact import parse_uniform_setting
from lit_mpq.allocation.split import ORDERS
from lit_mpq.bits import validate_candidates
from lit_mpq.energy import EnergyModel, uniform_energy
from lit_mpq.plan import QuantPlan

__all__ = ["CONFIG_POINT", "SweepPoint", "SweepSettings", "budget_ratios", "energy_span", "sweep_points"]

CONFIG_POINT = "config"
"""Name and kind of the sweep's first point: the config's own allocation, evaluated in the config's own run."""

PJ_PER_UJ = 1e6


def _bit_list(values: Sequence[int] | None, what: str) -> tuple[int, ...] | None:
    """``values`` as a sorted tuple of unique integer bit widths, or ``None``; ``ValueError`` naming ``what``."""
    if values is None:
        return None
    if not values:
        raise ValueError(f"sweep {what} must list at least one bit width, e.g. [4, 6, 8], or be null (the probe's)")
    return tuple(validate_candidates(values, f"sweep {what}"))


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep evaluates; the arguments of ``python cli.py sweep``, checked before anything runs.

    Attributes:
        num_budgets: Number of budgets, spread evenly between the lowest and the highest energy the candidates allow
            (used when ``budgets`` is not given).
        budgets: Explicit budgets as multiples of ``relative_to``'s uniform energy, e.g. ``[0.8, 1.0, 1.2]``.
        relative_to: Uniform setting whose energy is the unit of ``budgets`` and of random allocations.
        w_candidates: Weight bit widths the solver may pick; ``None``: those of the config's ``ExactAllocation``, or
            the probe's candidates when the config allocates otherwise.
        a_candidates: Activation bit widths the solver may pick; ``None``: as ``w_candidates``.
        baselines: Uniform settings evaluated as baselines (``W<b>A<b>``).
        seed_rule: Also evaluate the seed percentile rule (weights 4/6/8 by sensitivity, A8).
        splits: Weight splits to evaluate, any of ``"asc"`` (first half of the weights, by cumulative weight count, at
            the lower of ``split_bits``, second half at the higher) and ``"desc"`` (the reverse), activations at 8
            bits (:class:`~lit_mpq.allocation.WeightSplit`); points ``split_asc`` and ``split_desc``.
        split_bits: The two weight bit widths of the splits.
        num_random: Random allocations at ``relative_to``'s energy (exact solver, random objective).
        output_dir: Where the sweep's files go; ``None``: ``<run dir>/sweep``.

    Raises:
        ValueError: On a non-positive budget or count, an unparsable setting, repeated baselines, or bad bits.
    """

    num_budgets: int = 10
    budgets: tuple[float, ...] | None = None
    relative_to: str = "W4A4"
    w_candidates: tuple[int, ...] | None = None
    a_candidates: tuple[int, ...] | None = None
    baselines: tuple[str, ...] = ("W8A8", "W6A6", "W4A8", "W4A4")
    seed_rule: bool = True
    splits: tuple[str, ...] = ()
    split_bits: tuple[int, ...] = (3, 5)
    num_random: int = 0
    output_dir: str | None = None

    def __post_init__(self) -> None:
        # Lists come from the command line; frozen tuples keep the settings hashable and unchanged.
        if self.budgets is not None:
            budgets = [float(b) for b in self.budgets]
            if not budgets or not all(math.isfinite(b) and b > 0 for b in budgets):
                raise ValueError(
                    f"sweep budgets are multiples of {self.relative_to}'s energy and must be positive numbers, "
                    f"got {list(self.budgets)}"
                )
            object.__setattr__(self, "budgets", tuple(budgets))
        elif isinstance(self.num_budgets, bool) or not isinstance(self.num_budgets, int) or self.num_budgets < 1:
            raise ValueError(f"sweep num_budgets must be a positive integer, got {self.num_budgets!r}")
        if isinstance(self.num_random, bool) or not isinstance(self.num_random, int) or self.num_random < 0:
            raise ValueError(f"sweep num_random must be a non-negative integer, got {self.num_random!r}")
        baselines = tuple(self.baselines)
        for setting in (self.relative_to, *baselines):
            parse_uniform_setting(setting)
        names = [setting.strip().upper() for setting in baselines]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"sweep baselines repeat {repeated}: list each uniform setting once")
        object.__setattr__(self, "baselines", tuple(names))
        splits = tuple(str(order).strip().lower() for order in self.splits)
        if any(order not in ORDERS for order in splits) or len(set(splits)) != len(splits):
            raise ValueError(f"sweep splits must list each of {list(ORDERS)} at most once, got {self.splits!r}")
        object.__setattr__(self, "splits", splits)
        split_bits = validate_candidates(self.split_bits or (), "sweep split_bits")
        if len(split_bits) != 2:
            raise ValueError(f"sweep split_bits must be two different bit widths, e.g. [3, 5], got {self.split_bits}")
        object.__setattr__(self, "split_bits", tuple(split_bits))
        object.__setattr__(self, "w_candidates", _bit_list(self.w_candidates, "w_candidates"))
        object.__setattr__(self, "a_candidates", _bit_list(self.a_candidates, "a_candidates"))

    @property
    def expected_points(self) -> int:
        """How many points the sweep evaluates, the config's own included (some may turn out infeasible)."""
        budgets = len(self.budgets) if self.budgets is not None else self.num_budgets
        return 1 + budgets + len(self.baselines) + int(self.seed_rule) + len(self.splits) + self.num_random


@dataclass(frozen=True)
class SweepPoint:
    """One allocation the sweep evaluates.

    Attributes:
        name: Unique name: the point's folder, its TensorBoard run and its row (``budget_03``, ``uniform_W4A8``).
        kind: ``"config"``, ``"budget"``, ``"uniform"``, ``"seed_rule"``, ``"split"`` or ``"random"``.
        policy: The allocation policy.
        budget_ratio: The energy budget as a multiple of ``relative_to``'s energy, for budget and random points.
    """

    name: str
    kind: str
    policy: Policy
    budget_ratio: float | None = None


def energy_span(
    plan: QuantPlan, energy_model: EnergyModel, w_candidates: Sequence[int], a_candidates: Sequence[int]
) -> tuple[float, float]:
    """Lowest and highest analytic energy (µJ per image) the candidates can reach; pinned layers keep their bits.

    Args:
        plan: The plan, with the pins of the config's allocation.
        energy_model: Prices each layer at each bit width.
        w_candidates: Weight bit widths a free layer may take.
        a_candidates: Activation bit widths a free layer may take.

    Returns:
        ``(lowest, highest)`` in µJ per image.
    """
    low = high = 0.0
    for spec, decision in plan.items():
        if decision.pinned:
            energy = energy_model.layer(spec, decision.w_bits, decision.a_bits).total_pj
            low, high = low + energy, high + energy
            continue
        options = [energy_model.layer(spec, w, a).total_pj for w in w_candidates for a in a_candidates]
        low, high = low + min(options), high + max(options)
    return low / PJ_PER_UJ, high / PJ_PER_UJ


def budget_ratios(
    plan: QuantPlan,
    energy_model: EnergyModel,
    settings: SweepSettings,
    w_candidates: Sequence[int],
    a_candidates: Sequence[int],
) -> list[float]:
    """The budgets of the sweep as multiples of ``settings.relative_to``'s uniform energy.

    The explicit ``settings.budgets`` when given; otherwise ``settings.num_budgets`` budgets evenly spaced between the
    lowest and highest energy the candidates reach (:func:`energy_span`), both ends included; so every one of them
    is feasible.

    Returns:
        The ratios, in increasing order for the spread budgets, as given otherwise.
    """
    if settings.budgets is not None:
        return list(settings.budgets)
    unit = uniform_energy(plan, energy_model, *parse_uniform_setting(settings.relative_to)).total_pj / PJ_PER_UJ
    low, high = energy_span(plan, energy_model, w_candidates, a_candidates)
    if settings.num_budgets == 1:
        return [low / unit]
    steps = settings.num_budgets - 1
    return [(low + (high - low) * k / steps) / unit for k in range(settings.num_budgets)]


def sweep_points(
    settings: SweepSettings,
    plan: QuantPlan,
    energy_model: EnergyModel,
    probe_bits: Sequence[int],
    config_candidates: tuple[Sequence[int], Sequence[int]] | None = None,
) -> list[SweepPoint]:
    """The points evaluated after the config's own: budgets, uniform baselines, the seed rule, splits, random ones.

    Args:
        settings: The sweep's settings.
        plan: The plan after the config's own allocation (its pins count towards every budget).
        energy_model: The run's energy model (the ``EnergyMeter``'s).
        probe_bits: The probe's candidate bit widths, the default candidates of the solver.
        config_candidates: ``(w_candidates, a_candidates)`` of the config's own ``ExactAllocation``: the default
            instead of ``probe_bits`` (a sweep of an energy config then explores the space the config allocates in).

    Returns:
        The points in evaluation order, with unique names.
    """
    w_default, a_default = config_candidates or (probe_bits, probe_bits)
    w_candidates = list(settings.w_candidates or w_default)
    a_candidates = list(settings.a_candidates or a_default)
    ratios = budget_ratios(plan, energy_model, settings, w_candidates, a_candidates)
    points = [
        SweepPoint(
            f"budget_{k:02d}",
            "budget",
            ExactAllocation(
                w_candidates=w_candidates,
                a_candidates=a_candidates,
                energy_relative_to=settings.relative_to,
                energy_ratio=ratio,
            ),
            ratio,
        )
        for k, ratio in enumerate(ratios)
    ]
    points += [
        SweepPoint(f"uniform_{setting}", "uniform", Uniform(*parse_uniform_setting(setting)))
        for setting in settings.baselines
    ]
    if settings.seed_rule:
        points.append(SweepPoint("seed_rule", "seed_rule", SensitivityPercentile(target="w", a_bits=8)))
    low_bits, high_bits = settings.split_bits
    points += [
        SweepPoint(f"split_{order}", "split", WeightSplit(order, low_bits, high_bits, a_bits=8))
        for order in settings.splits
    ]
    points += [
        SweepPoint(
            f"random_{seed}",
            "random",
            RandomAllocation(
                seed=seed,
                w_candidates=w_candidates,
                a_candidates=a_candidates,
                energy_relative_to=settings.relative_to,
            ),
            1.0,
        )
        for seed in range(settings.num_random)
    ]
    return points
