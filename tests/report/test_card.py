"""Tests for lit_mpq.report.card: required keys, first/last precision, BatchNorm text and the YAML round trip."""

import dataclasses

import numpy as np
import pytest
import scipy
import torch
import yaml

import lit_mpq
from lit_mpq.energy import HorowitzEnergyModel, TableEnergyModel
from lit_mpq.plan import LayerPlan, LayerSpec, QuantPlan
from lit_mpq.quant.apply import QuantSettings
from lit_mpq.report import build_card, write_card
from lit_mpq.report.card import BN_NOT_FOLDED_PER_CHANNEL, first_last_precision

SPECS = [
    LayerSpec(name="stem", kind="conv2d", params=432, macs=442368, act_in=3072, act_out=16384),
    LayerSpec(name="body", kind="conv2d", params=2304, macs=2359296, act_in=16384, act_out=16384),
    LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10),
]

REQUIRED_KEYS = {
    "weight_granularity",
    "weight_symmetric",
    "weight_observer",
    "act_observer",
    "act_symmetric",
    "percentile",
    "first_last_precision",
    "batchnorm_folding",
    "calibration",
    "rounding",
    "rounding_settings",
    "sensitivity_metric",
    "policy",
    "energy_model",
    "bits_candidates",
    "lit_mpq_version",
    "torch_version",
    "library_versions",
    "seed_everything",
}


def make_plan() -> QuantPlan:
    return QuantPlan(
        SPECS,
        {
            "stem": LayerPlan(w_bits=8, a_bits=None, pinned=True),
            "body": LayerPlan(w_bits=4, a_bits=4),
            "fc": LayerPlan(w_bits=6, a_bits=8, pinned=True),
        },
    )


def card_args(**overrides):
    args = {
        "plan": make_plan(),
        "energy_model": HorowitzEnergyModel(),
        "weight_granularity": "per_channel",
        "weight_symmetric": True,
        "weight_observer": "minmax",
        "act_observer": "percentile",
        "act_symmetric": False,
        "percentile": 99.99,
        "bias_correction": False,
        "bn_folded": False,
        "calibration_images": 512,
        "calibration_seed": 0,
        "calibration_subset": "first 512 images of the training split",
        "dataset": "cifar10",
        "sensitivity_metric": "output_error",
        "policy": "EnergyBudget(budget=0.5)",
        "bits_candidates": [8, 4, None, 2],
        "seed_everything": 1234,
    }
    args.update(overrides)
    return args


def test_required_keys_and_values():
    card = build_card(**card_args())
    assert REQUIRED_KEYS <= set(card)
    assert card["first_last_precision"] == {"first": "W8AFP", "last": "W6A8"}
    assert card["batchnorm_folding"] == BN_NOT_FOLDED_PER_CHANNEL
    assert "invariant to folding" in card["batchnorm_folding"]
    assert card["calibration"] == {
        "images": 512,
        "seed": 0,
        "subset": "first 512 images of the training split",
        "dataset": "cifar10",
    }
    assert card["rounding"] == "nearest (round half to even)"
    assert card["percentile"] == 99.99
    assert card["bits_candidates"] == [2, 4, 8, None]
    assert card["energy_model"]["name"] == "horowitz45nm"
    assert "Horowitz" in card["energy_model"]["source"]
    assert card["energy_model"]["constants"]["mult8_pj"] == 0.2
    assert card["lit_mpq_version"] == lit_mpq.__version__
    assert card["torch_version"] == str(torch.__version__) and type(card["torch_version"]) is str
    assert card["library_versions"]["numpy"] == np.__version__
    assert card["library_versions"]["scipy"] == scipy.__version__
    assert card["seed_everything"] == 1234
    assert card["plan"]["pinned"] == ["stem", "fc"] and card["plan"]["layers"] == 3


def test_first_last_precision_from_a_hand_made_plan():
    plan = QuantPlan(SPECS, {"stem": LayerPlan(w_bits=8, a_bits=8), "fc": LayerPlan(w_bits=None, a_bits=None)})
    assert first_last_precision(plan) == {"first": "W8A8", "last": "WFPAFP"}
    assert first_last_precision(QuantPlan(SPECS[:1])) == {"first": "W8A8", "last": "W8A8"}
    assert first_last_precision(QuantPlan([])) == {"first": None, "last": None}


