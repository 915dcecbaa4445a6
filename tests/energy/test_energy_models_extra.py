"""Tests for the alternative energy models: MaxBitWidthEnergyModel, TableEnergyModel, and config-file selection."""

import json
import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonargparse import ArgumentParser

from lit_mpq.energy import (
    ENERGY_MODELS,
    EnergyModel,
    HorowitzEnergyModel,
    MaxBitWidthEnergyModel,
    TableEnergyModel,
    build_energy_model,
    energy_report,
    parse_precision_key,
    precision_key,
)
from lit_mpq.plan import LayerPlan, LayerSpec, QuantPlan

SPEC = LayerSpec(name="conv", kind="conv2d", params=432, macs=442368, act_in=3072, act_out=16384)
TABLE = {"W8A8": 0.23, "W4A4": 0.06, "W4A8": 0.1, "WFPAFP": 4.6}


# ------------------------------------------------------------------------------------------ max bit width
def test_max_bit_width_by_hand():
    model = MaxBitWidthEnergyModel()
    assert model.name == "max_bit_width"
    assert "Spingarn-Eliezer" in model.source and "ICLR 2023" in model.source and "Horowitz" in model.source
    assert model.accumulate_pj() == pytest.approx(0.1)  # 32-bit add
    assert model.mac_pj(8, 8) == pytest.approx(0.2 + 0.1)
    assert model.mac_pj(4, 8) == pytest.approx(model.mac_pj(8, 8))  # the wider operand sets the multiplier
    assert model.mac_pj(8, 4) == pytest.approx(model.mac_pj(8, 8))
    assert model.mac_pj(4, 4) == pytest.approx(0.2 / 4 + 0.1)
    assert model.mac_pj(2, 2) == pytest.approx(0.2 / 16 + 0.1)
    assert model.mac_pj(16, 4) == pytest.approx(0.2 * 4 + 0.1)
    assert model.mac_pj(None, 4) == pytest.approx(4.6)  # FP32 MAC
    assert model.mac_pj(4, None) == pytest.approx(4.6)


def test_max_bit_width_layer_terms_by_hand():
    terms = MaxBitWidthEnergyModel().layer(SPEC, 4, 8)
    assert terms.mac_pj == pytest.approx(442368 * 0.3)
    assert terms.weight_mem_pj == pytest.approx(432 * 4 * 20.0)  # memory terms as Horowitz
    assert terms.act_mem_pj == pytest.approx(3072 * 8 * 20.0)
    horowitz = HorowitzEnergyModel().layer(SPEC, 4, 8)
    assert (terms.weight_mem_pj, terms.act_mem_pj) == (horowitz.weight_mem_pj, horowitz.act_mem_pj)
    fp32 = MaxBitWidthEnergyModel().layer(SPEC, None, None)
    assert fp32 == HorowitzEnergyModel().layer(SPEC, None, None)


def test_max_bit_width_accumulator_width_scales_linearly():
    assert MaxBitWidthEnergyModel(acc_bits=16).accumulate_pj() == pytest.approx(0.05)
    assert MaxBitWidthEnergyModel(acc_bits=48).mac_pj(8, 8) == pytest.approx(0.2 + 0.15)
    model = MaxBitWidthEnergyModel(mult8_pj=1.0, acc32_add_pj=0.0, dram_pj_per_bit=1.0)
    assert model.mac_pj(4, 2) == pytest.approx(0.25)
    assert model.constants()["acc_bits"] == 32
    assert "acc_bits=32" in repr(model)


@settings(max_examples=60, deadline=None)
@given(w_bits=st.integers(min_value=1, max_value=32), a_bits=st.integers(min_value=1, max_value=32))
def test_max_bit_width_depends_only_on_the_wider_operand(w_bits, a_bits):
    model = MaxBitWidthEnergyModel()
    wide = max(w_bits, a_bits)
    assert model.mac_pj(w_bits, a_bits) == model.mac_pj(wide, wide)
    # never cheaper than the accumulator alone
    assert model.mac_pj(w_bits, a_bits) >= model.accumulate_pj()


@pytest.mark.parametrize("bad", [0, 65, -1, 32.0, True, "32"])
def test_max_bit_width_rejects_bad_acc_bits(bad):
    with pytest.raises(ValueError, match="acc_bits"):
        MaxBitWidthEnergyModel(acc_bits=bad)


