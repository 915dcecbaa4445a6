"""Allocation policies against hand-made examples with the expected allocation written out."""

import pytest
import yaml

from lit_mpq.allocation import FromFile, Policy, SensitivityPercentile, Uniform
from lit_mpq.plan import LayerPlan, LayerSpec, QuantPlan

# Eight layers in model order; their weight sensitivities (at 4 bits) are 1..8 in a shuffled order.
NAMES = ["l0", "l1", "l2", "l3", "l4", "l5", "l6", "l7"]
W_SCORES = {"l0": 5.0, "l1": 2.0, "l2": 8.0, "l3": 1.0, "l4": 6.0, "l5": 3.0, "l6": 7.0, "l7": 4.0}
# Activation sensitivities rank the layers differently (reversed).
A_SCORES = {name: 9.0 - score for name, score in W_SCORES.items()}


def make_plan(with_sensitivity: bool = True) -> QuantPlan:
    specs = [LayerSpec(name=n, kind="linear", params=100, macs=100, act_in=10, act_out=10) for n in NAMES]
    layers = {}
    for name in NAMES:
        sens = {}
        if with_sensitivity:
            # At 2 bits every layer is ranked the other way round, so the default (lowest probed) bit width matters.
            sens = {
                "w": {2: 100.0 - W_SCORES[name], 4: W_SCORES[name], 8: W_SCORES[name] / 100},
                "a": {4: A_SCORES[name], 8: A_SCORES[name] / 100},
            }
        layers[name] = LayerPlan(sensitivity=sens)
    return QuantPlan(specs, layers)


# ---------------------------------------------------------------------------------------- SensitivityPercentile
def test_percentile_hand_made_example():
    # numpy.percentile([1..8], [25, 75]) = [2.75, 6.25]: scores 1, 2 -> 4 bits; 3..6 -> 6 bits; 7, 8 -> 8 bits.
    policy = SensitivityPercentile(percentiles=[25, 75], bits=[4, 6, 8], target="w", a_bits=8, score_bits=4)
    expected = {
        "l0": (6, 8),  # 5
        "l1": (4, 8),  # 2
        "l2": (8, 8),  # 8
        "l3": (4, 8),  # 1
        "l4": (6, 8),  # 6
        "l5": (6, 8),  # 3
        "l6": (8, 8),  # 7
        "l7": (6, 8),  # 4
    }
    plan = make_plan()
    before = plan.to_dict()
    assert policy.allocate(plan) == expected
    assert plan.to_dict() == before  # allocate must not change the plan
    assert policy.requires_sensitivity and not policy.overrides_pins


def test_percentile_default_scores_at_the_lowest_probed_bits():
    # At 2 bits the ranking is reversed (score 100 - s): the layers with s = 7, 8 are now the least sensitive.
    allocation = SensitivityPercentile(a_bits=None).allocate(make_plan())
    assert allocation == {
        "l0": (6, None),
        "l1": (8, None),
        "l2": (4, None),
        "l3": (8, None),
        "l4": (6, None),
        "l5": (6, None),
        "l6": (4, None),
        "l7": (6, None),
    }


def test_percentile_excludes_pinned_layers():
    plan = make_plan()
    plan["l2"].pinned = True  # score 8
    plan["l3"].pinned = True  # score 1
    # Remaining scores 2..7: numpy.percentile([2, 3, 4, 5, 6, 7], [25, 75]) = [3.25, 5.75]
    # -> 2, 3 get 4 bits; 4, 5 get 6 bits; 6, 7 get 8 bits.
    allocation = SensitivityPercentile(score_bits=4).allocate(plan)
    assert allocation == {
        "l0": (6, 8),  # 5
        "l1": (4, 8),  # 2
        "l4": (8, 8),  # 6
        "l5": (4, 8),  # 3
        "l6": (8, 8),  # 7
        "l7": (6, 8),  # 4
    }


def test_percentile_target_activations():
    # A_SCORES = 9 - W_SCORES, again 1..8: a 1 -> l2, 2 -> l6, 7 -> l1, 8 -> l3.
    allocation = SensitivityPercentile(target="a", w_bits=4).allocate(make_plan())
    assert allocation == {
        "l0": (4, 6),  # 4
        "l1": (4, 8),  # 7
        "l2": (4, 4),  # 1
        "l3": (4, 8),  # 8
        "l4": (4, 6),  # 3
        "l5": (4, 6),  # 6
        "l6": (4, 4),  # 2
        "l7": (4, 6),  # 5
    }


