"""Benchmark: lit_mpq against Sony MCT and Qualcomm AIMET on equal footing (issue 13), one table.

Every tool quantizes the shared CIFAR-10 ResNet-20 for an integer-only accelerator: BatchNorm folded, every activation
tensor quantized (the network input, each convolution's input, both operands of every residual add, the logits). lit_mpq
runs under ``integer_only`` (float scales) and ``integer_only_pow2`` (power-of-two scales, the counterpart of MCT's
power-of-two platform); each peer runs in its own virtual environment (``benchmarks/peers/setup_mct.sh``,
``setup_aimet.sh``), never as a dependency, through its own script (``benchmarks/peers/mct_resnet20.py``,
``aimet_resnet20.py``). Same weights, the first 512 lossless training images to calibrate, the 1,000 lossless test
images to evaluate (one image is 0.1 point), 2 CPU cores. Budgets, each counted by each tool its own way:

* ``uniform_w4a8``, ``uniform_w4a4``: every layer (and every activation) at that width, no search;
* ``size_w4``: weight memory at most that of all weights at 4 bits, activations 8 bits;
* ``bitops_w4a8``: bit-ops (MACs x weight bits x input bits) at most those of uniform W4A8;
* ``bitops_1.09G``: bit-ops at most 0.42 of uniform W8A8's (1.09 G on ResNet-20).

lit_mpq's rows are ``python cli.py validate`` runs of ``configs/resnet20_energy.yaml`` with the Calibration's target
set and the BitAllocator's policy replaced by the row's (``Uniform``, or ``ExactAllocation`` with ``size_mb`` /
``bit_ops_g``; weight candidates 2, 3, 4, 6, 8, activation candidates 8 for ``size_w4`` and 4, 6, 8 for the bit-ops
rows, nothing pinned): the Fisher probe (no labels: the model's own predictions) and the exact MILP. Its probe runs
once per target (the probe cache serves the other rows); ``seconds`` is calibration + probe + solve of the row's
run, ``evaluations`` the labelled evaluations its search needed (none)::

    python benchmarks/peers_integer_only.py [--rows ...] [--targets integer_only integer_only_pow2]
        [--peers mct aimet] [--peer-results FILE.jsonl ...]

With ``--peers`` the peer scripts run here, in their own interpreters (a missing environment is reported with the
command that makes it); ``--peer-results`` reads rows a peer script wrote earlier instead. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _runs import write_quiet_config

from lit_mpq.models import create_backbone
from lit_mpq.quant.apply import QuantSettings, measure_model, quantize_model
from lit_mpq.quant.batchnorm import fold_batchnorm

CONFIG = Path("configs/resnet20_energy.yaml")
ROWS = ("uniform_w4a8", "uniform_w4a4", "size_w4", "bitops_w4a8", "bitops_1.09G")
PEERS = {
    "mct": (Path("benchmarks/peers/.venv-mct/bin/python"), Path("benchmarks/peers/mct_resnet20.py"), "setup_mct.sh"),
    "aimet": (
        Path("benchmarks/peers/.venv-aimet/bin/python"),
        Path("benchmarks/peers/aimet_resnet20.py"),
        "setup_aimet.sh",
    ),
}
W_CANDIDATES = [2, 3, 4, 6, 8]


def budgets(target: str) -> dict[str, dict[str, Any]]:
    """Each row's policy (class path and init args) and the budget as lit_mpq counts it, for ResNet-20."""
    model = create_backbone("cifar_resnet20").eval()
    example = torch.zeros(1, 3, 32, 32)
    fold_batchnorm(model, example)
    quantize_model(model, QuantSettings(target=target))
    plan = measure_model(model, example)
    params = sum(spec.params for spec in plan.specs.values())
    macs = sum(spec.macs for spec in plan.specs.values())
    size_w4 = params * 4 / 8 / 1e6
    bitops_w4a8, bitops_w8a8 = macs * 4 * 8 / 1e9, macs * 8 * 8 / 1e9
    exact = "lit_mpq.allocation.ExactAllocation"
    return {
        "uniform_w4a8": {"policy": ("lit_mpq.allocation.Uniform", {"w_bits": 4, "a_bits": 8}), "budget": None},
        "uniform_w4a4": {"policy": ("lit_mpq.allocation.Uniform", {"w_bits": 4, "a_bits": 4}), "budget": None},
        "size_w4": {
            "policy": (exact, {"w_candidates": W_CANDIDATES, "a_candidates": [8], "size_mb": size_w4}),
            "budget": {"value": size_w4, "unit": "MB of weights"},
        },
        "bitops_w4a8": {
            "policy": (exact, {"w_candidates": W_CANDIDATES, "a_candidates": [4, 6, 8], "bit_ops_g": bitops_w4a8}),
            "budget": {"value": bitops_w4a8, "unit": "G bit-ops"},
        },
        "bitops_1.09G": {
            "policy": (
                exact,
                {"w_candidates": W_CANDIDATES, "a_candidates": [4, 6, 8], "bit_ops_g": 0.42 * bitops_w8a8},
            ),
            "budget": {"value": 0.42 * bitops_w8a8, "unit": "G bit-ops"},
        },
    }


