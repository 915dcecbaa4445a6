"""Benchmark: how far each sensitivity metric can be trusted (Kendall's tau against measured accuracy drops).

For each model, every layer is quantized alone (weights, or its input activations) at each probed bit width, and
the top-1 drop is measured on the 10,000 CIFAR-10 test images of ``cifar10_test_jpeg10k.npz`` (JPEG-degraded, so
only drops relative to FP32 on the same file are used: a single layer at 3-4 bits moves the 1000-image lossless
set by less than its 0.1-point resolution); Kendall's tau (tau-b) between a metric's scores ``S[layer, bits]`` and
those drops, over all layer x bits pairs per tensor kind, says how well the metric ranks what actually hurts.
Calibration and probing use the first 512 lossless training images. Uses the pure-PyTorch API (no Trainer)::

    python benchmarks/sensitivity_trust.py [--models cifar_resnet20 cifar_resnet32] [--bits 2 3 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau

from lit_mpq.data import CIFARDataModule
from lit_mpq.models import create_backbone
from lit_mpq.quant import QuantSettings, quant_layers, quantize_model, quantizers_mode, set_mode
from lit_mpq.sensitivity import SENSITIVITY_METRICS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@torch.no_grad()
def top1(model: torch.nn.Module, loader) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(-1) == y).sum())
        total += int(y.numel())
    return 100.0 * correct / total


def measured_drops(model, loader, bits_list: list[int]) -> dict[str, dict[str, dict[int, float]]]:
    """Top-1 drop with one quantizer on at a time."""
    with quantizers_mode(model, "off"):
        reference = top1(model, loader)
    drops: dict[str, dict[str, dict[int, float]]] = {}
    for name, layer in quant_layers(model).items():
        drops[name] = {"w": {}, "a": {}}
        for kind, quantizer in (("w", layer.weight_quantizer), ("a", layer.input_quantizer)):
            saved = quantizer.bits
            for bits in bits_list:
                with quantizers_mode(model, "off"):
                    quantizer.mode, quantizer.bits = "quant", bits
                    drops[name][kind][bits] = reference - top1(model, loader)
            quantizer.mode, quantizer.bits = "off", saved
    return drops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet32"])
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument("--kl-samples", type=int, default=256)
    parser.add_argument("--eval-file", default="cifar10_test_jpeg10k.npz")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for backbone in args.models:
        model = create_backbone(backbone, checkpoint_path=str(SHARED / f"cifar10_{backbone.split('_')[-1]}.pt")).eval()
        data = CIFARDataModule(
            train_npz=str(SHARED / "cifar10_train_4k_lossless.npz"),
            test_npz=str(SHARED / args.eval_file),
            batch_size=256,
            num_calibration_samples=512,
            calibration_subset="first",
        )
        data.setup("validate")
        calib = [x for x, _ in data.calib_dataloader()]
        quantize_model(model, QuantSettings(act_observer="mse"))
        set_mode(model, weights="off", activations="observe")
        with torch.no_grad():
            for x in calib:
                model(x)
        set_mode(model, weights="off", activations="off")
        drops = measured_drops(model, data.val_dataloader(), args.bits)
        for metric, (probe, transform) in SENSITIVITY_METRICS.items():
            batches = calib if metric != "kl" else [x[: args.kl_samples] for x in calib[:1]]
            start = time.perf_counter()
            stats = probe(model, batches, args.bits)
            seconds = time.perf_counter() - start
            scores = stats.scores(transform)
            taus = {}
            for kind in ("w", "a"):
                s = [scores[n][kind][b] for n in scores for b in args.bits]
                d = [drops[n][kind][b] for n in scores for b in args.bits]
                taus[kind] = kendalltau(s, d).statistic
            pairs = [(scores[n][k][b], drops[n][k][b]) for n in scores for k in ("w", "a") for b in args.bits]
            taus["both"] = kendalltau(*zip(*pairs, strict=True)).statistic
            images = sum(int(x.shape[0]) for x in batches)
            rows.append((backbone, metric, taus["w"], taus["a"], taus["both"], seconds, images))
    print(
        f"\n`python benchmarks/sensitivity_trust.py --bits {' '.join(map(str, args.bits))}`: Kendall's tau between "
        f"S[layer, bits] and the measured top-1 drop of quantizing that layer alone ({args.eval_file})\n"
    )
    print("| model | metric | tau weights | tau activations | tau both | probe s | probe images |")
    print("|---|---|---|---|---|---|---|")
    for backbone, metric, tw, ta, tb, seconds, images in rows:
        print(f"| {backbone} | {metric} | {tw:.3f} | {ta:.3f} | {tb:.3f} | {seconds:.1f} | {images} |")


if __name__ == "__main__":
    main()
