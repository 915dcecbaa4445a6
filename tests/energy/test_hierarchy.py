"""Tests for the memory-hierarchy energy model, against picojoules worked out by hand.

Every expected number is written out from the cited constants as literals, never from the model's own helpers:

* MAC (Horowitz ISSCC 2014): 8-bit mult 0.2 pJ + 8-bit add 0.03 pJ = 0.23 pJ at W8A8, scaled by ``b_w * b_a / 64``;
  FP32 3.7 + 0.9 = 4.6 pJ.
* DRAM (Horowitz): 20 pJ/bit.
* SRAM (Horowitz, 64-bit cache access): 8 KB 10 pJ, 32 KB 20 pJ, 1 MB 100 pJ; 16 KB lies half-way between 8 and 32 KB
  in log(size), where the slope is log(20/10)/log(32/8) = 1/2, so 10 * sqrt(2) pJ.
* RF (Eyeriss ISCA 2016: RF = 1x a 16-bit MAC): 1 * 0.23 * (16 * 16 / 64) / 16 = 0.0575 pJ/bit.

The two-layer network: ``conv`` (4 -> 8 channels, 3x3, 32x32, stride 1) and ``fc`` (8,192 -> 10).
"""

import json
import math
import warnings

import pytest
import torch
from jsonargparse import ArgumentParser

from lit_mpq.energy import (
    ENERGY_MODELS,
    EnergyModel,
    EnergyTerms,
    HierarchyEnergy,
    MemoryHierarchyEnergyModel,
    build_energy_model,
    energy_report,
    hierarchy_report,
)
from lit_mpq.energy.hierarchy import horowitz_sram_pj_per_bit
from lit_mpq.models import create_backbone
from lit_mpq.plan import LayerSpec, QuantPlan
from lit_mpq.quant.apply import QuantSettings, measure_model, quantize_model

CONV = LayerSpec(
    name="conv", kind="conv2d", params=8 * 4 * 9, macs=8 * 32 * 32 * 4 * 9, act_in=4 * 32 * 32, act_out=8 * 32 * 32
)
FC = LayerSpec(name="fc", kind="linear", params=8192 * 10, macs=8192 * 10, act_in=8192, act_out=10)
BITS = {"conv": (8, 8), "fc": (4, 6)}

RF = 0.0575  # pJ/bit
DRAM = 20.0  # pJ/bit
SRAM_32K = 20.0 / 64  # pJ/bit
SRAM_16K = 10.0 * math.sqrt(2.0) / 64  # pJ/bit


def two_layer_plan() -> QuantPlan:
    plan = QuantPlan([CONV, FC])
    plan.set_bits(BITS)
    return plan


def test_the_spec_counts():
    assert (CONV.params, CONV.macs, CONV.act_in, CONV.act_out) == (288, 294_912, 4096, 8192)
    assert (FC.params, FC.macs, FC.act_in, FC.act_out) == (81_920, 81_920, 8192, 10)


# ----------------------------------------------------------------------------------------- SRAM fits (32 KB)
def test_two_layers_with_32_kb_sram_everything_fits():
    model = MemoryHierarchyEnergyModel(sram_bytes=32 * 1024, batch_size=2)
    # Working sets, batch of 2: conv 2 * (4096 * 8 + 8192 * 8) / 8 = 24,576 B; fc 2 * (8192 * 6 + 10 * 6) / 8 =
    # 12,303 B; both <= 32,768 B.
    assert model.working_set_bytes(CONV, 8, 8) == 24_576
    assert model.working_set_bytes(FC, 4, 6) == 12_303
    assert model.activations_on_chip(CONV, 8, 8) and model.activations_on_chip(FC, 4, 6)

    conv = model.levels(CONV, 8, 8)
    assert conv.mac_pj == pytest.approx(294_912 * 0.23)  # 67,829.76
    assert conv.rf_weight_pj == pytest.approx(294_912 * 8 * 0.0575)  # 135,659.52
    assert conv.rf_act_pj == pytest.approx(294_912 * 8 * 0.0575)
    assert conv.dram_weight_pj == pytest.approx(288 * 8 * 20 / 2)  # 23,040
    assert conv.sram_act_pj == pytest.approx(2 * 4096 * 8 * 20 / 64)  # written + read: 20,480
    assert conv.dram_act_pj == 0.0
    assert conv.total_pj == pytest.approx(382_668.8)

    fc = model.levels(FC, 4, 6)
    assert fc.mac_pj == pytest.approx(81_920 * 0.23 * 24 / 64)  # 7,065.6
    assert fc.rf_weight_pj == pytest.approx(81_920 * 4 * 0.0575)  # 18,841.6
    assert fc.rf_act_pj == pytest.approx(81_920 * 6 * 0.0575)  # 28,262.4
    assert fc.dram_weight_pj == pytest.approx(81_920 * 4 * 20 / 2)  # 3,276,800
    assert fc.sram_act_pj == pytest.approx(2 * 8192 * 6 * 20 / 64)  # 30,720
    assert fc.dram_act_pj == 0.0
    assert fc.total_pj == pytest.approx(3_361_689.6)

    report = hierarchy_report(two_layer_plan(), model)
    assert report["spilled"] == []
    levels = report["levels_uj_per_image"]
    assert levels["mac"] == pytest.approx((67_829.76 + 7_065.6) / 1e6)
    assert levels["rf"] == pytest.approx((2 * 135_659.52 + 18_841.6 + 28_262.4) / 1e6)
    assert levels["sram"] == pytest.approx((20_480 + 30_720) / 1e6)
    assert levels["dram"] == pytest.approx((23_040 + 3_276_800) / 1e6)
    assert levels["total"] == pytest.approx(3.7443584)
    assert sum(report["levels_share"].values()) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- SRAM spills (16 KB)
