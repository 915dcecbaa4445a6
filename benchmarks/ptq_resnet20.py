"""Benchmark: post-training quantization of the shared CIFAR-10 ResNet-20 under several allocations.

Calibrates on the first 512 images of ``cifar10_train_4k_lossless.npz``, evaluates on all 1000 images of
``cifar10_test_1k_lossless.npz`` (FP32: 91.5 %), and prints one table row per setting with top-1, analytic
energy (Horowitz 45 nm) and weight size, all measured in this one run::

    python benchmarks/ptq_resnet20.py [--shared ../shared/data] [--backbone cifar_resnet20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl

from lit_mpq.allocation import Policy, SensitivityPercentile, Uniform
from lit_mpq.callbacks import BitAllocator, Calibration, EnergyMeter, Report, SensitivityProbe
from lit_mpq.data import CIFARDataModule
from lit_mpq.module import MPQModule

PCT = {"act_observer": "percentile"}
BC = {"act_observer": "percentile", "bias_correction": True}
SETTINGS: list[tuple[str, dict, Policy | None, bool]] = [
    # name, Calibration kwargs, policy (None = FP32), needs a sensitivity probe
    ("FP32", {}, None, False),
    ("uniform W8A8, minmax W", PCT, Uniform(8, 8), False),
    ("uniform W8A8, minmax W + bias corr.", BC, Uniform(8, 8), False),
    ("uniform W4A8, minmax W", PCT, Uniform(4, 8), False),
    ("uniform W4A8, mse W", {**PCT, "weight_observer": "mse"}, Uniform(4, 8), False),
    ("uniform W4A8, minmax W + bias corr.", BC, Uniform(4, 8), False),
    ("seed percentile rule W4/6/8 A8", PCT, SensitivityPercentile(target="w", a_bits=8), True),
    ("seed percentile rule W4/6/8 A8 + bias corr.", BC, SensitivityPercentile(target="w", a_bits=8), True),
    ("uniform W4A4, minmax A + bias corr.", {"act_observer": "minmax", "bias_correction": True}, Uniform(4, 4), False),
    ("uniform W4A4, mse A + bias corr.", {"act_observer": "mse", "bias_correction": True}, Uniform(4, 4), False),
]


def run(name: str, calib: dict, policy: Policy | None, probe: bool, args: argparse.Namespace) -> dict:
    pl.seed_everything(0, verbose=False)
    shared = Path(args.shared)
    module = MPQModule(
        backbone=args.backbone, checkpoint_path=str(shared / f"cifar10_{args.backbone.split('_')[-1]}.pt"),
        fp32_reference=False,
    )
    data = CIFARDataModule(
        train_npz=str(shared / "cifar10_train_4k_lossless.npz"), test_npz=str(shared / "cifar10_test_1k_lossless.npz"),
        batch_size=250, num_calibration_samples=512, calibration_subset="first",
    )
    callbacks: list[pl.Callback] = []
    if policy is not None:
        callbacks.append(Calibration(**calib))
        if probe:
            callbacks.append(SensitivityProbe(candidate_bits=[4, 6, 8]))
        callbacks += [BitAllocator(policy=policy), EnergyMeter(), Report(output_dir=str(args.out / f"setting_{len(callbacks)}"), save_figures=False)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False)
    start = time.perf_counter()
    metrics = trainer.validate(module, data, verbose=False)[0]
    row = {"setting": name, "top1": 100 * metrics["val/top1"], "seconds": time.perf_counter() - start}
    if policy is not None:
        row.update(
            energy_uj=metrics["energy/analytic_uj_per_image"],
            rel_int8=metrics["energy/relative_to_int8"],
            avg_w=metrics["bits/avg_weight"],
            avg_a=metrics["bits/avg_act"],
            size_kb=1000 * metrics["size/weights_mb"],
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--backbone", default="cifar_resnet20")
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/ptq_resnet20"))
    args = parser.parse_args()
    rows = [run(*setting, args) for setting in SETTINGS]
    print(f"\n`python benchmarks/ptq_resnet20.py`: {args.backbone}, CIFAR-10 lossless 1k test, calibration: first 512 lossless train images\n")
    print("| setting | top-1 % | energy µJ/img | rel. W8A8 | avg W bits | avg A bits | weights kB | time s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "energy_uj" in r:
            print(f"| {r['setting']} | {r['top1']:.1f} | {r['energy_uj']:.2f} | {r['rel_int8']:.3f} | {r['avg_w']:.2f} "
                  f"| {r['avg_a']:.2f} | {r['size_kb']:.1f} | {r['seconds']:.1f} |")
        else:
            print(f"| {r['setting']} | {r['top1']:.1f} | – | – | 32 | 32 | – | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
