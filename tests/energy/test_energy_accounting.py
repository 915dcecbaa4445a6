"""Tests for lit_mpq.energy.accounting against a two-layer network priced by hand.

The network: a 3x3 conv 3 -> 16 channels on a 32x32 image (the ResNet-20 stem) and a 64 -> 10 linear head.

    conv:   params = 16 * 3 * 3 * 3 = 432,  MACs = (16 * 32 * 32) * 3 * 3 * 3 = 16384 * 27 = 442368,
            act_in = 3 * 32 * 32 = 3072
    linear: params = 10 * 64 = 640,         MACs = 10 * 64 = 640,                              act_in = 64

Horowitz 45 nm constants: integer MAC = (0.2 + 0.03) pJ * b_w * b_a / 64, FP32 MAC = 3.7 + 0.9 = 4.6 pJ,
DRAM = 20 pJ/bit. Every expected number below is worked out in the comments, not computed by the code under test.
"""

import json
import math

import pytest

from lit_mpq.energy import HorowitzEnergyModel, energy_report, layer_energy, plan_energy, uniform_energy
from lit_mpq.plan import LayerSpec, QuantPlan

CONV = LayerSpec(
    name="conv", kind="conv2d", params=432, macs=442368, act_in=3072, act_out=16384, weight_shape=(16, 3, 3, 3)
)
FC = LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10, weight_shape=(10, 64))

# ---- W8A8 (MAC = 0.23 pJ)
# conv: MAC    442368 * 0.23      = 101744.64 pJ
#       weight    432 * 8 * 20    =  69120    pJ
#       act      3072 * 8 * 20    = 491520    pJ   -> conv total 662384.64 pJ
# fc:   MAC       640 * 0.23      =    147.2  pJ
#       weight    640 * 8 * 20    = 102400    pJ
#       act        64 * 8 * 20    =  10240    pJ   -> fc total 112787.2 pJ
# total W8A8 = 662384.64 + 112787.2 = 775171.84 pJ
W8A8_MAC_PJ = 101_744.64 + 147.2  # 101891.84
W8A8_WEIGHT_PJ = 69_120.0 + 102_400.0  # 171520
W8A8_ACT_PJ = 491_520.0 + 10_240.0  # 501760
W8A8_TOTAL_PJ = 775_171.84

# ---- W4A8 (MAC = 0.23 * 4 * 8 / 64 = 0.115 pJ)
# conv: MAC    442368 * 0.115     =  50872.32 pJ
#       weight    432 * 4 * 20    =  34560    pJ
#       act      3072 * 8 * 20    = 491520    pJ   -> conv total 576952.32 pJ
# fc:   MAC       640 * 0.115     =     73.6  pJ
#       weight    640 * 4 * 20    =  51200    pJ
#       act        64 * 8 * 20    =  10240    pJ   -> fc total 61513.6 pJ
# total W4A8 = 576952.32 + 61513.6 = 638465.92 pJ
W4A8_TOTAL_PJ = 638_465.92

# ---- mixed: conv W8A8, fc FP32 (MAC = 3.7 + 0.9 = 4.6 pJ, 32 bits for weights and inputs)
# fc:   MAC       640 * 4.6       =   2944    pJ
#       weight    640 * 32 * 20   = 409600    pJ
#       act        64 * 32 * 20   =  40960    pJ   -> fc total 453504 pJ
# total = 662384.64 + 453504 = 1115888.64 pJ
MIXED_TOTAL_PJ = 1_115_888.64

# ---- conv W4A4 (MAC = 0.23 * 16 / 64 = 0.0575 pJ), fc W8 with FP32 inputs (FP32 MAC)
# conv: MAC    442368 * 0.0575    =  25436.16 pJ
#       weight    432 * 4 * 20    =  34560    pJ
#       act      3072 * 4 * 20    = 245760    pJ   -> conv total 305756.16 pJ
# fc:   MAC       640 * 4.6       =   2944    pJ
#       weight    640 * 8 * 20    = 102400    pJ
#       act        64 * 32 * 20   =  40960    pJ   -> fc total 146304 pJ
# total = 305756.16 + 146304 = 452060.16 pJ
HALF_FP32_TOTAL_PJ = 452_060.16

