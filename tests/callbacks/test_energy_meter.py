"""EnergyMeter, driven by a tiny real digits Trainer; the analytic energy is checked against numbers worked out by hand.

DigitsCNN on a 1x8x8 digit (see lit_mpq/models/small.py), per image:

=====  ================  =======  =======  ======
layer  shape             params   MACs     inputs
=====  ================  =======  =======  ======
conv1  1->16, 3x3, 8x8   144      9216     64
conv2  16->32, 3x3, 8x8  4608     294912   1024
conv3  32->64, 3x3, 4x4  18432    294912   512
fc     64->10            640      640      64
=====  ================  =======  =======  ======

Horowitz 45 nm: a MAC costs 0.23 pJ x (w_bits x a_bits / 64) (0.2 pJ multiply + 0.03 pJ add at 8 bit), 4.6 pJ with an
FP32 operand; every weight and input bit moved from DRAM costs 20 pJ.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lit_mpq
from lit_mpq.allocation import Uniform
from lit_mpq.callbacks import BitAllocator, Calibration, EnergyMeter
from lit_mpq.data import DigitsDataModule
from lit_mpq.energy import HorowitzEnergyModel
from lit_mpq.module import MPQModule

CHECKPOINT = Path(lit_mpq.__file__).parent / "assets" / "digits_cnn.pt"
CALIB = 16
BATCH = 16
VAL = 40  # two full batches and a short one of 8: every image must be counted

PARAMS = {"conv1": 144, "conv2": 4608, "conv3": 18432, "fc": 640}
MACS = {"conv1": 9216, "conv2": 294912, "conv3": 294912, "fc": 640}
INPUTS = {"conv1": 64, "conv2": 1024, "conv3": 512, "fc": 64}
BITS = {"conv1": (8, 8), "conv2": (4, 6), "conv3": (4, 6), "fc": (8, 8)}  # Uniform(W4A6), entry and exit pinned to 8

# Worked by hand from the table above, pJ per image:
MAC_PJ = 9216 * 0.23 + 2 * 294912 * 0.23 * 24 / 64 + 640 * 0.23  # 2119.68 + 2 x 25436.16 + 147.2 = 53139.2
WEIGHT_PJ = (144 * 8 + 4608 * 4 + 18432 * 4 + 640 * 8) * 20.0  # 98432 bits -> 1968640
ACT_PJ = (64 * 8 + 1024 * 6 + 512 * 6 + 64 * 8) * 20.0  # 10240 bits -> 204800
TOTAL_UJ = (MAC_PJ + WEIGHT_PJ + ACT_PJ) / 1e6  # 2.2265792 µJ
INT8_UJ = (599680 * 0.23 + 23824 * 8 * 20.0 + 1664 * 8 * 20.0) / 1e6  # 4.2160064 µJ
FP32_UJ = (599680 * 4.6 + 23824 * 32 * 20.0 + 1664 * 32 * 20.0) / 1e6  # 19.070848 µJ


def digits() -> DigitsDataModule:
    return DigitsDataModule(num_calibration_samples=CALIB, batch_size=BATCH, max_val_samples=VAL)


def metered_run(root: Path, *callbacks) -> SimpleNamespace:
    module = MPQModule(backbone="digits_cnn", checkpoint_path=str(CHECKPOINT), fp32_reference=False)
    datamodule = digits()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(root)),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.validate(module, datamodule, verbose=False)
    return SimpleNamespace(module=module, trainer=trainer, datamodule=datamodule, energy=module.record.energy)


@pytest.fixture(scope="module")
def metered(tmp_path_factory) -> SimpleNamespace:
    """Uniform W4A6 with the entry and exit layers at W8A8, priced by the default (Horowitz) model."""
    allocator = BitAllocator(policy=Uniform(4, 6), first_last_bits=8)
    return metered_run(tmp_path_factory.mktemp("energy"), Calibration(), allocator, EnergyMeter())


# -------------------------------------------------------------------------------------------------- analytic
def test_the_plan_is_the_hand_measured_network_at_the_allocated_bits(metered):
    plan = metered.module.plan
    assert {s.name: (s.params, s.macs, s.act_in) for s, _ in plan.items()} == {
        n: (PARAMS[n], MACS[n], INPUTS[n]) for n in PARAMS
    }
    assert plan.bits() == BITS


def test_the_total_is_the_sum_of_the_layers_priced_by_the_energy_model(metered):
    model = HorowitzEnergyModel()
    expected = sum(model.layer(spec, *BITS[spec.name]).total_pj / 1e6 for spec, _ in metered.module.plan.items())
    assert metered.energy["total_uj_per_image"] == pytest.approx(expected, rel=1e-12)
    assert metered.energy["total_uj_per_image"] == pytest.approx(TOTAL_UJ, rel=1e-12)


def test_every_term_and_reference_matches_the_hand_computation(metered):
    energy = metered.energy
    assert energy["mac_uj_per_image"] == pytest.approx(MAC_PJ / 1e6, rel=1e-12)
    assert energy["weight_mem_uj_per_image"] == pytest.approx(WEIGHT_PJ / 1e6, rel=1e-12)
    assert energy["act_mem_uj_per_image"] == pytest.approx(ACT_PJ / 1e6, rel=1e-12)
    assert energy["int8_uj_per_image"] == pytest.approx(INT8_UJ, rel=1e-12)
    assert energy["fp32_uj_per_image"] == pytest.approx(FP32_UJ, rel=1e-12)
    assert energy["relative_to_int8"] == pytest.approx(TOTAL_UJ / INT8_UJ, rel=1e-12)
    assert energy["relative_to_fp32"] == pytest.approx(TOTAL_UJ / FP32_UJ, rel=1e-12)
    rows = {row["name"]: row for row in energy["per_layer"]}
    assert list(rows) == list(BITS)
    assert {name: (row["w_bits"], row["a_bits"]) for name, row in rows.items()} == BITS
    assert rows["conv1"]["mac_pj"] == pytest.approx(2119.68) and rows["fc"]["weight_mem_pj"] == pytest.approx(102400)
    assert rows["conv2"]["act_mem_pj"] == pytest.approx(1024 * 6 * 20.0)
    assert energy["model"] == "horowitz45nm" and "Horowitz" in energy["source"]


def test_the_logged_scalars_are_the_reported_numbers(metered):
    metrics = metered.trainer.callback_metrics
    for key, field in [
        ("energy/analytic_uj_per_image", "total_uj_per_image"),
        ("energy/relative_to_int8", "relative_to_int8"),
        ("energy/relative_to_fp32", "relative_to_fp32"),
        ("energy/mac_uj_per_image", "mac_uj_per_image"),
        ("energy/weight_mem_uj_per_image", "weight_mem_uj_per_image"),
        ("energy/act_mem_uj_per_image", "act_mem_uj_per_image"),
    ]:
        assert float(metrics[key]) == pytest.approx(metered.energy[field], rel=1e-6), key


def test_the_meters_own_energy_model_prices_every_run_and_each_run_counts_its_own_images(tmp_path):
    """No DRAM cost and no allocator (every layer at the default W8A8): only the MACs remain. The same meter over two
    runs of one trainer (what a sweep does) counts each run's images, not their sum."""
    meter = EnergyMeter(energy_model=HorowitzEnergyModel(dram_pj_per_bit=0.0), measure=[])
    run = metered_run(tmp_path, Calibration(), meter)
    first = run.energy
    run.trainer.validate(run.module, run.datamodule, verbose=False)
    for energy in (first, run.module.record.energy):
        assert energy["weight_mem_uj_per_image"] == 0.0 and energy["act_mem_uj_per_image"] == 0.0
        assert energy["total_uj_per_image"] == pytest.approx(599680 * 0.23 / 1e6, rel=1e-12)
        assert energy["relative_to_int8"] == pytest.approx(1.0, rel=1e-12)
        assert energy["constants"]["dram_pj_per_bit"] == 0.0
        assert energy["evaluated_images"] == VAL
        assert energy["measured"]["status"] == "unavailable" and energy["measured"]["backends"] == {}
    assert run.module.record.energy is not first


