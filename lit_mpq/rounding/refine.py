"""Coordinate-descent refinement of a rounded weight on its method's own quadratic objective.

GPTQ and GPFQ are one greedy pass over the columns: each weight is rounded once, knowing only the columns rounded
before it. Both minimise a quadratic in the rounded weight ``q`` of each output row,

    ``f(q) = qᵀ B q - 2 qᵀ b + const``,

with ``B = X~ᵀ X~`` and ``b = X~ᵀ X w`` for GPFQ (``||X w - X~ q||²``: the float network's output from the quantized
one's inputs) and ``B = H = X~ᵀ X~ + λI`` and ``b = H w`` for GPTQ (``||X~ (w - q)||²`` plus its dampening). A pass of
coordinate descent visits every column ``t`` and puts ``q_t`` on the grid level that minimises ``f`` with the other
columns fixed; along one coordinate ``f`` is a parabola with its minimum at ``q_t + r_t / B_tt`` (``r = b - B q``,
the residual), so the best level is that point rounded to the grid. Each step can only lower ``f``, and the greedy
solution is the start, so the refined weight is never worse on the objective (the coordinate-wise PTQ of COMQ, Zhang
et al. 2024, "COMQ: a backpropagation-free algorithm for post-training quantization", applied after the greedy pass
rather than from nearest rounding). Passes stop early once one changes no level.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_mpq.rounding.grid import Grid

__all__ = ["coordinate_descent", "quadratic_objective"]


def quadratic_objective(rounded: Tensor, linear: Tensor, quadratic: Tensor) -> Tensor:
    """``qᵀ B q - 2 qᵀ b`` per output row (the objective up to its constant), ``[groups, rows]``."""
    return torch.einsum("grc,gcd,grd->gr", rounded, quadratic, rounded) - 2 * (rounded * linear).sum(-1)


def coordinate_descent(rounded: Tensor, linear: Tensor, quadratic: Tensor, grid: Grid, passes: int) -> Tensor:
    """Refine ``rounded`` by exact coordinate minimisation of ``qᵀ B q - 2 qᵀ b`` on ``grid``.

    Args:
        rounded: The greedy solution ``[groups, rows, columns]`` (values on the grid).
        linear: ``b`` per output row, ``[groups, rows, columns]``.
        quadratic: ``B`` ``[groups, columns, columns]``, symmetric positive semi-definite.
        grid: The grid the weight is rounded onto.
        passes: Sweeps over the columns (0 returns ``rounded`` unchanged).

    Returns:
        The refined weight (float64, on the grid); its objective is at most that of ``rounded`` in every row.

    Raises:
        ValueError: On mismatched shapes or a negative ``passes``.
    """
    groups, rows, columns = rounded.shape
    if passes < 0:
        raise ValueError(f"refinement passes must be >= 0, got {passes}")
    if linear.shape != rounded.shape or quadratic.shape != (groups, columns, columns):
        raise ValueError(
            f"coordinate descent needs b {tuple(rounded.shape)} and B {(groups, columns, columns)}, got "
            f"{tuple(linear.shape)} and {tuple(quadratic.shape)}"
        )
    q = rounded.detach().double().clone()
    b_matrix = quadratic.detach().double()
    residual = linear.detach().double() - q @ b_matrix.transpose(1, 2)  # r = b - B q, row by row
    diagonal = torch.diagonal(b_matrix, dim1=-2, dim2=-1)  # [groups, columns]
    for _ in range(passes):
        changed = False
        for t in range(columns):
            norm = diagonal[:, t].unsqueeze(-1)  # [groups, 1]
            if not bool((norm > 0).any()):
                continue  # a feature that is zero everywhere: its weight cannot change the output
            live = norm > 0
            old = q[:, :, t]
            new = grid.round_column(old + residual[:, :, t] / torch.where(live, norm, torch.ones_like(norm)))
            new = torch.where(live, new, old)
            delta = new - old
            if bool(delta.any()):
                changed = True
                q[:, :, t] = new
                residual -= delta.unsqueeze(-1) * b_matrix[:, t, :].unsqueeze(1)
        if not changed:
            break
    return q
