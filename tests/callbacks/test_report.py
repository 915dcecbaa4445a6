"""Report, driven by a tiny real digits Trainer: the files it writes, what they say, the summary, the run-folder checks.

Accuracy is checked against a brute-force count over the validation images (the quantized module as the run left
it, and the plain float network), in percent; bit averages and energy against hand computation; the first layer's
activation quantization parameters against torch.ao's MinMaxObserver.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver

import lit_mpq
from lit_mpq.allocation import Uniform
from lit_mpq.callbacks import BitAllocator, Calibration, EnergyMeter, Report, SensitivityProbe
from lit_mpq.callbacks.report import RunDirectoryError
from lit_mpq.data import DigitsDataModule
from lit_mpq.models.small import DigitsCNN
from lit_mpq.module import MPQModule

CHECKPOINT = Path(lit_mpq.__file__).parent / "assets" / "digits_cnn.pt"
CALIB = 32
BATCH = 32
VAL = 64
BITS = {"conv1": (8, 8), "conv2": (4, 8), "conv3": (4, 8), "fc": (8, 8)}  # Uniform(W4A8), entry and exit at 8
PARAMS = {"conv1": 144, "conv2": 4608, "conv3": 18432, "fc": 640}
AVG_WEIGHT_BITS = (144 * 8 + 4608 * 4 + 18432 * 4 + 640 * 8) / 23824  # parameter-weighted: 98432 / 23824
WEIGHTS_MB = 98432 / 8 / 1e6


def float_model() -> nn.Module:
    model = DigitsCNN()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    return model.eval()


def digits() -> DigitsDataModule:
    return DigitsDataModule(num_calibration_samples=CALIB, batch_size=BATCH, max_val_samples=VAL)


def new_module(**kwargs) -> MPQModule:
    return MPQModule(backbone="digits_cnn", checkpoint_path=str(CHECKPOINT), **kwargs)


def new_trainer(logger: TensorBoardLogger, *callbacks) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


@torch.no_grad()
def top1_percent(model: nn.Module, datamodule: DigitsDataModule) -> float:
    correct = total = 0
    for images, labels in datamodule.val_dataloader():
        correct += int((model(images).argmax(dim=1) == labels).sum())
        total += labels.numel()
    assert total == VAL
    return 100.0 * correct / total


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> SimpleNamespace:
    """A full run (calibrate, allocate W4A8 with W8A8 ends, meter, report) of DigitsCNN plus an auxiliary head that
    the forward never calls, so that one weight layer is left in float."""
    module = new_module()
    module.model.aux_head = nn.Linear(64, 10)  # a training-only head: never called, left in FP32
    datamodule = digits()
    allocator = BitAllocator(policy=Uniform(4, 8), first_last_bits=8)
    report = Report(save_figures=False)
    trainer = new_trainer(
        TensorBoardLogger(str(tmp_path_factory.mktemp("report"))),
        Calibration(),
        allocator,
        EnergyMeter(measure=[]),
        report,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.validate(module, datamodule, verbose=False)
    out = Path(trainer.log_dir)
    return SimpleNamespace(
        module=module,
        datamodule=datamodule,
        trainer=trainer,
        report=report,
        out=out,
        printed=printed.getvalue(),
        results=json.loads((out / "results.json").read_text()),
        card=yaml.safe_load((out / "card.yaml").read_text()),
    )


# ------------------------------------------------------------------------------------------------------- files
def test_the_run_folder_holds_the_plan_the_results_and_the_card(reported):
    assert reported.report.last_output_dir == reported.out
    for name in ("plan.yaml", "results.json", "card.yaml", "activation_qparams.json"):
        assert (reported.out / name).is_file(), name
    assert not list(reported.out.glob("*.png"))  # save_figures=False
    plan = yaml.safe_load((reported.out / "plan.yaml").read_text())
    assert {row["name"]: (row["w_bits"], row["a_bits"]) for row in plan["layers"]} == BITS


def test_results_accuracy_is_the_logged_percentage_and_a_brute_force_count(reported):
    results, metrics = reported.results, reported.trainer.callback_metrics
    assert results["accuracy_unit"] == "%"
    assert results["top1"] == pytest.approx(float(metrics["val/top1"]), rel=1e-7)
    assert results["top1_fp32"] == pytest.approx(float(metrics["val/top1_fp32"]), rel=1e-7)
    assert results["top1"] == pytest.approx(top1_percent(reported.module.eval(), reported.datamodule), rel=1e-6)
    assert results["top1_fp32"] == pytest.approx(top1_percent(float_model(), reported.datamodule), rel=1e-6)
    assert results["top1_fp32"] > 50  # percent, not a fraction
    assert results["top1_delta"] == pytest.approx(results["top1"] - results["top1_fp32"], abs=1e-9)


def test_results_sizes_bits_and_energy_match_hand_computation(reported):
    results = reported.results
    assert results["num_quantized_layers"] == 4 and results["backbone"] == "digits_cnn"
    assert results["avg_weight_bits"] == pytest.approx(AVG_WEIGHT_BITS, rel=1e-12)
    assert results["avg_act_bits"] == 8.0
    assert results["weights_mb"] == pytest.approx(WEIGHTS_MB, rel=1e-12)
    assert results["calibration"]["images"] == CALIB
    assert results["allocation"]["policy"] == "Uniform(W4A8)" and results["allocation"]["pinned"] == ["conv1", "fc"]
    mac_pj = 9216 * 0.23 + 2 * 294912 * 0.23 * 32 / 64 + 640 * 0.23
    dram_pj = (98432 + (64 + 1024 + 512 + 64) * 8) * 20.0
    assert results["energy"]["total_uj_per_image"] == pytest.approx((mac_pj + dram_pj) / 1e6, rel=1e-12)
    assert results["energy"]["evaluated_images"] == VAL
    assert list(results["layers_left_in_float"]) == ["aux_head"]


def test_the_card_lists_entry_exit_and_float_layers_and_the_settings(reported):
    card = reported.card
    assert card["plan"]["entry_layers"] == ["conv1"] and card["plan"]["exit_layers"] == ["fc"]
    assert list(card["plan"]["left_in_float"]) == ["aux_head"]
    assert "not called" in card["plan"]["left_in_float"]["aux_head"]
    assert card["plan"]["pinned"] == ["conv1", "fc"] and card["plan"]["layers"] == 4
    assert card["first_last_precision"] == {"first": "W8A8", "last": "W8A8"}
    assert card["calibration"]["images"] == CALIB and card["calibration"]["seed"] == 0
    assert card["policy"] == "Uniform(W4A8)" and card["sensitivity_metric"] is None
    assert card["energy_model"]["name"] == "horowitz45nm"
    assert (card["weight_granularity"], card["act_observer"]) == ("per_channel", "minmax")


def test_activation_qparams_of_the_first_layer_match_torch_ao(reported):
    table = json.loads((reported.out / "activation_qparams.json").read_text())
    assert list(table) == list(BITS)
    observer = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)
    for images, _ in reported.datamodule.calib_dataloader():
        observer(images)
    scale, zero_point = observer.calculate_qparams()
    row = table["conv1"]
    assert (row["min"], row["max"], row["bits"]) == (float(observer.min_val), float(observer.max_val), 8)
    assert row["scale"] == pytest.approx(float(scale), rel=1e-7) and row["zero_point"] == int(zero_point)


def test_the_summary_gives_accuracy_energy_and_the_run_folder_and_is_left_to_the_cli_to_print(reported):
    summary, results = reported.report.last_summary, reported.results
    assert f"top-1 {results['top1']:.2f} %" in summary
    assert f"FP32 {results['top1_fp32']:.2f} %" in summary
    assert f"{results['energy']['total_uj_per_image']:.4g} µJ/image" in summary
    assert "Uniform(W4A8)" in summary and "1 left in float" in summary
    assert f"run       {reported.out}" in summary
    assert "top-1" not in reported.printed  # lit_mpq.cli prints it after the run, as the last lines


# ---------------------------------------------------------------------------------------- run-folder checks
def test_a_folder_with_another_runs_results_is_refused_before_calibration(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    out = tmp_path / "run" / "version_0"
    out.mkdir(parents=True)
    (out / "results.json").write_text('{"top1": 12.5}\n')
    module = new_module()
    trainer = new_trainer(logger, Calibration(), SensitivityProbe(cache_dir=None), Report(save_figures=False))
    with pytest.raises(RunDirectoryError, match="already holds the results of another run"):
        trainer.validate(module, digits(), verbose=False)
    assert module.record.calibration is None and module.record.sensitivity is None
    assert not (out / "sensitivity.json").exists()
    assert (out / "results.json").read_text() == '{"top1": 12.5}\n'


def test_an_unwritable_output_dir_is_refused_before_calibration(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    module = new_module()
    trainer = new_trainer(
        TensorBoardLogger(str(tmp_path)), Calibration(), Report(output_dir=str(blocker / "out"), save_figures=False)
    )
    with pytest.raises(RunDirectoryError, match="cannot write the run's files to"):
        trainer.validate(module, digits(), verbose=False)
    assert module.record.calibration is None


def test_the_same_report_may_rewrite_its_own_run_but_a_new_run_may_not(tmp_path):
    """A sweep re-validates into the folder it wrote; a second run given the same folder is another run."""
    out = tmp_path / "sweep"
    report = Report(output_dir=str(out), save_figures=False, print_summary=False)
    module = new_module(fp32_reference=False)
    datamodule = digits()
    trainer = new_trainer(TensorBoardLogger(str(tmp_path)), Calibration(), report)
    trainer.validate(module, datamodule, verbose=False)
    trainer.validate(module, datamodule, verbose=False)
    assert json.loads((out / "results.json").read_text())["calibration"]["images"] == CALIB
    other = new_trainer(TensorBoardLogger(str(tmp_path)), Calibration(), Report(output_dir=str(out)))
    with pytest.raises(RunDirectoryError, match="already holds the results of another run"):
        other.validate(new_module(), digits(), verbose=False)
