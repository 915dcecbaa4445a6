"""Sparsity-aware energy (lit_mpq.energy.sparsity) against energies computed by hand from the Horowitz constants."""

from __future__ import annotations

import math

import pytest

from lit_mpq.energy.models import HorowitzEnergyModel
from lit_mpq.energy.sparsity import SparsityAwareEnergyModel, effective_macs, sparsity_report, weight_storage
from lit_mpq.plan import LayerSpec, QuantPlan

# Horowitz, ISSCC 2014, "Energy per operation", 45 nm: 8-bit mult 0.2 pJ, 8-bit add 0.03 pJ, DRAM ~20 pJ/bit.
MAC_W8A8 = 0.2 + 0.03
DRAM_BIT = 20.0

# Conv2d(2 -> 4, 3x3, padding 1) on 8x8: 72 weights, each used at 64 output positions; 18 of them nonzero.
CONV = LayerSpec("conv", "conv2d", params=72, macs=72 * 64, act_in=2 * 64, act_out=4 * 64, weight_shape=(4, 2, 3, 3),
                 nonzero_params=18)  # fmt: skip
# Linear(16 -> 10): 160 weights, half of them nonzero.
FC = LayerSpec("fc", "linear", params=160, macs=160, act_in=16, act_out=10, weight_shape=(10, 16), nonzero_params=80)


def two_layer_plan() -> QuantPlan:
    plan = QuantPlan([CONV, FC])
    plan.set_bits({"conv": (4, 8), "fc": (8, 8)})
    return plan


def test_two_layer_case_by_hand_bitmap():
    # conv at W4A8: a MAC costs 0.23 * 4 * 8 / 64 = 0.115 pJ.
    conv_dense = 4608 * 0.115 + 72 * 4 * DRAM_BIT + 128 * 8 * DRAM_BIT  # 529.92 + 5760 + 20480
    conv_sparse = 1152 * 0.115 + (18 * 4 + 72) * DRAM_BIT + 128 * 8 * DRAM_BIT  # 1/4 of the MACs; values + bitmap
    # fc at W8A8.
    fc_dense = 160 * MAC_W8A8 + 160 * 8 * DRAM_BIT + 16 * 8 * DRAM_BIT
    fc_sparse = 80 * MAC_W8A8 + (80 * 8 + 160) * DRAM_BIT + 16 * 8 * DRAM_BIT
    assert conv_dense == pytest.approx(26769.92) and conv_sparse == pytest.approx(23492.48)
    assert fc_dense == pytest.approx(28196.8) and fc_sparse == pytest.approx(18578.4)

    model = SparsityAwareEnergyModel(HorowitzEnergyModel(), "bitmap")
    assert model.layer(CONV, 4, 8).total_pj == pytest.approx(conv_sparse)
    assert model.layer(CONV, 4, 8).mac_pj == pytest.approx(132.48)
    assert model.layer(FC, 8, 8).weight_mem_pj == pytest.approx(16000.0)
    report = sparsity_report(two_layer_plan(), HorowitzEnergyModel(), "bitmap")
    assert report["dense"]["total_uj_per_image"] == pytest.approx((conv_dense + fc_dense) / 1e6)
    assert report["sparse"]["total_uj_per_image"] == pytest.approx((conv_sparse + fc_sparse) / 1e6)
    assert report["params"] == 232 and report["nonzero_params"] == 98
    assert report["sparsity_pct"] == pytest.approx(100 * 134 / 232)
    assert report["macs"] == 4768 and report["effective_macs"] == 1152 + 80
    assert report["dense_weight_bits"] == 72 * 4 + 160 * 8
    assert report["stored_weight_bits"] == (18 * 4 + 72) + (80 * 8 + 160)


def test_two_layer_case_by_hand_csr():
    # conv viewed as 4 rows x 18 columns: 5-bit column indices, 5 row pointers of ceil(log2(19)) = 5 bits.
    conv_bits = 18 * (4 + 5) + 5 * 5
    # fc: 10 rows x 16 columns: 4-bit column indices, 11 row pointers of ceil(log2(81)) = 7 bits.
    fc_bits = 80 * (8 + 4) + 11 * 7
    assert weight_storage(CONV, 4, "csr").total_bits == conv_bits == 187
    assert weight_storage(FC, 8, "csr").total_bits == fc_bits == 1037
    model = SparsityAwareEnergyModel(HorowitzEnergyModel(), "csr")
    assert model.layer(CONV, 4, 8).weight_mem_pj == pytest.approx(187 * DRAM_BIT)
    assert model.layer(FC, 8, 8).total_pj == pytest.approx(80 * MAC_W8A8 + 1037 * DRAM_BIT + 16 * 8 * DRAM_BIT)


def test_dense_storage_wins_when_compression_does_not_pay():
    # 60 of 72 weights nonzero at 2 bits: bitmap 60 * 2 + 72 = 192 bits > dense 144 bits.
    spec = LayerSpec("c", "conv2d", 72, 72 * 64, 128, 256, (4, 2, 3, 3), nonzero_params=60)
    storage = weight_storage(spec, 2, "bitmap")
    assert (storage.format, storage.total_bits) == ("dense", 144)
    terms = SparsityAwareEnergyModel().layer(spec, 2, 8)
    assert terms.weight_mem_pj == pytest.approx(144 * DRAM_BIT)
    assert terms.mac_pj == pytest.approx(60 * 64 * MAC_W8A8 * 2 * 8 / 64)  # MACs are still skipped


def test_fp32_weights_count_32_bits_and_fp32_macs():
    terms = SparsityAwareEnergyModel().layer(FC, None, None)
    assert terms.mac_pj == pytest.approx(80 * (3.7 + 0.9))
    assert terms.weight_mem_pj == pytest.approx((80 * 32 + 160) * DRAM_BIT)


def test_uncounted_layers_and_matmuls_cost_what_the_dense_model_says():
    dense = HorowitzEnergyModel()
    model = SparsityAwareEnergyModel(dense)
    uncounted = LayerSpec("fc", "linear", 160, 160, 16, 10, (10, 16))
    matmul = LayerSpec("attn.matmul_qk", "matmul", 0, 4096, 1024, 256, act_other=1024)
    for spec in (uncounted, matmul):
        assert model.layer(spec, 4, 8) == dense.layer(spec, 4, 8)
        assert effective_macs(spec) == spec.macs


def test_structurally_pruned_layer_is_just_smaller():
    # A dense layer whose count equals its size is stored dense and keeps every MAC: same price as the dense model.
    spec = LayerSpec("c", "conv2d", 36, 36 * 64, 64, 128, (2, 2, 3, 3), nonzero_params=36)
    assert SparsityAwareEnergyModel().layer(spec, 8, 8) == HorowitzEnergyModel().layer(spec, 8, 8)


def test_bad_inputs_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"'bitmap', 'csr'"):
        SparsityAwareEnergyModel(index_format="coo")
    with pytest.raises(ValueError, match="per-MAC"):
        SparsityAwareEnergyModel(dense=SparsityAwareEnergyModel())
    bad = LayerSpec("c", "conv2d", 8, 64, 8, 8, (2, 4), nonzero_params=9)
    with pytest.raises(ValueError, match="between 0 and its 8"):
        SparsityAwareEnergyModel().layer(bad, 8, 8)
    empty = sparsity_report(QuantPlan([]), HorowitzEnergyModel())
    assert empty["params"] == 0 and math.isnan(empty["sparse_relative_to_dense"])
