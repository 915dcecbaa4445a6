"""Benchmark: label-aware evaluation of the shared CIFAR-10 ResNet-20 (3-class subsets: similar, dissimilar, random).

Each column is ``configs/resnet20_cifar10.yaml``'s pipeline (calibration on the first 512 lossless training images)
with ``LabelAwareEvaluation(subset_size=3, num_random=3, seed=0)`` added and the allocation swapped for uniform W8A8,
uniform W4A4, or left as the config's own (the seed percentile rule, W4/6/8 A8)::

    python benchmarks/label_aware_resnet20.py [--test-npz ../shared/data/cifar10_test_jpeg10k.npz] [--figure PATH]

The class-similarity matrix comes from the FP32 model on the calibration images, so every column has the same
subsets (checked). It prints a Markdown table: per subset its classes, the mean pairwise symmetric KL between their
mean FP32 outputs (nats; low = similar), the images labelled in it, the FP32 accuracy within the subset (argmax over
its three classes) and each setting's quantized accuracy with its drop. ``--figure`` copies the W4A4 run's
``label_aware.png`` there.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from _runs import quiet_run_args

from lit_mpq.allocation import Policy, Uniform
from lit_mpq.callbacks import BitAllocator, LabelAwareEvaluation, Report
from lit_mpq.cli import main as cli_main

SETTINGS: list[tuple[str, Policy | None]] = [
    ("W8A8", Uniform(8, 8)),
    ("seed rule", None),  # the config's own allocation
    ("W4A4", Uniform(4, 4)),
]


def run(config: str, policy: Policy | None, test_npz: str | None, out: Path) -> tuple[dict, list[dict], Path]:
    """One validate run with the label-aware callback; returns its metrics, table rows and run folder."""
    extra = [f"--data.init_args.test_npz={test_npz}"] if test_npz else []
    cli = cli_main([*quiet_run_args(config, out), *extra], run=False)
    for callback in cli.trainer.callbacks:
        if isinstance(callback, BitAllocator) and policy is not None:
            callback.policy = policy
        if isinstance(callback, Report):
            callback.save_figures = False  # the pipeline's own figures are not what this benchmark is about
    label_aware = LabelAwareEvaluation(subset_size=3, num_random=3, seed=0)
    cli.trainer.callbacks.append(label_aware)
    start = time.perf_counter()
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    metrics["seconds"] = time.perf_counter() - start
    return metrics, label_aware.rows, Path(cli.trainer.default_root_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/resnet20_cifar10.yaml")
    parser.add_argument("--test-npz", default=None, help="evaluation images instead of the config's (e.g. jpeg10k)")
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/label_aware_resnet20"))
    parser.add_argument("--figure", type=Path, default=None, help="copy the W4A4 run's label_aware.png here")
    args = parser.parse_args()
    results = []
    for name, policy in SETTINGS:
        metrics, rows, folder = run(args.config, policy, args.test_npz, args.out)
        results.append((name, metrics, rows, folder))
        print(f"{name}: top-1 {metrics['val/top1']:.2f} % (FP32 {metrics['val/top1_fp32']:.2f} %), "
              f"{metrics['seconds']:.1f} s, {folder}", flush=True)  # fmt: skip
    reference = [row["classes"] for row in results[0][2]]
    assert all([row["classes"] for row in rows] == reference for _, _, rows, _ in results), "subsets differ"
    command = "python benchmarks/label_aware_resnet20.py" + (f" --test-npz {args.test_npz}" if args.test_npz else "")
    first = results[0][1]
    print(f"\n`{command}` (top-1 on all evaluation images: FP32 {first['val/top1_fp32']:.1f} %, "
          + ", ".join(f"{name} {m['val/top1']:.1f} %" for name, m, _, _ in results) + ")\n")  # fmt: skip
    header = "| subset | classes | mean sym. KL (nats) | images | FP32 % |"
    header += "".join(f" {name} % (drop) |" for name, _, _, _ in results)
    print(header)
    print("|---" * (5 + len(results)) + "|")
    for i, row in enumerate(results[0][2]):
        cells = [
            row["kind"],
            ", ".join(row["names"]),
            f"{row['mean_divergence_nats']:.2f}",
            str(row["images"]),
            f"{row['top1_fp32']:.1f}",
        ]
        for _, _, rows, _ in results:
            cells.append(f"{rows[i]['top1']:.1f} ({round(rows[i]['drop'], 1) + 0.0:.1f})")  # + 0.0: no "-0.0"
        print("| " + " | ".join(cells) + " |")
    if args.figure is not None:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(results[-1][3] / "label_aware.png", args.figure)
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
