"""``python cli.py sweep``: one probe, many budgets and baselines, pareto.csv, figures and TensorBoard scalars."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_mpq.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_sweep(tmp_path: Path, config: str, *extra: str):
    cli = main(
        [
            "sweep",
            "--config",
            str(REPO / "configs" / config),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )
    out = Path(cli.trainer.log_dir) / "sweep"
    with (out / "pareto.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return cli, out, rows


def test_sweep_on_the_embedded_default(tmp_path):
    cli, out, rows = run_sweep(tmp_path, "default.yaml", "--num_budgets=4", "--num_random=2", "--relative_to=W6A6")
    kinds = [r["kind"] for r in rows]
    assert kinds.count("budget") == 4 and kinds.count("uniform") == 4 and kinds.count("random") == 2
    assert kinds.count("seed_rule") == 1 and kinds[0] == "config"
    budgets = [r for r in rows if r["kind"] == "budget"]
    unit = next(float(r["energy_uj"]) for r in rows if r["name"] == "uniform_W6A6")
    for row in budgets:
        # Each exact allocation respects its own budget (a multiple of uniform W6A6's energy).
        assert float(row["energy_uj"]) <= float(row["budget_ratio"]) * unit * (1 + 1e-9)
    energies = [float(r["energy_uj"]) for r in budgets]
    assert energies == sorted(energies) and energies[0] < energies[-1]
    # The lowest budget is the cheapest allocation the candidates allow: every layer at the lowest bits.
    w4a4 = next(float(r["energy_uj"]) for r in rows if r["name"] == "uniform_W4A4")
    assert energies[0] == pytest.approx(w4a4, rel=1e-9)
    for name in ("pareto.png", "summary.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "budget_00" / "plan.yaml").is_file() and (out / "budget_00" / "card.yaml").is_file()
    scalars, images = [], set()
    for event in Path(cli.trainer.log_dir).glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event))
        acc.Reload()
        if "sweep/top1" in acc.Tags()["scalars"]:
            scalars += acc.Scalars("sweep/top1")
        images |= set(acc.Tags()["images"])
    assert len(scalars) == len(rows) - 1
    assert {"sweep/pareto", "sweep/summary"} <= images


def test_sweep_without_a_probe_says_what_is_missing(tmp_path):
    import yaml
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "Sensitivity" not in c["class_path"]]
    config["trainer"]["callbacks"][1]["init_args"]["policy"] = {"class_path": "lit_mpq.allocation.Uniform"}
    path = tmp_path / "no_probe.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(MisconfigurationException, match="SensitivityProbe"):
        main(["sweep", "--config", str(path), f"--trainer.logger.init_args.save_dir={tmp_path}"])


def test_deit_tiny_runs_every_policy_end_to_end(tmp_path, tiny_image_folder):
    """Exact budgets, uniform baselines, the seed rule and random allocations, all on DeiT-Tiny (no pretrained)."""
    cli, out, rows = run_sweep(
        tmp_path,
        "deit.yaml",
        "--model.init_args.pretrained=false",
        "--model.init_args.num_classes=3",
        f"--data.init_args.root={tiny_image_folder}",
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
    import yaml

    plan = yaml.safe_load((out / "budget_01" / "plan.yaml").read_text())
    assert len(plan["layers"]) == 50
    # first_last_bits: 8 in deit.yaml pins the patch embedding and the head under every policy.
    assert plan["layers"][0]["w_bits"] == 8 and plan["layers"][-1]["a_bits"] == 8
