"""Two CPU processes with DDP give the single-device answer: accuracy, plan, activation ranges (issue: multi-GPU).

The runs go through the real CLI in subprocesses (``--trainer.strategy=ddp --trainer.devices=2`` on CPU with gloo)
on an odd-sized validation set (449 images). ``OMP_NUM_THREADS=1`` gives both runs the same intra-op threading, so
per-batch arithmetic is identical and the comparison can be exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.slow


def config_with_cache(tmp_path: Path, cache_dir: Path | None) -> Path:
    """The default config with the probe cache in ``cache_dir`` (None: off), so each run's probing is under control,
    and an Export callback (the shipped model must not depend on the number of devices either)."""
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("SensitivityProbe"):
            callback.setdefault("init_args", {})["cache_dir"] = None if cache_dir is None else str(cache_dir)
    callbacks = config["trainer"]["callbacks"]
    callbacks.insert(len(callbacks) - 1, {"class_path": "lit_mpq.callbacks.Export"})  # before the Report
    path = tmp_path / f"default_cache_{'off' if cache_dir is None else cache_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(tmp_path: Path, name: str, *extra: str, cache_dir: Path | None = None) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "cli.py",
        "validate",
        "--config",
        str(config_with_cache(tmp_path, cache_dir)),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=0",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.max_val_samples=449",
        "--seed_everything=0",
        *extra,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name / "version_0"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # Every rank probes for itself here (cache off on the two-device run), so equal plans mean equal probing.
    single = run_cli(tmp, "single", "--trainer.accelerator=cpu", "--trainer.devices=1", cache_dir=tmp / "cache")
    double = run_cli(tmp, "ddp", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp")
    again = run_cli(tmp, "single_again", "--trainer.accelerator=cpu", "--trainer.devices=1")
    return single, double, again


def test_a_one_device_probe_cache_serves_a_two_device_run(runs, tmp_path_factory):
    single, _, _ = runs
    assert results(single)["sensitivity"]["cache"] == "miss"
    cached = run_cli(
        single.parents[1],
        "ddp_cached",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        cache_dir=single.parents[1] / "cache",
    )
    assert results(cached)["sensitivity"]["cache"] == "hit"
    assert results(cached)["sensitivity"]["cache_key"] == results(single)["sensitivity"]["cache_key"]
    assert (cached / "plan.yaml").read_bytes() == (single / "plan.yaml").read_bytes()


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_two_processes_give_the_single_device_top1_exactly(runs):
    single, double, _ = runs
    r1, r2 = results(single), results(double)
    assert r2["top1"] == r1["top1"] and r2["top1_fp32"] == r1["top1_fp32"]
    assert r1["energy"]["evaluated_images"] == r2["energy"]["evaluated_images"] == 449  # no padded duplicates


def test_plan_is_byte_identical_on_one_and_two_devices_and_across_runs(runs):
    single, double, again = runs
    plan = (single / "plan.yaml").read_bytes()
    assert (double / "plan.yaml").read_bytes() == plan
    assert (again / "plan.yaml").read_bytes() == plan


def test_activation_ranges_equal_single_device(runs):
    single, double, _ = runs
    q1 = json.loads((single / "activation_qparams.json").read_text())
    q2 = json.loads((double / "activation_qparams.json").read_text())
    assert q1.keys() == q2.keys()
    for name in q1:
        assert q2[name]["min"] == q1[name]["min"] and q2[name]["max"] == q1[name]["max"]  # bit-identical min/max
        assert q2[name]["scale"] == pytest.approx(q1[name]["scale"], rel=1e-6)  # histogram-based (percentile)
        assert q2[name]["zero_point"] == q1[name]["zero_point"]


def test_each_rank_calibrates_on_half_of_the_images(runs):
    single, double, _ = runs
    assert results(single)["calibration"]["images_per_rank"] == [256]
    assert results(double)["calibration"]["images_per_rank"] == [128, 128]
    assert results(double)["calibration"]["images"] == 256
    assert results(double)["sensitivity"]["images"] == 256


def test_measured_energy_is_unavailable_without_counters_and_times_are_logged(runs):
    single, double, _ = runs
    for run in (single, double):
        energy = results(run)["energy"]
        assert energy["measured"]["status"] == "unavailable" or energy["measured"]["eval_j"] > 0
        metrics = results(run)["metrics"]
        for key in ("time/calibration_s", "time/probe_s", "time/allocation_s", "time/eval_images_per_s"):
            assert metrics[key] >= 0, key


def test_the_packed_model_and_its_onnx_top1_equal_single_device(runs):
    import torch

    single, double, _ = runs
    one, two = (torch.load(run / "quantized.pt", weights_only=True) for run in (single, double))
    assert torch.equal(one["codes"], two["codes"])
    assert one["index"].tolist() == two["index"].tolist()  # scales' places, activation parameters, settings
    assert one["blobs"].keys() == two["blobs"].keys()
    for dtype in one["blobs"]:
        assert torch.equal(one["blobs"][dtype], two["blobs"][dtype]), dtype
    exports = [json.loads((run / "results.json").read_text())["export"] for run in (single, double)]
    assert exports[0]["onnx"]["top1"] == exports[1]["onnx"]["top1"]
    assert exports[0]["onnx"]["images"] == exports[1]["onnx"]["images"] == 449
