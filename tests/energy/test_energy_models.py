"""Tests for lit_mpq.energy.models: the Horowitz constants, the MAC formula, validation and the registry."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_mpq.energy import ENERGY_MODELS, EnergyModel, EnergyTerms, HorowitzEnergyModel, build_energy_model
from lit_mpq.energy import models as energy_models
from lit_mpq.plan import LayerSpec

SPEC = LayerSpec(name="conv", kind="conv2d", params=432, macs=442368, act_in=3072, act_out=16384)


def test_constants_are_horowitz_45nm():
    # Horowitz, ISSCC 2014, "Energy per operation" (45 nm, 0.9 V).
    assert energy_models.INT8_MULT_PJ == 0.2
    assert energy_models.INT8_ADD_PJ == 0.03
    assert energy_models.INT32_ADD_PJ == 0.1
    assert energy_models.INT32_MULT_PJ == 3.1
    assert energy_models.FP32_MULT_PJ == 3.7
    assert energy_models.FP32_ADD_PJ == 0.9
    assert energy_models.DRAM_PJ_PER_BIT == 20.0
    model = HorowitzEnergyModel()
    assert model.name == "horowitz45nm"
    assert "Horowitz" in model.source and "ISSCC 2014" in model.source and "45 nm" in model.source


def test_mac_energy_by_hand():
    model = HorowitzEnergyModel()
    assert model.mac_pj(8, 8) == pytest.approx(0.23)  # 0.2 + 0.03
    assert model.mac_pj(4, 8) == pytest.approx(0.115)  # 0.23 * 32 / 64
    assert model.mac_pj(4, 4) == pytest.approx(0.0575)  # 0.23 * 16 / 64
    assert model.mac_pj(2, 8) == pytest.approx(0.0575)  # 0.23 * 16 / 64
    assert model.mac_pj(16, 16) == pytest.approx(0.92)  # 0.23 * 256 / 64
    assert model.mac_pj(None, 8) == pytest.approx(4.6)  # FP32 MAC: 3.7 + 0.9
    assert model.mac_pj(8, None) == pytest.approx(4.6)
    assert model.mac_pj(None, None) == pytest.approx(4.6)


def test_layer_terms_by_hand():
    terms = HorowitzEnergyModel().layer(SPEC, 4, 8)
    assert terms.mac_pj == pytest.approx(50_872.32)  # 442368 MAC * 0.115 pJ
    assert terms.weight_mem_pj == pytest.approx(34_560.0)  # 432 weights * 4 bit * 20 pJ/bit
    assert terms.act_mem_pj == pytest.approx(491_520.0)  # 3072 inputs * 8 bit * 20 pJ/bit
    assert terms.total_pj == pytest.approx(50_872.32 + 34_560.0 + 491_520.0)


def test_fp32_layer_counts_32_bits():
    terms = HorowitzEnergyModel().layer(SPEC, None, None)
    assert terms.mac_pj == pytest.approx(2_034_892.8)  # 442368 * 4.6
    assert terms.weight_mem_pj == pytest.approx(276_480.0)  # 432 * 32 * 20
    assert terms.act_mem_pj == pytest.approx(1_966_080.0)  # 3072 * 32 * 20


def test_overridden_constants_are_used():
    model = HorowitzEnergyModel(mult8_pj=1.0, add8_pj=0.0, fp32_mult_pj=2.0, fp32_add_pj=1.0, dram_pj_per_bit=1.0)
    assert model.mac_pj(8, 8) == pytest.approx(1.0)
    assert model.mac_pj(None, 8) == pytest.approx(3.0)
    terms = model.layer(SPEC, 8, 4)
    assert terms.weight_mem_pj == pytest.approx(432 * 8)
    assert terms.act_mem_pj == pytest.approx(3072 * 4)
    assert model.constants()["dram_pj_per_bit"] == 1.0
    assert "dram_pj_per_bit=1.0" in repr(model)


@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(min_value=1, max_value=16),
    mult=st.floats(min_value=0.0, max_value=10.0),
    add=st.floats(min_value=0.0, max_value=10.0),
)
def test_mac_energy_scales_with_bits_squared(bits, mult, add):
    model = HorowitzEnergyModel(mult8_pj=mult, add8_pj=add)
    assert math.isclose(model.mac_pj(2 * bits, 2 * bits), 4 * model.mac_pj(bits, bits), rel_tol=1e-12, abs_tol=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    w_bits=st.integers(min_value=1, max_value=31),
    a_bits=st.integers(min_value=1, max_value=31),
)
def test_layer_energy_is_monotonic_in_bits(w_bits, a_bits):
    model = HorowitzEnergyModel()
    base = model.layer(SPEC, w_bits, a_bits)
    more_w = model.layer(SPEC, w_bits + 1, a_bits)
    more_a = model.layer(SPEC, w_bits, a_bits + 1)
    assert more_w.total_pj > base.total_pj
    assert more_a.total_pj > base.total_pj
    assert more_w.mac_pj > base.mac_pj and more_w.weight_mem_pj > base.weight_mem_pj
    assert more_a.mac_pj > base.mac_pj and more_a.act_mem_pj > base.act_mem_pj
    # An FP32 layer costs more than any integer layer with the Horowitz constants (4.6 pJ > 0.23 * 32 * 32 / 64).
    assert model.layer(SPEC, None, None).total_pj > model.layer(SPEC, 32, 32).total_pj >= base.total_pj


def test_energy_terms_add_and_sum():
    a = EnergyTerms(1.0, 2.0, 3.0)
    b = EnergyTerms(10.0, 20.0, 30.0)
    assert a + b == EnergyTerms(11.0, 22.0, 33.0)
    assert (a + b).total_pj == pytest.approx(66.0)
    assert sum([a, b]) == EnergyTerms(11.0, 22.0, 33.0)
    assert EnergyTerms.zero() + a == a
    assert a.to_dict() == {"mac_pj": 1.0, "weight_mem_pj": 2.0, "act_mem_pj": 3.0, "total_pj": 6.0}
    with pytest.raises(TypeError):
        a + 1.0  # noqa: B018


@pytest.mark.parametrize("name", ["mult8_pj", "add8_pj", "fp32_mult_pj", "fp32_add_pj", "dram_pj_per_bit"])
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.2"])
def test_invalid_constant_raises(name, bad):
    with pytest.raises(ValueError, match=name):
        HorowitzEnergyModel(**{name: bad})


@pytest.mark.parametrize("bits", [0, -4, 33, 8.0, True, "8"])
def test_invalid_bits_raise(bits):
    model = HorowitzEnergyModel()
    with pytest.raises(ValueError, match="integer from 1 to 32"):
        model.layer(SPEC, bits, 8)
    with pytest.raises(ValueError, match="a_bits"):
        model.layer(SPEC, 8, bits)


def test_registry_and_builder():
    assert build_energy_model("horowitz45nm").name == "horowitz45nm"
    assert isinstance(build_energy_model(" Horowitz "), HorowitzEnergyModel)
    assert all(issubclass(cls, EnergyModel) for cls in ENERGY_MODELS.values())


@pytest.mark.parametrize("name", ["nope", "", None])
def test_unknown_model_name_lists_known_names(name):
    with pytest.raises(ValueError, match="horowitz45nm"):
        build_energy_model(name)


def test_energy_model_is_abstract():
    with pytest.raises(TypeError):
        EnergyModel()
