"""``fit`` under quantization on the embedded default: QAT's packed model reloads exactly; learned widths fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lit_mpq.cli import main
from lit_mpq.deploy.checkpoint import load_quantized
from lit_mpq.plan import QuantPlan

REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "lit_mpq" / "assets" / "digits_cnn.pt")


def _config(tmp_path: Path, callbacks: list[dict], epochs: int = 1) -> Path:
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "lit_mpq.module.MPQModule",
            "init_args": {"backbone": "digits_cnn", "checkpoint_path": DIGITS, "fp32_reference": False, "lr": 0.01},
        },
        "data": {
            "class_path": "lit_mpq.data.DigitsDataModule",
            "init_args": {"batch_size": 128, "num_calibration_samples": 256},
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": epochs,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {
                    "class_path": "lit_mpq.callbacks.Calibration",
                    "init_args": {"act_observer": "mse", "bias_correction": True, "fold_batchnorm": True},
                },
                *callbacks,
            ],
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _allocator(w_bits: int, a_bits: int) -> dict:
    return {
        "class_path": "lit_mpq.callbacks.BitAllocator",
        "init_args": {
            "policy": {"class_path": "lit_mpq.allocation.Uniform", "init_args": {"w_bits": w_bits, "a_bits": a_bits}}
        },
    }


def _reloaded_top1(tmp_path: Path, run: Path) -> float:
    """Top-1 of ``run``'s packed ``quantized.pt`` in a fresh ``validate`` with no callbacks (no calibration)."""
    reloaded = main(
        [
            "validate",
            "--config",
            str(_config(tmp_path / "reload", [])),
            f"--model.init_args.checkpoint_path={run / 'quantized.pt'}",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={tmp_path / 'reload_run'}",
        ]
    )
    return reloaded.trainer.callback_metrics["val/top1"].item()


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_qat_model_reloads_with_the_same_top1_and_training_improves_on_ptq(tmp_path, rounding):
    """W2A3 digits. From nearest rounding PTQ loses ~14 points and two epochs of QAT win most of them back; from
    GPTQ the start is within ~4 points of FP32 and two epochs land within about one point of it either way (450
    images: one image is 0.22 points, and thread counts change the trajectory), so only the nearest start is asked
    to improve. Both starts must reload bit for bit, the GPTQ roundings having become the weights."""
    callbacks = [
        _allocator(2, 3),
        {"class_path": "lit_mpq.callbacks.WeightRounding", "init_args": {"method": rounding}},
    ]
    callbacks.append({"class_path": "lit_mpq.callbacks.QuantizationAwareTraining"})
    config = _config(tmp_path, callbacks, epochs=2)
    main(["fit", "--config", str(config)])
    run = tmp_path / "run"
    record = json.loads((run / "qat.json").read_text())
    rounded = 4 if rounding == "gptq" else 0
    assert record["start"] == {"rounded_weights": rounded, "frozen_bias_corrections": 4, "learned_steps": 8}
    trained_top1 = record["last_validation"]["val/top1"]

    # the same post-training model, evaluated without training (validate with the same callbacks but QAT)
    ptq = main(
        [
            "validate",
            "--config",
            str(_config(tmp_path / "ptq", callbacks[:2])),
            f"--trainer.default_root_dir={tmp_path / 'ptq_run'}",
        ]
    )
    ptq_top1 = ptq.trainer.callback_metrics["val/top1"].item()
    if rounding == "nearest":
        assert trained_top1 > ptq_top1 + 5.0, (ptq_top1, trained_top1)

    assert _reloaded_top1(tmp_path, run) == trained_top1  # bit-identical logits
    plan = QuantPlan.from_yaml(run / "plan.yaml")
    assert set(plan.bits().values()) == {(2, 3)}
    card = load_quantized(run / "quantized.pt").card
    assert card["training"]["method"] == "qat" and card["training"]["learn_steps"] is True
    if rounding == "gptq":  # nearest rounding records no data-driven rounding
        assert card["rounding_settings"]["method"] == "gptq"