# -------------------------------------------------------------------------------------------------- counting
def test_every_validation_image_is_counted(metered):
    assert len(metered.datamodule.val_dataloader().dataset) == VAL
    assert metered.energy["evaluated_images"] == VAL
    phases = metered.energy["measured"]["phases"]
    throughput = float(metered.trainer.callback_metrics["time/eval_images_per_s"])
    assert throughput == pytest.approx(VAL / phases["evaluation"]["seconds"], rel=1e-5)


# -------------------------------------------------------------------------------------------------- measured
def test_without_counters_measured_energy_is_unavailable_with_the_reasons(metered):
    powercap = Path("/sys/class/powercap")
    if powercap.is_dir() and any(powercap.glob("intel-rapl:*")):
        pytest.skip("this host exposes RAPL counters")
    measured = metered.energy["measured"]
    assert measured["status"] == "unavailable"
    assert measured["backends"]["nvml"] == "unavailable: the run is not on a CUDA device"
    assert measured["backends"]["rapl"].startswith("unavailable: no RAPL domains under /sys/class/powercap")
    assert "eval_j" not in measured and "eval_j_per_image" not in measured
    phases = measured["phases"]
    assert list(phases) == ["calibration", "probe", "evaluation"]
    assert {phase["joules"] for phase in phases.values()} == {"unavailable"}  # no number is invented
    assert phases["calibration"]["seconds"] > 0 and phases["evaluation"]["seconds"] > 0
    assert phases["probe"]["seconds"] == 0.0  # no SensitivityProbe in this run
    assert "energy/measured_eval_j_per_image" not in metered.trainer.callback_metrics


