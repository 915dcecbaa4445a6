"""GPTQ: rounding with second-order error feedback (Frantar, Ashkboos, Hoefler and Alistarh, ICLR 2023).

GPTQ minimises a layer's output error ``||W X - Q X||²`` over the calibration inputs ``X`` (columns = samples), whose
Hessian is ``H = X Xᵀ`` (up to a factor 2). Columns of ``W`` are rounded one at a time; the error each rounding makes
is spread over the columns not yet rounded through the inverse Hessian (Optimal Brain Surgeon), so that they can
compensate for it. The implementation follows the paper's Algorithm 1:

- the inverse Hessian's rows are read from the upper Cholesky factor of ``H⁻¹`` (numerically stable, and the
  sequence of OBS updates of ``H⁻¹`` in closed form);
- columns are processed in blocks of ``block_size`` ("lazy batch updates"): inside a block the updates are
  column by column, to the rest of the matrix one matrix product per block;
- ``damp`` adds ``damp * mean(diag H)`` to the diagonal of ``H`` (dampening), and inputs that are always zero get
  ``H[i, i] = 1`` (their weights do not change the output on these samples, so they round to nearest);
- ``act_order`` rounds columns in order of decreasing ``H[i, i]`` (the paper's "act-order" heuristic); the grid
  (scale per output row) is fixed beforehand, so the order does not change it.

With a diagonal ``H`` no error can be compensated and GPTQ is exactly nearest rounding (a test checks it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_mpq.rounding.grid import Grid


def gptq_round(
    weight: Tensor,
    hessian: Tensor,
    grid: Grid,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> Tensor:
    """Round ``weight`` onto ``grid`` with GPTQ.

    Args:
        weight: ``[groups, rows, columns]``.
        hessian: ``[groups, columns, columns]``: ``X Xᵀ`` of each group's inputs (any positive factor).
        grid: The quantization grid (per output row).
        damp: Dampening, as a fraction of the mean diagonal of each group's Hessian.
        block_size: Columns per lazy batch update.
        act_order: Round columns in order of decreasing Hessian diagonal.

    Returns:
        The rounded weight (dequantized values on the grid), ``[groups, rows, columns]``, float64.

    Raises:
        ValueError: On mismatched shapes or a negative ``damp``.
    """
    groups, rows, columns = weight.shape
    if hessian.shape != (groups, columns, columns):
        raise ValueError(f"GPTQ needs a Hessian of shape {(groups, columns, columns)}, got {tuple(hessian.shape)}")
    if damp < 0:
        raise ValueError(f"GPTQ damp must be >= 0, got {damp}")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    diagonal = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    if act_order:
        order = torch.argsort(diagonal, dim=-1, descending=True)
    else:
        order = torch.arange(columns, device=w.device).expand(groups, columns)
    w = torch.gather(w, 2, order.unsqueeze(1).expand(groups, rows, columns))
    h = torch.gather(h, 1, order.unsqueeze(2).expand(groups, columns, columns))
    h = torch.gather(h, 2, order.unsqueeze(1).expand(groups, columns, columns))
    diagonal = torch.diagonal(h, dim1=-2, dim2=-1)
    diagonal += damp * diagonal.mean(dim=-1, keepdim=True)
    inverse_factor = _upper_cholesky_of_inverse(h)

    rounded = torch.zeros_like(w)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, :, start:end].clone()
        errors = torch.zeros_like(block)
        factor = inverse_factor[:, start:end, start:end]
        for i in range(end - start):
            column = block[:, :, i]
            q = grid.round_column(column)
            rounded[:, :, start + i] = q
            error = (column - q) / factor[:, i, i].unsqueeze(-1)
            # OBS update of the block's remaining columns: W[:, j] -= err * Hinv[i, j] / Hinv[i, i] (Cholesky form).
            block[:, :, i:] -= error.unsqueeze(-1) * factor[:, i, i:].unsqueeze(1)
            errors[:, :, i] = error
        w[:, :, end:] -= errors @ inverse_factor[:, start:end, end:]
    inverse_order = torch.argsort(order, dim=-1)
    return torch.gather(rounded, 2, inverse_order.unsqueeze(1).expand(groups, rows, columns))


def _upper_cholesky_of_inverse(hessian: Tensor) -> Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``); more dampening if ``H`` is not positive definite."""
    mean_diagonal = torch.diagonal(hessian, dim1=-2, dim2=-1).mean(dim=-1)  # [groups]
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
    h = hessian
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h)
        if not bool(info.any()):
            # H⁻¹ = L⁻ᵀ L⁻¹ through a triangular solve: torch.cholesky_inverse is ~10x slower on CPU.
            lower_inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
            return torch.linalg.cholesky(lower_inverse.transpose(-1, -2) @ lower_inverse, upper=True)
        # Rank-deficient calibration data: add 1 %, 10 %, ... of the mean diagonal more.
        h = hessian + (0.01 * 10.0**attempt) * mean_diagonal[:, None, None] * eye
    raise torch.linalg.LinAlgError("GPTQ: the Hessian stays singular after dampening; use more calibration images")
