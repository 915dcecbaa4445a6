"""Benchmark: the accuracy-energy frontier of ResNet-20 with nearest rounding and with GPFQ (or GPTQ), side by side.

Both sweeps run ``configs/resnet20_energy_gpfq.yaml`` (exact allocation per budget from one Fisher probe, weights
2-8 bits, activations 4-8 bits, no bias correction) with the same budgets; the only difference is the
``WeightRounding`` method, so each budget gets the same allocation and is rounded two ways. Prints a Markdown table
(budget, energy, top-1 nearest, top-1 rounded, gain) and writes the two frontiers as a figure::

    python benchmarks/rounding_frontier.py [--num-budgets 8] [--method gpfq]
        [--figure docs/figures/rounding_frontier.png] [--tables NEAREST_RUN ROUNDED_RUN]

The frontier columns are the best top-1 of any budget at that energy or less (the Pareto frontier, which the figure
draws as steps); ``--tables`` reports two earlier sweeps again (their run folders) without sweeping.

Calibration on the first 512 lossless CIFAR-10 training images, evaluation on the 1,000 lossless test images (one
image is 0.1 point). Run from the repository root.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib
import yaml
from _runs import quiet_sweep

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIG = Path("configs/resnet20_energy_gpfq.yaml")


def sweep(method: str, num_budgets: int, out: Path) -> tuple[list[dict], float]:
    """Run the config's sweep with weights rounded by ``method``; its ``pareto.csv`` rows and the wall time."""
    config = yaml.safe_load(CONFIG.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("WeightRounding"):
            callback["init_args"]["method"] = method
    run, seconds = quiet_sweep(config, out, method, [f"--num_budgets={num_budgets}"])
    return read_sweep(run), seconds


def envelope(points: list[tuple[float, float]]) -> list[float]:
    """The frontier at each point's energy: the best top-1 of any point at that energy or less."""
    return [max(top for energy, top in points if energy <= at) for at, _ in points]


def read_sweep(run: Path) -> list[dict]:
    """``pareto.csv`` rows of an earlier sweep run folder."""
    with open(run / "sweep" / "pareto.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-budgets", type=int, default=8)
    parser.add_argument("--method", choices=["gpfq", "gptq"], default="gpfq")
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/rounding_frontier"))
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument(
        "--tables",
        nargs=2,
        type=Path,
        default=None,
        metavar=("NEAREST_RUN", "ROUNDED_RUN"),
        help="report two earlier sweep runs (their run folders) instead of sweeping again",
    )
    args = parser.parse_args()
    if args.tables is None:
        nearest, nearest_s = sweep("nearest", args.num_budgets, args.out)
        rounded, rounded_s = sweep(args.method, args.num_budgets, args.out)
    else:
        (nearest, rounded), nearest_s, rounded_s = (read_sweep(run) for run in args.tables), None, None
    by_name = {row["name"]: row for row in rounded}
    name = args.method.upper()
    rows = []
    for row in nearest:
        other = by_name.get(row["name"])
        if other is None or row["top1"] in ("", None) or other["top1"] in ("", None):
            continue
        rows.append((row, float(row["energy_uj"]), float(row["top1"]), float(other["top1"])))
    # Budgets and the config are the allocator's frontier; the uniform baselines are shown beside it.
    frontier_rows = sorted((r for r in rows if r[0]["kind"] in ("budget", "config")), key=lambda r: r[1])
    best_nearest = envelope([(energy, top) for _, energy, top, _ in frontier_rows])
    best_rounded = envelope([(energy, top) for _, energy, _, top in frontier_rows])
    print(f"\n`python benchmarks/rounding_frontier.py --num-budgets {args.num_budgets} --method {args.method}`\n")
    print(
        f"| point | energy µJ/img | avg W bits | avg A bits | top-1 nearest | top-1 {name} | gain "
        f"| frontier nearest | frontier {name} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    frontier_at = {id(r[0]): (n, g) for r, n, g in zip(frontier_rows, best_nearest, best_rounded, strict=True)}
    for row, energy, top_n, top_r in sorted(rows, key=lambda r: (r[0]["kind"] == "uniform", r[1])):
        front = frontier_at.get(id(row))
        front_text = f"{front[0]:.1f} | {front[1]:.1f}" if front else "- | -"
        print(
            f"| {row['name']} | {energy:.2f} | {float(row['avg_weight_bits']):.2f} | {float(row['avg_act_bits']):.2f} "
            f"| {top_n:.1f} | {top_r:.1f} | {top_r - top_n:+.1f} | {front_text} |"
        )
    fp32 = float(nearest[0]["top1_fp32"])
    below = [r[0]["name"] for r, n, g in zip(frontier_rows, best_nearest, best_rounded, strict=True) if g < n]
    print(f"\nFP32 {fp32:.1f} %; rounded frontier below the nearest one at: {', '.join(below) or 'no budget'}")
    if nearest_s is not None:
        print(f"sweep time nearest {nearest_s:.0f} s, {name} {rounded_s:.0f} s")
    if args.figure is not None:
        energies = [r[1] for r in frontier_rows]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
        for ax, zoom in zip(axes, (False, True), strict=True):
            ax.plot(energies, [r[2] for r in frontier_rows], "o", color="C0", label="nearest rounding")
            ax.plot(energies, [r[3] for r in frontier_rows], "s", color="C1", label=f"{name} rounding")
            ax.step(energies, best_nearest, where="post", color="C0", alpha=0.6, label="frontier, nearest")
            ax.step(energies, best_rounded, where="post", color="C1", alpha=0.6, label=f"frontier, {name}")
            for row, energy, top_n, top_r in rows:
                if row["kind"] == "uniform":
                    ax.plot([energy, energy], [top_n, top_r], ":", color="grey")
                    ax.annotate(row["name"].replace("uniform_", ""), (energy, top_r), fontsize=7, color="grey")
            ax.axhline(fp32, color="grey", linestyle=":", label="FP32")
            ax.set_xlabel("analytic energy (µJ per image)")
            ax.set_ylabel("top-1 % (CIFAR-10, 1,000 test images)")
            if zoom:
                ax.set_ylim(85, fp32 + 1.5)
                ax.set_title("zoom: top-1 from 85 %")
            else:
                ax.set_title("ResNet-20: exact allocation per energy budget")
                ax.legend(fontsize=8)
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