def test_two_layers_with_16_kb_sram_the_conv_spills():
    model = MemoryHierarchyEnergyModel(sram_bytes=16 * 1024, batch_size=2)
    assert model.sram_pj_per_bit == pytest.approx(SRAM_16K)
    # conv: 24,576 B > 16,384 B, its activations go to DRAM; fc: 12,303 B <= 16,384 B, they stay on chip.
    assert not model.activations_on_chip(CONV, 8, 8)
    assert model.activations_on_chip(FC, 4, 6)

    conv = model.levels(CONV, 8, 8)
    assert conv.sram_act_pj == 0.0
    assert conv.dram_act_pj == pytest.approx(2 * 4096 * 8 * 20)  # 1,310,720
    assert conv.total_pj == pytest.approx(67_829.76 + 2 * 135_659.52 + 23_040 + 1_310_720)  # 1,672,908.8
    fc = model.levels(FC, 4, 6)
    assert fc.sram_act_pj == pytest.approx(2 * 8192 * 6 * 10 * math.sqrt(2) / 64)  # 21,722.3...
    assert fc.total_pj == pytest.approx(7_065.6 + 18_841.6 + 28_262.4 + 3_276_800 + 2 * 8192 * 6 * SRAM_16K)

    report = hierarchy_report(two_layer_plan(), model)
    assert report["spilled"] == ["conv"]
    assert report["levels_uj_per_image"]["dram"] == pytest.approx((23_040 + 1_310_720 + 3_276_800) / 1e6)
    assert [row["on_chip"] for row in report["per_layer"]] == [False, True]
    # 4-bit conv activations halve its working set (12,288 B): back on chip.
    assert model.activations_on_chip(CONV, 8, 4)
    assert model.levels(CONV, 8, 4).sram_act_pj == pytest.approx(2 * 4096 * 4 * SRAM_16K)


def test_layer_terms_group_the_levels_by_operand():
    model = MemoryHierarchyEnergyModel(sram_bytes=16 * 1024, batch_size=2)
    terms = model.layer(CONV, 8, 8)
    assert terms == model.levels(CONV, 8, 8).terms()
    assert terms.mac_pj == pytest.approx(294_912 * 0.23)
    assert terms.weight_mem_pj == pytest.approx(288 * 8 * 20 / 2 + 294_912 * 8 * 0.0575)  # DRAM + RF, weights
    assert terms.act_mem_pj == pytest.approx(2 * 4096 * 8 * 20 + 294_912 * 8 * 0.0575)  # DRAM + RF, activations
    report = energy_report(two_layer_plan(), model)  # the common report works unchanged
    assert report["model"] == "memory_hierarchy" and "Eyeriss" in report["source"] and "Horowitz" in report["source"]
    assert report["total_uj_per_image"] == pytest.approx(
        hierarchy_report(two_layer_plan(), model)["levels_uj_per_image"]["total"]
    )