def test_percentile_target_both_with_three_levels():
    policy = SensitivityPercentile(percentiles=[50], bits=[2, 8], target="both", score_bits=4)
    # numpy.percentile([1..8], 50) = 4.5: scores <= 4 -> 2 bits, above -> 8 bits, for w and a separately.
    assert policy.allocate(make_plan()) == {
        "l0": (8, 2),  # w 5, a 4
        "l1": (2, 8),  # w 2, a 7
        "l2": (8, 2),  # w 8, a 1
        "l3": (2, 8),  # w 1, a 8
        "l4": (8, 2),  # w 6, a 3
        "l5": (2, 8),  # w 3, a 6
        "l6": (8, 2),  # w 7, a 2
        "l7": (2, 8),  # w 4, a 5
    }


def test_percentile_ties_at_a_threshold_get_the_lower_bits():
    specs = [LayerSpec(name=f"t{i}", kind="linear", params=1, macs=1, act_in=1, act_out=1) for i in range(5)]
    plan = QuantPlan(specs, {f"t{i}": LayerPlan(sensitivity={"w": {4: float(i + 1)}}) for i in range(5)})
    # percentile([1..5], 50) = 3: "number of thresholds strictly below the score" -> 3 gets bits[0].
    allocation = SensitivityPercentile(percentiles=[50], bits=[4, 8]).allocate(plan)
    assert {n: w for n, (w, _) in allocation.items()} == {"t0": 4, "t1": 4, "t2": 4, "t3": 8, "t4": 8}


def test_percentile_missing_sensitivity_names_the_probe():
    with pytest.raises(ValueError, match="SensitivityProbe") as err:
        SensitivityPercentile().allocate(make_plan(with_sensitivity=False))
    assert "'l0'" in str(err.value)
    # Activation scores are only needed when activations are allocated.
    plan = make_plan()
    for name in NAMES:
        del plan[name].sensitivity["a"]
    assert len(SensitivityPercentile(target="w").allocate(plan)) == 8
    with pytest.raises(ValueError, match="SensitivityProbe") as err:
        SensitivityPercentile(target="a").allocate(plan)
    # A probe that measured weights only is named as such, with the two ways out.
    assert "no activation ('a') sensitivity: the SensitivityProbe measured only weights" in str(err.value)
    assert "'a' to SensitivityProbe.kinds" in str(err.value) and "target: 'w'" in str(err.value)


def test_percentile_unprobed_score_bits():
    with pytest.raises(ValueError, match="score_bits=6") as err:
        SensitivityPercentile(score_bits=6).allocate(make_plan())
    assert "[2, 4, 8]" in str(err.value)


def test_percentile_all_pinned_allocates_nothing():
    plan = make_plan()
    for name in NAMES:
        plan[name].pinned = True
    assert SensitivityPercentile().allocate(plan) == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "weights"}, "target"),
        ({"percentiles": [25, 75], "bits": [4, 8]}, "one more"),
        ({"percentiles": [75, 25]}, "strictly increasing"),
        ({"percentiles": [25, 25], "bits": [4, 6, 8]}, "strictly increasing"),
        ({"percentiles": [0, 75]}, r"\(0, 100\)"),
        ({"percentiles": [25, 100]}, r"\(0, 100\)"),
        ({"bits": [8, 6, 4]}, "increasing"),
        ({"bits": [1, 6, 8]}, "SensitivityPercentile.bits"),
        ({"bits": [None, 6, 8]}, "SensitivityPercentile.bits=.*lists null, but FP32 is not a candidate"),
        ({"w_bits": 33}, "w_bits"),
        ({"a_bits": 0}, "a_bits"),
        ({"score_bits": 9}, "score_bits=9 is not supported.*or null for the lowest probed width"),
    ],
)
def test_percentile_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SensitivityPercentile(**kwargs)


def test_percentile_describe():
    assert SensitivityPercentile().describe() == "SensitivityPercentile(w: [25.0, 75.0] -> [4, 6, 8])"


# ------------------------------------------------------------------------------------------------- Uniform
def test_uniform():
    plan = make_plan(with_sensitivity=False)
    plan["l0"].pinned = True
    assert Uniform(w_bits=4, a_bits=None).allocate(plan) == dict.fromkeys(NAMES, (4, None))
    assert Uniform(w_bits=4, a_bits=8).describe() == "Uniform(W4A8)"
    assert Uniform(w_bits=None, a_bits=None).describe() == "Uniform(WFPAFP)"
    assert isinstance(Uniform(), Policy) and not Uniform.requires_sensitivity
    with pytest.raises(ValueError, match="Uniform.w_bits"):
        Uniform(w_bits=1)
    with pytest.raises(ValueError, match="Uniform.a_bits"):
        Uniform(a_bits="8")


