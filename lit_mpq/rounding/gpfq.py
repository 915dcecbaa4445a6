"""GPFQ: greedy path-following quantization (Lybrand and Saab, JMLR 2021; Zhang, Zhou and Saab, SIMODS 2023).

GPFQ rounds one neuron (one output row ``w``) weight by weight, keeping the running error of the layer's output
small. With ``X_t`` the ``t``-th input feature over the calibration samples in the **float** network and ``X~_t``
the same feature in the **quantized** network (the already-quantized earlier layers, and this layer's own input
quantizer), the paper's update is::

    u_0 = 0
    q_t = Q( <X~_t, u_{t-1} + w_t X_t> / ||X~_t||² )
    u_t = u_{t-1} + w_t X_t - q_t X~_t

``Q`` rounds to the nearest element of the alphabet and ``u_t`` is the output error of the first ``t`` weights. So
each weight corrects both the rounding error of the weights before it and the error the quantized inputs bring in
(``X`` against ``X~``), which is what sets GPFQ apart from methods that fit ``X~`` alone.

``u`` has one entry per sample (image × position), far too many for a convolution's calibration set. But
``<X~_t, u_{t-1}>`` only needs inner products of input features, so this implementation keeps two
``columns × columns`` matrices, ``C = X~ᵀ X`` (``C[t, j] = <X~_t, X_j>``) and ``B = X~ᵀ X~``, and computes::

    q_t = Q( (sum_{j <= t} w_j C[t, j] - sum_{j < t} q_j B[t, j]) / B[t, t] )

for every output row at once, which is the same number (``tests/rounding/test_gpfq.py`` checks it against the
literal update). Columns are processed in blocks: the contribution of earlier blocks is one matrix product per
block. A feature that is zero on every sample (``B[t, t] = 0``) cannot change the output, and is rounded to nearest.

The alphabet is the weight quantizer's grid (:class:`~lit_mpq.rounding.grid.Grid`), or, with ``alphabet_scalar``
``C``, the source project's rule: a step such that ``2^b`` levels span ``±C · median|w|`` of the layer
(:func:`median_alphabet_scale`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_mpq.rounding.grid import Grid


def gpfq_round(weight: Tensor, cross: Tensor, gram: Tensor, grid: Grid, block_size: int = 128) -> Tensor:
    """Round ``weight`` onto ``grid`` with GPFQ.

    Args:
        weight: ``[groups, rows, columns]``.
        cross: ``[groups, columns, columns]``: ``X~ᵀ X`` (quantized-network features against float-network features).
        gram: ``[groups, columns, columns]``: ``X~ᵀ X~``.
        grid: The alphabet (per output row).
        block_size: Columns per block of the matrix-product update.

    Returns:
        The rounded weight (dequantized values on the grid), ``[groups, rows, columns]``, float64.

    Raises:
        ValueError: On mismatched shapes.
    """
    groups, rows, columns = weight.shape
    for name, matrix in (("cross", cross), ("gram", gram)):
        if matrix.shape != (groups, columns, columns):
            raise ValueError(f"GPFQ needs a {name} matrix of shape {(groups, columns, columns)}, got {matrix.shape}")
    w = weight.detach().double()
    c = cross.detach().double()
    b = gram.detach().double()
    # target[:, :, t] = sum_{j <= t} w_j C[t, j]: the float path's part, known before any rounding.
    target = w @ torch.tril(c).transpose(1, 2)
    norms = torch.diagonal(b, dim1=-2, dim2=-1)
    rounded = torch.zeros_like(w)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        # Everything rounded before this block, in one product: sum_{j < start} q_j B[t, j].
        block_target = target[:, :, start:end] - rounded[:, :, :start] @ b[:, start:end, :start].transpose(1, 2)
        for t in range(start, end):
            inside = rounded[:, :, start:t] @ b[:, t, start:t].unsqueeze(-1)  # sum_{start <= j < t} q_j B[t, j]
            value = block_target[:, :, t - start] - inside.squeeze(-1)
            norm = norms[:, t].unsqueeze(-1)
            live = norm > 0
            argument = torch.where(live, value / torch.where(live, norm, torch.ones_like(norm)), w[:, :, t])
            rounded[:, :, t] = grid.round_column(argument)
    return rounded


def median_alphabet_scale(weight: Tensor, bits: int, alphabet_scalar: float, per_channel: bool) -> Tensor:
    """Step of the source project's GPFQ alphabet: ``2^bits`` levels spanning ``±C · median|w|``.

    The source project's alphabet is ``linspace(-1, 1, 2^b) · C · median|w|``, whose step is
    ``2 C median|w| / (2^b - 1)``; lit_mpq keeps that step on its signed integer grid (which holds zero, one
    level more on the negative side).

    Args:
        weight: ``[out, ...]``.
        bits: Bit width ``b``.
        alphabet_scalar: ``C`` (> 0).
        per_channel: Median per output channel (one step each) instead of over the whole layer.

    Returns:
        The step: a scalar, or ``[out]`` per channel.

    Raises:
        ValueError: If ``alphabet_scalar`` is not positive.
    """
    if not alphabet_scalar > 0:
        raise ValueError(f"GPFQ alphabet_scalar must be positive, got {alphabet_scalar}")
    magnitude = weight.detach().abs().float()
    rows = magnitude.reshape(weight.shape[0], -1) if per_channel else magnitude.reshape(1, -1)
    # numpy's median (the source project's): the mean of the two middle values of an even count (torch.median takes
    # the lower one; torch.quantile refuses large tensors).
    count = rows.shape[1]
    lower = rows.kthvalue((count + 1) // 2, dim=1).values
    upper = rows.kthvalue(count // 2 + 1, dim=1).values
    median = (lower + upper) / 2 if per_channel else ((lower + upper) / 2)[0]
    step = 2.0 * alphabet_scalar * median / (2**bits - 1)
    return torch.clamp(step, min=torch.finfo(torch.float32).tiny)
