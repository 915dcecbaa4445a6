"""pin_layers / match_overrides on hand-made plans, with the expected bits and pins written out."""

import pytest

from lit_mpq.allocation import BitOverride, match_overrides, pin_layers
from lit_mpq.plan import LayerSpec, QuantPlan

NAMES = ["stem", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "head", "head_dist"]


def plan(**lists) -> QuantPlan:
    """Six layers at W8A8; LeViT-like, with two classifier heads when ``exit_layers`` says so."""
    return QuantPlan([LayerSpec(n, "conv2d", 10, 100, 10, 10) for n in NAMES], **lists)


def test_entry_and_every_exit_layer_are_pinned():
    p = plan(entry_layers=["stem"], exit_layers=["head", "head_dist"])
    p.set_bits(dict.fromkeys(NAMES, (4, 4)))
    assert pin_layers(p, first_last_bits=6) == ["stem", "head", "head_dist"]
    assert p.bits() == {
        "stem": (6, 6),
        "layer1.0.conv1": (4, 4),
        "layer1.0.conv2": (4, 4),
        "layer2.0.conv1": (4, 4),
        "head": (6, 6),
        "head_dist": (6, 6),
    }
    assert [p[n].pinned for n in NAMES] == [True, False, False, False, True, True]


def test_without_entry_and_exit_lists_the_first_and_last_layers_are_pinned():
    p = plan()
    assert pin_layers(p, first_last_bits=8) == ["stem", "head_dist"]


def test_overrides_come_after_first_last_bits_and_later_patterns_win():
    p = plan(entry_layers=["stem"], exit_layers=["head", "head_dist"])
    overrides = {
        r"re:layer1\..*": BitOverride(w_bits=6, a_bits=None),
        "layer1.0.conv2": BitOverride(w_bits=2, a_bits=16),
        "head": (None, None),  # a plain pair works too
    }
    assert pin_layers(p, 8, overrides) == ["stem", "layer1.0.conv1", "layer1.0.conv2", "head", "head_dist"]
    assert p.bits() == {
        "stem": (8, 8),
        "layer1.0.conv1": (6, None),
        "layer1.0.conv2": (2, 16),
        "layer2.0.conv1": (8, 8),  # untouched: left to the policy
        "head": (None, None),
        "head_dist": (8, 8),
    }


def test_pinning_again_leaves_no_stale_pin():
    p = plan()
    pin_layers(p, first_last_bits=8, overrides={"layer2.0.conv1": BitOverride(4, 4)})
    assert pin_layers(p) == []
    assert not any(p[n].pinned for n in NAMES)


def test_match_overrides_does_not_change_the_plan():
    p = plan()
    before = p.to_dict()
    assert match_overrides(p, {"re:.*conv1": BitOverride(4, 8)}) == {"layer1.0.conv1": (4, 8), "layer2.0.conv1": (4, 8)}
    assert match_overrides(p, None) == {}
    assert p.to_dict() == before


def test_an_unmatched_name_suggests_the_closest_layer_and_changes_nothing():
    p = plan()
    before = p.to_dict()
    with pytest.raises(ValueError) as err:
        pin_layers(p, 8, {"layer1.0.conv": BitOverride(8, 8)})
    message = str(err.value)
    assert message.startswith("override 'layer1.0.conv' matches no quantized layer: did you mean one of ")
    assert "one of ['layer1.0.conv1', 'layer1.0.conv2', 'layer2.0.conv1']?" in message
    assert "['stem', 'layer1.0.conv1', 'layer1.0.conv2']" in message and "re:<regex>" in message
    assert p.to_dict() == before  # checked before anything is pinned
    with pytest.raises(ValueError, match=r"did you mean 'stem'\?"):
        pin_layers(p, 8, {"stme": BitOverride(8, 8)})


def test_unmatched_and_invalid_regexes():
    with pytest.raises(ValueError, match=r"override 're:layer3.\*' matches no quantized layer: layer names look"):
        match_overrides(plan(), {"re:layer3.*": BitOverride()})
    with pytest.raises(ValueError, match=r"override 're:layer\(': invalid layer regex"):
        match_overrides(plan(), {"re:layer(": BitOverride()})


def test_an_override_of_a_layer_left_in_float_says_so():
    reasons = {"aux.fc": "never called by the eval forward"}
    p = QuantPlan([LayerSpec("stem", "conv2d", 1, 1, 1, 1)], float_layers=reasons)
    with pytest.raises(ValueError, match=r"'aux.fc' names a layer left in floating point \(never called"):
        match_overrides(p, {"aux.fc": BitOverride()})


@pytest.mark.parametrize("bits", [1, 9, "8", 8.0])
def test_bad_bits_are_rejected(bits):
    with pytest.raises(ValueError, match="first_last_bits"):
        pin_layers(plan(), first_last_bits=bits)
    with pytest.raises(ValueError, match="override w_bits"):
        BitOverride(w_bits=bits)
    with pytest.raises(ValueError, match="override a_bits"):
        match_overrides(plan(), {"stem": (8, bits)})