# ------------------------------------------------------------------------------------------------ FromFile
def test_from_file_round_trip(tmp_path):
    saved = make_plan()
    saved.set_bits({"l0": (2, 4), "l1": (None, 8), "l5": (16, None)})
    saved["l3"].pinned = True
    path = saved.to_yaml(tmp_path / "plan.yaml")
    policy = FromFile(str(path))
    assert policy.overrides_pins and policy.describe() == f"FromFile({path})"
    target = make_plan(with_sensitivity=False)
    allocation = policy.allocate(target)
    assert allocation == saved.bits()
    assert allocation["l0"] == (2, 4) and allocation["l1"] == (None, 8) and allocation["l5"] == (16, None)
    assert allocation["l3"] == (8, 8)  # pinned layers are part of the saved decision too
    target.set_bits(allocation)
    assert target.bits() == saved.bits()


def test_from_file_rejects_a_plan_for_another_model(tmp_path):
    specs = [LayerSpec(name=n, kind="linear", params=1, macs=1, act_in=1, act_out=1) for n in ["l0", "l1", "extra"]]
    path = QuantPlan(specs).to_yaml(tmp_path / "other.yaml")
    policy = FromFile(str(path))
    for check in (policy.check_plan, policy.allocate):
        with pytest.raises(ValueError, match="does not fit this model") as err:
            check(make_plan())
        message = str(err.value)
        assert str(path) in message
        assert "the model's layers ['l2', 'l3', 'l4', 'l5', 'l6'] (6 in all) are not in the file" in message
        assert "the file's layers ['extra'] are not in the model" in message
    # A layer this model leaves in floating point is named as such.
    target = QuantPlan(make_plan().specs.values(), float_layers={"extra": "never called by the eval forward"})
    with pytest.raises(ValueError, match=r"layers \['extra'\] are left in floating point in this model"):
        policy.check_plan(target)


def test_from_file_accepts_a_minimal_hand_written_plan(tmp_path):
    # Only name, w_bits and a_bits are read; rows may come in any order.
    rows = [{"name": n, "w_bits": 4, "a_bits": None} for n in reversed(NAMES)]
    path = tmp_path / "hand.yaml"
    path.write_text(yaml.safe_dump({"layers": rows}))
    policy = FromFile(str(path))
    policy.check_plan(make_plan())
    allocation = policy.allocate(make_plan())
    assert list(allocation) == NAMES and set(allocation.values()) == {(4, None)}


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([{"spec": {"name": "l0"}, "w_bits": 4, "a_bits": 4}], r"layers\[0\]: a row needs 'name'"),
        ([{"name": "l0", "w_bits": 4, "a_bits": 4}, "l1"], r"layers\[1\]: a row needs 'name'"),
        ([{"name": "l0", "a_bits": 4}], r"layers\[0\] \(layer 'l0'\) has no 'w_bits': give one of .* or null"),
        ([{"name": "l0", "w_bits": 4}], r"layers\[0\] \(layer 'l0'\) has no 'a_bits'"),
        ([{"name": "l0", "w_bits": 4, "a_bits": 9}], r"layers\[0\] \(layer 'l0'\): a_bits=9 is not supported"),
        ([{"name": "l0", "w_bits": "8", "a_bits": 8}], r"\(layer 'l0'\): w_bits='8' is not supported"),
        (
            [{"name": "l0", "w_bits": 8, "a_bits": 8}, {"name": "l0", "w_bits": 4, "a_bits": 4}],
            r"layers\[1\] \(layer 'l0'\) repeats a layer",
        ),
        ([], "lists no layers"),
    ],
)
def test_from_file_checks_every_row_at_construction(tmp_path, layers, match):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "layers": layers}))
    with pytest.raises(ValueError, match=match) as err:
        FromFile(str(path))
    assert str(path) in str(err.value) and "KeyError" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("layers: [unclosed\n", "is not valid YAML"),
        ("just: a mapping\n", "is not a lit_mpq plan"),
        ("- a list\n", "is not a lit_mpq plan"),
        ("layers: {l0: 4}\n", "is not a lit_mpq plan"),
        ("version: 2\nlayers: []\n", "has format version 2; this lit_mpq reads version 1"),
    ],
)
def test_from_file_rejects_what_is_not_a_plan(tmp_path, text, match):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        FromFile(str(path))
    assert str(path) in str(err.value)


def test_from_file_reads_the_file_once(tmp_path):
    # The run applies what the file said when the policy was built, even if the file changes meanwhile.
    saved = make_plan()
    saved.set_bits(dict.fromkeys(NAMES, (4, 4)))
    path = saved.to_yaml(tmp_path / "plan.yaml")
    policy = FromFile(str(path))
    path.write_text("not: a plan\n")
    assert set(policy.allocate(make_plan()).values()) == {(4, 4)}


def test_from_file_missing_path_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        FromFile(str(tmp_path / "nope.yaml"))
