"""Benchmark: the confounders table, how much each reported (or unreported) quantization choice moves top-1.

Garg et al., "Confounding Tradeoffs for Neural Network Quantization" (arXiv 2102.06366), showed that choices papers
rarely report (weight granularity, first/last-layer precision, BatchNorm folding, calibration set size) move accuracy as
much as the method does. This script measures them on lit_mpq, one choice at a time from a fixed baseline:

- **ResNet-20** (``configs/resnet20_cifar10.yaml``: the shared pretrained weights, calibration on the first 512 of
  the 4,000 lossless CIFAR-10 training images, top-1 on the 1,000 lossless test images; per-channel min/max weights,
  per-tensor MSE activation ranges, bias correction) at uniform W4A4 and W4A8 with the first and last layer at W8A8
  (``first_last_bits: 8``). Choices: weight granularity (per-tensor), first/last layer at the setting's bits, BN
  folded before quantization (and, as an interaction, folded under per-tensor weights: that row's reference is the
  per-tensor row), calibration set size (64 / 256 / 1024 first images), which 512 images (``calibration_subset:
  random`` with seeds 0, 1, 2), activation observer (min/max, percentile 99.99).
- **DeiT-Tiny** (``configs/deit.yaml``: shared weights, 512 random images of ``imagenet_sample_1000`` to calibrate,
  the ViT recipe's calibration settings) at uniform W8A8 with the patch embedding and head at W8A8, evaluated on
  ``--deit-images`` images spread evenly over ``imagenet_val_1300`` (650 by default: one image is 0.15 point).
  Choices: weight granularity, calibration set size (64 / 256 / 1000: the pool holds 1,000 images), seed (1, 2),
  activation observer of the inputs the recipe leaves to ``act_observer`` (the ``mlp.fc2`` inputs keep their
  twin-uniform grids and the post-LayerNorm inputs their RepQ-ViT fold). BN folding and first/last precision do not
  apply (no BatchNorm; W8A8 is already 8 bits). The config's ranking-aware refinement of the attention ranges
  (``AttentionRefinement``) is left out: it is a 4-bit tool and took 8.5 minutes per W8A8 run on this machine.

Every row is one in-process ``validate`` of the config (``lit_mpq.cli.main(..., run=False)``, the sensitivity probe
removed since a uniform policy needs none) whose ``card.yaml`` and ``results.json`` the script reads back: it asserts
that the row's card differs from its reference's in exactly the settings the choice names, with the values intended
(derived fields that follow, such as the average bits when the first and last layer change, are allowed and shown),
and prints that diff in the table. Top-1 comes from ``results.json``::

    python benchmarks/confounders.py [--models resnet20 deit] [--deit-images 650] [--figure PATH]

Run from the repository root; ``--load logs/benchmarks/confounders/rows_*.json`` prints (and ``--figure`` draws) the
rows of earlier runs instead of running. On two CPU cores shared with other jobs (load ~6) the 26 ResNet-20 rows took
9 minutes (10-40 s each) and the 9 DeiT-Tiny rows 45 minutes (4-6.5 minutes each); ``--deit-images``,
``--deit-sizes`` and ``--seeds`` trim the DeiT part. The spread of a choice is max - min of top-1 over its rows and
its reference (the reference is one of its values).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from _runs import evenly_spaced, quiet_run_args

from lit_mpq.allocation import Uniform
from lit_mpq.callbacks import BitAllocator, Calibration, Report
from lit_mpq.cli import main as cli_main
from lit_mpq.report.card import batchnorm_folding_text

CONFIGS = {"resnet20": "configs/resnet20_cifar10.yaml", "deit": "configs/deit.yaml"}
SETTINGS = {"resnet20": {"W4A4": (4, 4), "W4A8": (4, 8)}, "deit": {"W8A8": (8, 8)}}
KEPT_CALLBACKS = ("Calibration", "BitAllocator", "EnergyMeter", "Report")
"""The config callbacks every row keeps (the probe serves no uniform policy; see the module docstring for DeiT's
refinement)."""
BASE_CALIBRATION = {"resnet20": ("first", 512), "deit": ("random", 512)}
"""The configs' calibration draw: subset and size."""
PERCENTILE = 99.99
"""The ``percentile`` observer's kept percentile (``Calibration``'s default)."""
PLAN_FOLLOWERS = frozenset({"plan.pinned", "plan.average_weight_bits", "plan.average_act_bits", "bits_candidates"})
"""Card fields that follow from the first/last layer's widths (which layers are pinned, the averages, the widths
present in the plan)."""


