"""The integer grid a weight is rounded onto, shared by every rounding method.

Data-driven rounding (GPTQ, GPFQ) changes *which* level each weight takes, never the levels themselves: the grid is
the weight quantizer's (its scale per output row or per tensor, its zero point and integer range), computed from the
original weight before any rounding, so that a rounded weight deploys exactly like a nearest-rounded one. (The
``scale_fit`` option, :mod:`lit_mpq.rounding.scale_fit`, is the exception: it refits each row's scale afterwards.)

Weights are handled as ``[groups, rows, columns]`` matrices: a Linear is one group of ``[out, in]``; a convolution
with ``g`` groups is ``g`` groups of ``[out / g, in / g * kh * kw]`` (each output channel only sees its group's input
channels, so each group is an independent least-squares problem).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Grid:
    """Uniform integer grid per output row: ``level = clamp(round(w / scale) + zero_point, qmin, qmax)``.

    Attributes:
        scale: ``[groups, rows]`` (one scale per output row; a per-tensor grid repeats its scale).
        zero_point: ``[groups, rows]``, integer-valued.
        qmin: Lowest integer level.
        qmax: Highest integer level.
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int

    @classmethod
    def from_qparams(cls, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, groups: int, rows: int) -> Grid:
        """A grid from a quantizer's ``(scale, zero_point)``: scalars (per tensor) or one per output channel.

        Args:
            scale: Scalar or ``[groups * rows]``.
            zero_point: Same shape as ``scale``.
            qmin: Lowest integer level.
            qmax: Highest integer level.
            groups: Number of groups of the layer.
            rows: Output rows per group.
        """
        shape = (groups, rows)
        scale = scale.detach().double().reshape(-1).expand(groups * rows).reshape(shape)
        zero_point = zero_point.detach().double().reshape(-1).expand(groups * rows).reshape(shape)
        return cls(scale, zero_point, qmin, qmax)

    def to(self, device: torch.device) -> Grid:
        """The same grid with its tensors on ``device``."""
        return Grid(self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax)

    def round_column(self, values: Tensor) -> Tensor:
        """Nearest grid value of ``values`` ``[groups, rows]`` (one column of each group), dequantized."""
        level = torch.clamp(torch.round(values / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (level - self.zero_point) * self.scale

    def round(self, weight: Tensor) -> Tensor:
        """Nearest rounding of a whole ``[groups, rows, columns]`` weight (the reference every method starts from)."""
        scale, zero_point = self.scale.unsqueeze(-1), self.zero_point.unsqueeze(-1)
        level = torch.clamp(torch.round(weight / scale) + zero_point, self.qmin, self.qmax)
        return (level - zero_point) * scale


def as_groups(weight: Tensor, groups: int) -> Tensor:
    """``weight`` ``[out, ...]`` as ``[groups, out / groups, fan_in]`` in float64."""
    out = weight.shape[0]
    return weight.detach().double().reshape(groups, out // groups, -1)


def from_groups(grouped: Tensor, like: Tensor) -> Tensor:
    """``grouped`` ``[groups, rows, columns]`` back in the shape and dtype of ``like``."""
    return grouped.reshape(like.shape).to(like.dtype)
