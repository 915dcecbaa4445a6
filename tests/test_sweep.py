"""``python cli.py sweep``: one probe, many budgets and baselines, each point in its own run; the table on disk,
printed and in TensorBoard; errors other than an infeasible budget stop the sweep."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lit_mpq.cli import main
from lit_mpq.deploy import load_quantized
from lit_mpq.energy import HorowitzEnergyModel, uniform_energy
from lit_mpq.plan import QuantPlan
from lit_mpq.report import pareto_figure

REPO = Path(__file__).resolve().parents[1]


def run_sweep(tmp_path: Path, config: str | Path, *extra: str) -> tuple[Path, Path, list[dict[str, str]], str]:
    """Run a sweep in-process; return the config's run folder, the sweep folder, the CSV rows and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli = main(
            [
                "sweep",
                "--config",
                str(config if isinstance(config, Path) else REPO / "configs" / config),
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.enable_progress_bar=false",
                *extra,
            ]
        )
    run = Path(cli.trainer.log_dir)
    out = run / "sweep"
    with (out / "pareto.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return run, out, rows, printed.getvalue()


def tensorboard_run(path: Path) -> EventAccumulator:
    """The events of one TensorBoard run (the event files directly in ``path``, not its subfolders)."""
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def hparams_of(acc: EventAccumulator) -> dict[str, object]:
    """The hparams row of a run, as TensorBoard's HPARAMS tab shows it."""
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: value.string_value or value.number_value for key, value in info.hparams.items()}