# ----------------------------------------------------------------------------------------- batch size
def test_the_weight_fetch_divides_by_the_batch_size():
    fc_one = MemoryHierarchyEnergyModel(sram_bytes=32 * 1024, batch_size=1).levels(FC, 4, 6)
    assert fc_one.dram_weight_pj == pytest.approx(81_920 * 4 * 20)  # 6,553,600: the DRAM-only model's weight term
    for batch in (2, 5):
        fc = MemoryHierarchyEnergyModel(sram_bytes=32 * 1024, batch_size=batch).levels(FC, 4, 6)
        assert fc.dram_weight_pj == pytest.approx(81_920 * 4 * 20 / batch)
        # Nothing else changes while the batch's working set (batch * 6,151.5 B) still fits 32 KB.
        assert (fc.mac_pj, fc.rf_pj, fc.sram_pj, fc.dram_act_pj) == (
            fc_one.mac_pj,
            fc_one.rf_pj,
            fc_one.sram_pj,
            fc_one.dram_act_pj,
        )


def test_a_larger_batch_can_push_the_activations_off_chip():
    # The batch's activations are live together: conv at batch 3 needs 3 * 12,288 = 36,864 B > 32,768 B.
    model = MemoryHierarchyEnergyModel(sram_bytes=32 * 1024, batch_size=3)
    assert model.working_set_bytes(CONV, 8, 8) == 36_864
    conv = model.levels(CONV, 8, 8)
    assert conv.dram_act_pj == pytest.approx(2 * 4096 * 8 * 20) and conv.sram_act_pj == 0.0
    assert conv.dram_weight_pj == pytest.approx(288 * 8 * 20 / 3)


# ----------------------------------------------------------------------------------------- other rows
def test_fp32_layer_counts_32_bits_and_the_fp32_mac():
    model = MemoryHierarchyEnergyModel(sram_bytes=1024 * 1024, batch_size=1)
    assert model.sram_pj_per_bit == pytest.approx(100 / 64)
    fc = model.levels(FC, None, None)
    assert fc.mac_pj == pytest.approx(81_920 * (3.7 + 0.9))
    assert fc.rf_pj == pytest.approx(81_920 * 64 * 0.0575)
    assert fc.dram_weight_pj == pytest.approx(81_920 * 32 * 20)
    # 8192 * 32 + 10 * 32 bits = 32,808 B <= 1 MB: on chip.
    assert fc.sram_act_pj == pytest.approx(2 * 8192 * 32 * 100 / 64)


def test_matmul_operands_are_both_activations():
    spec = LayerSpec(
        "attn.matmul_qk", "matmul", params=0, macs=64 * 64 * 32, act_in=64 * 32, act_out=64 * 64, act_other=64 * 32
    )
    model = MemoryHierarchyEnergyModel(sram_bytes=32 * 1024)
    levels = model.levels(spec, 6, 8)  # k at 6 bits, q at 8 bits
    assert levels.rf_weight_pj == 0.0 and levels.dram_weight_pj == 0.0
    assert levels.rf_act_pj == pytest.approx(131_072 * (6 + 8) * 0.0575)
    # working set (2048 * 8 + 2048 * 6 + 4096 * 8) / 8 = 7,680 B: on chip; both operands written and read once.
    assert model.working_set_bytes(spec, 6, 8) == 7680
    assert levels.sram_act_pj == pytest.approx(2 * (2048 * 8 + 2048 * 6) * 20 / 64)


def test_output_bits_set_the_output_part_of_the_working_set():
    model = MemoryHierarchyEnergyModel(sram_bytes=16 * 1024, batch_size=2, output_bits=2)
    assert model.working_set_bytes(CONV, 8, 8) == 2 * (4096 * 8 + 8192 * 2) / 8  # 12,288 B: now it fits
    assert model.activations_on_chip(CONV, 8, 8)
    assert model.constants()["output_bits"] == 2
    assert "output_bits" not in MemoryHierarchyEnergyModel().constants()


def test_horowitz_sram_interpolation_hits_the_published_points():
    assert horowitz_sram_pj_per_bit(8 * 1024) == pytest.approx(10 / 64)
    assert horowitz_sram_pj_per_bit(32 * 1024) == pytest.approx(20 / 64)
    assert horowitz_sram_pj_per_bit(1024 * 1024) == pytest.approx(100 / 64)
    assert horowitz_sram_pj_per_bit(16 * 1024) == pytest.approx(SRAM_16K)
    # 32 KB -> 1 MB: 32x the size for 5x the energy; 64 KB is a fifth of the way in log(size): 20 * 5 ** (1 / 5).
    assert horowitz_sram_pj_per_bit(64 * 1024) == pytest.approx(20 * 5 ** (1 / 5) / 64)