# ---- all FP32
# conv: 442368 * 4.6 = 2034892.8; 432 * 32 * 20 = 276480; 3072 * 32 * 20 = 1966080 -> 4277452.8 pJ
# fc:   453504 pJ (above)
# total = 4277452.8 + 453504 = 4730956.8 pJ
FP32_TOTAL_PJ = 4_730_956.8


def make_plan(conv_bits, fc_bits):
    plan = QuantPlan([CONV, FC])
    plan.set_bits({"conv": conv_bits, "fc": fc_bits})
    return plan


MODEL = HorowitzEnergyModel()


def test_w8a8_by_hand():
    terms = plan_energy(make_plan((8, 8), (8, 8)), MODEL)
    assert terms.mac_pj == pytest.approx(W8A8_MAC_PJ)
    assert terms.weight_mem_pj == pytest.approx(W8A8_WEIGHT_PJ)
    assert terms.act_mem_pj == pytest.approx(W8A8_ACT_PJ)
    assert terms.total_pj == pytest.approx(W8A8_TOTAL_PJ)


def test_w4a8_by_hand():
    assert plan_energy(make_plan((4, 8), (4, 8)), MODEL).total_pj == pytest.approx(W4A8_TOTAL_PJ)


def test_mixed_with_fp32_layer_by_hand():
    plan = make_plan((8, 8), (None, None))
    assert plan_energy(plan, MODEL).total_pj == pytest.approx(MIXED_TOTAL_PJ)
    per_layer = layer_energy(plan, MODEL)
    assert list(per_layer) == ["conv", "fc"]
    assert per_layer["conv"].total_pj == pytest.approx(662_384.64)
    assert per_layer["fc"].mac_pj == pytest.approx(2_944.0)
    assert per_layer["fc"].weight_mem_pj == pytest.approx(409_600.0)
    assert per_layer["fc"].act_mem_pj == pytest.approx(40_960.0)


def test_fp32_inputs_only_by_hand():
    assert plan_energy(make_plan((4, 4), (8, None)), MODEL).total_pj == pytest.approx(HALF_FP32_TOTAL_PJ)


def test_uniform_energy_ignores_plan_bits():
    plan = make_plan((2, 3), (None, 16))
    assert uniform_energy(plan, MODEL, 8, 8).total_pj == pytest.approx(W8A8_TOTAL_PJ)
    assert uniform_energy(plan, MODEL, 4, 8).total_pj == pytest.approx(W4A8_TOTAL_PJ)
    assert uniform_energy(plan, MODEL, None, None).total_pj == pytest.approx(FP32_TOTAL_PJ)


def test_energy_report_at_w8a8():
    report = energy_report(make_plan((8, 8), (8, 8)), MODEL)
    assert report["relative_to_int8"] == pytest.approx(1.0)
    assert report["relative_to_fp32"] == pytest.approx(W8A8_TOTAL_PJ / FP32_TOTAL_PJ)  # 0.16385
    assert report["total_uj_per_image"] == pytest.approx(0.77517184)  # 775171.84 pJ / 1e6
    assert report["mac_uj_per_image"] == pytest.approx(0.10189184)
    assert report["weight_mem_uj_per_image"] == pytest.approx(0.17152)
    assert report["act_mem_uj_per_image"] == pytest.approx(0.50176)
    assert report["int8_uj_per_image"] == pytest.approx(0.77517184)
    assert report["fp32_uj_per_image"] == pytest.approx(4.7309568)
    assert report["model"] == "horowitz45nm"
    assert "Horowitz" in report["source"]
    assert report["constants"]["dram_pj_per_bit"] == 20.0
    assert [row["name"] for row in report["per_layer"]] == ["conv", "fc"]
    conv = report["per_layer"][0]
    assert conv["w_bits"] == 8 and conv["a_bits"] == 8
    assert conv["mac_pj"] == pytest.approx(101_744.64)
    assert conv["weight_mem_pj"] == pytest.approx(69_120.0)
    assert conv["act_mem_pj"] == pytest.approx(491_520.0)
    assert conv["total_pj"] == pytest.approx(662_384.64)


