"""Benchmark: post-training quantization of the shared CIFAR-10 ResNet-20 with ``configs/resnet20_cifar10.yaml``.

Every row is the config's own pipeline (calibration on the first 512 images of ``cifar10_train_4k_lossless.npz``,
evaluation on all 1000 images of ``cifar10_test_1k_lossless.npz``, FP32 91.5 %) with the allocation policy, and
for the ablation rows the calibration settings, swapped; all rows are measured in this one run::

    python benchmarks/ptq_resnet20.py [--config configs/resnet20_cifar10.yaml]

It prints a Markdown table: top-1, analytic energy (Horowitz 45 nm, µJ per image), energy relative to uniform
W8A8, average bits, weight size, and wall time of the whole validate call.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from _runs import quiet_run_args

from lit_mpq.allocation import Policy, SensitivityPercentile, Uniform
from lit_mpq.callbacks import BitAllocator, Calibration
from lit_mpq.cli import main as cli_main

NO_BC = {"bias_correction": False}
SEED_RULE = SensitivityPercentile(percentiles=[25, 75], bits=[4, 6, 8], target="w", a_bits=8)
ROWS: list[tuple[str, Policy, dict]] = [
    # name, policy, Calibration settings changed from the config's
    ("uniform W8A8", Uniform(8, 8), {}),
    ("uniform W4A8 (per-channel W)", Uniform(4, 8), {}),
    ("seed percentile rule W4/6/8, A8", SEED_RULE, {}),
    ("ablation: W4A8, no bias correction", Uniform(4, 8), NO_BC),
    ("ablation: W4A8, MSE weights, no bias corr.", Uniform(4, 8), {**NO_BC, "weight_observer": "mse"}),
    (
        "ablation: seed rule, percentile A, no bias corr.",
        SEED_RULE,
        {**NO_BC, "act_observer": "percentile"},
    ),
    ("uniform W4A4", Uniform(4, 4), {}),
    (
        "uniform W4A4, min/max A, no bias corr. (naive)",
        Uniform(4, 4),
        {**NO_BC, "act_observer": "minmax"},
    ),
]


def run(config: str, policy: Policy, calibration: dict, out: Path) -> dict:
    cli = cli_main(
        [
            *quiet_run_args(config, out),
        ],
        run=False,
    )
    for callback in cli.trainer.callbacks:
        if isinstance(callback, BitAllocator):
            callback.policy = policy
        if isinstance(callback, Calibration):
            callback.settings = dataclasses.replace(callback.settings, **calibration)
    start = time.perf_counter()
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    return {
        "top1": metrics["val/top1"],  # percent
        "top1_fp32": metrics["val/top1_fp32"],
        "energy_uj": metrics["energy/analytic_uj_per_image"],
        "rel_int8": metrics["energy/relative_to_int8"],
        "avg_w": metrics["bits/avg_weight"],
        "avg_a": metrics["bits/avg_act"],
        "size_kb": 1000 * metrics["size/weights_mb"],
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/resnet20_cifar10.yaml")
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/ptq_resnet20"))
    args = parser.parse_args()
    results = [
        (name, run(args.config, policy, calib, args.out / f"row{i}")) for i, (name, policy, calib) in enumerate(ROWS)
    ]
    print(f"\n`python benchmarks/ptq_resnet20.py --config {args.config}` (CIFAR-10 lossless 1k test set)\n")
    print("| setting | top-1 % | energy µJ/img | rel. W8A8 | avg W bits | avg A bits | weights kB | time s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| FP32 reference | {results[0][1]['top1_fp32']:.1f} | – | – | 32 | 32 | – | – |")
    for name, r in results:
        print(
            f"| {name} | {r['top1']:.1f} | {r['energy_uj']:.2f} | {r['rel_int8']:.3f} | {r['avg_w']:.2f} "
            f"| {r['avg_a']:.2f} | {r['size_kb']:.1f} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
