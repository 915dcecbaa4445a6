"""AdaRound (Nagel et al., ICML 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization") on one layer.

Each weight is rounded down or up, never elsewhere: ``W~ = s · (floor(W / s) + h(V))`` with the rectified sigmoid
``h(V) = clip(σ(V)·(ζ - γ) + γ, 0, 1)``, ``ζ = 1.1``, ``γ = -0.1`` (the paper's eq. 23), clamped to the grid's range.
The continuous ``V`` is trained with Adam on the layer's reconstruction error plus the regularizer
``λ Σ (1 - |2h(V) - 1|^β)`` (eq. 24), which pushes every ``h`` to 0 or 1 as ``β`` anneals from 20 to 2; the first
``warm_start`` of the iterations run without it. At the end each weight takes ``h >= 0.5`` (``V >= 0``) as "up".

The reconstruction error is the asymmetric one the paper uses (section 5): the float network's output from the
quantized network's inputs, ``||W X - W~ X~||²``. It is a quadratic in ``W~`` per output row,
``W~ᵀ B W~ - 2 W~ᵀ b + const`` with ``B = X~ᵀ X~`` and ``b = X~ᵀ X w`` (GPFQ's objective,
:mod:`lit_mpq.rounding.refine`), so each iteration costs a ``[rows, columns] × [columns, columns]`` product instead of
a pass over the calibration images. Divided by the number of output elements it is the paper's mean squared error, the
scale its ``λ = 0.01`` was chosen for. The paper also puts the layer's activation function inside the loss; a
quadratic form cannot, so this is its pre-activation variant. :func:`adaround` takes any such ``(b, B)``: the caller
(:mod:`lit_mpq.rounding.layerwise`) also offers GPTQ's objective, ``B = H = X~ᵀ X~`` dampened and ``b = H w``,
the layer's own output on its quantized inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_mpq.rounding.grid import Grid

__all__ = [
    "GAMMA",
    "ZETA",
    "adaround",
    "beta_schedule",
    "offset_gradient",
    "rectified_sigmoid",
    "rounding_regularizer",
]

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clip(σ(V)·(ζ - γ) + γ, 0, 1)``: the soft rounding offset in ``[0, 1]`` (eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regularizer(v: Tensor, beta: float) -> Tensor:
    """``Σ (1 - |2h(V) - 1|^β)``: zero exactly when every offset is 0 or 1 (eq. 24)."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def beta_schedule(iteration: int, iterations: int, warm_start: float, beta_range: tuple[float, float]) -> float | None:
    """``β`` at ``iteration``: None during the warm start, then a cosine decay from ``beta_range[0]`` to ``[1]``."""
    warm = int(warm_start * iterations)
    if iteration < warm:
        return None
    progress = (iteration - warm) / max(iterations - warm, 1)
    start, end = beta_range
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def adaround(
    weight: Tensor,
    linear: Tensor,
    quadratic: Tensor,
    grid: Grid,
    samples: int,
    iterations: int = 10000,
    regularization: float = 0.01,
    beta_range: tuple[float, float] = (20.0, 2.0),
    warm_start: float = 0.2,
    learning_rate: float = 1e-3,
) -> Tensor:
    """Round ``weight`` up or down per element by AdaRound on the quadratic objective ``qᵀ B q - 2 qᵀ b``.

    Args:
        weight: ``[groups, rows, columns]``.
        linear: ``b`` per output row, ``[groups, rows, columns]``.
        quadratic: ``B`` ``[groups, columns, columns]``, sums over ``samples`` input columns.
        grid: The grid the weight is rounded onto (its scale per output row, zero point and range).
        samples: Input columns summed into ``B`` (images × output positions): the objective divided by
            ``samples × rows`` is the mean squared output error the paper's ``λ`` refers to.
        iterations: Adam steps (the paper: 10,000 at batch 32).
        regularization: ``λ`` of the rounding regularizer.
        beta_range: ``β`` at the end of the warm start and at the last step.
        warm_start: Fraction of the steps without the regularizer.
        learning_rate: Adam's step size.

    Returns:
        The rounded weight (float64, on the grid: every level ``floor(w / s)`` or one above, clamped to the range).

    Raises:
        ValueError: On mismatched shapes or a setting out of range.
    """
    groups, rows, columns = weight.shape
    if linear.shape != weight.shape or quadratic.shape != (groups, columns, columns):
        raise ValueError(
            f"AdaRound needs b {tuple(weight.shape)} and B {(groups, columns, columns)}, got "
            f"{tuple(linear.shape)} and {tuple(quadratic.shape)}"
        )
    if iterations < 1 or samples < 1 or regularization < 0 or not 0 <= warm_start < 1:
        raise ValueError(
            f"AdaRound needs iterations >= 1, samples >= 1, regularization >= 0 and 0 <= warm_start < 1; got "
            f"{iterations}, {samples}, {regularization}, {warm_start}"
        )
    # validate() runs in inference mode, whose tensors an optimizer cannot update in place: work on ordinary copies.
    with torch.inference_mode(False), torch.no_grad():
        scale = grid.scale.unsqueeze(-1).float().clone()
        zero_point = grid.zero_point.unsqueeze(-1).float().clone()
        levels = (grid.qmin, grid.qmax)
        norm = float(samples * rows * groups)
        b_matrix, b_vector = quadratic.float() / norm, linear.float() / norm
        b_matrix = (b_matrix + b_matrix.transpose(1, 2)) / 2  # symmetric to the last bit, as the gradient assumes
        w = weight.float()
        floor = torch.floor(w / scale)
        fraction = (w / scale - floor).clamp(1e-4, 1 - 1e-4)
        # V such that h(V) is the weight's own fractional part: training starts from the float weight.
        v = torch.log((fraction - GAMMA) / (ZETA - fraction))
        optimizer = torch.optim.Adam([v], lr=learning_rate)
        for iteration in range(iterations):
            beta = beta_schedule(iteration, iterations, warm_start, beta_range)
            v.grad = offset_gradient(v, floor, scale, zero_point, levels, b_matrix, b_vector, regularization, beta)
            optimizer.step()
        level = torch.clamp(floor + (v >= 0).float() + zero_point, *levels)
        return ((level - zero_point) * scale).double()