@dataclass(frozen=True)
class Variant:
    """One row: a single choice changed from its reference row.

    Attributes:
        choice: The choice this row varies (``"baseline"`` for the reference of all rows).
        value: The value of the choice, in words.
        settings: ``QuantSettings`` fields to replace in the ``Calibration`` callback.
        fold_batchnorm: ``Calibration.fold_batchnorm`` (``None``: the config's, which is "not folded" without export).
        data: Data module arguments, given on the command line (so that they are recorded in the card).
        first_last_bits: ``BitAllocator.first_last_bits``.
        expected: Flattened card keys (``"calibration.images"``) and the value this row must record.
        derived: Card keys that may also differ because they follow from the change.
        reference: The ``choice`` of the row this one is compared with (its card diff and Δ).
    """

    choice: str
    value: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    fold_batchnorm: bool | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    first_last_bits: int | None = 8
    expected: Mapping[str, Any] = field(default_factory=dict)
    derived: frozenset[str] = frozenset()
    reference: str = "baseline"


def flatten(card: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``{"a": {"b": 1}}`` gives ``{"a.b": 1}``).

    Args:
        card: A card (or any nested mapping of plain values).
        prefix: Prepended to every key (for the recursion).

    Returns:
        The leaves keyed by their dotted path; lists are leaves.
    """
    flat: dict[str, Any] = {}
    for key, value in card.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def card_diff(reference: Mapping[str, Any], card: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The card fields whose values differ: ``{dotted key: (reference value, value)}``, keys sorted.

    Example:
        >>> card_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
        {'b.c': (2, 3)}
    """
    old, new = flatten(reference), flatten(card)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def check_diff(variant: Variant, card: Mapping[str, Any], diff: Mapping[str, tuple[Any, Any]]) -> None:
    """Assert that ``diff`` (``card`` against its reference's) is exactly the change ``variant`` intends.

    Every expected key must hold its expected value in ``card``, and every differing key must be expected or derived.

    Raises:
        AssertionError: Naming the unexpected fields and the recorded values that are not the intended ones.
    """
    flat = flatten(card)
    unexpected = {key: diff[key] for key in sorted(set(diff) - set(variant.expected) - variant.derived)}
    wrong = {key: (flat.get(key), value) for key, value in variant.expected.items() if flat.get(key) != value}
    if unexpected or wrong:
        raise AssertionError(
            f"{variant.choice} = {variant.value}: the card differs from its reference's in more than the choice "
            f"(unexpected: {unexpected}; recorded vs intended: {wrong})"
        )