@pytest.mark.parametrize(
    ("folded", "granularity", "expected"),
    [
        (False, "per_channel", BN_NOT_FOLDED_PER_CHANNEL),
        (False, "per_tensor", "not folded"),
        (True, "per_tensor", "folded into the preceding convolution's weights and bias before quantization"),
    ],
)
def test_batchnorm_text(folded, granularity, expected):
    card = build_card(**card_args(bn_folded=folded, weight_granularity=granularity))
    assert card["batchnorm_folding"] == expected


def test_data_driven_rounding_is_named_with_its_settings():
    settings = {"method": "gpfq", "upstream": "quantized", "damp": 0.01, "alphabet_scalar": None}
    card = build_card(**card_args(bias_correction=True, weight_rounding=settings))
    assert card["rounding"] == (
        "GPFQ (Lybrand and Saab, JMLR 2021; Zhang, Zhou and Saab, SIMODS 2023), layer by layer on the quantized "
        "network's inputs + bias correction"
    )
    assert card["rounding_settings"] == settings
    nearest = build_card(**card_args(weight_rounding={"method": "nearest", "upstream": "quantized"}))
    assert nearest["rounding"] == "nearest (round half to even)" and nearest["rounding_settings"] is None


def test_bias_correction_and_percentile_recording():
    card = build_card(**card_args(bias_correction=True, act_observer="minmax", percentile=99.9))
    assert card["rounding"] == "nearest (round half to even) + bias correction"
    assert card["percentile"] is None  # no effect without the percentile observer
    assert card["act_observer_overrides"] is None
    overridden = build_card(
        **card_args(act_observer="mse", percentile=99.9, act_observer_overrides={".*fc": "percentile"})
    )
    assert overridden["act_observer_overrides"] == {".*fc": "percentile"}
    assert overridden["percentile"] == 99.9  # the override used it
    assert overridden["ptf_max_shift"] is None and card["ptf_max_shift"] is None
    ptf = build_card(**card_args(act_observer="mse", act_observer_overrides={".*fc2": "ptf"}, ptf_max_shift=6))
    assert ptf["ptf_max_shift"] == 6 and ptf["percentile"] is None


def test_softmax_uniform_from_bits_is_recorded_only_with_logarithmic_levels():
    hybrid = build_card(**card_args(attention=True, softmax_quantizer="log_sqrt2", softmax_uniform_from_bits=6))
    assert hybrid["attention"]["softmax_uniform_from_bits"] == 6
    uniform = build_card(**card_args(attention=True, softmax_quantizer="uniform", softmax_uniform_from_bits=6))
    assert uniform["attention"]["softmax_uniform_from_bits"] is None


def test_arguments_match_quant_settings():
    settings = dataclasses.asdict(QuantSettings())
    args = card_args()
    for key in settings:
        args.pop(key, None)
    card = build_card(**args, **settings)
    assert card["weight_granularity"] == settings["weight_granularity"]
    assert card["act_observer"] == settings["act_observer"]
    assert card["attention"]["softmax_quantizer"] == settings["softmax_quantizer"]
    assert card["attention"]["post_layernorm"] == settings["post_layernorm"]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"weight_granularity": "per_group"}, "weight_granularity"),
        ({"calibration_images": -1}, "calibration_images"),
        ({"bits_candidates": [4, 9]}, "bits_candidates"),
    ],
)
def test_bad_arguments(override, match):
    with pytest.raises(ValueError, match=match):
        build_card(**card_args(**override))


def test_build_card_takes_keywords_only():
    with pytest.raises(TypeError):
        build_card(make_plan())  # type: ignore[misc]


def test_yaml_round_trip(tmp_path):
    table = TableEnergyModel({"W8A8": 0.23, "W4A4": 0.06, "WFPAFP": 4.6}, source="chip X, 7 nm")
    card = build_card(**card_args(energy_model=table, seed_everything=None, calibration_seed=np.int64(3)))
    path = write_card(tmp_path / "run" / "quantization_card.yaml", card)
    assert path.is_file()
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert loaded == card
    assert list(loaded) == list(card)  # key order kept (sort_keys=False)
    assert loaded["calibration"]["seed"] == 3 and type(loaded["calibration"]["seed"]) is int
    assert loaded["energy_model"]["constants"]["mac_pj[W4A4]"] == 0.06
    assert loaded["energy_model"]["source"] == "chip X, 7 nm"
    assert path.read_text(encoding="utf-8").startswith("card_version: 1\nweight_granularity: per_channel\n")


def test_write_card_rejects_non_mapping(tmp_path):
    with pytest.raises(ValueError, match="build_card"):
        write_card(tmp_path / "card.yaml", ["not", "a", "card"])