# --------------------------------------------------------------------------------------------- configuration
def test_an_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown energy measurement backend\(s\) \['joulescope'\].*'auto'.*'nvml'"):
        EnergyMeter(measure=["rapl", "joulescope"])


def test_the_meter_before_calibration_is_refused_at_setup(tmp_path):
    module = MPQModule(backbone="digits_cnn", checkpoint_path=str(CHECKPOINT))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(tmp_path)),
        enable_progress_bar=False,
        callbacks=[EnergyMeter(measure=[])],
    )
    with pytest.raises(MisconfigurationException, match="add lit_mpq.callbacks.Calibration"):
        trainer.validate(module, digits(), verbose=False)
    assert module.record.energy is None


def test_a_memory_hierarchy_meter_records_where_the_energy_goes(tmp_path):
    """Every layer at W8A8 on a 1 MB SRAM (everything fits), batch 1, worked by hand from the cited constants: MAC 0.23
    pJ, both operands read from the register file at 0.0575 pJ/bit (Eyeriss: RF = one 16-bit MAC), weights from DRAM
    at 20 pJ/bit, each input activation written to and read from the SRAM at 100/64 pJ/bit (Horowitz: 1 MB, 100 pJ
    per 64-bit access)."""
    from lit_mpq.energy import MemoryHierarchyEnergyModel

    meter = EnergyMeter(energy_model=MemoryHierarchyEnergyModel(sram_bytes=1024 * 1024, batch_size=1), measure=[])
    run = metered_run(tmp_path, Calibration(), meter)
    macs, params, inputs = sum(MACS.values()), sum(PARAMS.values()), sum(INPUTS.values())
    levels = run.energy["hierarchy"]["levels_uj_per_image"]
    assert levels["mac"] == pytest.approx(macs * 0.23 / 1e6, rel=1e-9)
    assert levels["rf"] == pytest.approx(macs * 16 * 0.0575 / 1e6, rel=1e-9)
    assert levels["dram"] == pytest.approx(params * 8 * 20.0 / 1e6, rel=1e-9)
    assert levels["sram"] == pytest.approx(2 * inputs * 8 * 100.0 / 64 / 1e6, rel=1e-9)
    assert run.energy["total_uj_per_image"] == pytest.approx(levels["total"], rel=1e-9)
    assert run.energy["hierarchy"]["spilled"] == []
    metrics = run.trainer.callback_metrics
    for level in ("mac", "rf", "sram", "dram"):
        assert float(metrics[f"energy/{level}_uj_per_image"]) == pytest.approx(levels[level], rel=1e-6)
