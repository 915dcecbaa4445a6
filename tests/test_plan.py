"""QuantPlan: validation, hand-computed summaries, layer matching, a lossless YAML round trip; the bit vocabulary."""

import pytest
import yaml

from lit_mpq import bits
from lit_mpq.plan import (
    FLOAT_BITS,
    SUPPORTED_BITS,
    LayerPlan,
    LayerSpec,
    QuantPlan,
    effective_bits,
    validate_bits,
)

CONV = LayerSpec(
    name="features.0", kind="conv2d", params=432, macs=442_368, act_in=3072, act_out=16_384, weight_shape=(16, 3, 3, 3)
)
FC = LayerSpec(name="classifier", kind="linear", params=640, macs=640, act_in=64, act_out=10, weight_shape=(10, 64))


def two_layer_plan() -> QuantPlan:
    plan = QuantPlan([CONV, FC])
    plan["features.0"].w_bits, plan["features.0"].a_bits = 4, 8
    plan["classifier"].w_bits, plan["classifier"].a_bits = 8, None
    plan["classifier"].pinned = True
    plan["features.0"].sensitivity = {"w": {2: 3.5, 4: 0.25, 8: 0.001}, "a": {4: 1.5, 8: 0.0625}}
    return plan


# --------------------------------------------------------------------------------------------------- bits
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16, None])
def test_validate_bits_accepts_supported_widths(bits):
    assert validate_bits(bits) is bits


@pytest.mark.parametrize("bits", [1, 33, 0, -4, 9, 32, True, False, "8", 8.0])
def test_validate_bits_rejects_everything_else(bits):
    with pytest.raises(ValueError, match="w_bits") as err:
        validate_bits(bits, "w_bits")
    message = str(err.value)
    assert repr(bits) in message and "16" in message and "null" in message


def test_effective_bits():
    assert SUPPORTED_BITS == (2, 3, 4, 5, 6, 7, 8, 16)
    assert effective_bits(None) == FLOAT_BITS == 32
    assert effective_bits(4) == 4


def test_the_vocabulary_lives_in_lit_mpq_bits_and_is_still_importable_from_here():
    import lit_mpq.allocation.exact as exact
    import lit_mpq.plan as plan

    for name in ("FLOAT_BITS", "SUPPORTED_BITS", "effective_bits", "validate_bits"):
        assert getattr(plan, name) is getattr(bits, name)
    assert exact.parse_uniform_setting is bits.parse_setting


@pytest.mark.parametrize(
    ("text", "pair"),
    [("W4A8", (4, 8)), ("w8a4", (8, 4)), (" W16A2 ", (16, 2)), ("WFPA8", (None, 8)), ("w4afp", (4, None))],
)
def test_settings_parse_and_format(text, pair):
    assert bits.parse_setting(text) == pair
    assert bits.format_setting(*pair) == text.strip().upper()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("W4X4", r"relative_to='W4X4' is not a uniform setting: write it as 'W<weight bits>A<activation bits>'"),
        ("4A4", "is not a uniform setting"),
        (44, "relative_to=44 is not a uniform setting"),
        ("W9A8", r"relative_to='W9A8': 9 weight bits are not supported: use one of \[2, .*16\], or FP for FP32"),
        ("W8A32", "32 activation bits are not supported"),
    ],
)
def test_bad_settings_name_the_option_and_the_fix(text, match):
    with pytest.raises(ValueError, match=match) as err:
        bits.parse_setting(text, "relative_to")
    assert "null" not in str(err.value)  # a setting string writes FP32 as FP


