"""AnalogNoise on the embedded digits model, end to end through a real Trainer: noise in the quantized pass only,
allocation under the budget, the analog MAC energy recorded beside the digital one, reproducible, clear errors.

DigitsCNN MACs per image (see tests/callbacks/test_energy_meter.py): conv1 9216, conv2 294912, conv3 294912, fc 640;
599680 in all. At W8A8 the Horowitz 45 nm model charges 0.23 pJ per MAC: 137926.4 pJ = 0.1379264 µJ per image.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lit_mpq
from lit_mpq.allocation import Uniform
from lit_mpq.analog import PHOTON_ENERGY_1550NM_AJ
from lit_mpq.callbacks import AnalogNoise, BitAllocator, Calibration, EnergyMeter, Report
from lit_mpq.data import DigitsDataModule
from lit_mpq.module import MPQModule

CHECKPOINT = Path(lit_mpq.__file__).parent / "assets" / "digits_cnn.pt"
MACS = {"conv1": 9216, "conv2": 294912, "conv3": 294912, "fc": 640}
TOTAL_MACS = 599680
INT8_MAC_UJ = TOTAL_MACS * 0.23 / 1e6


def run(root: Path, *callbacks, fp32: bool = True) -> SimpleNamespace:
    module = MPQModule(backbone="digits_cnn", checkpoint_path=str(CHECKPOINT), fp32_reference=fp32)
    datamodule = DigitsDataModule(num_calibration_samples=64, batch_size=64, max_val_samples=128)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(root)),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    metrics = trainer.validate(module, datamodule, verbose=False)[0]
    return SimpleNamespace(module=module, trainer=trainer, metrics=metrics, datamodule=datamodule)


def w8a8() -> BitAllocator:
    return BitAllocator(policy=Uniform(8, 8))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> SimpleNamespace:
    return run(tmp_path_factory.mktemp("clean"), Calibration(), w8a8())


@pytest.fixture(scope="module")
def allocated(tmp_path_factory) -> SimpleNamespace:
    analog = AnalogNoise(noise="thermal", energy_per_mac=0.05, allocate=True, num_samples=32, seed=3)
    return run(tmp_path_factory.mktemp("allocated"), Calibration(), w8a8(), analog, EnergyMeter(measure=[]), Report())


def test_the_noise_lowers_the_quantized_top1_only(clean, allocated):
    assert allocated.metrics["val/top1_fp32"] == clean.metrics["val/top1_fp32"]  # the float pass stays noise-free
    assert allocated.metrics["val/top1"] < clean.metrics["val/top1"] - 5


def test_the_allocation_meets_the_budget_and_is_recorded(allocated):
    record = allocated.module.record.analog
    layers = record["layers"]
    assert {name: row["macs"] for name, row in layers.items()} == MACS
    used = sum(MACS[name] * row["energy_per_mac"] for name, row in layers.items())
    assert used <= 0.05 * TOTAL_MACS * (1 + 1e-9)
    assert record["allocation"]["total_e0_per_image"] == pytest.approx(used, rel=1e-12)
    assert record["energy"]["e0_per_image"] == pytest.approx(used, rel=1e-12)
    assert record["energy"]["mean_energy_per_mac"] == pytest.approx(used / TOTAL_MACS, rel=1e-12)
    grid = record["settings"]["energy_grid"]
    assert grid[0] == pytest.approx(0.025) and grid[-1] == pytest.approx(0.8) and len(grid) == 11
    assert all(row["energy_per_mac"] >= 0.025 * (1 - 1e-12) for row in layers.values())  # min_energy_ratio 0.5
    # The solver's objective is the summed sensitivity at the chosen energies, never above uniform's.
    scores = record["sensitivity"]["scores"]
    chosen = sum(scores[name][repr(row["energy_per_mac"])] for name, row in layers.items())
    assert record["allocation"]["objective"] == pytest.approx(chosen, rel=1e-12)
    assert record["allocation"]["objective"] <= record["allocation"]["uniform_objective"]
    assert record["sensitivity"]["images"] == 32


def test_the_digital_energy_beside_it_is_the_energy_meters(allocated):
    energy = allocated.module.record.analog["energy"]
    assert energy["digital"]["mac_uj_per_image"] == pytest.approx(INT8_MAC_UJ, rel=1e-12)
    assert energy["digital"]["total_uj_per_image"] == pytest.approx(
        allocated.module.record.energy["total_uj_per_image"], rel=1e-12
    )
    assert energy["unit_energy_aj"] is None and energy["analog_mac_uj_per_image"] is None  # thermal: no unit given
    assert float(allocated.trainer.callback_metrics["analog/e0_per_image"]) == pytest.approx(energy["e0_per_image"])


def test_results_and_card_carry_the_analog_section(allocated):
    out = Path(allocated.trainer.log_dir)
    results = json.loads((out / "results.json").read_text())
    assert results["analog"]["settings"]["noise"] == "thermal" and results["analog"]["settings"]["seed"] == 3
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["analog_noise"]["energy_per_mac"] == 0.05 and card["analog_noise"]["allocate"] is True


def test_after_validate_the_model_is_noise_free_again(allocated):
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(allocated.module(x), allocated.module(x))


def test_uniform_shot_noise_is_reproducible_and_priced_in_photons(tmp_path):
    runs = [
        run(tmp_path / str(i), Calibration(), w8a8(), AnalogNoise(noise="shot", energy_per_mac=2.0), fp32=False)
        for i in range(2)
    ]
    assert runs[0].metrics["val/top1"] == runs[1].metrics["val/top1"]
    record = runs[0].module.record.analog
    assert {name: row["energy_per_mac"] for name, row in record["layers"].items()} == dict.fromkeys(MACS, 2.0)
    energy = record["energy"]
    assert energy["unit_energy_aj"] == pytest.approx(0.12816, rel=1e-4)
    assert energy["analog_mac_uj_per_image"] == pytest.approx(TOTAL_MACS * 2.0 * PHOTON_ENERGY_1550NM_AJ * 1e-12)
    assert energy["analog_over_digital_mac"] == pytest.approx(energy["analog_mac_uj_per_image"] / INT8_MAC_UJ)
    assert "sensitivity" not in record and record["settings"]["energy_grid"] is None


def test_the_callback_must_come_after_calibration_and_the_allocator(tmp_path):
    with pytest.raises(MisconfigurationException, match="BitAllocator"):
        run(tmp_path, Calibration(), AnalogNoise(), w8a8())
    with pytest.raises(MisconfigurationException, match="Calibration"):
        run(tmp_path, AnalogNoise(), Calibration(), w8a8())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise": "pink"}, "unknown analog noise 'pink'"),
        ({"energy_per_mac": 0}, "energy_per_mac=0 must be a finite positive energy"),
        ({"energy_per_mac": float("nan")}, "energy_per_mac=nan"),
        ({"sigma": -1.0}, "sigma=-1.0"),
        ({"energy_grid": []}, "energy_grid must list at least one energy"),
        ({"energy_grid": [1.0, -2.0]}, "energy_grid value=-2.0"),
        ({"min_energy_ratio": 1.5}, r"min_energy_ratio=1.5 must be in \(0, 1\]"),
        ({"num_samples": 0}, "num_samples=0 must be a positive integer"),
        ({"draws": 1.5}, "draws=1.5"),
        ({"seed": -1}, "seed=-1"),
        ({"unit_energy_aj": 0.0}, "unit_energy_aj=0.0"),
    ],
)
def test_bad_settings_are_refused_with_a_short_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnalogNoise(**kwargs)