def test_validate_after_fit_in_one_process_evaluates_the_trained_model_as_saved(tmp_path):
    """``trainer.validate`` after a QAT ``fit`` in the same process must score the trained model, i.e. what its packed
    file reloads to: the post-training callbacks must not calibrate, allocate or round it again (GPFQ re-rounding the
    trained weights gave chance accuracy, 9 % on digits, before they checked)."""
    callbacks = [
        _allocator(2, 3),
        {"class_path": "lit_mpq.callbacks.WeightRounding", "init_args": {"method": "gpfq"}},
        {"class_path": "lit_mpq.callbacks.QuantizationAwareTraining"},
    ]
    cli = main(["--config", str(_config(tmp_path, callbacks))], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    trained_top1 = json.loads((tmp_path / "run" / "qat.json").read_text())["last_validation"]["val/top1"]
    after = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]["val/top1"]
    assert after == _reloaded_top1(tmp_path, tmp_path / "run") == trained_top1
    assert after > 80.0  # and not by chance: FP32 digits score ~97 %


def test_learned_bit_widths_meet_their_average_and_compare_with_the_exact_allocator(tmp_path):
    callbacks = [
        {
            "class_path": "lit_mpq.callbacks.SensitivityProbe",
            "init_args": {"metric": "output_l2", "candidate_bits": [2, 3, 4, 6, 8]},
        },
        _allocator(8, 8),
        {
            "class_path": "lit_mpq.callbacks.BitWidthLearning",
            "init_args": {"target_avg_bits": 4.0, "penalty_weight": 5.0},
        },
    ]
    main(["fit", "--config", str(_config(tmp_path, callbacks, epochs=3))])
    run = tmp_path / "run"
    record = json.loads((run / "learned_bits.json").read_text())
    plan = QuantPlan.from_yaml(run / "plan.yaml")
    average = plan.average_weight_bits()
    assert 3.9 <= average <= 4.0 + 1e-9, average
    assert record["rounded_value"] == pytest.approx(average)
    assert record["relaxed_value_at_end"] < 6.0  # training moved the widths from 8 toward the budget
    exact = QuantPlan.from_yaml(run / "plan_exact.yaml")
    assert exact.average_weight_bits() <= average + 1e-9
    comparison = record["exact_allocation"]
    # the exact allocator minimizes the summed probe sensitivity at that budget: never above the learned plan's
    assert comparison["summed_w_sensitivity_exact"] <= comparison["summed_w_sensitivity_learned"] + 1e-12
    assert {bits for bits, _ in plan.bits().values()} <= {2, 3, 4, 6, 8}


def test_two_training_callbacks_are_rejected_at_start_up(tmp_path, capsys):
    callbacks = [
        _allocator(4, 4),
        {"class_path": "lit_mpq.callbacks.QuantizationAwareTraining"},
        {"class_path": "lit_mpq.callbacks.BitWidthLearning", "init_args": {"target_avg_bits": 4.0}},
    ]
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(_config(tmp_path, callbacks))])
    assert "both train the quantized model" in capsys.readouterr().err


def test_the_block_range_search_runs_before_training_and_is_in_the_card(tmp_path):
    """A post-training step listed before the training callback runs once before the first step, like the others."""
    search = {
        "class_path": "lit_mpq.callbacks.BlockRangeSearch",
        "init_args": {"num_samples": 32, "blocks": ["conv2", "conv3"], "candidates": [0.5, 0.8], "rounds": 1},
    }
    callbacks = [_allocator(2, 3), search, {"class_path": "lit_mpq.callbacks.QuantizationAwareTraining"}]
    main(["fit", "--config", str(_config(tmp_path, callbacks))])
    card = load_quantized(tmp_path / "run" / "quantized.pt").card
    assert card["block_ranges"]["max_images"] == 32 and card["block_ranges"]["blocks"] == ["conv2", "conv3"]
