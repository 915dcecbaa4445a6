"""BitAllocator's pinning and overrides on a hand-made plan (no Trainer needed)."""

import pytest

from lit_mpq.allocation import Uniform
from lit_mpq.callbacks import BitAllocator, BitOverride
from lit_mpq.plan import LayerSpec, QuantPlan


def plan() -> QuantPlan:
    names = ["stem", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc"]
    return QuantPlan([LayerSpec(n, "conv2d", 10, 100, 10, 10) for n in names])


def test_first_last_and_overrides_are_pinned_and_kept_from_the_policy():
    allocator = BitAllocator(
        policy=Uniform(4, 4), first_last_bits=8, overrides={"re:layer1\\..*conv2": {"w_bits": 6, "a_bits": None}}
    )
    p = plan()
    allocator.pin(p)
    decision = {n: b for n, b in allocator.policy.allocate(p).items() if not p[n].pinned}
    p.set_bits(decision)
    assert p.bits() == {
        "stem": (8, 8),
        "layer1.0.conv1": (4, 4),
        "layer1.0.conv2": (6, None),
        "layer2.0.conv1": (4, 4),
        "fc": (8, 8),
    }
    assert [p[n].pinned for n in p] == [True, False, True, False, True]


def test_override_matching_nothing_is_an_error_naming_the_pattern():
    allocator = BitAllocator(overrides={"layer9.conv": BitOverride(8, 8)})
    with pytest.raises(ValueError, match="layer9.conv"):
        allocator.pin(plan())


@pytest.mark.parametrize("bits", [1, 33, 0])
def test_bad_bits_are_rejected(bits):
    with pytest.raises(ValueError, match=str(bits)):
        BitAllocator(first_last_bits=bits)
    with pytest.raises(ValueError, match=str(bits)):
        BitOverride(w_bits=bits)