def test_defaults_and_their_sources():
    model = MemoryHierarchyEnergyModel()
    assert (model.sram_bytes, model.batch_size, model.output_bits) == (108 * 1024, 1, None)
    # Eyeriss: an RF access of a 16-bit word costs 1x a 16-bit MAC; Horowitz's MAC at 16 x 16 bits: 0.23 * 4 pJ.
    assert model.rf_pj_per_bit * 16 == pytest.approx(0.23 * 4)
    assert model.rf_pj_per_bit == pytest.approx(RF)
    assert model.dram_pj_per_bit == DRAM
    assert model.mac_pj(8, 8) == pytest.approx(0.23) and model.mac_pj(4, 4) == pytest.approx(0.0575)
    assert model.sram_pj_per_bit == pytest.approx(20 * (108 / 32) ** (math.log(5) / math.log(32)) / 64)
    assert "ISSCC 2014" in model.source and "ISCA 2016" in model.source
    assert "batch_size=1" in repr(model)


def test_constants_override_from_the_constructor():
    model = MemoryHierarchyEnergyModel(
        sram_bytes=1000, sram_pj_per_bit=0.5, rf_pj_per_bit=0.1, dram_pj_per_bit=10.0, mult8_pj=0.4, add8_pj=0.0
    )
    levels = model.levels(FC, 8, 8)
    assert levels.mac_pj == pytest.approx(81_920 * 0.4)
    assert levels.rf_pj == pytest.approx(81_920 * 16 * 0.1)
    assert levels.dram_weight_pj == pytest.approx(81_920 * 8 * 10.0)
    assert levels.dram_act_pj == pytest.approx(2 * 8192 * 8 * 10.0)  # 8,202 B > 1,000 B
    assert model.constants()["sram_pj_per_bit"] == 0.5


