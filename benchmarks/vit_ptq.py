"""Benchmark: DeiT-Tiny and ViT-Tiny post-training quantization on real ImageNet images, attention included.

Every row runs the pipeline of ``configs/deit.yaml`` / ``configs/vit_tiny.yaml`` through the CLI (calibration on
``--calibration`` images of ``imagenet_sample_1000``, evaluation on all 1,300 images of ``imagenet_val_1300``), with
every Linear layer **and both attention matmuls** (q·kᵀ and softmax·V) quantized; only the policy and the quantizer
settings change:

- FP32, then uniform W8A8, W6A6, W4A8 and W4A4 with the recipe (the config's calibration settings), the patch
  embedding and the head at W8A8 as the configs pin them (``first_last_bits: 8``, the convention of PTQ4ViT and
  RepQ-ViT);
- the exact allocator (``ExactAllocation``, Fisher sensitivities) at the analytic energy of uniform W4A4, with
  candidates 3, 4, 6 and 8 bits, and again with activations kept at 4 bits or more;
- rounding: the W4 rows and the allocator with every weight rounded by GPTQ (``WeightRounding``, issue 9) instead of to
  nearest, on the calibration images, the allocator again at the uniform W4A4 row's own energy (which keeps the patch
  embedding and head at W8A8, where ``energy_relative_to="W4A4"`` charges them 4 bits), that row with 5-bit
  candidates, uniform W4A4 and that row with the block-output range search (``BlockRangeSearch`` on 32 images, float
  weights, before GPTQ), and uniform W4A8 and the allocator without 3-bit activations with GPFQ;
- ablations: each of the recipe's ViT-specific parts (softmax levels: log√2 below 6 bits and uniform from 6 up,
  against log√2 or uniform at every width; the RepQ-ViT post-LayerNorm reparameterization; the ranking-aware
  refinement of the attention ranges) switched off, one at a time, at W6A6 and W4A4.

Each row prints top-1 (percent), analytic energy (µJ/image, the config's energy model), parameter-weighted weight bits,
element-weighted activation bits (matmul operands included) and the wall time of the whole ``validate`` call::

    python benchmarks/vit_ptq.py [--models deit vit] [--calibration 256] [--rows main|rounding|ablations|all]
        [--only REGEX]

``--only`` keeps the rows whose name matches a regular expression (``re.search``), e.g. ``--only 'W8A8|W6A6'``.

On two CPU cores a row takes two to four minutes (one calibration pass, one quantized evaluation of 1,300 images).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import time
from pathlib import Path

from _runs import quiet_run_args

from lit_mpq.allocation import ExactAllocation, Policy, Uniform
from lit_mpq.callbacks import BitAllocator, BlockRangeSearch, Calibration, SensitivityProbe, WeightRounding
from lit_mpq.cli import main as cli_main

CONFIGS = {"deit": "configs/deit.yaml", "vit": "configs/vit_tiny.yaml"}
W_CANDIDATES = [3, 4, 6, 8]
A_CANDIDATES = [3, 4, 6, 8]
TUNING_CALLBACKS = ("BitAllocator", "AttentionRefinement")
UNIFORM_W4A4_ROW_UJ = 1055.1
"""Analytic energy (µJ/image) of the uniform W4A4 row: every tensor at W4A4 but the patch embedding and head at W8A8."""
ABLATIONS = {
    "softmax log√2 at every width": {"softmax_uniform_from_bits": None},
    "softmax uniform at every width": {"softmax_quantizer": "uniform", "softmax_uniform_from_bits": None},
    "LayerNorm per tensor": {"post_layernorm": "per_tensor"},
    "no ranking refinement": {"refine": False},
}


def run(config: str, out: Path, policy: Policy, calibration: int, fp32: bool, **changes) -> dict:
    """One ``validate`` of ``config`` with ``policy`` and the calibration settings changed by ``changes``."""
    cli = cli_main(
        [
            *quiet_run_args(config, out),
            f"--model.init_args.fp32_reference={str(fp32).lower()}",
            f"--data.init_args.num_calibration_samples={calibration}",
        ],
        run=False,
    )
    refine = changes.pop("refine", None)
    rounding = changes.pop("rounding", None)
    block_ranges = changes.pop("block_ranges", None)
    callbacks = cli.trainer.callbacks
    if rounding is not None:  # after the allocation and the attention ranges' refinement, before the evaluation
        after = max(i for i, cb in enumerate(callbacks) if type(cb).__name__ in ("BitAllocator", "AttentionRefinement"))
        rounding_args = {"method": rounding} if isinstance(rounding, str) else dict(rounding)
        callbacks.insert(after + 1, WeightRounding(**rounding_args))
    if block_ranges is not None:  # before the rounding, which then rounds for the ranges searched (and the fold's)
        after = max(i for i, cb in enumerate(callbacks) if type(cb).__name__ in TUNING_CALLBACKS)
        callbacks.insert(after + 1, BlockRangeSearch(num_samples=block_ranges, float_weights=True))
    for callback in list(callbacks):
        if isinstance(callback, Calibration):
            callback.settings = dataclasses.replace(callback.settings, **changes)
        if isinstance(callback, BitAllocator):
            callback.policy = policy  # the config's first_last_bits (8) stays: patch embedding and head at W8A8
        if isinstance(callback, SensitivityProbe):
            if policy.requires_sensitivity:
                widths = set(getattr(policy, "w_candidates", W_CANDIDATES)) | set(getattr(policy, "a_candidates", []))
                callback.metric, callback.candidate_bits = "fisher", sorted(widths)
            else:
                callbacks.remove(callback)  # nothing reads its scores: do not pay for it
        if type(callback).__name__ == "AttentionRefinement" and refine is False:
            callbacks.remove(callback)
    start = time.perf_counter()
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    return {
        "top1": metrics["val/top1"],
        "fp32": metrics.get("val/top1_fp32"),
        "energy": metrics["energy/analytic_uj_per_image"],
        "avg_w": metrics["bits/avg_weight"],
        "avg_a": metrics["bits/avg_act"],
        "seconds": time.perf_counter() - start,
    }


def jobs(rows: str) -> list[tuple[str, Policy, dict]]:
    """The (row name, policy, calibration changes) of a lane: ``main``, ``rounding``, ``ablations`` or ``all``."""
    main_rows = [(f"uniform W{w}A{a}", Uniform(w, a), {}) for w, a in ((8, 8), (6, 6), (4, 8), (4, 4))]
    budget = ExactAllocation(energy_relative_to="W4A4", w_candidates=W_CANDIDATES, a_candidates=A_CANDIDATES)
    main_rows.append(("exact allocator, energy <= uniform W4A4", budget, {}))
    # 3-bit activations compound through twelve blocks in a way no sum of single-tensor scores sees: without them
    no_a3 = ExactAllocation(energy_relative_to="W4A4", w_candidates=W_CANDIDATES, a_candidates=[4, 6, 8])
    main_rows.append(("exact allocator, energy <= uniform W4A4, activations >= 4 bits", no_a3, {}))
    same_as_row = ExactAllocation(energy_uj=UNIFORM_W4A4_ROW_UJ, w_candidates=W_CANDIDATES, a_candidates=[4, 6, 8])
    gptq = {"rounding": "gptq"}
    # AdaRound on GPTQ's objective: at 4-bit activations a ViT's quantized inputs drift too far for a float target
    adaround = {"rounding": {"method": "adaround", "adaround_target": "quantized", "adaround_iterations": 2000}}
    with_5 = ExactAllocation(energy_uj=UNIFORM_W4A4_ROW_UJ, w_candidates=[3, 4, 5, 6, 8], a_candidates=[4, 5, 6, 8])
    rounding_rows = [
        ("uniform W4A8, GPTQ", Uniform(4, 8), {"rounding": "gptq"}),
        ("uniform W4A4, GPTQ", Uniform(4, 4), {"rounding": "gptq"}),
        ("exact allocator, energy <= uniform W4A4, GPTQ", budget, {"rounding": "gptq"}),
        ("exact allocator, energy <= uniform W4A4, activations >= 4 bits, GPTQ", no_a3, {"rounding": "gptq"}),
        # the uniform W4A4 row keeps the patch embedding and head at W8A8 (1055.1 µJ/img, deterministic: the Horowitz
        # model on DeiT-Tiny's and ViT-Tiny's shared plan shape), while energy_relative_to="W4A4" charges them 4 bits
        # (1010.8): the same budget as the uniform row it is compared with
        ("exact allocator, energy <= the uniform W4A4 row's, activations >= 4 bits, GPTQ", same_as_row, gptq),
        ("uniform W4A4, GPTQ, block ranges", Uniform(4, 4), {"rounding": "gptq", "block_ranges": 32}),
        (
            "exact allocator, energy <= the uniform W4A4 row's, activations >= 4 bits, GPTQ, block ranges",
            same_as_row,
            {"rounding": "gptq", "block_ranges": 32},
        ),
        # 5 bits as a candidate: a tensor that needs more than 4 bits need not pay for 6
        (
            "exact allocator, energy <= the uniform W4A4 row's, candidates with 5 bits, activations >= 4 bits, GPTQ",
            with_5,
            gptq,
        ),
        ("uniform W4A4, AdaRound (GPTQ's objective), block ranges", Uniform(4, 4), {**adaround, "block_ranges": 32}),
        (
            "exact allocator, energy <= the uniform W4A4 row's, activations >= 4 bits, AdaRound (GPTQ's objective), "
            "block ranges",
            same_as_row,
            {**adaround, "block_ranges": 32},
        ),
        ("uniform W4A8, GPFQ", Uniform(4, 8), {"rounding": "gpfq"}),
        ("exact allocator, energy <= uniform W4A4, activations >= 4 bits, GPFQ", no_a3, {"rounding": "gpfq"}),
    ]
    ablation_rows = [
        (f"uniform W{w}A{a}, {name}", Uniform(w, a), dict(change))
        for w, a in ((6, 6), (4, 4))
        for name, change in ABLATIONS.items()
    ]
    lanes = {"main": main_rows, "ablations": ablation_rows, "rounding": rounding_rows}
    return {**lanes, "all": main_rows + rounding_rows + ablation_rows}[rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--rows", choices=["main", "ablations", "rounding", "all"], default="all")
    parser.add_argument("--only", default=None, help="keep the rows whose name matches this regular expression")
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/vit_ptq"))
    args = parser.parse_args()
    selected = [job for job in jobs(args.rows) if args.only is None or re.search(args.only, job[0])]
    if not selected:
        parser.error(
            f"--only {args.only!r} matches none of the {args.rows!r} rows: {[job[0] for job in jobs(args.rows)]}"
        )
    for model in args.models:
        config, out = CONFIGS[model], args.out / model
        command = f"python benchmarks/vit_ptq.py --models {model} --calibration {args.calibration} --rows {args.rows}"
        command += f" --only {shlex.quote(args.only)}" if args.only else ""
        print(f"\n`{command}` ({config})\n")
        print("| setting | top-1 % | Δ vs FP32 | energy µJ/img | avg W bits | avg A bits | time s |")
        print("|---|---|---|---|---|---|---|", flush=True)
        fp32_top1 = None
        for name, policy, changes in selected:
            # The first run also evaluates the FP32 model (same images, same pass), the reference of every Δ.
            r = run(config, out, policy, args.calibration, fp32=fp32_top1 is None, **changes)
            if fp32_top1 is None:
                fp32_top1 = r["fp32"]
                print(f"| FP32 | {fp32_top1:.2f} | +0.00 | | 32 | 32 | |")
            print(
                f"| {name} | {r['top1']:.2f} | {r['top1'] - fp32_top1:+.2f} | {r['energy']:.1f} | {r['avg_w']:.2f} "
                f"| {r['avg_a']:.2f} | {r['seconds']:.0f} |",
                flush=True,  # rows appear as they finish: a long run can be read (and stopped) part way
            )


if __name__ == "__main__":
    main()
