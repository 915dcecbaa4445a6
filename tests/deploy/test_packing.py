"""Bit packing against numpy's packbits (an independent reference) and the size arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_mpq.deploy.packing import pack_codes, packed_nbytes, unpack_codes


def numpy_reference(codes: np.ndarray, bits: int, qmin: int) -> np.ndarray:
    """Each code's low ``bits`` bits, least significant first, concatenated, then packed little-endian by numpy."""
    unsigned = (codes - qmin).astype(np.uint8)
    planes = np.unpackbits(unsigned[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("count", [1, 7, 8, 1001])
def test_packed_bytes_are_numpys_packbits_of_the_bit_planes(bits, signed, count):
    qmin = -(2 ** (bits - 1)) if signed and bits > 1 else 0
    rng = np.random.default_rng(bits * 100 + count)
    codes = rng.integers(qmin, qmin + 2**bits, size=count)
    packed = pack_codes(torch.from_numpy(codes), bits, qmin)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(count, bits) == -(-count * bits // 8)
    np.testing.assert_array_equal(packed.numpy(), numpy_reference(codes, bits, qmin))
    assert torch.equal(unpack_codes(packed, bits, qmin, count), torch.from_numpy(codes))


def test_a_hand_packed_example():
    # 3-bit codes 1, 2, 7 (unsigned): bits 100 010 111 -> byte0 = 1|0<<1|0<<2|0<<3|1<<4|0<<5|1<<6|1<<7 = 209, byte1 = 1
    assert pack_codes(torch.tensor([1, 2, 7]), 3, 0).tolist() == [209, 1]


def test_codes_outside_the_range_are_refused():
    with pytest.raises(ValueError, match=r"outside the 4-bit range \[-8, 7\]"):
        pack_codes(torch.tensor([0, 8]), 4, -8)
    with pytest.raises(ValueError, match="widths of 1 to 8 bits"):
        pack_codes(torch.tensor([0]), 9, 0)
    with pytest.raises(ValueError, match="expected 2 packed bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, -8, 4)
