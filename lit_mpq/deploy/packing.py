"""Bit packing: integer codes of any width from 2 to 8 bits stored back to back, eight codes of 1 bit per byte.

A ``b``-bit weight takes ``b`` bits on disk, not a byte: a mixed-precision plan's file is as small as its bit widths
say. Codes are stored as unsigned offsets from the range's lowest level (``q - qmin``) in one little-endian bit
stream per tensor (bit ``i`` of code ``j`` is bit ``j * b + i`` of the stream), the layout of numpy's
``packbits(bitorder="little")`` applied to the codes' bit planes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_codes", "packed_nbytes", "unpack_codes"]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take packed: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"packing supports widths of 1 to 8 bits, got {bits!r}")


def pack_codes(codes: Tensor, bits: int, qmin: int) -> Tensor:
    """Pack integer ``codes`` in ``[qmin, qmin + 2^bits - 1]`` into a flat ``uint8`` tensor of ``packed_nbytes`` bytes.

    Args:
        codes: Integer codes (any shape; flattened in row-major order).
        bits: Width of every code, 1 to 8.
        qmin: The range's lowest level (``-2^(bits-1)`` signed, 0 unsigned).

    Raises:
        ValueError: If a code lies outside the range.
    """
    _check_bits(bits)
    unsigned = codes.detach().reshape(-1).to(torch.int64) - qmin
    if unsigned.numel() and (int(unsigned.min()) < 0 or int(unsigned.max()) >= 1 << bits):
        raise ValueError(
            f"codes span [{int(unsigned.min()) + qmin}, {int(unsigned.max()) + qmin}], outside the {bits}-bit range "
            f"[{qmin}, {qmin + (1 << bits) - 1}]"
        )
    unsigned = unsigned.to(torch.uint8)
    # Bit planes in uint8 throughout (int64 intermediates would take 8 bytes per bit of a large layer).
    planes = torch.zeros(packed_nbytes(unsigned.numel(), bits) * 8, dtype=torch.uint8)
    for i in range(bits):  # bit i of code j lands at position j * bits + i
        planes[i : unsigned.numel() * bits : bits] = (unsigned >> i) & 1
    planes = planes.reshape(-1, 8)
    packed = planes[:, 0].clone()
    for i in range(1, 8):
        packed |= planes[:, i] << i
    return packed


def unpack_codes(packed: Tensor, bits: int, qmin: int, count: int) -> Tensor:
    """The ``count`` int64 codes that :func:`pack_codes` packed (flat; reshape them to the tensor's shape).

    Raises:
        ValueError: If ``packed`` is not ``packed_nbytes(count, bits)`` bytes of ``uint8``.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(count, bits):
        raise ValueError(
            f"expected {packed_nbytes(count, bits)} packed bytes (uint8) for {count} codes of {bits} bits, got "
            f"{packed.numel()} {packed.dtype}"
        )
    planes = torch.empty(packed.numel(), 8, dtype=torch.uint8)
    for i in range(8):
        planes[:, i] = (packed >> i) & 1
    planes = planes.reshape(-1)[: count * bits].reshape(count, bits)
    codes = torch.zeros(count, dtype=torch.uint8)
    for i in range(bits):
        codes |= planes[:, i] << i
    return codes.to(torch.int64) + qmin