def offset_gradient(
    v: Tensor,
    floor: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    levels: tuple[int, int],
    b_matrix: Tensor,
    b_vector: Tensor,
    regularization: float,
    beta: float | None,
) -> Tensor:
    """The gradient in ``V`` of ``qᵀ B q - 2 qᵀ b + λ Σ (1 - |2h(V) - 1|^β)``, ``q = s·(clamp(floor + h(V) + z) - z)``.

    Written out (``dq/dh = s`` inside the grid's range, 0 where the clamp holds; ``dh/dV = (ζ - γ) σ(1 - σ)`` where the
    rectified sigmoid is strictly between 0 and 1, 0 where it is clipped) so that each of the many small steps costs a
    few tensor operations and no autograd graph; ``B`` must be symmetric. ``beta`` None: no regularizer (warm start).
    """
    sigmoid = torch.sigmoid(v)
    stretched = sigmoid * (ZETA - GAMMA) + GAMMA
    offset = stretched.clamp(0.0, 1.0)
    level = floor + offset + zero_point
    inside = (level > levels[0]) & (level < levels[1])
    q = (level.clamp(levels[0], levels[1]) - zero_point) * scale
    grad_h = 2 * (q @ b_matrix - b_vector) * scale * inside
    if beta is not None:
        centred = 2 * offset - 1
        grad_h = grad_h - regularization * beta * centred.abs().pow(beta - 1) * torch.sign(centred) * 2
    d_offset = (ZETA - GAMMA) * sigmoid * (1 - sigmoid) * ((stretched > 0) & (stretched < 1))
    return grad_h * d_offset
