"""Learned per-layer bit widths: continuous bit widths trained with the network toward a budget, then rounded.

Each layer's weight bit width is a parameter ``b`` between the smallest and largest candidate. Between two adjacent
candidates ``lo <= b <= hi`` the weight is the interpolation of its two fake quantizations,
``Q_b(W) = Q_lo(W) + t (Q_hi(W) - Q_lo(W))`` with ``t = (b - lo) / (hi - lo)``: exactly the usual quantized weight at
a candidate, differentiable in ``b`` in between (``dQ/db = (Q_hi - Q_lo) / (hi - lo)``, how much the layer's output
moves per bit), and in ``W`` through the straight-through estimator of both quantizations.

The budget enters the loss as a penalty that is zero at the target and pulls toward it from either side
(:func:`budget_penalty`): ``((c(b) - target) / target)^2`` for the parameter-weighted average bit width, or for the
analytic energy (:func:`relaxed_cost`: each layer's cost interpolated between its two candidates, exact at the
candidates). Training trades the loss against the budget; :func:`round_to_budget` then gives every layer a
candidate width (nearest first, then the cheapest moves until the budget holds, then raises that still fit), which is
a normal plan.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lit_mpq.quant.modules import WeightQuantizer

__all__ = [
    "LearnedBitWeightQuantizer",
    "budget_penalty",
    "learned_bit_quantizers",
    "relaxed_cost",
    "round_to_budget",
]


def _bracket(candidates: Sequence[int], value: float) -> tuple[int, int]:
    """The adjacent candidates ``lo <= value <= hi`` (``value`` within the candidates' range)."""
    index = bisect.bisect_right(candidates, value) - 1
    index = min(max(index, 0), len(candidates) - 2)
    return candidates[index], candidates[index + 1]


class LearnedBitWeightQuantizer(WeightQuantizer):
    """A :class:`~lit_mpq.quant.modules.WeightQuantizer` whose bit width is a trained continuous parameter.

    While :attr:`learning` is on, the forward pass quantizes at the continuous width (the interpolation between the two
    adjacent candidates); otherwise it is the usual quantizer at :attr:`bits`.

    Args:
        candidates: Bit widths the layer may end with (at least two, ascending after sorting).
        bits, symmetric, per_channel, method: As for :class:`~lit_mpq.quant.modules.WeightQuantizer`.

    Raises:
        ValueError: With fewer than two candidates.
    """

    def __init__(
        self,
        candidates: Sequence[int],
        bits: int | None = 8,
        symmetric: bool = True,
        per_channel: bool = True,
        method: str = "minmax",
    ) -> None:
        super().__init__(bits, symmetric, per_channel, method)
        self.candidates = sorted({int(b) for b in candidates})
        if len(self.candidates) < 2:
            raise ValueError(f"learned bit widths need at least two candidate widths, got {list(candidates)}")
        start = float(bits) if bits is not None else float(self.candidates[-1])
        self.bit_width = nn.Parameter(torch.tensor(start))
        self.learning = False
        """Quantize at the continuous :attr:`bit_width` (training); off: at :attr:`bits` like any quantizer."""

    @classmethod
    def from_quantizer(cls, quantizer: WeightQuantizer, candidates: Sequence[int]) -> LearnedBitWeightQuantizer:
        """The same quantizer (settings, mode) with a bit-width parameter starting at its bits."""
        learned = cls(candidates, quantizer.bits, quantizer.symmetric, quantizer.per_channel, quantizer.method)
        learned.mode = quantizer.mode
        return learned

    def continuous_bits(self) -> Tensor:
        """The bit width in use, clamped to the candidates' range.

        The gradient passes the clamp unchanged: a width that starts at the largest candidate (where a plain clamp's
        gradient is zero) can still move down.
        """
        width = self.bit_width
        return width + (width.clamp(self.candidates[0], self.candidates[-1]) - width).detach()

    @torch.no_grad()
    def project(self) -> None:
        """Bring the parameter back into the candidates' range (after an optimizer step)."""
        self.bit_width.clamp_(self.candidates[0], self.candidates[-1])

    def quantize(self, weight: Tensor, bits: int, version: tuple[int, ...] | None = None) -> Tensor:
        """At the continuous width while learning (``bits`` = this quantizer's own), else as usual."""
        if not self.learning or bits != self.bits:
            return super().quantize(weight, bits, version)
        width = self.continuous_bits()
        lo, hi = _bracket(self.candidates, float(width.detach()))
        low = super().quantize(weight, lo, version)
        high = super().quantize(weight, hi, version)
        return low + (width - lo) / (hi - lo) * (high - low)

    def frozen(self) -> WeightQuantizer:
        """The usual quantizer at :attr:`bits` (what the layer keeps once its width is rounded)."""
        plain = WeightQuantizer(self.bits, self.symmetric, self.per_channel, self.method)
        plain.mode = self.mode
        return plain


def relaxed_cost(width: Tensor, costs: Mapping[int, float]) -> Tensor:
    """A layer's cost at a continuous ``width``: linear between its two adjacent candidates' costs, exact at them.

    Args:
        width: The continuous bit width (a scalar tensor, within the candidates' range).
        costs: ``{candidate bits: cost}`` (e.g. the layer's energy in pJ at each weight width).
    """
    candidates = sorted(costs)
    lo, hi = _bracket(candidates, float(width.detach()))
    return costs[lo] + (width - lo) / (hi - lo) * (costs[hi] - costs[lo])


def budget_penalty(cost: Tensor, target: float) -> Tensor:
    """``((cost - target) / target)^2``: zero at the target, its gradient pointing toward it from either side.

    Raises:
        ValueError: If ``target`` is not positive.
    """
    if not target > 0:
        raise ValueError(f"a bit-width budget must be positive, got {target}")
    return ((cost - target) / target) ** 2


def round_to_budget(
    widths: Mapping[str, float],
    costs: Mapping[str, Mapping[int, float]],
    budget: float,
    fixed_cost: float = 0.0,
    fill: float | None = None,
) -> dict[str, int]:
    """The candidate widths nearest the learned ``widths`` whose total cost is at most ``budget``, exactly.

    Nearest: the least summed squared distance ``sum_l (b_l - w_l)^2``, found by the same exact multiple-choice
    solver as :class:`~lit_mpq.allocation.ExactAllocation`. With ``fill``, the total must also be at least
    ``budget - fill`` (the budget is spent, not only respected), when any choice allows it.

    Args:
        widths: ``{layer: learned continuous width}``.
        costs: ``{layer: {candidate bits: cost}}``.
        budget: Largest total cost, including ``fixed_cost``.
        fixed_cost: Cost of the layers that are not learned (pinned layers).
        fill: How far under the budget the total may stay (same unit); None: no lower bound.

    Raises:
        ValueError: If even the smallest candidates exceed the budget.
    """
    from lit_mpq.allocation.solver import Constraint, InfeasibleBudgetError, solve_multiple_choice

    names = list(widths)
    options = sorted({b for name in names for b in costs[name]})
    objective = np.full((len(names), len(options)), np.inf)
    spend = np.zeros((len(names), len(options)))
    for row, name in enumerate(names):
        for column, bits in enumerate(options):
            if bits in costs[name]:
                objective[row, column] = (bits - widths[name]) ** 2
                spend[row, column] = costs[name][bits]
    at_most = Constraint("budget", spend, float(budget), offset=float(fixed_cost))
    floor = fixed_cost + sum(min(costs[name].values()) for name in names)
    if floor > budget * (1 + 1e-12):
        raise ValueError(
            f"the budget {budget:.6g} is below the cost of every layer at its smallest candidate ({floor:.6g})"
        )
    constraints = [at_most]
    if fill is not None:
        constraints.append(Constraint("fill", -spend, -(float(budget) - float(fill)), offset=-float(fixed_cost)))
    try:
        choice = solve_multiple_choice(objective, constraints)
    except InfeasibleBudgetError:  # no choice spends that much of the budget: respect the budget only
        choice = solve_multiple_choice(objective, [at_most])
    return {name: options[int(k)] for name, k in zip(names, choice, strict=True)}


def learned_bit_quantizers(model: nn.Module) -> dict[str, LearnedBitWeightQuantizer]:
    """``{layer name: its learned-bit weight quantizer}`` for the layers of ``model`` that have one."""
    from lit_mpq.quant.apply import quant_layers

    return {
        name: layer.weight_quantizer
        for name, layer in quant_layers(model).items()
        if isinstance(getattr(layer, "weight_quantizer", None), LearnedBitWeightQuantizer)
    }
