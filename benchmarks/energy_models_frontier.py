"""Benchmark: the same ResNet-20 sweep allocated under the DRAM-only energy model and under the memory-hierarchy one.

Runs ``python cli.py sweep`` twice with the same budgets (multiples of each model's own uniform W4A4 energy), once on
``configs/resnet20_energy.yaml`` (``HorowitzEnergyModel``: every weight and input activation moved from DRAM once per
image) and once on ``configs/resnet20_energy_hierarchy.yaml`` (the same file with the ``EnergyMeter``'s model set to
``MemoryHierarchyEnergyModel``: 108 KB SRAM, weights fetched once per batch of 4, register files). One Fisher probe
per sweep; the exact solver allocates per budget under that sweep's model. Then every allocation of both sweeps is
priced under *both* models (its ``plan.yaml``), and the script prints:

* one row per budget and allocator: top-1, average bits, energy under each model (µJ per image and relative to that
  model's uniform W8A8), and how many layers' activations spill to DRAM under the hierarchy model;
* the average weight / activation bits per stage of both allocations at each budget, and the layers that get more
  activation (or weight) bits under the hierarchy model;

and writes one figure with two panels, top-1 against the energy under each model (relative to its own uniform W8A8),
both allocators' points and frontiers in each panel::

    python benchmarks/energy_models_frontier.py [--budgets 0.65 0.8 1.25 1.6 2.0]
        [--figure docs/figures/energy_hierarchy_frontier.png] [--runs DRAM_RUN HIERARCHY_RUN]

The config's own point is the budget 1.0 x W4A4. ``--runs`` reports two earlier runs (their run folders) again without
sweeping. Calibration on the first 512 lossless CIFAR-10 training images, evaluation on the 1,000 lossless test
images (one image is 0.1 point). Run from the repository root.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import matplotlib
import yaml
from _runs import envelope, quiet_sweep

from lit_mpq.energy import EnergyModel, HorowitzEnergyModel, MemoryHierarchyEnergyModel, hierarchy_report
from lit_mpq.energy.accounting import plan_energy, uniform_energy
from lit_mpq.plan import QuantPlan

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DRAM_CONFIG = Path("configs/resnet20_energy.yaml")
HIERARCHY_CONFIG = Path("configs/resnet20_energy_hierarchy.yaml")
STAGES = ("stem", "stage1", "stage2", "stage3", "fc")
PJ_PER_UJ = 1e6
Y_FLOOR = 84.0
"""Lowest top-1 the figure shows (%); points below it are drawn on it and labelled with their value."""


def energy_meter_model(config: dict) -> EnergyModel:
    """The ``EnergyMeter``'s energy model of a config (Horowitz when it names none)."""
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("EnergyMeter"):
            spec = (callback.get("init_args") or {}).get("energy_model")
            if spec is None:
                return HorowitzEnergyModel()
            assert spec["class_path"].endswith("MemoryHierarchyEnergyModel"), spec
            return MemoryHierarchyEnergyModel(**spec.get("init_args", {}))
    raise ValueError("the config has no EnergyMeter")


def check_same_sweep(dram: dict, hierarchy: dict) -> None:
    """Stop unless the two configs differ only in the EnergyMeter's model and the logger's name."""

    def stripped(config: dict) -> dict:
        config = yaml.safe_load(yaml.safe_dump(config))
        config["trainer"]["logger"] = None
        for callback in config["trainer"]["callbacks"]:
            if callback["class_path"].endswith("EnergyMeter"):
                callback.pop("init_args", None)
        return config

    if stripped(dram) != stripped(hierarchy):
        raise SystemExit(f"{DRAM_CONFIG} and {HIERARCHY_CONFIG} differ in more than the energy model")


def sweep(config_path: Path, budgets: list[float], out: Path) -> tuple[Path, float]:
    """Run the config's sweep at ``budgets`` (x W4A4) plus uniform W8A8 and W4A4; the run folder and the wall time."""
    config = yaml.safe_load(config_path.read_text())
    return quiet_sweep(config, out, config_path.stem, [f"--budgets=[{', '.join(str(b) for b in budgets)}]"])