def test_energy_report_relative_values():
    report = energy_report(make_plan((4, 8), (4, 8)), MODEL)
    assert report["relative_to_int8"] == pytest.approx(638_465.92 / 775_171.84)  # 0.82364
    report = energy_report(make_plan((None, None), (None, None)), MODEL)
    assert report["relative_to_fp32"] == pytest.approx(1.0)
    assert report["relative_to_int8"] == pytest.approx(4_730_956.8 / 775_171.84)  # 6.1031


def test_empty_plan():
    report = energy_report(QuantPlan([]), MODEL)
    assert report["total_uj_per_image"] == 0.0
    assert math.isnan(report["relative_to_int8"]) and math.isnan(report["relative_to_fp32"])
    assert report["per_layer"] == []


def test_energy_report_is_json_ready():
    json.dumps(energy_report(make_plan((8, 8), (None, 8)), MODEL))


def resnet20_specs():
    # ResNet-20 with parameter-free "option A" shortcuts: stem, 3 stages x 3 blocks x 2 convs, linear head.
    specs = []

    def conv(name, c_in, c_out, h_in, stride):
        h_out = h_in // stride
        specs.append(
            LayerSpec(
                name=name,
                kind="conv2d",
                params=c_out * c_in * 9,
                macs=c_out * h_out * h_out * c_in * 9,
                act_in=c_in * h_in * h_in,
                act_out=c_out * h_out * h_out,
            )
        )
        return h_out

    h = conv("conv1", 3, 16, 32, 1)
    c_in = 16
    for stage, (c_out, first_stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
        for block in range(3):
            h = conv(f"layer{stage}.{block}.conv1", c_in, c_out, h, first_stride if block == 0 else 1)
            h = conv(f"layer{stage}.{block}.conv2", c_out, c_out, h, 1)
            c_in = c_out
    specs.append(FC)
    return specs


def test_resnet20_worked_example():
    # The numbers in docs/energy_model.md, "Worked example".
    plan = QuantPlan(resnet20_specs())
    assert len(plan) == 20
    assert sum(s.params for s in plan.specs.values()) == 268_336
    assert sum(s.macs for s in plan.specs.values()) == 40_551_040
    assert sum(s.act_in for s in plan.specs.values()) == 187_456
    # W8A8: 40551040 * 0.23 + 268336 * 8 * 20 + 187456 * 8 * 20 = 9326739.2 + 42933760 + 29992960 pJ
    assert uniform_energy(plan, MODEL, 8, 8).total_pj == pytest.approx(82_253_459.2)
    # FP32: 40551040 * 4.6 + 268336 * 32 * 20 + 187456 * 32 * 20 = 186534784 + 171735040 + 119971840 pJ
    assert uniform_energy(plan, MODEL, None, None).total_pj == pytest.approx(478_241_664.0)
    # W4A8: 40551040 * 0.115 + 268336 * 4 * 20 + 187456 * 8 * 20 = 4663369.6 + 21466880 + 29992960 pJ
    assert uniform_energy(plan, MODEL, 4, 8).total_pj == pytest.approx(56_123_209.6)
    # W4A4: 40551040 * 0.0575 + 268336 * 4 * 20 + 187456 * 4 * 20 = 2331684.8 + 21466880 + 14996480 pJ
    assert uniform_energy(plan, MODEL, 4, 4).total_pj == pytest.approx(38_795_044.8)
    bits = {name: (4, 4) for name in plan.names}
    bits["conv1"] = bits["fc"] = (8, 8)
    plan.set_bits(bits)
    report = energy_report(plan, MODEL)
    assert report["total_uj_per_image"] == pytest.approx(39.21, abs=0.005)
    assert report["relative_to_int8"] == pytest.approx(0.477, abs=0.0005)
    assert report["relative_to_fp32"] == pytest.approx(0.082, abs=0.0005)