def lit_mpq_row(
    target: str, row: str, spec: dict[str, Any], out: Path, calibration: dict[str, Any], rounding: str = "nearest"
) -> dict[str, Any]:
    """One ``python cli.py validate`` run of the row; its top-1, bits, time and budget as lit_mpq counts it."""
    from lit_mpq.cli import main as cli_main

    config = yaml.safe_load(CONFIG.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("Calibration"):
            callback.setdefault("init_args", {})["target"] = target
            callback["init_args"].update(calibration)
        if callback["class_path"].endswith("BitAllocator"):
            class_path, init_args = spec["policy"]
            callback["init_args"] = {"policy": {"class_path": class_path, "init_args": init_args}}
        if callback["class_path"].endswith("SensitivityProbe"):  # every row pays for its own probe
            callback.setdefault("init_args", {})["cache_dir"] = None
    if rounding != "nearest":  # data-driven rounding after the allocation; it corrects each output's error itself
        callbacks = config["trainer"]["callbacks"]
        at = next(i for i, cb in enumerate(callbacks) if cb["class_path"].endswith("BitAllocator")) + 1
        callbacks.insert(
            at,
            {"class_path": "lit_mpq.callbacks.WeightRounding", "init_args": {"method": rounding, "refine_passes": 4}},
        )
        for callback in callbacks:
            if callback["class_path"].endswith("Calibration"):
                callback["init_args"]["bias_correction"] = False
    run, path = write_quiet_config(config, out, f"{target}_{row}")
    start = time.perf_counter()
    cli_main(["validate", "--config", str(path), f"--trainer.default_root_dir={run}"])
    wall = time.perf_counter() - start
    results = json.loads(next(run.rglob("results.json")).read_text())
    metrics = results["metrics"]
    seconds = sum(
        metrics.get(key, 0.0) for key in ("time/calibration_s", "time/probe_s", "time/allocation_s", "time/rounding_s")
    )
    counted = spec["budget"]
    if counted is not None:
        used = metrics["size/weights_mb"] if counted["unit"].startswith("MB") else metrics["bits/bit_ops_g"]
        counted = {**counted, "used": used}
    return {
        "tool": "lit_mpq",
        "version": f"({rounding})",
        "tpc": target,
        "budget": row,
        "budget_as_counted": counted,
        "top1": metrics["val/top1"],
        "seconds": seconds,
        "wall_seconds": wall,
        "evaluations": 0,
        "bits": f"W {metrics['bits/avg_weight']:.2f} / A {metrics['bits/avg_act']:.2f}",
    }


def run_peer(name: str, rows: list[str], extra: list[str]) -> list[dict[str, Any]]:
    """The peer's script in its own interpreter; its JSON lines (empty, with a message, when it is not set up)."""
    python, script, setup = PEERS[name]
    if not python.exists():
        print(f"{name}: no environment at {python}; make it with: bash benchmarks/peers/{setup}", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / f"{name}.jsonl"
        command = [str(python), str(script), "--out", str(out), "--rows", *rows, *extra]
        print("running:", " ".join(command), file=sys.stderr)
        subprocess.run(command, check=True)
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def counted_text(counted: dict[str, Any] | None) -> str:
    """``≤ budget unit (used x)``, or a dash for a row without a budget."""
    if not counted:
        return "–"
    value = counted.get("value")
    used = counted.get("used")
    text = f"≤ {value:.4g} {counted.get('unit', '')}" if value is not None else str(counted)
    return f"{text} (used {used:.4g})" if used is not None else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--targets", nargs="+", default=["integer_only", "integer_only_pow2"])
    parser.add_argument("--peers", nargs="*", default=["mct", "aimet"], choices=sorted(PEERS))
    parser.add_argument("--peer-results", type=Path, nargs="*", default=[])
    parser.add_argument("--weight-observer", default="minmax", choices=["minmax", "mse"])
    parser.add_argument("--rounding", nargs="+", default=["nearest", "gpfq"], choices=["nearest", "gptq", "gpfq"])
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/peers_integer_only"))
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for target in args.targets:
        specs = budgets(target)
        for row in args.rows:
            for rounding in args.rounding:
                calibration = {"weight_observer": args.weight_observer}
                results.append(lit_mpq_row(target, row, specs[row], args.out, calibration, rounding))
    for name in args.peers:
        extra_runs = [[]] if name != "mct" else [[], ["--tpc", "pow2"]]
        for extra in extra_runs:
            results += run_peer(name, list(args.rows), extra)
    for path in args.peer_results:
        results += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in results))
    print("\n| budget | tool | target / platform | budget as the tool counts it | top-1 % | time s | labelled evals |")
    print("|---|---|---|---|---|---|---|")
    for row in args.rows:
        for result in (r for r in results if r.get("budget") == row):
            print(
                f"| {row} | {result['tool']} {result.get('version', '')} | {result.get('tpc', '')} "
                f"| {counted_text(result.get('budget_as_counted'))}"
                f"{' **over budget**' if result.get('within_budget') is False else ''} | {float(result['top1']):.1f} "
                f"| {float(result.get('seconds', 0.0)):.1f} | {result.get('evaluations', '–')} |"
            )
    print(f"\nall rows: {args.out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
