"""A grid that follows the rounded weight: the least-squares scale of each output row, given its integer codes.

GPTQ and GPFQ choose the integer level of each weight on a grid fixed beforehand by the original weight. Once the
levels are chosen, the scale that multiplies them can move too: with the codes ``z = level - zero_point`` of one output
row fixed, the method's quadratic objective (:mod:`lit_mpq.rounding.refine`)

    ``f(s) = s² zᵀ B z - 2 s zᵀ b``

is a parabola in the row's scale ``s``, smallest at ``s* = zᵀ b / zᵀ B z`` (``B = X~ᵀ X~``, ``b = X~ᵀ X w`` for
GPFQ; GPTQ's dampened ``H`` and ``H w``). A per-tensor grid shares one scale over every row, and its minimum is the
same ratio of sums over the rows. Brevitas' GPFQ moves its grid too, differently: its weight quantizer computes the
scale from the weight as GPFQ has modified it (``max|w|`` of each row); this fit instead picks the scale the objective
prefers.

:func:`fit_scales` alternates this fit with coordinate descent on the new grid (the levels' best response to the
scale), so the objective never rises from the greedy solution. The codes keep their integer range, so the result is
still ``scale · (code - zero_point)`` with codes in ``[qmin, qmax]``, on a grid of its own scale.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from lit_mpq.rounding.grid import Grid
from lit_mpq.rounding.refine import coordinate_descent

__all__ = ["fit_scales", "least_squares_scale"]


def least_squares_scale(rounded: Tensor, linear: Tensor, quadratic: Tensor, grid: Grid, per_channel: bool) -> Grid:
    """``grid`` with each row's scale replaced by the one minimising ``qᵀ B q - 2 qᵀ b`` for the codes of ``rounded``.

    Args:
        rounded: Weights on ``grid``, ``[groups, rows, columns]``.
        linear: ``b`` per output row, ``[groups, rows, columns]``.
        quadratic: ``B``, ``[groups, columns, columns]``, symmetric positive semi-definite.
        grid: The grid ``rounded`` lies on (its zero points and integer range are kept).
        per_channel: One scale per output row; otherwise one for the whole tensor (the rows' sums pooled).

    Returns:
        The refitted grid. A row (or tensor) whose codes are all zero, or whose best scale would not be positive,
        keeps its scale.
    """
    codes = torch.round(rounded.double() / grid.scale.unsqueeze(-1))  # level - zero_point, exactly an integer
    b_matrix = quadratic.double()
    curvature = torch.einsum("grc,gcd,grd->gr", codes, b_matrix, codes)  # zᵀ B z per row
    slope = (codes * linear.double()).sum(-1)  # zᵀ b per row
    if not per_channel:
        curvature = curvature.sum().expand_as(curvature)
        slope = slope.sum().expand_as(slope)
    best = slope / torch.where(curvature > 0, curvature, torch.ones_like(curvature))
    usable = (curvature > 0) & (best > 0) & torch.isfinite(best)
    return replace(grid, scale=torch.where(usable, best, grid.scale))


def fit_scales(
    rounded: Tensor,
    linear: Tensor,
    quadratic: Tensor,
    grid: Grid,
    per_channel: bool,
    rounds: int,
    passes: int,
) -> tuple[Tensor, Grid]:
    """Alternate the least-squares scale (:func:`least_squares_scale`) with coordinate descent on the new grid.

    Each round refits the scales to the current codes, then (``passes > 0``) moves each weight to its best level on
    the refitted grid: both steps can only lower ``qᵀ B q - 2 qᵀ b``, so the result is never worse than ``rounded``.

    Args:
        rounded: The method's solution on ``grid``, ``[groups, rows, columns]``.
        linear: ``b`` per output row, ``[groups, rows, columns]``.
        quadratic: ``B``, ``[groups, columns, columns]``.
        grid: The grid ``rounded`` lies on.
        per_channel: One scale per output row (else one per tensor).
        rounds: Scale fits (0 returns the inputs unchanged).
        passes: Coordinate-descent passes after each fit (0: the codes stay as the method chose them).

    Returns:
        The weight on the refitted grid (float64) and that grid.

    Raises:
        ValueError: If ``rounds`` or ``passes`` is negative.
    """
    if rounds < 0 or passes < 0:
        raise ValueError(f"scale fitting needs rounds >= 0 and passes >= 0, got {rounds} and {passes}")
    q = rounded.double()
    for _ in range(rounds):
        codes = torch.round(q / grid.scale.unsqueeze(-1))
        grid = least_squares_scale(q, linear, quadratic, grid, per_channel)
        q = codes * grid.scale.unsqueeze(-1)
        if passes:
            q = coordinate_descent(q, linear, quadratic, grid, passes)
    return q, grid