@pytest.mark.parametrize("name", ["mult8_pj", "acc32_add_pj", "fp32_mult_pj", "fp32_add_pj", "dram_pj_per_bit"])
def test_max_bit_width_rejects_bad_constants(name):
    with pytest.raises(ValueError, match=name):
        MaxBitWidthEnergyModel(**{name: -1.0})


# ------------------------------------------------------------------------------------------ table
def test_precision_keys_round_trip():
    assert precision_key(8, 8) == "W8A8"
    assert precision_key(None, 4) == "WFPA4"
    assert precision_key(None, None) == "WFPAFP"
    assert parse_precision_key(" w4afp ") == (4, None)
    for pair in [(1, 32), (None, 8), (8, None), (None, None)]:
        assert parse_precision_key(precision_key(*pair)) == pair


@pytest.mark.parametrize("key", ["W8", "A8W8", "W0A8", "W33A8", "W8A8x", "WfloatA8", "", 8])
def test_bad_precision_key(key):
    with pytest.raises(ValueError, match="precision key"):
        parse_precision_key(key)


def test_table_lookups():
    model = TableEnergyModel(TABLE, dram_pj_per_bit=10.0, source="test table")
    assert model.name == "table" and model.source == "test table"
    assert model.mac_pj(4, 4) == 0.06
    assert model.mac_pj(None, None) == 4.6
    terms = model.layer(SPEC, 4, 8)
    assert terms.mac_pj == pytest.approx(442368 * 0.1)
    assert terms.weight_mem_pj == pytest.approx(432 * 4 * 10.0)
    assert terms.act_mem_pj == pytest.approx(3072 * 8 * 10.0)
    assert model.constants() == {
        "mac_pj[W8A8]": 0.23,
        "mac_pj[W4A4]": 0.06,
        "mac_pj[W4A8]": 0.1,
        "mac_pj[WFPAFP]": 4.6,
        "dram_pj_per_bit": 10.0,
    }
    assert TableEnergyModel(TABLE).source == "user-supplied table"


def test_table_with_horowitz_numbers_matches_horowitz():
    horowitz = HorowitzEnergyModel()
    pairs = [(8, 8), (4, 8), (4, 4), (None, None)]
    model = TableEnergyModel({precision_key(w, a): horowitz.mac_pj(w, a) for w, a in pairs})
    for w, a in pairs:
        assert model.layer(SPEC, w, a) == horowitz.layer(SPEC, w, a)


def test_table_keys_are_case_insensitive_and_canonical():
    model = TableEnergyModel({"w8a8": 0.2, "WfpAfp": 4.0, " W4A8 ": 0.1})
    assert sorted(model.mac_table) == ["W4A8", "W8A8", "WFPAFP"]
    assert model.mac_pj(4, 8) == 0.1


def test_table_missing_combination_lists_available_keys():
    model = TableEnergyModel(TABLE)
    with pytest.raises(ValueError, match=r"no entry for W2A8.*'W4A4'.*'WFPAFP'"):
        model.mac_pj(2, 8)
    with pytest.raises(ValueError, match="W8AFP"):
        model.layer(SPEC, 8, None)
    with pytest.raises(ValueError, match="integer from 1 to 32"):
        model.mac_pj(0, 8)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({}, "non-empty mapping"),
        ([("W8A8", 0.2)], "non-empty mapping"),
        ({"W8A8": 0.2, "WFPAFP": 4.6, "8x8": 0.1}, "precision key '8x8'"),
        ({"W8A8": 0.2, "WFPAFP": 4.6, "W4A4": -0.1}, r"mac_pj\['W4A4'\]"),
        ({"W8A8": 0.2, "WFPAFP": 4.6, "W4A4": float("nan")}, "W4A4"),
        ({"W8A8": 0.2, "w8a8": 0.3, "WFPAFP": 4.6}, "twice"),
        ({"W4A4": 0.06, "WFPAFP": 4.6}, r"lacks \['W8A8'\]"),
        ({"W8A8": 0.23}, r"lacks \['WFPAFP'\]"),
    ],
)
def test_table_validation(table, match):
    with pytest.raises(ValueError, match=match):
        TableEnergyModel(table)