def test_candidate_lists():
    assert bits.validate_candidates([8, 4, 4, 6], "candidate_bits") == [4, 6, 8]
    assert bits.validate_candidates((16,), "candidate_bits") == [16]
    for bad, match in [
        ([], "candidate_bits must list at least one bit width"),
        ([4, None], r"candidate_bits=\[4, None\] lists null, but FP32 is not a candidate: list bit widths from"),
        ([4, 9], r"candidate_bits=\[4, 9\] lists 9, which is not a supported bit width"),
        ([True], "lists True"),
        ("468", "must be a list of bit widths"),
        (8, "must be a list of bit widths"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            bits.validate_candidates(bad, "candidate_bits")
        assert "or null" not in str(err.value)  # a list of candidates cannot take null


def test_validate_width_takes_no_null_and_says_what_else_is_allowed():
    assert bits.validate_width(16, "score_bits") == 16
    with pytest.raises(ValueError, match=r"score_bits=None is not supported: use one of \[2, .*16\]\.$"):
        bits.validate_width(None, "score_bits")
    with pytest.raises(ValueError, match="use one of .*, or null for the lowest probed width"):
        bits.validate_width(1, "score_bits", alternative="or null for the lowest probed width")


# ----------------------------------------------------------------------------------------------- summaries
def test_summaries_against_hand_computed_values():
    plan = two_layer_plan()
    # weights: (432 * 4 + 640 * 8) / (432 + 640) = (1728 + 5120) / 1072
    assert plan.average_weight_bits() == pytest.approx(6848 / 1072)
    # activations: (3072 * 8 + 64 * 32) / (3072 + 64) -- the classifier input is FP32
    assert plan.average_act_bits() == pytest.approx((24_576 + 2048) / 3136)
    # size: 6848 bits = 856 bytes
    assert plan.weight_size_mb() == pytest.approx(856 / 1e6)
    # BOPs: 442368 * 4 * 8 + 640 * 8 * 32
    assert plan.bit_ops() == pytest.approx(442_368 * 32 + 640 * 256)
    assert plan.bit_ops() == 14_319_616.0


def test_all_fp32_plan_counts_32_bits():
    plan = QuantPlan([CONV, FC])
    plan.set_bits({"features.0": (None, None), "classifier": (None, None)})
    assert plan.average_weight_bits() == 32.0 and plan.average_act_bits() == 32.0
    assert plan.weight_size_mb() == pytest.approx(1072 * 4 / 1e6)
    assert plan.bit_ops() == (442_368 + 640) * 1024


def test_defaults_and_access():
    plan = QuantPlan([CONV, FC])
    assert len(plan) == 2 and list(plan) == plan.names == ["features.0", "classifier"]
    assert "classifier" in plan and "nope" not in plan
    assert plan.bits() == {"features.0": (8, 8), "classifier": (8, 8)}
    assert [spec.name for spec, _ in plan.items()] == plan.names
    rows = plan.summary_rows()
    assert rows[1] == {
        "name": "classifier",
        "kind": "linear",
        "params": 640,
        "macs": 640,
        "w_bits": 8,
        "a_bits": 8,
        "pinned": False,
    }


def test_construction_errors():
    with pytest.raises(ValueError, match="unique"):
        QuantPlan([CONV, CONV])
    with pytest.raises(ValueError, match="ghost"):
        QuantPlan([CONV], {"ghost": LayerPlan()})


def test_set_bits_validates():
    plan = QuantPlan([CONV, FC])
    plan.set_bits({"classifier": (2, 16)})
    assert plan.bits()["classifier"] == (2, 16) and plan.bits()["features.0"] == (8, 8)
    with pytest.raises(ValueError, match="ghost"):
        plan.set_bits({"ghost": (4, 4)})
    with pytest.raises(ValueError, match=r"classifier\.a_bits"):
        plan.set_bits({"classifier": (4, 1)})


# ------------------------------------------------------------------------------------------------- matching
def test_match_exact_name_and_regex():
    specs = [
        LayerSpec(name=n, kind="conv2d", params=1, macs=1, act_in=1, act_out=1)
        for n in ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc"]
    ]
    plan = QuantPlan(specs)
    assert plan.match("fc") == ["fc"]
    assert plan.match("conv1") == ["conv1"]  # exact, not a substring search
    assert plan.match("layer3.0.conv1") == []
    assert plan.match(r"re:layer1\..*") == ["layer1.0.conv1", "layer1.0.conv2"]
    assert plan.match("re:.*conv1") == ["conv1", "layer1.0.conv1", "layer2.0.conv1"]
    assert plan.match("re:conv") == []  # fullmatch
    with pytest.raises(ValueError, match="invalid layer regex"):
        plan.match("re:layer(")


# --------------------------------------------------------------------------------------------- serialisation
def test_yaml_round_trip_preserves_everything(tmp_path):
    plan = two_layer_plan()
    path = plan.to_yaml(tmp_path / "run" / "plan.yaml")
    assert path.is_file()
    back = QuantPlan.from_yaml(path)
    assert back.names == plan.names
    assert back.specs == plan.specs
    for name in plan:
        assert back[name] == plan[name], name
    assert back["classifier"].a_bits is None and back["classifier"].pinned is True
    assert back["features.0"].sensitivity == {"w": {2: 3.5, 4: 0.25, 8: 0.001}, "a": {4: 1.5, 8: 0.0625}}
    assert all(isinstance(b, int) for table in back["features.0"].sensitivity.values() for b in table)
    assert back.specs["features.0"].weight_shape == (16, 3, 3, 3)
    # The file is plain, human-editable YAML with the layers in model order.
    data = yaml.safe_load(path.read_text())
    assert data["version"] == 1
    assert [row["name"] for row in data["layers"]] == ["features.0", "classifier"]
    assert data["layers"][1]["a_bits"] is None
    # Round trip is stable.
    assert QuantPlan.from_dict(back.to_dict()).to_dict() == plan.to_dict()


def test_hand_edited_yaml_is_validated(tmp_path):
    path = two_layer_plan().to_yaml(tmp_path / "plan.yaml")
    path.write_text(path.read_text().replace("w_bits: 4", "w_bits: 1"))
    with pytest.raises(ValueError, match="w_bits"):
        QuantPlan.from_yaml(path)


def test_from_yaml_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        QuantPlan.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        QuantPlan.from_yaml(bad)
    other = tmp_path / "other.yaml"
    other.write_text("just: a mapping\n")
    with pytest.raises(ValueError, match="not a lit_mpq plan"):
        QuantPlan.from_yaml(other)
