"""Benchmark: top-1 vs energy per MAC of ResNet-20 under analog thermal noise, uniform vs allocated energy per layer.

The shared CIFAR-10 ResNet-20 is quantized at W8A8 with the model, data and calibration settings of ``--config``
(default ``configs/resnet20_cifar10.yaml``: MSE activation ranges, per-channel min/max weights, bias correction,
calibrated on the first 512 lossless training images; batches of 250). Thermal noise
(:class:`lit_mpq.analog.ThermalNoise`, Garg et al., arXiv:2102.06365) is added at the output of every quantized
Conv2d/Linear layer (19 convolutions and the classifier). For each budget ``E_bar`` (mean energy per MAC, units of
``E0``):

- **uniform**: every layer at ``E_bar``;
- **allocated**: the exact MILP (:func:`lit_mpq.analog.allocate_energy`) picks each layer's energy from a geometric
  grid (``--steps-per-octave`` energies per doubling, from ``min(budgets) / 2`` to ``max(budgets) x 16``; no layer
  below ``--min-energy-ratio x E_bar``) to minimise the summed per-layer sensitivity under
  ``sum_l M_l E_l <= E_bar sum_l M_l``: the same total analog energy.

The sensitivities (mean KL between the noise-free and the noisy softmax, one layer noisy at a time, every grid
energy) are probed once, on the first ``--probe-images`` calibration (training) images. Top-1 is measured on the
1000 lossless test images, for ``--seeds`` noise seeds; uniform and allocated use the same seeds (and, through
per-layer generators, the same standard normal draws), so the table also gives the paired difference. It prints a
Markdown table (mean +- sample standard deviation over the seeds), writes ``--figure`` and a JSON file with every
number under ``logs/benchmarks/analog_noise_curve/run_<k>``::

    python benchmarks/analog_noise_curve.py [--budgets 1 2 4 8 16] [--seeds 3] [--probe-images 128]
        [--steps-per-octave 1] [--draws 1] [--min-energy-ratio 0.5] [--figure docs/figures/analog_noise_curve.png]
        [--config configs/resnet20_cifar10.yaml] [--head-only]

Run from the repository root. About 10 minutes on 2 CPU cores shared with other jobs (see ``docs/analog.md``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import yaml
from _runs import cached_batches, fresh_run_dir
from matplotlib.figure import Figure
from torch import Tensor, nn

from lit_mpq.analog import NoiseInjector, ThermalNoise, allocate_energy, energy_grid, probe_noise_sensitivity
from lit_mpq.data import CIFARDataModule
from lit_mpq.models import create_backbone
from lit_mpq.quant.apply import QuantSettings, apply_plan, calibrate, measure_model, quantize_model, quantizers_mode
from lit_mpq.report.figures import save_figure

BATCH = 250
"""Images per batch, calibration and evaluation (the config's 200 replaced: 4 batches of the 1000 test images)."""


def load(args: argparse.Namespace) -> tuple[nn.Module, dict[str, int], list[Tensor], list[tuple[Tensor, Tensor]]]:
    """The W8A8 model of ``args.config``, its layers' MACs, the probe's calibration images and the test images.

    The backbone, checkpoint, data and ``Calibration`` settings are read from the config (paths relative to the
    repository root); the bits are uniform W8A8 whatever its allocator says.
    """
    config = yaml.safe_load(Path(args.config).read_text())
    model_args = config["model"]["init_args"]
    model = create_backbone(model_args["backbone"], checkpoint_path=model_args["checkpoint_path"]).eval()
    data = CIFARDataModule(**{**config["data"]["init_args"], "batch_size": BATCH})
    data.setup("validate")
    calibration_args = next(
        callback.get("init_args", {})
        for callback in config["trainer"]["callbacks"]
        if callback["class_path"].endswith(".Calibration")
    )
    calibration = [x for x, _ in data.calib_dataloader()]
    quantize_model(model, QuantSettings(**calibration_args))
    plan = measure_model(model, torch.zeros(1, 3, 32, 32))
    calibrate(model, calibration)
    plan.set_bits(dict.fromkeys(plan.names, (8, 8)))
    apply_plan(model, plan)
    probe = torch.cat(calibration)[: args.probe_images]
    probe_batches = list(probe.split(args.probe_batch))
    validation = cached_batches(data.val_set, BATCH, 0)
    macs = {spec.name: int(spec.macs) for spec, _ in plan.items()}
    return model, macs, probe_batches, validation


@torch.no_grad()
def top1(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Top-1 in percent."""
    correct = sum(int((model(x).argmax(dim=1) == y).sum()) for x, y in batches)
    return 100.0 * correct / sum(int(y.numel()) for _, y in batches)


def noisy_top1(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], energies: dict[str, float], seeds: list[int]
) -> list[float]:
    """Top-1 (%) with thermal noise at ``energies``, one value per seed."""
    scores = []
    with NoiseInjector(model, ThermalNoise(), energies) as injector:
        for seed in seeds:
            injector.reseed(seed)
            scores.append(top1(model, batches))
    return scores


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {spread:.2f}"


def figure(rows: list[dict], names: list[str], w8a8: float, fp32: float) -> Figure:
    """Left: top-1 vs energy per MAC, uniform and allocated. Right: the allocated energy of each layer / the mean."""
    fig = Figure(figsize=(11, 4.2))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.25]})
    budgets = [row["budget"] for row in rows]
    curves = (("uniform", "uniform energy per MAC", "o"), ("allocated", "allocated (exact MILP)", "s"))
    for key, label, marker in curves:
        means = [statistics.fmean(row[key]) for row in rows]
        stds = [statistics.stdev(row[key]) if len(row[key]) > 1 else 0.0 for row in rows]
        ax.errorbar(budgets, means, yerr=stds, marker=marker, capsize=3, label=label)
    ax.axhline(w8a8, color="grey", linestyle="--", linewidth=1, label=f"W8A8 without noise ({w8a8:.1f} %)")
    ax.axhline(fp32, color="black", linestyle=":", linewidth=1, label=f"FP32 ({fp32:.1f} %)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean energy per MAC (E0; same total energy in both curves)")
    ax.set_ylabel("top-1 (%), 1000 CIFAR-10 test images")
    ax.set_title("ResNet-20 W8A8, thermal noise")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    for row in rows:
        ratios = [row["energies"][name] / row["budget"] for name in names]
        bx.plot(range(len(names)), ratios, marker=".", label=f"E_bar = {row['budget']:g}")
    bx.set_yscale("log", base=2)
    bx.axhline(1.0, color="grey", linewidth=1)
    bx.set_xticks(range(len(names)))
    bx.set_xticklabels(names, rotation=75, fontsize=7)
    bx.set_ylabel("allocated energy per MAC / mean")
    bx.set_title("allocated energy per layer")
    bx.grid(True, which="both", alpha=0.3)
    bx.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def head_only(args: argparse.Namespace, model: nn.Module, macs: dict[str, int], validation: list) -> None:
    """Top-1 with every layer at the same energy except the classifier, at the top of the default grid.

    The total is the uniform one: the convolutions get ``(E_bar sum_l M_l - M_fc E_top) / sum_conv M_l``. It tells
    how much of the allocation's gain the cheap classifier alone brings.
    """
    seeds = list(range(args.seeds))
    head, top = list(macs)[-1], max(args.budgets) * 16
    rest = sum(macs.values()) - macs[head]
    lines = [
        f"| mean energy per MAC (E0) | uniform, {head} at {top:g} |",
        "|---:|---:|",
    ]
    for budget in sorted(args.budgets):
        conv = (budget * sum(macs.values()) - macs[head] * top) / rest
        energies = dict.fromkeys(macs, conv) | {head: top}
        scores = noisy_top1(model, validation, energies, seeds)
        lines.append(f"| {budget:g} (others at {conv:.4g}) | {mean_std(scores)} |")
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines) + f"\n\n`python {shlex.join(sys.argv)}`  {date.today().isoformat()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--probe-images", type=int, default=128)
    parser.add_argument("--probe-batch", type=int, default=128)
    parser.add_argument("--steps-per-octave", type=int, default=1)
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--min-energy-ratio", type=float, default=0.5, help="0 or less: the whole grid")
    parser.add_argument("--config", default="configs/resnet20_cifar10.yaml", help="model, data and calibration")
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/analog_noise_curve.png"))
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/analog_noise_curve"))
    parser.add_argument(
        "--head-only",
        action="store_true",
        help="only the ablation: uniform energy except the classifier at the grid's top, same total (no probe)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    model, macs, probe, validation = load(args)
    if args.head_only:
        head_only(args, model, macs, validation)
        return
    with quantizers_mode(model, "off"):
        fp32 = top1(model, validation)
    w8a8 = top1(model, validation)
    budgets = sorted(args.budgets)
    grid = energy_grid(budgets[0] / 2, budgets[-1] * 16, args.steps_per_octave)
    ratio = args.min_energy_ratio if args.min_energy_ratio > 0 else None
    missing = [b for b in budgets if not any(abs(b - e) <= 1e-12 * b for e in grid)]
    if missing:
        sys.exit(f"budgets {missing} are not on the grid {grid}: use powers of two apart")
    probe_start = time.perf_counter()
    sensitivity = probe_noise_sensitivity(model, probe, ThermalNoise(), grid, seed=1000, draws=args.draws)
    probe_seconds = time.perf_counter() - probe_start
    print(f"probe: {len(macs)} layers x {len(grid)} energies on {sensitivity.images} images, {probe_seconds:.0f} s")
    seeds = list(range(args.seeds))
    rows = []
    for budget in budgets:
        energy = next(e for e in grid if abs(budget - e) <= 1e-12 * budget)
        allocation = allocate_energy(sensitivity.scores, macs, energy, ratio)
        uniform = noisy_top1(model, validation, dict.fromkeys(macs, energy), seeds)
        allocated = noisy_top1(model, validation, allocation.energies, seeds)
        rows.append(
            {
                "budget": energy,
                "uniform": uniform,
                "allocated": allocated,
                "energies": allocation.energies,
                "allocated_mean_energy_per_mac": allocation.mean_energy_per_mac,
                "uniform_objective": sum(row[energy] for row in sensitivity.scores.values()),
                "allocated_objective": allocation.objective,
            }
        )
        print(f"E_bar={energy:g}: uniform {mean_std(uniform)}, allocated {mean_std(allocated)}", flush=True)
    seconds = time.perf_counter() - start

    command = "python " + shlex.join(sys.argv)
    lines = [
        f"ResNet-20 W8A8, thermal noise (sigma_t = 0.01), top-1 % on 1000 CIFAR-10 test images, mean ± std over "
        f"{args.seeds} noise seeds. FP32 {fp32:.1f} %, W8A8 without noise {w8a8:.1f} %.",
        "",
        "| mean energy per MAC (E0) | uniform | allocated | allocated − uniform (paired) | allocated E_l range "
        "| summed KL, uniform → allocated |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        diffs = [a - u for a, u in zip(row["allocated"], row["uniform"], strict=True)]
        low, high = min(row["energies"].values()), max(row["energies"].values())
        lines.append(
            f"| {row['budget']:g} (used {row['allocated_mean_energy_per_mac']:.3g}) | {mean_std(row['uniform'])} "
            f"| {mean_std(row['allocated'])} | {mean_std(diffs)} | {low:g} – {high:g} "
            f"| {row['uniform_objective']:.3f} → {row['allocated_objective']:.3f} |"
        )
    lines += [
        "",
        f"Sensitivities: {len(macs)} layers x {len(grid)} energies ({grid[0]:g} to {grid[-1]:g}, "
        f"{args.steps_per_octave} per octave; none below {args.min_energy_ratio:g} x the mean) on the first "
        f"{sensitivity.images} calibration images, "
        f"{args.draws} draw(s), {probe_seconds:.0f} s. Total {seconds / 60:.1f} min. {date.today().isoformat()}.",
        "",
        f"`{command}`",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    names = list(macs)
    save_figure(figure(rows, names, w8a8, fp32), args.figure)
    out = fresh_run_dir(args.out)
    payload = {
        "command": command,
        "date": date.today().isoformat(),
        "fp32": fp32,
        "w8a8": w8a8,
        "macs": macs,
        "grid": grid,
        "sensitivity": sensitivity.to_dict(),
        "rows": rows,
        "seconds": seconds,
        "table": table,
    }
    (out / "analog_noise_curve.json").write_text(json.dumps(payload, indent=1))
    print(f"\nfigure: {args.figure}; numbers: {out / 'analog_noise_curve.json'}")


if __name__ == "__main__":
    main()