def test_hierarchy_energy_adds_and_converts():
    a = HierarchyEnergy(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    total = sum([a, a], HierarchyEnergy.zero())
    assert total == HierarchyEnergy(2.0, 4.0, 6.0, 8.0, 10.0, 12.0)
    assert (a.rf_pj, a.sram_pj, a.dram_pj, a.total_pj) == (5.0, 4.0, 11.0, 21.0)
    assert a.terms() == EnergyTerms(1.0, 2.0 + 5.0, 3.0 + 4.0 + 6.0)
    assert a.to_dict()["total_pj"] == 21.0


# ----------------------------------------------------------------------------------------- ResNet-20
def test_resnet20_worked_example():
    # docs/energy_model.md, "Memory-hierarchy model": 108 KB SRAM, batch 4, the plan measured from the model itself.
    model = create_backbone("cifar_resnet20")
    quantize_model(model, QuantSettings())
    plan = measure_model(model, torch.zeros(1, 3, 32, 32))
    assert sum(s.macs for s in plan.specs.values()) == 40_551_040
    assert sum(s.params for s in plan.specs.values()) == 268_336
    assert sum(s.act_in for s in plan.specs.values()) == 187_456
    hierarchy = MemoryHierarchyEnergyModel(sram_bytes=108 * 1024, batch_size=4)
    sram = 20 * (108 / 32) ** (math.log(5) / math.log(32)) / 64  # Horowitz 32 KB -> 1 MB, at 108 KB: 0.5498 pJ/bit

    # One layer by hand: layer1.0.conv1, 16 -> 16 channels, 3x3 at 32x32.
    spec = plan.specs["layer1.0.conv1"]
    assert (spec.params, spec.macs, spec.act_in, spec.act_out) == (2304, 2_359_296, 16_384, 16_384)
    # W4A4: working set 4 * (16384 * 4 + 16384 * 4) / 8 = 65,536 B <= 110,592 B: on chip.
    assert hierarchy.levels(spec, 4, 4).total_pj == pytest.approx(
        2_359_296 * 0.0575 + 2_359_296 * 8 * 0.0575 + 2 * 16_384 * 4 * sram + 2304 * 4 * 20 / 4
    )  # 135,659.52 + 1,085,276.16 + 72,058.08 + 46,080 = 1,339,073.76 pJ
    # W8A8: 131,072 B > 110,592 B: the activations go to DRAM.
    assert hierarchy.levels(spec, 8, 8).total_pj == pytest.approx(
        2_359_296 * 0.23 + 2_359_296 * 16 * 0.0575 + 2 * 16_384 * 8 * 20 + 2304 * 8 * 20 / 4
    )  # 542,638.08 + 2,170,552.32 + 5,242,880 + 92,160 = 8,048,230.4 pJ
    assert hierarchy.activations_on_chip(spec, 8, 6)  # 98,304 B

    # The whole network. W4A4: every layer on chip.
    w4a4 = 40_551_040 * 0.0575 + 40_551_040 * 8 * 0.0575 + 2 * 187_456 * 4 * sram + 268_336 * 4 * 20 / 4
    plan.set_bits({name: (4, 4) for name in plan.names})
    assert hierarchy_report(plan, hierarchy)["spilled"] == []
    assert energy_report(plan, hierarchy)["total_uj_per_image"] == pytest.approx(w4a4 / 1e6)  # 27.18 µJ
    # W8A8: the six stage-1 convolutions (16,384 input elements each, 98,304 in all) spill.
    w8a8 = (
        40_551_040 * 0.23
        + 40_551_040 * 16 * 0.0575
        + 2 * (187_456 - 98_304) * 8 * sram
        + 2 * 98_304 * 8 * 20
        + 268_336 * 8 * 20 / 4
    )
    plan.set_bits({name: (8, 8) for name in plan.names})
    report = hierarchy_report(plan, hierarchy)
    assert report["spilled"] == [f"layer1.{block}.conv{conv}" for block in range(3) for conv in (1, 2)]
    assert report["levels_uj_per_image"]["total"] == pytest.approx(w8a8 / 1e6)  # 89.61 µJ
    assert report["levels_uj_per_image"]["rf"] == pytest.approx(40_551_040 * 16 * 0.0575 / 1e6)  # 37.31 µJ
    assert energy_report(plan, hierarchy)["relative_to_int8"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- selection
def test_selectable_by_name_and_from_a_config():
    assert ENERGY_MODELS["memory_hierarchy"] is MemoryHierarchyEnergyModel
    model = build_energy_model("Memory_Hierarchy", {"sram_bytes": 16 * 1024, "batch_size": 4})
    assert isinstance(model, MemoryHierarchyEnergyModel) and model.batch_size == 4
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--energy_model", type=EnergyModel)
    config = {"class_path": "lit_mpq.energy.MemoryHierarchyEnergyModel", "init_args": {"batch_size": 4}}
    cfg = parser.parse_args(["--energy_model", json.dumps(config)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        built = instantiate(cfg).energy_model
    assert type(built) is MemoryHierarchyEnergyModel and built.batch_size == 4 and built.sram_bytes == 108 * 1024


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "32k", None])
def test_bad_sizes_and_batches_are_clear_errors(bad):
    with pytest.raises(ValueError, match="sram_bytes"):
        MemoryHierarchyEnergyModel(sram_bytes=bad, sram_pj_per_bit=0.3)
    with pytest.raises(ValueError, match="batch_size"):
        MemoryHierarchyEnergyModel(batch_size=bad)


@pytest.mark.parametrize("size", [4 * 1024, 1024 * 1024 + 1])
def test_sram_outside_horowitz_range_needs_an_explicit_energy(size):
    with pytest.raises(ValueError, match="sram_pj_per_bit"):
        MemoryHierarchyEnergyModel(sram_bytes=size)
    assert MemoryHierarchyEnergyModel(sram_bytes=size, sram_pj_per_bit=0.1).sram_pj_per_bit == 0.1


@pytest.mark.parametrize("argument", ["sram_pj_per_bit", "rf_pj_per_bit", "dram_pj_per_bit", "mult8_pj"])
@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan, "1"])
def test_bad_energies_are_clear_errors(argument, bad):
    with pytest.raises(ValueError, match=argument):
        MemoryHierarchyEnergyModel(**{argument: bad})


@pytest.mark.parametrize("bad", [0, 33, 4.0, True])
def test_bad_output_bits_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="output_bits"):
        MemoryHierarchyEnergyModel(output_bits=bad)


def test_bad_bits_and_arguments_are_clear_errors():
    model = MemoryHierarchyEnergyModel()
    with pytest.raises(ValueError, match="w_bits"):
        model.layer(FC, 0, 8)
    with pytest.raises(ValueError, match="a_bits"):
        model.working_set_bytes(FC, 8, 40)
    with pytest.raises(ValueError, match="sram_bits"):
        build_energy_model("memory_hierarchy", {"sram_bits": 1024})
    with pytest.raises(ValueError, match="MemoryHierarchyEnergyModel"):
        hierarchy_report(two_layer_plan(), build_energy_model("horowitz45nm"))
