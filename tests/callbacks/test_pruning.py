"""The ``Pruning`` callback end to end on the embedded default: recorded sparsity against a NumPy reference, plan MACs
against a hand count, energies recomputed by hand, and a sweep with the callback present."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lit_mpq.callbacks import Pruning
from lit_mpq.cli import main

REPO = Path(__file__).resolve().parents[2]
CONV_LAYERS = ("conv1", "conv2", "conv3")
# Horowitz, ISSCC 2014, 45 nm: an 8x8-bit MAC is 0.2 + 0.03 pJ and scales with w_bits * a_bits / 64; DRAM 20 pJ/bit.
MAC_W8A8, DRAM_BIT = 0.23, 20.0
# digits_cnn on 1x8x8 inputs, by hand: conv1 16 x 64 x 1*9, conv2 32 x 64 x 16*9, conv3 64 x 16 (after 2x2 pooling)
# x 32*9, fc 64 x 10.
DENSE_MACS = 16 * 64 * 9 + 32 * 64 * 144 + 64 * 16 * 288 + 640  # 599680


def config_with_pruning(tmp_path: Path, **pruning) -> Path:
    """configs/default.yaml with a Pruning callback first and the probe cache under ``tmp_path``."""
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["trainer"]["callbacks"][1].setdefault("init_args", {})["cache_dir"] = str(tmp_path / "probe_cache")
    config["trainer"]["callbacks"].insert(0, {"class_path": "lit_mpq.callbacks.Pruning", "init_args": pruning})
    path = tmp_path / "pruned.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_args(tmp_path: Path, config: Path) -> list[str]:
    return [
        "--config",
        str(config),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]


def expected_nonzeros(amount: float) -> dict[str, int]:
    """Nonzero weights per conv after global magnitude pruning of the shipped checkpoint, by a NumPy sort."""
    state = torch.load(REPO / "lit_mpq" / "assets" / "digits_cnn.pt", weights_only=True)
    weights = {name: state[f"{name}.weight"].numpy() for name in CONV_LAYERS}
    pool = np.concatenate([np.abs(w).ravel() for w in weights.values()])
    threshold = np.sort(pool)[round(amount * pool.size) - 1]  # the largest magnitude that is pruned
    return {name: int((np.abs(w) > threshold).sum()) for name, w in weights.items()}


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """One validate of the default with half of its conv weights pruned (global magnitude)."""
    tmp_path = tmp_path_factory.mktemp("pruned")
    config = config_with_pruning(tmp_path, method="unstructured", amount=0.5, scope="global")
    cli = main(["validate", *cli_args(tmp_path, config)])
    return cli, Path(cli.trainer.log_dir)


def test_validate_records_the_sparsity_of_a_numpy_reference(pruned_run):
    _, run = pruned_run
    rows = {row["name"]: row for row in yaml.safe_load((run / "plan.yaml").read_text())["layers"]}
    expected = expected_nonzeros(0.5)
    assert {name: rows[name]["spec"]["nonzero_params"] for name in CONV_LAYERS} == expected
    assert rows["fc"]["spec"]["nonzero_params"] == rows["fc"]["spec"]["params"] == 640  # the classifier is kept
    pruning = json.loads((run / "pruning.json").read_text())
    assert pruning["settings"] | {"ignored": None} == {
        "method": "unstructured", "amount": 0.5, "scope": "global", "ignored_layers": None, "ignored": None,
        "index_format": "bitmap",
    }  # fmt: skip
    assert pruning["settings"]["ignored"] == ["fc"]
    conv_params = sum(rows[name]["spec"]["params"] for name in CONV_LAYERS)
    assert sum(expected.values()) == conv_params - round(0.5 * conv_params)
    assert pruning["nonzero_params"] == sum(expected.values()) + 640
    # The plan's MACs (dense hardware) are unchanged; the MACs with a nonzero weight shrink by each layer's density.
    assert sum(row["spec"]["macs"] for row in rows.values()) == DENSE_MACS
    effective = sum(rows[n]["spec"]["macs"] // rows[n]["spec"]["params"] * expected[n] for n in CONV_LAYERS) + 640
    assert pruning["effective_macs"] == effective < 0.6 * DENSE_MACS


def test_dense_and_sparsity_aware_energy_by_hand(pruned_run):
    _, run = pruned_run
    rows = yaml.safe_load((run / "plan.yaml").read_text())["layers"]
    dense = sparse = 0.0
    for row in rows:
        spec, w, a = row["spec"], row["w_bits"], row["a_bits"]
        mac = MAC_W8A8 * w * a / 64
        act = spec["act_in"] * a * DRAM_BIT
        dense += spec["macs"] * mac + spec["params"] * w * DRAM_BIT + act
        stored = min(spec["params"] * w, spec["nonzero_params"] * w + spec["params"])  # dense, or values + bitmap
        sparse += spec["macs"] * spec["nonzero_params"] / spec["params"] * mac + stored * DRAM_BIT + act
    pruning = json.loads((run / "pruning.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert pruning["dense"]["total_uj_per_image"] == pytest.approx(dense / 1e6, rel=1e-9)
    assert pruning["sparse"]["total_uj_per_image"] == pytest.approx(sparse / 1e6, rel=1e-9)
    assert results["energy"]["total_uj_per_image"] == pytest.approx(dense / 1e6, rel=1e-9)  # EnergyMeter: dense
    assert results["metrics"]["energy/sparse_uj_per_image"] == pytest.approx(sparse / 1e6, rel=1e-6)
    assert results["metrics"]["prune/sparsity_pct"] == pytest.approx(pruning["sparsity_pct"], rel=1e-6)


@pytest.mark.slow
def test_a_sweep_prunes_once_and_costs_every_point_dense_and_sparse(tmp_path):
    config = config_with_pruning(tmp_path, method="unstructured", amount=0.5, scope="global")
    with contextlib.redirect_stdout(io.StringIO()):
        cli = main(["sweep", *cli_args(tmp_path, config), "--budgets=[1.0]", "--relative_to=W6A6",
                    "--baselines=[W8A8]", "--seed_rule=false"])  # fmt: skip
    run = Path(cli.trainer.log_dir)
    points = sorted(path.name for path in (run / "sweep").iterdir() if (path / "pruning.json").is_file())
    assert points == ["budget_00", "uniform_W8A8"]
    config_counts = json.loads((run / "pruning.json").read_text())["nonzero_params"]
    assert config_counts == sum(expected_nonzeros(0.5).values()) + 640
    energies = set()
    for point in points:
        pruning = json.loads((run / "sweep" / point / "pruning.json").read_text())
        assert pruning["nonzero_params"] == config_counts  # pruned once, not again per point
        assert pruning["sparse"]["total_uj_per_image"] < pruning["dense"]["total_uj_per_image"]
        energies.add(round(pruning["dense"]["total_uj_per_image"], 9))
    assert len(energies) == 2  # each point's own bits
    weights = [m.weight for m in cli.model.model.modules() if getattr(m, "weight", None) is not None]
    assert sum(int(torch.count_nonzero(w)) for w in weights if w.dim() > 1) == config_counts


def test_structured_pruning_shrinks_the_plan_to_the_hand_count(tmp_path):
    config = config_with_pruning(tmp_path, method="structured", amount=0.5, scope="layer")
    cli = main(["validate", *cli_args(tmp_path, config)])
    run = Path(cli.trainer.log_dir)
    rows = {row["name"]: row["spec"] for row in yaml.safe_load((run / "plan.yaml").read_text())["layers"]}
    # Half of every layer's output channels go (fc's outputs are the classes): 16 -> 8, 32 -> 16, 64 -> 32.
    macs = {"conv1": 8 * 64 * 9, "conv2": 16 * 64 * 8 * 9, "conv3": 32 * 16 * 16 * 9, "fc": 32 * 10}
    assert {name: spec["macs"] for name, spec in rows.items()} == macs
    assert sum(macs.values()) == 152384 < DENSE_MACS
    assert {name: spec["params"] for name, spec in rows.items()} == {
        "conv1": 72,
        "conv2": 1152,
        "conv3": 4608,
        "fc": 320,
    }
    pruning = json.loads((run / "pruning.json").read_text())
    assert pruning["channels"]["conv2"] == {"name": "conv2", "in_before": 16, "in_after": 8, "out_before": 32,
                                            "out_after": 16}  # fmt: skip
    assert pruning["sparsity_pct"] == 0.0  # smaller, dense: both energies agree
    assert pruning["sparse"]["total_uj_per_image"] == pytest.approx(pruning["dense"]["total_uj_per_image"])


def refusal(tmp_path: Path, config: dict, capsys) -> str:
    """Run ``config`` and return the one-line error of the exit with status 2 that it must end in."""
    path = tmp_path / "refused.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exc:
        main(["validate", *cli_args(tmp_path, path)])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_pruning_after_calibration_is_refused(tmp_path, capsys):
    config = yaml.safe_load(config_with_pruning(tmp_path, amount=0.3).read_text())
    callbacks = config["trainer"]["callbacks"]
    callbacks[0], callbacks[1] = callbacks[1], callbacks[0]
    assert "Pruning must come before Calibration" in refusal(tmp_path, config, capsys)


def test_a_sparse_energy_meter_with_another_index_format_is_refused(tmp_path, capsys):
    config = yaml.safe_load(config_with_pruning(tmp_path, amount=0.3, index_format="bitmap").read_text())
    meter = next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("EnergyMeter"))
    sparse = {"class_path": "lit_mpq.energy.sparsity.SparsityAwareEnergyModel", "init_args": {"index_format": "csr"}}
    meter["init_args"] = {"energy_model": sparse}
    assert "set both to the same format" in refusal(tmp_path, config, capsys)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "filter"}, r"\['unstructured', 'structured'\]"),
        ({"scope": "row"}, r"\['global', 'layer'\]"),
        ({"amount": 1.0}, r"\[0, 1\)"),
        ({"index_format": "coo"}, r"\['bitmap', 'csr'\]"),
    ],
)
def test_bad_settings_name_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Pruning(**kwargs)
