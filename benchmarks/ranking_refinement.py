"""Benchmark: ranking-aware refinement of DeiT-Tiny's attention matmul ranges at 4 bits (Liu et al., NeurIPS 2021).

DeiT-Tiny (timm ``deit_tiny_patch16_224`` with ``deit_tiny_patch16_224.pt``) is prepared with the default
:class:`~lit_mpq.quant.apply.QuantSettings` (minmax observers, asymmetric activations, per-channel weights, uniform
softmax levels) and calibrated on 128 images of ``imagenet_sample_1000`` (:class:`~lit_mpq.data.ImageFolderDataModule`,
seeded draw). Every Linear runs at W8A8 and both operands of every attention matmul (q·kᵀ and softmax·V) at 4 bits.
Top-1 is measured on the first 500 images of ``imagenet_val_1300``:

- with the observers' own ranges;
- for each ``--search-ranges`` interval of range factors (default: the paper's ``0.5:1.2``, and ``0.05:1.2``, wide
  enough for the softmax output's optimum at 4 bits), after :func:`~lit_mpq.quant.ranking.refine_attention_ranges`
  (the ranking-aware objective on the first ``--max-images`` calibration images), with the refinement's wall time;
- with ``--ablation``, for each interval, after the same search without the ranking term (``ranking_weight=0``);
- with ``--fp32``, the float model.

Run::

    python benchmarks/ranking_refinement.py [--data-root ../shared/data] [--fp32] [--ablation] [--json out.json]

It prints one line per row (top-1 in %, refinement seconds), then per refinement a table per matmul: the chosen range
factors of the left (``a``: q or the softmax output) and right (``w``: k or v) operands, the objective before and
after, and ``*`` where a factor sits at the edge of the interval. Everything runs on the CPU with ``--threads``
(default 1: on a machine whose cores other jobs share, one thread runs the search's many small operations several
times faster than two). With ``--fp32 --ablation`` it takes about 15 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch
from _runs import imagenet_data
from torch import Tensor, nn

from lit_mpq.quant.apply import (
    QuantSettings,
    apply_plan,
    invalidate_qparams,
    measure_model,
    quantize_model,
    quantizers_mode,
    set_mode,
)
from lit_mpq.quant.ranking import RefinementReport, refine_attention_ranges

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "deit_tiny_patch16_224"


def load_batches(loader, limit: int) -> list[tuple[Tensor, Tensor]]:
    """The loader's first ``limit`` images as ``(images, labels)`` batches, in memory (data loading off the clock)."""
    batches, seen = [], 0
    for x, y in loader:
        keep = min(len(y), limit - seen)
        batches.append((x[:keep], y[:keep]))
        seen += keep
        if seen >= limit:
            break
    return batches


@torch.inference_mode()
def top1(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def print_factors(report: RefinementReport) -> None:
    print(
        f"  {'matmul':<26} {'a bits':>6} {'w bits':>6} {'a factor':>9} {'w factor':>9} {'J before':>9} {'J after':>9}"
    )
    for name, entry in report.matmuls.items():
        factor = {kind: f"{entry.factors.get(kind, 1.0):.3f}{'*' if kind in entry.at_edge else ' '}" for kind in "aw"}
        print(
            f"  {name:<26} {entry.bits['a']!s:>6} {entry.bits['w']!s:>6} {factor['a']:>9} {factor['w']:>9} "
            f"{entry.objective_before:>9.4f} {entry.objective_after:>9.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--matmul-bits", type=int, default=4)
    parser.add_argument("--max-images", type=int, default=16, help="calibration images the search measures on")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--ranking-weight", type=float, default=1.0)
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument("--search-ranges", nargs="+", default=["0.5:1.2", "0.05:1.2"], help="low:high factors")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fp32", action="store_true", help="also evaluate the float model")
    parser.add_argument("--ablation", action="store_true", help="also refine without the ranking term")
    parser.add_argument("--json", type=Path, help="write the rows and the refinement reports here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data_root)

    model = timm.create_model(BACKBONE, pretrained=False)
    model.load_state_dict(torch.load(root / f"{BACKBONE}.pt", weights_only=True))
    model.eval()
    data = imagenet_data(root, BACKBONE, args.calib_images)
    calib = load_batches(data.calib_dataloader(), args.calib_images)
    val = load_batches(data.val_dataloader(), args.val_images)

    quantize_model(model, QuantSettings())
    plan = measure_model(model, calib[0][0][:1])
    set_mode(model, weights="off", activations="observe")
    with torch.inference_mode():
        for x, _ in calib:
            model(x)
    set_mode(model, weights="off", activations="off")
    invalidate_qparams(model)
    for spec, layer in plan.items():
        bits = args.matmul_bits if spec.kind == "matmul" else 8
        layer.w_bits, layer.a_bits = bits, bits
    apply_plan(model, plan)

    rows: list[dict] = []
    reports: dict[str, dict] = {}

    def row(label: str, seconds: float | None = None) -> None:
        start = time.perf_counter()
        accuracy = top1(model, val)
        rows.append({"row": label, "top1": accuracy, "refine_s": seconds, "eval_s": time.perf_counter() - start})
        extra = f", refinement {seconds:.1f} s" if seconds is not None else ""
        print(f"{label:<48} top-1 {accuracy:6.2f} %{extra}", flush=True)

    images = sum(len(y) for _, y in val)
    print(f"{BACKBONE}: Linear W8A8, matmuls at {args.matmul_bits} bits (both operands), {images} val images")
    if args.fp32:
        with quantizers_mode(model, "off"):
            row("FP32")
    row("observer ranges (minmax)")
    settings = {"candidates": args.candidates, "max_images": args.max_images, "margin": args.margin}
    for interval in args.search_ranges:
        low, high = (float(v) for v in interval.split(":"))
        for weight in (args.ranking_weight, 0.0) if args.ablation else (args.ranking_weight,):
            report = refine_attention_ranges(
                model, calib, plan.bits(), ranking_weight=weight, search_range=(low, high), **settings
            )
            label = f"refined [{low}, {high}], " + (f"ranking (gamma={weight})" if weight else "Pearson only")
            reports[label] = report.to_dict()
            row(label, report.seconds)
            print_factors(report)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "reports": reports}, indent=2))


if __name__ == "__main__":
    main()