def describe_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    """The card diff in words for the table (long sentences and float averages shortened)."""

    def short(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        text = str(value)
        return text if len(text) <= 28 else text[:25] + "..."

    return "; ".join(f"`{key}`: {short(old)} → {short(new)}" for key, (old, new) in diff.items()) or "-"


def variants(model: str, w_bits: int, a_bits: int, sizes: list[int], seeds: list[int]) -> list[Variant]:
    """The rows of one model and setting: the baseline, then one row per value of each choice."""
    subset, base_images = BASE_CALIBRATION[model]
    folded, unfolded = batchnorm_folding_text(True, "per_channel"), batchnorm_folding_text(False, "per_tensor")
    rows = [Variant("baseline", "as configured")]
    rows.append(
        Variant(
            "weight granularity",
            "per-tensor",
            settings={"weight_granularity": "per_tensor"},
            expected={"weight_granularity": "per_tensor", "batchnorm_folding": unfolded},
        )
    )
    if model == "resnet20":
        rows.append(
            Variant(
                "first/last layer precision",
                f"W{w_bits}A{a_bits} (the setting's)",
                first_last_bits=None,
                expected={
                    "first_last_precision.first": f"W{w_bits}A{a_bits}",
                    "first_last_precision.last": f"W{w_bits}A{a_bits}",
                },
                derived=PLAN_FOLLOWERS,
            )
        )
        rows.append(Variant("BN folding", "folded", fold_batchnorm=True, expected={"batchnorm_folding": folded}))
        rows.append(
            Variant(
                "BN folding, per-tensor weights",
                "folded (vs the per-tensor row)",
                settings={"weight_granularity": "per_tensor"},
                fold_batchnorm=True,
                expected={"batchnorm_folding": folded},
                reference="weight granularity",
            )
        )
    for size in sizes:
        if size != base_images:
            rows.append(
                Variant(
                    "calibration size",
                    f"{size} images",
                    data={"num_calibration_samples": size},
                    expected={
                        "calibration.images": size,
                        "calibration.subset": f"{subset} {size} images of the calibration pool",
                    },
                )
            )
    for seed in seeds:
        if subset == "random" and seed == 0:
            continue  # the baseline itself
        rows.append(
            Variant(
                "calibration draw",
                f"random {base_images}, seed {seed}",
                data={"calibration_subset": "random", "calibration_seed": seed},
                expected={
                    "calibration.subset": f"random {base_images} images of the calibration pool",
                    "calibration.seed": seed,
                },
            )
        )
    for observer in ("minmax", "percentile"):
        expected: dict[str, Any] = {"act_observer": observer}
        if observer == "percentile":
            expected["percentile"] = PERCENTILE
        rows.append(Variant("activation observer", observer, settings={"act_observer": observer}, expected=expected))
    return rows


def run_variant(
    model: str, bits: tuple[int, int], variant: Variant, out: Path, deit_images: int, fp32: bool
) -> dict[str, Any]:
    """One ``validate`` of the model's config with ``variant``'s change; its card, ``results.json`` and time."""
    data_args = [f"--data.init_args.{key}={value}" for key, value in variant.data.items()]
    cli = cli_main(
        [*quiet_run_args(CONFIGS[model], out), f"--model.init_args.fp32_reference={str(fp32).lower()}", *data_args],
        run=False,
    )
    callbacks = cli.trainer.callbacks
    callbacks[:] = [
        callback
        for callback in callbacks
        if type(callback).__name__ in KEPT_CALLBACKS or not type(callback).__module__.startswith("lit_mpq.")
    ]
    report = None
    for callback in callbacks:
        if isinstance(callback, Calibration):
            callback.settings = dataclasses.replace(callback.settings, **variant.settings)
            if variant.fold_batchnorm is not None:
                callback.fold_batchnorm = variant.fold_batchnorm
        if isinstance(callback, BitAllocator):
            callback.policy, callback.first_last_bits = Uniform(*bits), variant.first_last_bits
        if isinstance(callback, Report):
            callback.save_figures, callback.print_summary, report = False, False, callback
    if report is None:
        raise RuntimeError(f"{CONFIGS[model]} has no Report callback: no card to check")
    datamodule = cli.datamodule
    if model == "deit":  # the same evenly spread images for every row
        datamodule.setup("validate")
        datamodule.val_set = evenly_spaced(datamodule.val_set, deit_images)
    start = time.perf_counter()
    cli.trainer.validate(cli.model, datamodule, verbose=False)
    seconds = time.perf_counter() - start
    folder = Path(report.last_output_dir)
    results = json.loads((folder / "results.json").read_text())
    card = yaml.safe_load((folder / "card.yaml").read_text())
    return {
        "top1": results["top1"],
        "top1_fp32": results["top1_fp32"],
        "images": len(datamodule.val_set),
        "card": card,
        "seconds": seconds,
        "folder": str(folder),
    }


def spreads(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Max - min top-1 per choice over its rows and its reference's (the reference is one of its values)."""
    by_choice: dict[str, list[float]] = {}
    for row in rows:
        if row["choice"] != "baseline":
            by_choice.setdefault(row["choice"], [row["reference_top1"]]).append(row["top1"])
    return {choice: max(values) - min(values) for choice, values in by_choice.items()}


def print_tables(rows: list[dict[str, Any]], command: str) -> None:
    """The markdown table of every row, the spreads per choice and the summary."""
    print(f"\n`{command}`\n")
    print("| model | setting | choice | value | top-1 % | Δ vs reference | card diff vs reference |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        delta = "-" if row["choice"] == "baseline" else f"{row['top1'] - row['reference_top1']:+.2f}"
        print(
            f"| {row['model']} | {row['setting']} | {row['choice']} | {row['value']} | {row['top1']:.2f} | {delta} "
            f"| {row['diff']} |"
        )
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["setting"]), []).append(row)
    print("\nSpread (max - min top-1 over the choice's values, the reference included):\n")
    print("| model | setting | images | baseline top-1 % (FP32) | " + "choice | spread (points) |")
    print("|---|---|---|---|---|---|")
    summary = []
    for (model, setting), members in groups.items():
        base = members[0]
        fp32 = f" ({base['top1_fp32']:.2f})" if base["top1_fp32"] is not None else ""
        ranked = sorted(spreads(members).items(), key=lambda item: -item[1])
        for choice, spread in ranked:
            print(f"| {model} | {setting} | {base['images']} | {base['top1']:.2f}{fp32} | {choice} | {spread:.2f} |")
        one_image = 100.0 / base["images"]
        moved = [f"{choice} {spread:.1f}" for choice, spread in ranked if spread > 2 * one_image]
        summary.append(
            f"- {model} {setting}: "
            + ("; ".join(moved) if moved else "nothing")
            + f" (points; one image is {one_image:.2f}, choices within two images left out)"
        )
    print("\nWhat moves accuracy most (spread per choice, largest first):\n")
    print("\n".join(summary))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars: every row's Δ vs its reference, one panel per model and setting, on one x scale.

    The grey band is ±2 images of the panel's evaluation set (what two equally good runs differ by).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["choice"] != "baseline":
            groups.setdefault(f"{row['model']} {row['setting']}", []).append(row)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.6 * len(groups), 5.0), squeeze=False, sharex=True)
    for ax, (title, members) in zip(axes[0], groups.items(), strict=True):
        labels = [f"{row['choice']}: {row['value']}" for row in members]
        deltas = [row["top1"] - row["reference_top1"] for row in members]
        band = 2 * 100.0 / members[0]["images"]
        ax.axvspan(-band, band, color="0.9", zorder=0)
        ax.barh(range(len(members)), deltas, color=["tab:red" if d < 0 else "tab:blue" for d in deltas], zorder=2)
        ax.set_yticks(range(len(members)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{title} (baseline {members[0]['reference_top1']:.2f} %)", fontsize=10)
        ax.set_xlabel("Δ top-1 vs reference (points)")
    fig.suptitle("One choice at a time: Δ top-1 (grey: ±2 images)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def measure(args: argparse.Namespace, saved: Path) -> list[dict[str, Any]]:
    """Run every row of ``args.models``, checking each card against its reference's; rows saved after each run."""
    rows: list[dict[str, Any]] = []
    for model in args.models:
        sizes = args.resnet_sizes if model == "resnet20" else args.deit_sizes
        for setting, bits in SETTINGS[model].items():
            done: dict[str, dict[str, Any]] = {}
            for variant in variants(model, *bits, sizes, args.seeds):
                run = run_variant(model, bits, variant, args.out, args.deit_images, fp32=variant.choice == "baseline")
                reference = done.get(variant.reference)
                diff = {} if reference is None else card_diff(reference["card"], run["card"])
                if reference is not None:
                    check_diff(variant, run["card"], diff)
                done.setdefault(variant.choice, run)
                rows.append(
                    {
                        "model": model,
                        "setting": setting,
                        "choice": variant.choice,
                        "value": variant.value,
                        "reference_top1": reference["top1"] if reference else run["top1"],
                        "diff": describe_diff(diff),
                        **{key: value for key, value in run.items() if key != "card"},
                    }
                )
                saved.write_text(json.dumps(rows, indent=1))
                print(
                    f"{model} {setting} {variant.choice} = {variant.value}: top-1 {run['top1']:.2f} "
                    f"({run['seconds']:.0f} s) {rows[-1]['diff']}",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--deit-images", type=int, default=650, help="DeiT-Tiny evaluation images (of 1,300)")
    parser.add_argument("--resnet-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--deit-sizes", type=int, nargs="+", default=[64, 256, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the random 512-image draws")
    parser.add_argument("--figure", type=Path, default=None, help="also draw every row's Δ into this PNG")
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/confounders"))
    parser.add_argument(
        "--load", type=Path, nargs="+", default=None, help="print (and draw) the rows of earlier runs' rows_*.json"
    )
    args = parser.parse_args()
    if args.load:
        rows = [row for path in args.load for row in json.loads(path.read_text())]
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        rows = measure(args, args.out / f"rows_{'_'.join(args.models)}.json")
    print_tables(rows, "python benchmarks/confounders.py " + shlex.join(sys.argv[1:]))
    if args.figure is not None:
        plot(rows, args.figure)


if __name__ == "__main__":
    main()