def test_table_rejects_empty_source():
    with pytest.raises(ValueError, match="source"):
        TableEnergyModel(TABLE, source=" ")


def test_energy_report_with_each_model():
    specs = [SPEC, LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10)]
    plan = QuantPlan(specs, {"conv": LayerPlan(w_bits=4, a_bits=4), "fc": LayerPlan(w_bits=8, a_bits=8)})
    for model in (HorowitzEnergyModel(), MaxBitWidthEnergyModel(), TableEnergyModel(TABLE, source="t")):
        report = energy_report(plan, model)
        assert report["model"] == model.name and report["source"] == model.source
        assert report["constants"] == model.constants()
        per_layer = sum(row["total_pj"] for row in report["per_layer"]) / 1e6
        assert report["total_uj_per_image"] == pytest.approx(per_layer)
        assert 0 < report["relative_to_int8"] < 1 and 0 < report["relative_to_fp32"] < 1
    # the fixed accumulator makes low bit widths save less arithmetic than under Horowitz
    mac_share = {
        type(m).__name__: energy_report(plan, m)["mac_uj_per_image"] / energy_report(plan, m)["total_uj_per_image"]
        for m in (HorowitzEnergyModel(), MaxBitWidthEnergyModel())
    }
    assert mac_share["MaxBitWidthEnergyModel"] > mac_share["HorowitzEnergyModel"]


# ------------------------------------------------------------------------------------------ registry / config
def test_registry_and_builder_know_the_new_models():
    assert ENERGY_MODELS["max_bit_width"] is MaxBitWidthEnergyModel
    assert ENERGY_MODELS["table"] is TableEnergyModel
    assert isinstance(build_energy_model("Max_Bit_Width"), MaxBitWidthEnergyModel)
    assert build_energy_model("max_bit_width", {"acc_bits": 16}).acc_bits == 16
    assert build_energy_model("table", {"mac_pj": TABLE}).mac_pj(4, 4) == 0.06
    assert build_energy_model("horowitz", {"dram_pj_per_bit": 40.0}).dram_pj_per_bit == 40.0


def test_builder_explains_bad_arguments():
    with pytest.raises(ValueError, match=r"mac_pj.*Its arguments are \['mac_pj', 'dram_pj_per_bit', 'source'\]"):
        build_energy_model("table")
    with pytest.raises(ValueError, match="acc_bits"):
        build_energy_model("horowitz45nm", {"acc_bits": 16})
    with pytest.raises(ValueError, match="max_bit_width"):
        build_energy_model("maxbits")


def _parse_energy_model(config: dict) -> EnergyModel:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--energy_model", type=EnergyModel)
    cfg = parser.parse_args(["--energy_model", json.dumps(config)])
    with warnings.catch_warnings():
        # jsonargparse >= 4.49 renamed instantiate_classes to instantiate; use whichever exists.
        warnings.simplefilter("ignore")
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        return instantiate(cfg).energy_model


@pytest.mark.parametrize(
    ("config", "cls"),
    [
        ({"class_path": "lit_mpq.energy.HorowitzEnergyModel"}, HorowitzEnergyModel),
        (
            {"class_path": "lit_mpq.energy.MaxBitWidthEnergyModel", "init_args": {"acc_bits": 24, "mult8_pj": 0.4}},
            MaxBitWidthEnergyModel,
        ),
        (
            {"class_path": "lit_mpq.energy.TableEnergyModel", "init_args": {"mac_pj": TABLE, "source": "chip X"}},
            TableEnergyModel,
        ),
    ],
)
def test_models_build_from_a_jsonargparse_config(config, cls):
    model = _parse_energy_model(config)
    assert type(model) is cls
    if cls is MaxBitWidthEnergyModel:
        assert model.acc_bits == 24 and model.mac_pj(8, 8) == pytest.approx(0.4 + 0.075)
    if cls is TableEnergyModel:
        assert model.source == "chip X" and model.mac_pj(4, 8) == 0.1
    assert math.isfinite(model.layer(SPEC, 8, 8).total_pj)


def test_jsonargparse_config_with_a_bad_table_fails_clearly():
    with pytest.raises(ValueError, match="WFPAFP"):
        _parse_energy_model({"class_path": "lit_mpq.energy.TableEnergyModel", "init_args": {"mac_pj": {"W8A8": 0.2}}})
