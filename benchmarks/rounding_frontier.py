"""Benchmark: the accuracy-energy frontier of ResNet-20 with nearest rounding and with GPFQ (or GPTQ), side by side.

Both sweeps run ``configs/resnet20_energy_gpfq.yaml`` (exact allocation per budget from one Fisher probe, weights
2-8 bits, activations 4-8 bits, no bias correction) with the same budgets; the only difference is the
``WeightRounding`` method, so each budget gets the same allocation and is rounded two ways. Prints a Markdown table
(budget, energy, top-1 nearest, top-1 rounded, gain) and writes the two frontiers as a figure::

    python benchmarks/rounding_frontier.py [--num-budgets 8] [--method gpfq]
        [--figure docs/figures/rounding_frontier.png]

Calibration on the first 512 lossless CIFAR-10 training images, evaluation on the 1,000 lossless test images (one
image is 0.1 point). Run from the repository root.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib
import yaml
from _runs import fresh_run_dir

from lit_mpq.cli import main as cli_main

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIG = Path("configs/resnet20_energy_gpfq.yaml")


def sweep(method: str, num_budgets: int, out: Path) -> tuple[list[dict], float]:
    """Run the config's sweep with weights rounded by ``method``; its ``pareto.csv`` rows and the wall time."""
    config = yaml.safe_load(CONFIG.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("WeightRounding"):
            callback["init_args"]["method"] = method
        if callback["class_path"].endswith("Report"):
            callback.setdefault("init_args", {})["save_figures"] = False
    config["trainer"]["logger"] = False
    config["trainer"]["enable_progress_bar"] = False
    run = fresh_run_dir(out)
    path = run.parent / f"{run.name}_{method}.yaml"  # outside the run folder, where the CLI saves its own copy
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    cli_main(
        [
            "sweep",
            "--config",
            str(path),
            f"--trainer.default_root_dir={run}",
            f"--num_budgets={num_budgets}",
            "--baselines=[W8A8, W4A4]",
            "--seed_rule=false",
            "--num_random=0",
            f"--output_dir={run / 'sweep'}",
        ]
    )
    with open(run / "sweep" / "pareto.csv", newline="") as handle:
        return list(csv.DictReader(handle)), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-budgets", type=int, default=8)
    parser.add_argument("--method", choices=["gpfq", "gptq"], default="gpfq")
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/rounding_frontier"))
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()
    nearest, nearest_s = sweep("nearest", args.num_budgets, args.out)
    rounded, rounded_s = sweep(args.method, args.num_budgets, args.out)
    by_name = {row["name"]: row for row in rounded}
    name = args.method.upper()
    print(f"\n`python benchmarks/rounding_frontier.py --num-budgets {args.num_budgets} --method {args.method}`\n")
    print(f"| point | energy µJ/img | avg W bits | avg A bits | top-1 nearest | top-1 {name} | gain |")
    print("|---|---|---|---|---|---|---|")
    points = []
    for row in nearest:
        other = by_name.get(row["name"])
        if other is None or row["top1"] in ("", None):
            continue
        top_n, top_r, energy = float(row["top1"]), float(other["top1"]), float(row["energy_uj"])
        points.append((row["kind"], energy, top_n, top_r))
        print(
            f"| {row['name']} | {energy:.2f} | {float(row['avg_weight_bits']):.2f} | {float(row['avg_act_bits']):.2f} "
            f"| {top_n:.1f} | {top_r:.1f} | {top_r - top_n:+.1f} |"
        )
    print(
        f"\nFP32 {float(nearest[0]['top1_fp32']):.1f} %; sweep time nearest {nearest_s:.0f} s, {name} {rounded_s:.0f} s"
    )
    if args.figure is not None:
        budgets = sorted(p for p in points if p[0] in ("budget", "config"))
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot([p[1] for p in budgets], [p[2] for p in budgets], "o-", label="nearest rounding")
        ax.plot([p[1] for p in budgets], [p[3] for p in budgets], "s-", label=f"{name} rounding")
        ax.axhline(float(nearest[0]["top1_fp32"]), color="grey", linestyle=":", label="FP32")
        ax.set_xlabel("analytic energy (µJ per image)")
        ax.set_ylabel("top-1 % (CIFAR-10, 1,000 test images)")
        ax.set_title("ResNet-20: exact allocation per energy budget")
        ax.legend()
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