@pytest.fixture(scope="module")
def digits_sweep(tmp_path_factory):
    """A small sweep of the embedded default: an infeasible budget, a feasible one, a uniform baseline."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    return run_sweep(
        tmp_path,
        "default.yaml",
        "--budgets=[0.01, 1.0]",
        "--relative_to=W6A6",
        "--baselines=[W8A8]",
        "--seed_rule=false",
    )


@pytest.mark.slow
def test_sweep_points_budgets_and_files(digits_sweep):
    _, out, rows, _ = digits_sweep
    assert [(r["name"], r["kind"]) for r in rows] == [
        ("config", "config"),
        ("budget_01", "budget"),  # budget_00 (0.01 x W6A6) has no feasible allocation: skipped
        ("uniform_W8A8", "uniform"),
    ]
    budget = rows[1]
    results = json.loads((out / "budget_01" / "results.json").read_text())
    assert results["allocation"]["policy"] == budget["policy"]  # each point's own files
    # The exact allocation respects its budget: 1.0 x the energy of every layer at W6A6.
    plan = QuantPlan.from_yaml(out / "budget_01" / "plan.yaml")
    w6a6 = uniform_energy(plan, HorowitzEnergyModel(), 6, 6).total_pj / 1e6
    assert float(budget["budget_ratio"]) == 1.0
    assert results["energy"]["total_uj_per_image"] <= w6a6 * (1 + 1e-9)
    assert float(budget["energy_uj"]) == pytest.approx(results["energy"]["total_uj_per_image"], rel=1e-3)


@pytest.mark.slow
def test_infeasible_budget_is_skipped_and_listed(digits_sweep):
    _, out, _, printed = digits_sweep
    assert "budget_00 skipped" in printed
    md = (out / "pareto.md").read_text()
    assert "Skipped, no allocation meets the budget (1):" in md and "- budget_00:" in md


@pytest.mark.slow
def test_sweep_csv_in_percent_without_float32_noise(digits_sweep):
    _, _, rows, _ = digits_sweep
    fp32 = float(rows[0]["top1_fp32"])
    assert 90.0 < fp32 <= 100.0  # percent, like results.json and TensorBoard
    for row in rows:
        for column in ("top1", "top5", "top1_fp32", "delta_top1", "avg_weight_bits", "avg_act_bits"):
            assert len(row[column].partition(".")[2]) <= 2, (column, row[column])
        for column in ("energy_uj", "relative_to_int8", "weights_mb", "bit_ops_g"):
            digits = row[column].replace(".", "").lstrip("0").rstrip("0")
            assert len(digits) <= 4, (column, row[column])
        assert float(row["delta_top1"]) == pytest.approx(float(row["top1"]) - fp32, abs=0.011)
        assert row["pareto"] in ("True", "False")


@pytest.mark.slow
def test_sweep_writes_and_prints_its_table(digits_sweep):
    _, out, rows, printed = digits_sweep
    md = (out / "pareto.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert "top-1 (%)" in table[0] and "energy (µJ/image)" in table[0] and "avg bits W / A" in table[0]
    assert [line.split("|")[1].strip() for line in table[2:]] == [r["name"] for r in rows]
    assert f"FP32 top-1 {float(rows[0]['top1_fp32']):.2f} %" in md
    assert "\n".join(table) in printed  # the same table, printed at the end
    for name in ("pareto.png", "summary.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.slow
def test_each_point_is_its_own_tensorboard_run_and_the_config_keeps_its_own(digits_sweep):
    run, out, rows, _ = digits_sweep
    config = tensorboard_run(run)
    assert hparams_of(config)["policy"] == rows[0]["policy"]  # not the last point's
    images = set(config.Tags()["images"])
    assert {"figures/bits_per_layer", "figures/summary", "sweep/pareto", "sweep/summary"} <= images
    assert {"figures/sensitivity_histogram", "figures/sensitivity_heatmap"} <= images  # the probe's, once
    assert [event.value for event in config.Scalars("sweep/top1")] == pytest.approx(
        [float(r["top1"]) for r in rows], abs=0.006
    )
    assert any(tag.startswith("sweep/table") for tag in config.Tags()["tensors"])  # the table, in the TEXT tab
    results = json.loads((run / "results.json").read_text())
    assert results["allocation"]["policy"] == rows[0]["policy"]
    for row in rows[1:]:
        point = tensorboard_run(out / row["name"])
        assert hparams_of(point)["policy"] == row["policy"]
        point_images = set(point.Tags()["images"])
        assert {"figures/bits_per_layer", "figures/summary"} <= point_images
        assert not {"figures/sensitivity_histogram", "figures/sensitivity_heatmap"} & point_images
        assert not (out / row["name"] / "sensitivity_heatmap.png").exists()
        assert (out / row["name"] / "card.yaml").is_file()


@pytest.mark.slow
def test_an_error_stops_the_sweep_and_the_rows_done_stay_on_disk(tmp_path, monkeypatch, capsys):
    from lit_mpq.allocation import Uniform

    def broken(self, plan, energy_model=None):
        raise RuntimeError("the uniform policy broke")

    monkeypatch.setattr(Uniform, "allocate", broken)
    with pytest.raises(RuntimeError, match="the uniform policy broke"):
        main(
            [
                "sweep",
                "--config",
                str(REPO / "configs" / "default.yaml"),
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.enable_progress_bar=false",
                "--num_budgets=1",
                "--baselines=[W8A8]",
            ]
        )
    captured = capsys.readouterr()
    assert "skipped" not in captured.out + captured.err
    assert "sweep stopped at point uniform_W8A8" in captured.err
    (out,) = tmp_path.glob("*/version_*/sweep")
    with (out / "pareto.csv").open() as handle:
        assert [r["name"] for r in csv.DictReader(handle)] == ["config", "budget_00"]
    assert "budget_00" in (out / "pareto.md").read_text()


def test_misconfigured_sweep_exits_with_its_message_and_skips_nothing(tmp_path, capsys):
    # The solver's candidates include 3 bits, which the default config's probe does not score: a configuration
    # error, not an infeasible budget; it stops the sweep before any work, in a few lines.
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "sweep",
                "--config",
                str(REPO / "configs" / "default.yaml"),
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--w_candidates=[3, 4]",
            ]
        )
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "w_candidates=[3, 4] include [3]" in captured.err and "candidate_bits" in captured.err
    assert "skipped" not in output and "Traceback" not in output
    assert len(captured.err.strip().splitlines()) <= 10
    assert not list(tmp_path.rglob("results.json"))  # stopped before calibration


def test_sweep_refuses_an_output_dir_holding_another_sweep(tmp_path, capsys):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "pareto.csv").write_text("name,top1\nconfig,91.5\n")
    with pytest.raises(SystemExit):
        main(
            [
                "sweep",
                "--config",
                str(REPO / "configs" / "default.yaml"),
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                f"--output_dir={earlier}",
            ]
        )
    assert "already holds another sweep's pareto.csv" in capsys.readouterr().err
    assert (earlier / "pareto.csv").read_text() == "name,top1\nconfig,91.5\n"  # untouched


def test_sweep_without_a_probe_says_what_is_missing(tmp_path, capsys):
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "Sensitivity" not in c["class_path"]]
    config["trainer"]["callbacks"][1]["init_args"]["policy"] = {"class_path": "lit_mpq.allocation.Uniform"}
    path = tmp_path / "no_probe.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(path), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert exit_info.value.code != 0
    assert "SensitivityProbe" in capsys.readouterr().err


@pytest.mark.slow
def test_deit_tiny_runs_every_policy_end_to_end(tmp_path, tiny_image_folder):
    """Exact budgets, uniform baselines, the seed rule and random allocations, all on DeiT-Tiny (no pretrained)."""
    config = yaml.safe_load((REPO / "configs" / "deit.yaml").read_text())
    refinement = config["trainer"]["callbacks"][3]
    assert refinement["class_path"].endswith("AttentionRefinement")
    refinement["init_args"].update(candidates=6, rounds=1, num_samples=4)  # every point refines: keep it cheap
    report = config["trainer"]["callbacks"][-1]
    assert report["class_path"].endswith("Report")
    report["init_args"] = {"save_figures": False}  # figures of a 74-row plan cost seconds each; tested on ResNet-20
    calibration = config["trainer"]["callbacks"][0]
    assert calibration["class_path"].endswith("Calibration")
    calibration["init_args"]["weight_observer"] = "minmax"  # the MSE weight search is the costliest step per point
    (tmp_path / "deit.yaml").write_text(yaml.safe_dump(config))
    _, out, rows, _ = run_sweep(
        tmp_path,
        tmp_path / "deit.yaml",
        "--model.init_args.pretrained=false",
        "--model.init_args.checkpoint_path=null",  # random weights: the shared file has 1000 outputs, not 3
        "--model.init_args.num_classes=3",
        f"--data.init_args.root={tiny_image_folder}",
        "--data.init_args.val_dir=val",
        "--data.init_args.calib_dir=train",
        "--data.init_args.classes_file=null",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=12",
        "--data.init_args.num_calibration_samples=12",
        "--trainer.accelerator=cpu",
        "--num_budgets=2",
        "--num_random=1",
        "--baselines=[W8A8, W4A4]",
        "--relative_to=W6A6",  # with the first and last layers pinned at 8 bits, W4A4's energy is out of reach
    )
    assert [r["kind"] for r in rows] == ["config", "budget", "budget", "uniform", "uniform", "seed_rule", "random"]
    policies = {r["policy"].split("(")[0] for r in rows}
    assert policies == {"SensitivityPercentile", "ExactAllocation", "Uniform", "RandomAllocation"}
    for row in rows:
        assert 0.0 <= float(row["top1"]) <= 100.0 and float(row["energy_uj"]) > 0
    plan = yaml.safe_load((out / "budget_01" / "plan.yaml").read_text())
    assert len(plan["layers"]) == 1 + 12 * 6 + 1  # attention matmuls included
    # first_last_bits: 8 in deit.yaml pins the patch embedding and the head under every policy.
    assert plan["layers"][0]["w_bits"] == 8 and plan["layers"][-1]["a_bits"] == 8


@pytest.mark.slow
def test_resnet20_frontier_figure_keeps_the_band_where_comparisons_happen(tmp_path, shared_data):
    """On the real CIFAR-10 ResNet-20, 2-bit budgets fall far below FP32; the figure still shows the 85-92 % band."""
    _, out, rows, _ = run_sweep(
        tmp_path,
        "resnet20_energy.yaml",
        "--model.init_args.checkpoint_path=" + str(shared_data / "cifar10_resnet20.pt"),
        "--data.init_args.train_npz=" + str(shared_data / "cifar10_train_4k_lossless.npz"),
        "--data.init_args.test_npz=" + str(shared_data / "cifar10_test_1k_lossless.npz"),
        "--trainer.accelerator=cpu",
        "--data.init_args.max_val_samples=500",
        "--num_budgets=3",
        "--baselines=[W8A8, W4A4]",
        "--seed_rule=false",
    )
    fp32 = float(rows[0]["top1_fp32"])
    assert 90.0 < fp32 < 93.0
    plotted = [{**row, "energy_uj": float(row["energy_uj"]), "top1": float(row["top1"])} for row in rows]
    ax = pareto_figure(plotted, fp32_top1=fp32).axes[0]
    bottom, top = ax.get_ylim()
    assert top >= fp32 and top - bottom < 15  # not squashed by the lowest budget
    close = [row["top1"] for row in plotted if row["top1"] >= fp32 - 10]
    assert bottom <= min(close)  # every point within 10 points of FP32 is on the axis
    below = [row for row in plotted if row["top1"] < bottom]
    if below:
        assert f"{len(below)} below" in ax.get_xlabel().replace("\n", " ")
    assert (out / "pareto.png").stat().st_size > 1000


@pytest.mark.slow
def test_each_sweep_point_ships_its_own_packed_model(tmp_path):
    """With an Export callback every point writes quantized.pt and model.onnx in its own folder, at its own plan."""
    pytest.importorskip("onnxruntime")
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["trainer"]["callbacks"].insert(-1, {"class_path": "lit_mpq.callbacks.Export"})
    path = tmp_path / "default_export.yaml"
    path.write_text(yaml.safe_dump(config))
    run, out, rows, _ = run_sweep(tmp_path, path, "--budgets=[1.0]", "--relative_to=W6A6", "--baselines=[W8A8]",
                                  "--seed_rule=false")  # fmt: skip
    points = [folder for folder in sorted(out.iterdir()) if folder.is_dir()]
    assert len(points) == len(rows) - 1  # the config's own point is the run itself
    assert (run / "quantized.pt").is_file() and (run / "model.onnx").is_file()
    plans = []
    for folder in points:
        assert (folder / "quantized.pt").is_file() and (folder / "model.onnx").is_file(), folder
        loaded = load_quantized(folder / "quantized.pt")
        plans.append(loaded.plan.bits())
        assert plans[-1] == QuantPlan.from_yaml(folder / "plan.yaml").bits()
    assert len({str(p) for p in plans}) == len(plans)  # each point shipped its own allocation


def test_without_a_logger_each_point_keeps_its_plan_and_the_config_run_keeps_its_own(tmp_path):
    """With ``logger: false`` the run folder is ``default_root_dir``; the points' plans must not overwrite the
    config run's ``plan.yaml`` there (they go to each point's folder, beside its ``results.json``)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(
            [
                "sweep",
                "--config",
                str(REPO / "configs" / "default.yaml"),
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false",
                "--budgets=[1.0]",
                "--relative_to=W6A6",
                "--baselines=[W8A8, W4A4]",
                "--seed_rule=false",
            ]
        )
    config_results = json.loads((tmp_path / "results.json").read_text())
    config_plan = QuantPlan.from_yaml(tmp_path / "plan.yaml")
    assert config_plan.average_weight_bits() == pytest.approx(config_results["avg_weight_bits"])
    assert config_plan.average_act_bits() == pytest.approx(config_results["avg_act_bits"])
    points = [folder for folder in sorted((tmp_path / "sweep").iterdir()) if folder.is_dir()]
    assert len(points) == 3
    for folder in points:
        results = json.loads((folder / "results.json").read_text())
        plan = QuantPlan.from_yaml(folder / "plan.yaml")
        assert plan.average_weight_bits() == pytest.approx(results["avg_weight_bits"]), folder.name
        assert plan.average_act_bits() == pytest.approx(results["avg_act_bits"]), folder.name
