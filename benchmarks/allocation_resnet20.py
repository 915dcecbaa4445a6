"""Benchmark: allocation policies on the shared ResNet-20 at the analytic energy of uniform W4A4.

Rows, all from ``configs/resnet20_cifar10.yaml``'s pipeline (calibration on the first 512 lossless training images,
evaluation on the 1000 lossless test images, FP32 91.5 %) with the policy and the probe's metric swapped:
uniform W4A4; the seed percentile rule (at its own energy); the mean of 5 random allocations at the W4A4 energy;
and the exact solver (``ExactAllocation``, energy <= uniform W4A4) with each sensitivity metric. A second table
gives each probe's cost in plain FP32 passes over the same calibration images, measured in the same run::

    python benchmarks/allocation_resnet20.py [--config configs/resnet20_cifar10.yaml] [--random 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _runs import quiet_run_args

from lit_mpq.allocation import ExactAllocation, Policy, RandomAllocation, SensitivityPercentile, Uniform
from lit_mpq.callbacks import BitAllocator, Calibration, SensitivityProbe
from lit_mpq.cli import main as cli_main
from lit_mpq.quant import quantizers_mode

W_CANDIDATES = [2, 3, 4, 6, 8]
A_CANDIDATES = [3, 4, 6, 8]
PROBE_BITS = sorted(set(W_CANDIDATES) | set(A_CANDIDATES))


def build(config: str, out: Path, metric: str, policy: Policy, first_last_bits: int | None):
    cli = cli_main(
        [
            *quiet_run_args(config, out),
            "--model.init_args.fp32_reference=false",
        ],
        run=False,
    )
    for callback in cli.trainer.callbacks:
        if isinstance(callback, SensitivityProbe):
            callback.metric, callback.candidate_bits = metric, PROBE_BITS
            callback.num_samples = 256 if metric == "kl" else None
            callback.cache_dir = str(out / "probe_cache")
        if isinstance(callback, BitAllocator):
            callback.policy, callback.first_last_bits = policy, first_last_bits
    return cli


def evaluate(config: str, out: Path, metric: str, policy: Policy, first_last_bits: int | None = None) -> dict:
    cli = build(config, out, metric, policy, first_last_bits)
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    sensitivity = cli.model.record.sensitivity
    return {
        "top1": metrics["val/top1"],  # percent
        "energy": metrics["energy/analytic_uj_per_image"],
        "avg_w": metrics["bits/avg_weight"],
        "avg_a": metrics["bits/avg_act"],
        "probe_s": sensitivity.seconds if sensitivity is not None else float("nan"),
        "cache": sensitivity.cache if sensitivity is not None else None,
    }


def probe_costs(config: str, out: Path, metrics: list[tuple[str, dict]]) -> list[tuple[str, float, float]]:
    """Wall time of each probe and of one plain FP32 pass over the same calibration images, same process."""
    cli = build(config, out, "output_l2", Uniform(8, 8), None)
    trainer, module = cli.trainer, cli.model
    cli.datamodule.setup("validate")
    trainer.strategy.connect(module)
    for callback in trainer.callbacks:
        if isinstance(callback, Calibration):
            callback.setup(trainer, module, "validate")
    trainer.datamodule = cli.datamodule  # what the callbacks read
    calibration = next(cb for cb in trainer.callbacks if isinstance(cb, Calibration))
    calibration.on_validation_start(trainer, module)
    batches = [x for x, _ in cli.datamodule.calib_dataloader()]
    from lit_mpq.sensitivity import SENSITIVITY_METRICS

    rows = []
    with torch.no_grad(), quantizers_mode(module.model, "off"):
        module(batches[0])  # warm-up
        start = time.perf_counter()
        for x in batches:
            module(x)
        fp32 = time.perf_counter() - start
    for metric, options in metrics:
        probe, _ = SENSITIVITY_METRICS[metric]
        start = time.perf_counter()
        probe(module.model, batches, PROBE_BITS, **options)
        seconds = time.perf_counter() - start
        label = metric + "".join(f", {k}={v}" for k, v in options.items())
        rows.append((label, seconds, seconds / fp32))
    return [("plain FP32 pass", fp32, 1.0), *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/resnet20_cifar10.yaml")
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/allocation_resnet20"))
    parser.add_argument("--random", type=int, default=5)
    parser.add_argument("--first-last-bits", type=int, default=None)
    parser.add_argument("--costs-only", action="store_true", help="only the probe-cost table")
    args = parser.parse_args()
    if args.costs_only:
        print_costs(args)
        return
    budget = {"energy_relative_to": "W4A4", "w_candidates": W_CANDIDATES, "a_candidates": A_CANDIDATES}
    rows = [
        ("uniform W4A4", evaluate(args.config, args.out, "output_l2", Uniform(4, 4))),
        (
            "seed percentile rule W4/6/8 A8 (own energy)",
            evaluate(args.config, args.out, "output_l2", SensitivityPercentile(target="w", a_bits=8)),
        ),
    ]
    randoms = [
        evaluate(args.config, args.out, "output_l2", RandomAllocation(seed=i, **budget)) for i in range(args.random)
    ]
    rows.append(
        (
            f"random allocations, mean of {args.random} (min-max top-1 "
            f"{min(r['top1'] for r in randoms):.1f}-{max(r['top1'] for r in randoms):.1f})",
            {k: statistics.mean(r[k] for r in randoms) for k in ("top1", "energy", "avg_w", "avg_a")}
            | {"probe_s": float("nan"), "cache": None},
        )
    )
    for metric in ("output_l2", "output_l2_normalized", "fisher", "kl"):
        rows.append(
            (
                f"exact solver, {metric}",
                evaluate(args.config, args.out, metric, ExactAllocation(**budget), args.first_last_bits),
            )
        )
    print(
        f"\n`python benchmarks/allocation_resnet20.py --random {args.random}`: ResNet-20, CIFAR-10 lossless 1k test, "
        f"budget = analytic energy of uniform W4A4; W candidates {W_CANDIDATES}, A candidates {A_CANDIDATES}\n"
    )
    print("| policy | top-1 % | energy µJ/img | avg W bits | avg A bits |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['top1']:.1f} | {r['energy']:.2f} | {r['avg_w']:.2f} | {r['avg_a']:.2f} |")
    print_costs(args)


def print_costs(args: argparse.Namespace) -> None:
    probes = [("output_l2", {}), ("output_l2", {"subsample": 2}), ("fisher", {}), ("fisher", {"subsample": 2})]
    costs = probe_costs(args.config, args.out, probes)
    k = len(PROBE_BITS)
    print(
        f"\nProbe cost, all layers x {k} candidate bit widths x (weights, activations), 512 calibration images; "
        f"the goal is <= K + 2 = {k + 2} FP32 passes\n"
    )
    print("| pass | seconds | FP32 passes |")
    print("|---|---|---|")
    for name, seconds, ratio in costs:
        print(f"| {name} | {seconds:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
