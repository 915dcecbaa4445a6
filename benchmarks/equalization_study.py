"""Benchmark: what cross-layer equalization buys, per-tensor and per-channel weights, on the shared CIFAR-10 CNNs.

For ResNet-20 and ShuffleNetV2-0.5x (the shared weights), uniform widths on every layer but the first and last (8
bits), nearest rounding, MSE activation ranges on the first 512 lossless training images, top-1 on the 1,000 lossless
test images; each setting with BatchNorm folded and without equalization, and with ``cross_layer_equalization: 20``
(:mod:`lit_mpq.quant.equalization`). With per-tensor weights a layer whose channels have very different ranges
wastes its grid on the largest (Nagel et al. 2019 report MobileNetV2 at per-tensor INT8 going from 0.1 % to 69.9 %);
per-channel weights leave equalization little to do::

    python benchmarks/equalization_study.py [--models resnet20 shufflenet] [--bits 8 6 4]
        [--granularities per_tensor per_channel]

Run from the repository root; prints a markdown table (about 15 s a row on two cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _runs import quiet_run_args

from lit_mpq.allocation import Uniform
from lit_mpq.callbacks import BitAllocator, Calibration, SensitivityProbe
from lit_mpq.cli import main as cli_main

CONFIG = "configs/resnet20_cifar10.yaml"
MODELS = {
    "resnet20": [],
    "shufflenet": [
        "--model.init_args.backbone=cifar_shufflenetv2_x0_5",
        "--model.init_args.checkpoint_path=../shared/data/cifar10_shufflenetv2_x0_5.pt",
        "--data.init_args.normalization=cifar10_chenyaofo",
    ],
}


def run(model: str, w_bits: int, granularity: str, iterations: int, out: Path) -> dict:
    """One ``validate`` of ``model`` at uniform ``W{w_bits}A8`` (first and last layer 8 bits); top-1 and seconds."""
    cli = cli_main([*quiet_run_args(CONFIG, out), *MODELS[model]], run=False)
    callbacks = cli.trainer.callbacks
    for position, callback in enumerate(list(callbacks)):
        if isinstance(callback, Calibration):
            callbacks[position] = Calibration(
                act_observer="mse",
                weight_granularity=granularity,
                fold_batchnorm=True,
                cross_layer_equalization=iterations,
            )
        if isinstance(callback, BitAllocator):
            callback.policy, callback.first_last_bits = Uniform(w_bits, 8), 8
    callbacks[:] = [callback for callback in callbacks if not isinstance(callback, SensitivityProbe)]
    start = time.perf_counter()
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    pairs = next(c for c in callbacks if isinstance(c, Calibration)).equalized_pairs
    return {"top1": metrics["val/top1"], "pairs": len(pairs), "seconds": time.perf_counter() - start}


def main() -> None:
    """Print the table of the settings asked for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4])
    parser.add_argument("--granularities", nargs="+", default=["per_tensor", "per_channel"])
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/equalization_study"))
    args = parser.parse_args()
    print("| model | weights | W/A | top-1 %, BN folded | top-1 %, + equalization (20 iterations) | pairs | gain |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for granularity in args.granularities:
            for bits in args.bits:
                plain = run(model, bits, granularity, 0, args.out)
                equalized = run(model, bits, granularity, 20, args.out)
                print(
                    f"| {model} | {granularity} | W{bits}A8 | {plain['top1']:.1f} | {equalized['top1']:.1f} | "
                    f"{equalized['pairs']} | {equalized['top1'] - plain['top1']:+.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
