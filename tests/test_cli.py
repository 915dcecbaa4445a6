"""End-to-end runs of ``python cli.py validate`` through LightningCLI, on the embedded default and DeiT-Tiny."""

from __future__ import annotations

import importlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lit_mpq.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

FROM_FILE = "lit_mpq.allocation.FromFile"
REQUIRED_TAGS = {
    "scalars": [
        "val/top1",
        "val/top1_fp32",
        "energy/analytic_uj_per_image",
        "energy/relative_to_int8",
        "bits/avg_weight",
        "bits/avg_act",
        "size/weights_mb",
    ],
    "histograms": ["sens/w_log10", "sens/a_log10"],
    "images": ["figures/bits_per_layer"],
}


def run_validate(tmp_path: Path, config: Path, *extra: str, name: str = "run"):
    """Run ``validate`` in-process with the logger under ``tmp_path``; return the CLI and the run directory."""
    cli = main(
        [
            "validate",
            "--config",
            str(config),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.logger.init_args.name={name}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )
    return cli, Path(cli.trainer.log_dir)


def edited_config(tmp_path: Path, base: str, edit) -> Path:
    """Write a copy of ``configs/<base>`` changed by ``edit(config_dict)`` and return its path."""
    config = yaml.safe_load((CONFIGS / base).read_text())
    edit(config)
    path = tmp_path / f"edited_{base}"
    path.write_text(yaml.safe_dump(config))
    return path


def set_callback_arg(index: int, key: str, value):
    def edit(config):
        node = config["trainer"]["callbacks"][index].setdefault("init_args", {})
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return edit


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default")
    config = edited_config(tmp, "default.yaml", set_callback_arg(1, "cache_dir", str(tmp / "probe_cache")))
    cli, out = run_validate(tmp, config)
    return cli, out


def test_default_run_writes_plan_results_and_figures(default_run):
    cli, out = default_run
    for name in ("plan.yaml", "results.json", "sensitivity.json", "bits_per_layer.png", "sensitivity_histogram.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["top1"] > 0.95 and results["top1_fp32"] > 0.95
    assert abs(results["top1"] - results["top1_fp32"]) < 0.02
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    names = [row["name"] for row in plan["layers"]]
    expected = [n for n, m in cli.model.model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert names == expected
    # Seed rule: with 4 layers, 25th/75th percentiles put exactly one layer at 4 and one at 8 bits.
    w_bits = sorted(row["w_bits"] for row in plan["layers"])
    assert w_bits == [4, 6, 6, 8]
    assert all(row["a_bits"] == 8 for row in plan["layers"])
    # The energy in the results is the plan's: recompute it independently from the Horowitz constants.
    total = sum(
        row["spec"]["macs"] * 0.23 * row["w_bits"] * row["a_bits"] / 64
        + row["spec"]["params"] * row["w_bits"] * 20
        + row["spec"]["act_in"] * row["a_bits"] * 20
        for row in plan["layers"]
    )
    assert results["energy"]["total_uj_per_image"] == pytest.approx(total / 1e6, rel=1e-9)
    # No energy counter on a CPU-only machine: measured energy says so, with each backend's reason.
    measured = results["energy"]["measured"]
    if measured["status"] == "unavailable":
        assert all(state.startswith(("unavailable", "skipped")) for state in measured["backends"].values())
        assert all(phase["joules"] == "unavailable" for phase in measured["phases"].values())
    else:
        assert measured["eval_j_per_image"] > 0


def test_tensorboard_event_file_has_every_required_tag(default_run):
    _, out = default_run
    events = sorted(out.glob("events.out.tfevents.*"))
    assert events
    tags: dict[str, set] = {}
    for event in events:
        acc = EventAccumulator(str(event))
        acc.Reload()
        for kind, values in acc.Tags().items():
            if isinstance(values, list):
                tags.setdefault(kind, set()).update(values)
    for kind, required in REQUIRED_TAGS.items():
        missing = set(required) - tags.get(kind, set())
        assert not missing, f"{kind} missing {missing}"
    # hparams with the final metrics (written through log_hyperparams(metrics=...)).
    assert {"hp/top1", "hp/energy_uj_per_image"} <= tags["scalars"]
    raw = b"".join(event.read_bytes() for event in events)
    assert b"_hparams_/session_start_info" in raw


def test_tensorboard_figures_are_the_saved_pngs_pixel_for_pixel(default_run):
    _, out = default_run
    acc = EventAccumulator(str(out), size_guidance={"images": 0})
    acc.Reload()
    for name in ("bits_per_layer", "summary", "sensitivity_heatmap"):
        (event,) = acc.Images(f"figures/{name}")
        with Image.open(io.BytesIO(event.encoded_image_string)) as logged, Image.open(out / f"{name}.png") as saved:
            assert logged.size == saved.size
            assert np.array_equal(np.asarray(logged.convert("RGB")), np.asarray(saved.convert("RGB")))


def test_from_file_reproduces_the_same_accuracy_exactly(default_run, tmp_path):
    cli, out = default_run
    first = json.loads((out / "results.json").read_text())
    saved = out / "plan.yaml"
    # Re-apply the saved plan with FromFile instead of probing and the percentile rule.
    config = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    config["trainer"]["callbacks"] = [
        config["trainer"]["callbacks"][0],
        {
            "class_path": "lit_mpq.callbacks.BitAllocator",
            "init_args": {"policy": {"class_path": FROM_FILE, "init_args": {"path": str(saved)}}},
        },
        {"class_path": "lit_mpq.callbacks.EnergyMeter"},
        {"class_path": "lit_mpq.callbacks.Report"},
    ]
    config_path = tmp_path / "from_file.yaml"
    config_path.write_text(yaml.safe_dump(config))
    _, out2 = run_validate(tmp_path, config_path, name="from_file")
    second = json.loads((out2 / "results.json").read_text())
    assert second["top1"] == first["top1"]
    assert second["energy"]["total_uj_per_image"] == first["energy"]["total_uj_per_image"]
    bits = lambda p: [(r["w_bits"], r["a_bits"]) for r in yaml.safe_load(p.read_text())["layers"]]  # noqa: E731
    assert bits(out2 / "plan.yaml") == bits(out / "plan.yaml")


@pytest.mark.slow
def test_deit_tiny_runs_the_full_chain_and_quantizes_every_layer(tiny_image_folder, tmp_path):
    cheap = [  # the probe on 6 images, the ranking-aware refinement (callback 3) with a short search
        set_callback_arg(1, "num_samples", 6),
        set_callback_arg(3, "candidates", 6),
        set_callback_arg(3, "rounds", 1),
    ]
    callbacks = yaml.safe_load((CONFIGS / "deit.yaml").read_text())["trainer"]["callbacks"]
    assert callbacks[3]["class_path"].endswith("AttentionRefinement")
    config = edited_config(tmp_path, "deit.yaml", lambda c: [edit(c) for edit in cheap])
    cli, out = run_validate(
        tmp_path,
        config,
        "--model.init_args.pretrained=false",
        "--model.init_args.checkpoint_path=null",  # random weights: the shared file has 1000 outputs, not 3
        "--model.init_args.num_classes=3",
        f"--data.init_args.root={tiny_image_folder}",
        "--data.init_args.val_dir=val",
        "--data.init_args.calib_dir=train",
        "--data.init_args.classes_file=null",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=6",
        "--data.init_args.num_calibration_samples=12",
        "--trainer.accelerator=cpu",
        name="deit",
    )
    model = cli.model.model
    float_layers = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert float_layers == [], f"layers left in float: {float_layers[:5]}"
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    names = [row["name"] for row in plan["layers"]]
    # DeiT-Tiny: patch embedding + 12 blocks x (qkv, q·kᵀ, softmax·V, proj, fc1, fc2) + head.
    assert len(names) == 1 + 12 * 6 + 1
    assert names[0] == "patch_embed.proj" and names[-1] == "head"
    for suffix in ("attn.qkv", "attn.matmul_qk", "attn.matmul_av", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert sum(n.endswith(suffix) for n in names) == 12
    assert {row["spec"]["kind"] for row in plan["layers"] if "matmul" in row["name"]} == {"matmul"}
    # first_last_bits: 8 pins the patch embedding and the head.
    assert plan["layers"][0]["pinned"] and plan["layers"][-1]["pinned"]
    assert all(row["sensitivity"]["w"] and row["sensitivity"]["a"] for row in plan["layers"])
    assert json.loads((out / "results.json").read_text())["num_quantized_layers"] == 74


def test_policy_needing_sensitivity_without_probe_fails_at_start_up(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    del config["trainer"]["callbacks"][1]  # the SensitivityProbe
    path = tmp_path / "no_probe.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        run_validate(tmp_path, path)
    assert info.value.code == 2 and "SensitivityProbe" in capsys.readouterr().err
    assert not list(tmp_path.rglob("plan.yaml"))


def test_allocator_before_calibration_is_rejected(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "lit_mpq.callbacks.Report"},
        config["trainer"]["callbacks"][0],
    ]
    path = tmp_path / "order.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        run_validate(tmp_path, path)
    assert info.value.code == 2 and re.search("Calibration.*listed after", capsys.readouterr().err)


@pytest.mark.parametrize(
    ("override", "edit", "message"),
    [
        ("--model.init_args.backbone=no_such_net", None, "no_such_net"),
        ("--model.init_args.checkpoint_path=/nonexistent/weights.pt", None, "/nonexistent/weights.pt"),
        ("--data.init_args.num_calibration_samples=-5", None, "num_calibration_samples"),
        ("--data.init_args.num_calibration_samples=0", None, "num_calibration_samples"),
        (None, set_callback_arg(2, "policy.init_args.bits", [1, 6, 8]), "bits=[1, 6, 8] lists 1"),
        (None, set_callback_arg(2, "policy.init_args.bits", [4, 6, 33]), "bits=[4, 6, 33] lists 33"),
        (None, set_callback_arg(0, "act_observer", "bogus"), "bogus"),
        (None, set_callback_arg(1, "num_samples", -1), "num_samples"),
        (
            None,
            set_callback_arg(
                2, "policy", {"class_path": "lit_mpq.allocation.FromFile", "init_args": {"path": "/no/plan.yaml"}}
            ),
            "/no/plan.yaml",
        ),
    ],
)
def test_bad_config_gives_one_clear_error(tmp_path, capsys, override, edit, message):
    """A bad value ends the CLI with the offending option or value named in the message."""
    config = edited_config(tmp_path, "default.yaml", edit) if edit else CONFIGS / "default.yaml"
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as info:
        run_validate(tmp_path, config, *([override] if override else []))
    text = str(info.value) + capsys.readouterr().err
    assert message in text
    assert text.count("Traceback") == 0


def test_empty_calibration_set_is_a_clear_error(tmp_path):
    from lit_mpq.data import DigitsDataModule

    with pytest.raises(ValueError, match="calibration"):
        data = DigitsDataModule(num_calibration_samples=10_000)
        data.setup("validate")
        data.calib_dataloader()


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses_and_its_class_paths_import(config, capsys, monkeypatch):
    """Import-by-string rot check: every class_path in every shipped config resolves (no run, no download).

    In-process (one interpreter start for all configs); the subprocess path is covered by the other CLI tests.
    """
    monkeypatch.chdir(REPO)  # the configs' relative paths resolve from the repository root
    with pytest.raises(SystemExit) as info:
        main(["validate", "--config", f"configs/{config}", "--print_config"])
    captured = capsys.readouterr()
    assert info.value.code == 0, captured.err[-2000:]
    printed = yaml.safe_load(captured.out)
    assert printed["model"]["class_path"] == "lit_mpq.module.MPQModule"
    for callback in printed["trainer"].get("callbacks") or []:
        module, _, name = callback["class_path"].rpartition(".")
        assert hasattr(importlib.import_module(module), name), callback["class_path"]


@pytest.mark.slow
def test_validate_help_lists_typed_options():
    result = subprocess.run(
        [sys.executable, "cli.py", "validate", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "--config" in result.stdout and "--trainer.callbacks" in result.stdout
    assert torch.__version__  # the CLI ran under the installed torch


@pytest.mark.slow
def test_probe_cache_hit_skips_probing_and_gives_the_same_table(tmp_path):
    edit = set_callback_arg(1, "cache_dir", str(tmp_path / "cache"))
    config = edited_config(tmp_path, "default.yaml", edit)
    _, first = run_validate(tmp_path, config, name="first")
    _, second = run_validate(tmp_path, config, name="second")
    r1 = json.loads((first / "results.json").read_text())
    r2 = json.loads((second / "results.json").read_text())
    assert r1["sensitivity"]["cache"] == "miss" and r2["sensitivity"]["cache"] == "hit"
    assert r1["sensitivity"]["cache_key"] == r2["sensitivity"]["cache_key"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert json.loads((first / "sensitivity.json").read_text()) == json.loads((second / "sensitivity.json").read_text())
    assert r2["top1"] == r1["top1"]
    # Another calibration seed draws other images: a different key, so a miss.
    _, third = run_validate(tmp_path, config, "--data.init_args.calibration_seed=1", name="third")
    assert json.loads((third / "results.json").read_text())["sensitivity"]["cache"] == "miss"
    # The card records the seeds, so a run whose plan differs can be traced to its calibration draw.
    card1, card3 = (yaml.safe_load((d / "card.yaml").read_text()) for d in (first, third))
    assert card1["calibration"]["seed"] == 0 and card3["calibration"]["seed"] == 1
    assert card1["seed_everything"] == card3["seed_everything"] == 0
    assert json.loads((third / "sensitivity.json").read_text()) != json.loads((first / "sensitivity.json").read_text())


def test_the_variance_policy_reads_the_weights_through_the_allocator(tmp_path):
    """VarianceMixed from YAML: the BitAllocator hands it the model, and the lower-variance half gets the low width."""
    import torch

    edit = set_callback_arg(2, "policy", {"class_path": "lit_mpq.allocation.VarianceMixed"})
    cli, out = run_validate(tmp_path, edited_config(tmp_path, "default.yaml", edit))
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    free = [row for row in plan["layers"] if not row["pinned"]]
    names = {row["name"] for row in free}
    modules = dict(cli.model.model.named_modules())
    variances = {name: float(modules[name].weight.detach().double().var(unbiased=False)) for name in names}
    threshold = float(torch.tensor(list(variances.values()), dtype=torch.float64).quantile(0.5))
    for row in free:
        assert row["w_bits"] == (4 if variances[row["name"]] < threshold else 8), row["name"]
