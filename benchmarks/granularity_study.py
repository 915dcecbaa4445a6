"""Benchmark: quantization granularity (issue 8) on DeiT-Tiny and ResNet-20, in one side-by-side table.

Two comparisons, each a coarse and a fine treatment of the same tensors, everything else fixed:

- **weights**: one scale per tensor against one per output channel (symmetric, min/max), at W8A8, W6A6 and W4A8, on
  DeiT-Tiny and ResNet-20 (whose BatchNorm stays unfolded, as in lit_mpq's pipeline: folding scales each output
  channel's weights by its own factor, which typically widens their spread across channels, Nagel et al. 2019, so a
  deployment that folds BatchNorm can lose more per tensor than this table shows);
- **post-LayerNorm activations** (the inputs of DeiT's ``attn.qkv`` and ``mlp.fc1``): one range per tensor against the
  RepQ-ViT reparameterization (``post_layernorm="reparam"``: per-channel min/max ranges folded into the LayerNorm and
  the Linear, per tensor at inference; :mod:`lit_mpq.quant.layernorm`), at W8A6 and W8A4 (every activation at that
  width) and at W8A8 with only the post-LayerNorm inputs at 4 bits (which isolates them), weights per channel. ResNet-20
  has no LayerNorm: n/a.

Activations are asymmetric and per tensor otherwise, with ``--act-observer`` (default ``minmax``, so that the
post-LayerNorm rows compare per-tensor and per-channel min/max ranges: the reparameterization's per-channel ranges
are always min/max); attention matmul operands (q, k, v) are activations at the activation width; the softmax output
has its own quantizer (``--softmax``, default ``log2``: levels down from the observed maximum, nothing clipped) at the
activation width. No bias correction. Activation statistics do not depend on the weight granularity, so each model
is calibrated once, and DeiT's reparameterized quantizers once more (they replace the per-tensor ones of the
post-LayerNorm inputs after the first round of rows; every other range stays as calibrated). Data as in
``benchmarks/clipping_study.py``: DeiT-Tiny calibrated on ``--calibration`` (default 256) images of
``imagenet_sample_1000`` and evaluated on the 1300 images of ``imagenet_val_1300``; ResNet-20 calibrated on the first
512 lossless CIFAR-10 training images and evaluated on the 1000 lossless test images. ``--val-limit`` evaluates an
evenly spaced subset, for quick trials only::

    python benchmarks/granularity_study.py [--models deit resnet20] [--calibration N] [--val-limit N]
        [--act-observer minmax|percentile|mse] [--softmax log2|uniform]

Run from the repository root. Runtime on 2 CPU cores, from the trial runs (``--val-limit 200``, the cores shared with
other jobs at a load of about 6): DeiT-Tiny calibration of 256 images took about 70 s and each quantized evaluation
of 200 images 60-90 s, so the full study (two calibration passes, 13 evaluations of 1300 images) should take about
40 minutes on idle cores and up to 2 hours on loaded ones; ResNet-20 takes 1-2 minutes. It prints a Markdown table:
top-1 % with the change from FP32 in points, for the coarse and the fine treatment, and the gain of the fine one.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from _runs import top1
from clipping_study import MODELS, Setup, calibrate, command_line, evaluate_fp32, prepare
from torch import nn

from lit_mpq.plan import QuantPlan
from lit_mpq.quant.apply import (
    QuantSettings,
    apply_plan,
    apply_post_layernorm,
    invalidate_qparams,
    post_layernorm_layers,
)
from lit_mpq.quant.modules import WeightQuantizer


@dataclass(frozen=True)
class Bits:
    """A uniform bit-width setting; ``post_ln_bits`` overrides the activation width of the post-LayerNorm inputs."""

    w_bits: int
    a_bits: int
    post_ln_bits: int | None = None

    @property
    def label(self) -> str:
        """``W8A6``, or ``W8A8, post-LN A4``."""
        text = f"W{self.w_bits}A{self.a_bits}"
        return f"{text}, post-LN inputs A{self.post_ln_bits}" if self.post_ln_bits is not None else text


WEIGHT_ROWS = [Bits(8, 8), Bits(6, 6), Bits(4, 8)]
LAYERNORM_ROWS = [Bits(8, 6), Bits(8, 4), Bits(8, 8, post_ln_bits=4)]
WEIGHT_STUDY = ("weights", "per-tensor", "per-channel")
LAYERNORM_STUDY = ("post-LayerNorm activations", "per-tensor", "RepQ-ViT reparam")


def apply_bits(model: nn.Module, plan: QuantPlan, bits: Bits, post_ln: set[str]) -> None:
    """Every row at ``bits``; attention matmul operands are activations (both at ``a_bits``)."""
    allocation = {}
    for name, spec in plan.specs.items():
        a_bits = bits.post_ln_bits if bits.post_ln_bits is not None and name in post_ln else bits.a_bits
        allocation[name] = (bits.a_bits if spec.kind == "matmul" else bits.w_bits, a_bits)
    plan.set_bits(allocation)
    apply_plan(model, plan)


def set_weight_granularity(model: nn.Module, granularity: str) -> None:
    """Switch every weight quantizer to ``"per_channel"`` or ``"per_tensor"`` (weights need no calibration)."""
    for quantizer in model.modules():
        if isinstance(quantizer, WeightQuantizer):
            quantizer.per_channel = granularity == "per_channel"
    invalidate_qparams(model)


def timed_top1(setup: Setup, what: str) -> float:
    """Top-1 on the evaluation images, printed with its wall time."""
    start = time.perf_counter()
    result = top1(setup.model, setup.validation)
    print(f"[{setup.title}] {what}: {result:.1f} % ({time.perf_counter() - start:.0f} s)", flush=True)
    return result


def reparameterize(setup: Setup) -> list[str]:
    """Replace the post-LayerNorm input quantizers by RepQ-ViT ones and calibrate those only; returns their layers.

    Every other quantizer keeps the statistics of the first calibration pass (same images), so the post-LayerNorm
    rows differ in the post-LayerNorm inputs alone.
    """
    names = apply_post_layernorm(setup.model, setup.example)
    quantizers = [setup.model.get_submodule(name).input_quantizer for name in names]
    seconds = calibrate(setup, only=quantizers)
    print(f"[{setup.title}] reparameterized and calibrated {len(names)} post-LayerNorm inputs in {seconds:.0f} s")
    return names


def study(setup: Setup, args: argparse.Namespace) -> dict[tuple[str, str], dict[str, float]]:
    """``{(comparison, bits label): {treatment: top-1}}`` for this model."""
    settings = QuantSettings(
        act_observer=args.act_observer,
        percentile=args.percentile,
        weight_granularity="per_channel",
        softmax_quantizer=args.softmax,
        post_layernorm="per_tensor",
    )
    plan = prepare(setup, settings)
    post_ln = set(post_layernorm_layers(setup.model, setup.example))
    seconds = calibrate(setup)
    print(f"[{setup.title}] calibrated on {len(setup.calibration.dataset)} images in {seconds:.0f} s", flush=True)
    evaluate_fp32(setup)
    print(f"[{setup.title}] FP32 {setup.fp32:.1f} %", flush=True)

    results: dict[tuple[str, str], dict[str, float]] = {}
    comparison, coarse, fine = WEIGHT_STUDY
    for bits in WEIGHT_ROWS:
        row = results.setdefault((comparison, bits.label), {})
        for treatment, granularity in ((coarse, "per_tensor"), (fine, "per_channel")):
            set_weight_granularity(setup.model, granularity)
            apply_bits(setup.model, plan, bits, post_ln)
            row[treatment] = timed_top1(setup, f"{bits.label} weights {granularity}")
    set_weight_granularity(setup.model, "per_channel")
    if not post_ln:
        setup.notes.append(f"{setup.title}: no Linear fed by a LayerNorm, post-LayerNorm rows n/a")
        return results

    comparison, coarse, fine = LAYERNORM_STUDY
    for bits in LAYERNORM_ROWS:
        apply_bits(setup.model, plan, bits, post_ln)
        results[(comparison, bits.label)] = {coarse: timed_top1(setup, f"{bits.label} post-LN per tensor")}
    names = reparameterize(setup)
    assert set(names) == post_ln, "the reparameterized layers are the post-LayerNorm layers found before"
    for bits in LAYERNORM_ROWS:
        apply_bits(setup.model, plan, bits, post_ln)
        results[(comparison, bits.label)][fine] = timed_top1(setup, f"{bits.label} post-LN reparam")
    setup.notes.append(f"{setup.title}: {len(post_ln)} post-LayerNorm inputs ({', '.join(sorted(post_ln)[:2])}, ...)")
    return results


def cell(results: dict[str, float], treatment: str, fp32: float) -> str:
    """``top-1 (drop)``, or n/a."""
    if treatment not in results:
        return "n/a"
    return f"{results[treatment]:.1f} ({results[treatment] - fp32:+.1f})"


def table(setups: list[Setup], results: dict[str, dict[tuple[str, str], dict[str, float]]]) -> str:
    """Markdown: one row per (comparison, bits), per model the coarse and fine top-1 (drop) and the gain."""
    head = ["comparison", "bits"]
    for setup in setups:
        head += [f"{setup.title} coarse", f"{setup.title} fine", f"{setup.title} gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp32 = ["FP32", "-"]
    for setup in setups:
        fp32 += [f"{setup.fp32:.1f}", f"{setup.fp32:.1f}", "-"]
    lines.append("| " + " | ".join(fp32) + " |")
    for (comparison, coarse, fine), rows in ((WEIGHT_STUDY, WEIGHT_ROWS), (LAYERNORM_STUDY, LAYERNORM_ROWS)):
        for bits in rows:
            cells = [f"{comparison}: {coarse} → {fine}", bits.label]
            for setup in setups:
                row = results[setup.key].get((comparison, bits.label), {})
                gain = f"{row[fine] - row[coarse]:+.1f}" if coarse in row and fine in row else "n/a"
                cells += [cell(row, coarse, setup.fp32), cell(row, fine, setup.fp32), gain]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--calibration", type=int, default=None, help="calibration images (default: DeiT 256, ResNet-20 512)"
    )
    parser.add_argument("--val-limit", type=int, default=None, help="evaluate N evenly spaced images (trials only)")
    parser.add_argument("--act-observer", choices=["minmax", "percentile", "mse"], default="minmax")
    parser.add_argument("--percentile", type=float, default=99.99, help="with --act-observer percentile")
    parser.add_argument("--softmax", choices=["log2", "uniform", "log_sqrt2"], default="log2")
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()

    start = time.perf_counter()
    setups, results = [], {}
    for key in args.models:
        setup = MODELS[key](args)
        results[key] = study(setup, args)
        setups.append(setup)
    print(f"\n`{command_line()}`\n")
    sizes = ", ".join(f"{s.title} {sum(len(y) for _, y in s.validation)}" for s in setups)
    print(
        f"Top-1 % (change from FP32 in points); coarse = per-tensor, fine = per-channel weights or the RepQ-ViT "
        f"post-LayerNorm reparameterization; gain = fine - coarse in points. Activations: {args.act_observer} "
        f"ranges, softmax output {args.softmax}. Evaluation images: {sizes}.\n"
    )
    print(table(setups, results))
    print()
    for setup in setups:
        for note in setup.notes:
            print(f"- {note}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