def read_points(run: Path) -> list[dict[str, Any]]:
    """The sweep's ``pareto.csv`` rows, each with the allocation it evaluated (``plan``).

    The bits come from each point's ``results.json`` (its energy rows); the layer specs are the same in every
    ``plan.yaml``.
    """
    with open(run / "sweep" / "pareto.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        folder = run if row["kind"] == "config" else run / "sweep" / row["name"]
        plan = QuantPlan.from_yaml(folder / "plan.yaml")
        layers = json.loads((folder / "results.json").read_text())["energy"]["per_layer"]
        plan.set_bits({layer["name"]: (layer["w_bits"], layer["a_bits"]) for layer in layers})
        row["plan"] = plan
        row["budget"] = (
            1.0 if row["kind"] == "config" else (float(row["budget_ratio"]) if row["budget_ratio"] else None)
        )
    return rows


def stage_of(name: str) -> str:
    """``stem``, ``stage1``..``stage3`` or ``fc`` for a ResNet-20 layer name."""
    if name.startswith("layer"):
        return f"stage{name[5]}"
    return "stem" if name == "conv1" else "fc"


def stage_bits(plan: QuantPlan) -> dict[str, tuple[float, float]]:
    """Mean (over layers) weight and activation bits of each stage."""
    groups: dict[str, list[tuple[int, int]]] = {stage: [] for stage in STAGES}
    for spec, decision in plan.items():
        groups[stage_of(spec.name)].append((decision.w_bits, decision.a_bits))
    return {
        stage: (sum(w for w, _ in bits) / len(bits), sum(a for _, a in bits) / len(bits))
        for stage, bits in groups.items()
    }


def price(row: dict[str, Any], models: dict[str, EnergyModel], int8: dict[str, float]) -> None:
    """Add the allocation's energy under every model (µJ per image, and relative to that model's W8A8)."""
    for key, model in models.items():
        energy = plan_energy(row["plan"], model).total_pj / PJ_PER_UJ
        row[f"{key}_uj"], row[f"{key}_rel"] = energy, energy / int8[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.65, 0.8, 1.25, 1.6, 2.0])
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/energy_models_frontier"))
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--runs", nargs=2, type=Path, default=None, metavar=("DRAM_RUN", "HIERARCHY_RUN"))
    args = parser.parse_args()
    dram_config, hierarchy_config = (yaml.safe_load(p.read_text()) for p in (DRAM_CONFIG, HIERARCHY_CONFIG))
    check_same_sweep(dram_config, hierarchy_config)
    models = {"dram": energy_meter_model(dram_config), "hier": energy_meter_model(hierarchy_config)}
    hierarchy: MemoryHierarchyEnergyModel = models["hier"]  # type: ignore[assignment]
    if args.runs is None:
        (dram_run, dram_s), (hier_run, hier_s) = (
            sweep(p, args.budgets, args.out) for p in (DRAM_CONFIG, HIERARCHY_CONFIG)
        )
    else:
        (dram_run, hier_run), dram_s, hier_s = args.runs, None, None
    sweeps = {"dram": read_points(dram_run), "hier": read_points(hier_run)}
    reference = sweeps["dram"][0]["plan"]
    int8 = {key: uniform_energy(reference, model, 8, 8).total_pj / PJ_PER_UJ for key, model in models.items()}
    for rows in sweeps.values():
        for row in rows:
            price(row, models, int8)
            row["spilled"] = hierarchy_report(row["plan"], hierarchy)["spilled"]
    label = {"dram": "DRAM-only", "hier": "hierarchy"}
    constants = hierarchy.constants()
    print(
        f"\nDRAM-only: HorowitzEnergyModel, uniform W8A8 = {int8['dram']:.2f} µJ/image; hierarchy: "
        f"MemoryHierarchyEnergyModel(sram_bytes={constants['sram_bytes']}, batch_size={constants['batch_size']}), "
        f"uniform W8A8 = {int8['hier']:.2f} µJ/image. Energies: µJ/image (× that model's W8A8).\n"
    )
    print(
        "| budget (× W4A4) | allocated under | top-1 % | avg W / A bits | energy, DRAM-only | energy, hierarchy "
        "| layers spilling (hierarchy) |"
    )
    print("|---|---|---|---|---|---|---|")
    by_budget: dict[float, dict[str, dict]] = {}
    for key, rows in sweeps.items():
        for row in rows:
            if row["kind"] in ("budget", "config"):
                by_budget.setdefault(row["budget"], {})[key] = row
    uniforms = {(key, row["name"]): row for key, rows in sweeps.items() for row in rows if row["kind"] == "uniform"}
    ordered = [(budget, pair[key], key) for budget, pair in sorted(by_budget.items()) for key in ("dram", "hier")]
    ordered += [(None, uniforms[("dram", name)], "dram") for name in ("uniform_W8A8", "uniform_W4A4")]
    for budget, row, key in ordered:
        budget_text = f"{budget:g}" if budget is not None else row["name"].replace("uniform_", "uniform ")
        print(
            f"| {budget_text} | {label[key] if budget is not None else 'both'} | {float(row['top1']):.1f} "
            f"| {float(row['avg_weight_bits']):.2f} / {float(row['avg_act_bits']):.2f} "
            f"| {row['dram_uj']:.2f} ({row['dram_rel']:.3f}) | {row['hier_uj']:.2f} ({row['hier_rel']:.3f}) "
            f"| {len(row['spilled'])} |"
        )
    print("\nMean bits per stage, W / A (stem, stage 1: 32x32, stage 2: 16x16, stage 3: 8x8, fc):\n")
    print(
        "| budget | allocated under | "
        + " | ".join(STAGES)
        + " | layers with more (+) / fewer (−) bits under hierarchy |"
    )
    print("|---|---|" + "---|" * len(STAGES) + "---|")
    for budget, pair in sorted(by_budget.items()):
        bits = {key: {s.name: (d.w_bits, d.a_bits) for s, d in pair[key]["plan"].items()} for key in ("dram", "hier")}
        for key in ("dram", "hier"):
            stages = stage_bits(pair[key]["plan"])
            cells = " | ".join(f"{w:.1f} / {a:.1f}" for w, a in (stages[s] for s in STAGES))
            changes = ""
            if key == "hier":
                parts = []
                for what, index in (("W", 0), ("A", 1)):
                    more = [n for n in bits["hier"] if bits["hier"][n][index] > bits["dram"][n][index]]
                    fewer = sum(bits["hier"][n][index] < bits["dram"][n][index] for n in bits["hier"])
                    parts.append(f"{what} +{len(more)}" + (f" ({', '.join(more)})" if more else "") + f" −{fewer}")
                changes = "; ".join(parts)
            print(f"| {budget:g} | {label[key]} | {cells} | {changes} |")
    if dram_s is not None:
        print(f"\nsweep time: DRAM-only {dram_s:.0f} s, hierarchy {hier_s:.0f} s; runs {dram_run}, {hier_run}")
    if args.figure is not None:
        draw(args.figure, by_budget, uniforms, label, float(sweeps["dram"][0]["top1_fp32"]), constants)


