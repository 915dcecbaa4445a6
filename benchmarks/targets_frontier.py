"""Benchmark: the ResNet-20 accuracy-energy frontier under each hardware target, in one table and one figure.

Runs ``python cli.py sweep`` on ``configs/resnet20_energy.yaml`` once per target (``lenient``: the inputs of
convolutions and the classifier quantized, BatchNorm and the residual adds in float; ``integer_only``: every
activation tensor quantized, both operands of every residual add and the logits included, BatchNorm folded;
``integer_only_pow2``: the same with power-of-two scales), the config otherwise unchanged: one Fisher probe per
target over 2-8 bits, the exact solver at each budget (multiples of that target's own uniform W4A4 energy, which
under the strict targets includes the adds' operand reads and additions), and uniform W8A8 and W4A4. It prints one
row per point and target, and draws the frontiers in one figure (top-1 against the energy each target's graph
costs, µJ per image under the Horowitz model), so a user sees what the strict graph costs::

    python benchmarks/targets_frontier.py [--targets lenient integer_only] [--budgets 0.6 0.75 0.9 1.0 1.2 1.5 2.0]
        [--figure docs/figures/targets_frontier.png] [--runs LENIENT_RUN INTEGER_ONLY_RUN ...]

``--runs`` reports earlier run folders again (in the order of ``--targets``) without sweeping. Calibration on the
first 512 lossless CIFAR-10 training images, evaluation on the 1,000 lossless test images (one image is 0.1 point).
Run from the repository root.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import matplotlib
import yaml
from _runs import envelope, quiet_sweep

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIG = Path("configs/resnet20_energy.yaml")
COLORS = {"lenient": "C0", "integer_only": "C3", "integer_only_pow2": "C2"}
Y_FLOOR = 80.0
"""Lowest top-1 the figure shows (%); points below it are drawn on it and labelled with their value."""


def config_for(target: str) -> dict:
    """``configs/resnet20_energy.yaml`` with its Calibration set to ``target`` (nothing else changed)."""
    config = yaml.safe_load(CONFIG.read_text())
    calibrations = [cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("Calibration")]
    assert len(calibrations) == 1, calibrations
    calibrations[0].setdefault("init_args", {})["target"] = target
    return config


def read_points(run: Path) -> list[dict[str, Any]]:
    """The sweep's ``pareto.csv`` rows; the config's own point is the budget 1.0."""
    with open(run / "sweep" / "pareto.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        ratio = float(row["budget_ratio"]) if row["budget_ratio"] else None
        row["budget"] = 1.0 if row["kind"] == "config" else ratio
        row["top1"], row["energy"] = float(row["top1"]), float(row["energy_uj"])
    return rows


def draw(figure: Path, sweeps: dict[str, list[dict[str, Any]]], fp32: float) -> None:
    """Top-1 against energy: each target's allocated points, its frontier and its uniform W8A8 / W4A4."""
    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=120)
    for index, (target, rows) in enumerate(sweeps.items()):
        color = COLORS.get(target, None)
        points = [(row["energy"], row["top1"]) for row in rows if row["kind"] in ("budget", "config")]
        shown = [(x, max(y, Y_FLOOR)) for x, y in points]
        ax.plot(*zip(*shown, strict=True), "o", color=color, label=f"{target}: exact allocation")
        front = envelope(points)
        ax.step(*zip(*[(x, max(y, Y_FLOOR)) for x, y in front], strict=True), where="post", color=color, alpha=0.6)
        for (x, y), (_, y_shown) in zip(points, shown, strict=True):
            if y < Y_FLOOR:
                offset = (0, 6 + 9 * index)  # one line per target: floor labels at the same energy stay readable
                ax.annotate(f"{y:.1f} %", (x, y_shown), offset, textcoords="offset points", fontsize=7, color=color)
        for row in rows:
            if row["kind"] == "uniform":
                ax.plot(row["energy"], max(row["top1"], Y_FLOOR), "x", color=color)
                ax.annotate(row["name"].replace("uniform_", ""), (row["energy"], max(row["top1"], Y_FLOOR)), fontsize=7)
    ax.axhline(fp32, color="grey", linestyle=":", label="FP32")
    ax.set_ylim(Y_FLOOR - 0.5, fp32 + 0.7)
    ax.set_xlabel("energy, µJ per image (Horowitz 45 nm; each target's graph priced as it runs)")
    ax.set_ylabel("top-1 % (CIFAR-10, 1,000 test images)")
    ax.set_title("ResNet-20: the accuracy-energy frontier under each hardware target", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(figure)
    print(f"figure: {figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["lenient", "integer_only"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.75, 0.9, 1.2, 1.5, 2.0])
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/targets_frontier"))
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--runs", type=Path, nargs="+", default=None)
    args = parser.parse_args()
    if args.runs is not None and len(args.runs) != len(args.targets):
        raise SystemExit(f"--runs needs one run folder per target ({len(args.targets)}), got {len(args.runs)}")
    sweeps, seconds, runs = {}, {}, {}
    for index, target in enumerate(args.targets):
        if args.runs is not None:
            runs[target] = args.runs[index]
        else:
            budgets = f"--budgets=[{', '.join(str(b) for b in args.budgets)}]"
            runs[target], seconds[target] = quiet_sweep(config_for(target), args.out, target, [budgets])
        sweeps[target] = read_points(runs[target])
    print("\n| point | " + " | ".join(f"{t}: top-1 % | energy µJ | W / A bits" for t in args.targets) + " |")
    print("|---|" + "---|---|---|" * len(args.targets))
    names = [row["name"] for row in sweeps[args.targets[0]]]
    for name in names:
        cells = []
        for target in args.targets:
            row = next((r for r in sweeps[target] if r["name"] == name), None)
            cells.append(
                "n/a | n/a | n/a"
                if row is None
                else f"{row['top1']:.1f} | {row['energy']:.2f} "
                f"| {float(row['avg_weight_bits']):.2f} / {float(row['avg_act_bits']):.2f}"
            )
        label = sweeps[args.targets[0]][names.index(name)]
        point = f"{label['budget']:g} × W4A4" if label["budget"] is not None else name
        print(f"| {point} | " + " | ".join(cells) + " |")
    for target in args.targets:
        took = f", {seconds[target]:.0f} s" if target in seconds else ""
        print(f"{target}: run {runs[target]}{took}")
    if args.figure is not None:
        draw(args.figure, sweeps, float(sweeps[args.targets[0]][0]["top1_fp32"]))


if __name__ == "__main__":
    main()