def draw(
    figure: Path,
    by_budget: dict[float, dict[str, dict]],
    uniforms: dict[tuple[str, str], dict],
    label: dict[str, str],
    fp32: float,
    constants: dict[str, float],
) -> None:
    """Two panels, top-1 against the energy under each model: both allocators' points and frontiers in each."""
    titles = {
        "dram": "priced DRAM-only (Horowitz 45 nm, batch 1)",
        "hier": f"priced on the hierarchy ({constants['sram_bytes'] // 1024} KB SRAM, batch {constants['batch_size']})",
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    for ax, axis_key in zip(axes, ("dram", "hier"), strict=True):
        for key, marker, color in (("dram", "o", "C0"), ("hier", "s", "C1")):
            points = [(pair[key][f"{axis_key}_rel"], float(pair[key]["top1"])) for pair in by_budget.values()]
            shown = [(x, max(y, Y_FLOOR)) for x, y in points]
            ax.plot(*zip(*shown, strict=True), marker, color=color, label=f"allocated {label[key]}")
            front = envelope(points)
            ax.step(*zip(*[(x, max(y, Y_FLOOR)) for x, y in front], strict=True), where="post", color=color, alpha=0.6)
            for (x, y), (_, y_shown) in zip(points, shown, strict=True):
                if y < Y_FLOOR:  # below the axis: drawn on its floor, labelled with the real value
                    ax.annotate(
                        f"{y:.1f} %",
                        (x, y_shown),
                        (0, 6 if key == "hier" else -10),
                        fontsize=7,
                        textcoords="offset points",
                        color=color,
                        ha="center",
                    )
        for name in ("uniform_W8A8", "uniform_W4A4"):
            row = uniforms[("dram", name)]
            ax.plot(row[f"{axis_key}_rel"], float(row["top1"]), "x", color="grey")
            ax.annotate(name.replace("uniform_", ""), (row[f"{axis_key}_rel"], float(row["top1"])), fontsize=7)
        ax.axhline(fp32, color="grey", linestyle=":", label="FP32")
        ax.set_ylim(Y_FLOOR - 0.5, fp32 + 0.7)
        ax.set_xlabel(f"energy, {label[axis_key]} model (× its uniform W8A8)")
        ax.set_title(titles[axis_key], fontsize=9)
    axes[0].set_ylabel("top-1 % (CIFAR-10, 1,000 test images)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("ResNet-20: exact allocation per budget under each energy model, each allocation priced by both")
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(figure)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
