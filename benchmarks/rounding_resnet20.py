"""Benchmark: lit_mpq's GPTQ and GPFQ against Brevitas' on the shared CIFAR-10 ResNet-20, side by side in one run.

For each setting of ``shared/reference/peer_results_resnet20.md`` (W4A8, W4A4 with the first and last layer at 8
bits, W4A4 everywhere, W3A8) and each method (nearest, + bias correction, GPTQ, GPFQ; AdaRound on lit_mpq's side
only), lit_mpq runs
``configs/resnet20_cifar10.yaml``'s pipeline (calibration on the first 512 lossless training images, per-channel
min/max weights, per-tensor MSE activation ranges, top-1 on the 1,000 lossless test images) with
``Uniform(w, a)``, ``first_last_bits`` and a ``WeightRounding`` callback; then, in the same run, Brevitas 0.13.4
(``benchmarks/peers/brevitas_resnet20.py``, in its own environment ``benchmarks/peers/.venv-brevitas``, made by
``benchmarks/peers/setup_brevitas.sh``; it is not a dependency of lit_mpq) does the same rows. Times are the
rounding step alone (lit_mpq: the ``WeightRounding`` callback; Brevitas: ``apply_gptq`` / ``apply_gpfq``), both with
every layer's pass over the 512 calibration images::

    bash benchmarks/peers/setup_brevitas.sh   # once
    python benchmarks/rounding_resnet20.py [--settings w4a8 w4a4 w4a4_all w3a8] [--methods nearest bias_corr gptq gpfq]
        [--gpfq-refine-passes N] [--gpfq-scale-fit N] [--equalization N] [--adaround-iterations N] [--no-peer]

The two runs alternate per setting (lit_mpq's rows, then Brevitas'), so both see the same load on this shared
machine. Run from the repository root.

Both sides classify the same 1,000 test images, so the table also gives the paired comparison: the difference in
top-1 and McNemar's exact test on the images exactly one of the two gets right (its two-sided p-value; one image is
0.1 point, and a difference of a few images is what two equally good roundings of the same model differ by).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _runs import quiet_run_args
from scipy.stats import binomtest

from lit_mpq.allocation import Uniform
from lit_mpq.callbacks import BitAllocator, Calibration, SensitivityProbe, WeightRounding
from lit_mpq.cli import main as cli_main

CONFIG = "configs/resnet20_cifar10.yaml"
PEER_PYTHON = Path("benchmarks/peers/.venv-brevitas/bin/python")
PEER_SCRIPT = Path("benchmarks/peers/brevitas_resnet20.py")
SETTINGS = {"w4a8": (4, 8, 8), "w4a4": (4, 4, 8), "w4a4_all": (4, 4, None), "w3a8": (3, 8, 8)}
METHODS = ("nearest", "bias_corr", "gptq", "gpfq", "adaround")
PEER_METHODS = ("nearest", "bias_corr", "gptq", "gpfq")  # Brevitas' example has no AdaRound row here


def lit_mpq_row(
    setting: str,
    method: str,
    out: Path,
    gpfq_refine_passes: int = 0,
    gpfq_scale_fit: int = 0,
    equalization: int = 0,
    adaround_iterations: int = 10000,
) -> dict:
    """One lit_mpq ``validate``: top-1 and the rounding time.

    ``gpfq_*``: GPFQ's refinement passes and scale fits; ``equalization``: iterations of cross-layer equalization
    (BatchNorm then folded; 0: off, BatchNorm left as the config has it); ``adaround_iterations``: AdaRound's steps
    per layer.
    """
    w_bits, a_bits, first_last = SETTINGS[setting]
    cli = cli_main(quiet_run_args(CONFIG, out), run=False)
    callbacks = cli.trainer.callbacks
    for position, callback in enumerate(list(callbacks)):
        if isinstance(callback, BitAllocator):
            callback.policy, callback.first_last_bits = Uniform(w_bits, a_bits), first_last
            rounding = method if method in ("gptq", "gpfq", "adaround") else "nearest"
            callbacks.insert(
                position + 1,
                WeightRounding(
                    method=rounding,
                    refine_passes=gpfq_refine_passes if rounding == "gpfq" else 0,
                    scale_fit=gpfq_scale_fit if rounding == "gpfq" else 0,
                    adaround_iterations=adaround_iterations,
                ),
            )
        if isinstance(callback, Calibration):
            callback.settings = dataclasses.replace(callback.settings, bias_correction=method == "bias_corr")
            if equalization:
                callback.fold_batchnorm, callback.cross_layer_equalization = True, equalization
    callbacks[:] = [callback for callback in callbacks if not isinstance(callback, SensitivityProbe)]
    start = time.perf_counter()
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    total_s = time.perf_counter() - start
    record = cli.model.record.rounding
    correct = correct_images(cli.model, cli.datamodule.val_dataloader())
    top1 = 100.0 * float(correct.float().mean())
    if abs(top1 - metrics["val/top1"]) > 1e-3:
        raise RuntimeError(f"per-image top-1 {top1:.2f} differs from the validation's {metrics['val/top1']:.2f}")
    return {
        "top1": top1,
        "round_s": record.seconds if record is not None and method in ("gptq", "gpfq", "adaround") else 0.0,
        "total_s": total_s,
        "correct": "".join("1" if c else "0" for c in correct.tolist()),
    }


@torch.no_grad()
def correct_images(module: torch.nn.Module, loader) -> torch.Tensor:
    """Whether the quantized model classifies each image of ``loader`` correctly (bool, in order)."""
    module.eval()
    return torch.cat([module(x).argmax(1) == y for x, y in loader])


def mcnemar(ours: str, theirs: str) -> tuple[float, float]:
    """Top-1 difference (points) and McNemar's exact two-sided p-value from two per-image ``0``/``1`` strings."""
    if len(ours) != len(theirs):
        raise ValueError(f"the two runs classified {len(ours)} and {len(theirs)} images")
    only_ours = sum(a == "1" and b == "0" for a, b in zip(ours, theirs, strict=True))
    only_theirs = sum(a == "0" and b == "1" for a, b in zip(ours, theirs, strict=True))
    discordant = only_ours + only_theirs
    p_value = binomtest(only_ours, discordant, 0.5).pvalue if discordant else 1.0
    return 100.0 * (only_ours - only_theirs) / len(ours), p_value


def peer_rows(setting: str, methods: list[str]) -> dict[str, dict]:
    """Brevitas' rows of ``setting`` (its own interpreter), or an empty dict with a note when it is not set up."""
    if not PEER_PYTHON.exists():
        print(
            f"Brevitas is not set up ({PEER_PYTHON} missing): run bash benchmarks/peers/setup_brevitas.sh",
            file=sys.stderr,
        )
        return {}
    done = subprocess.run(
        [str(PEER_PYTHON), str(PEER_SCRIPT), "--settings", setting, "--methods", *methods],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {row["method"]: row for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(PEER_METHODS))
    parser.add_argument(
        "--gpfq-refine-passes",
        type=int,
        default=0,
        help="coordinate-descent passes after lit_mpq's GPFQ (WeightRounding.refine_passes); GPTQ runs without",
    )
    parser.add_argument(
        "--gpfq-scale-fit",
        type=int,
        default=0,
        help="least-squares scale refits after lit_mpq's GPFQ (WeightRounding.scale_fit); GPTQ runs without",
    )
    parser.add_argument(
        "--equalization",
        type=int,
        default=0,
        help="iterations of cross-layer equalization before lit_mpq's rows (Calibration.cross_layer_equalization)",
    )
    parser.add_argument(
        "--adaround-iterations", type=int, default=10000, help="AdaRound's steps per layer (the paper's 10000)"
    )
    parser.add_argument("--no-peer", action="store_true", help="lit_mpq's rows only (no Brevitas run)")
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/rounding_resnet20"))
    args = parser.parse_args()
    table = []
    for setting in args.settings:
        ours = {
            method: lit_mpq_row(
                setting,
                method,
                args.out,
                args.gpfq_refine_passes,
                args.gpfq_scale_fit,
                args.equalization,
                args.adaround_iterations,
            )
            for method in args.methods
        }
        peer_methods = [method for method in args.methods if method in PEER_METHODS]
        theirs = {} if args.no_peer or not peer_methods else peer_rows(setting, peer_methods)
        for method in args.methods:
            peer = theirs.get(method, {})
            table.append((setting, method, ours[method], peer))
            brief = {key: value for key, value in ours[method].items() if key != "correct"}
            peer_brief = {key: value for key, value in peer.items() if key != "correct"}
            print(f"{setting} {method}: lit_mpq {brief}, Brevitas {peer_brief}", file=sys.stderr, flush=True)
    print(f"\n`python benchmarks/rounding_resnet20.py {' '.join(sys.argv[1:])}`\n")
    print(
        "| setting | method | lit_mpq top-1 | Brevitas top-1 | difference | McNemar p | lit_mpq rounding s "
        "| Brevitas rounding s | time ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for setting, method, ours, peer in table:
        peer_top1 = f"{peer['top1']:.1f}" if peer else "-"
        difference, p_value = mcnemar(ours["correct"], peer["correct"]) if "correct" in peer else (None, None)
        paired = f"{difference:+.1f} | {p_value:.2f}" if difference is not None else "- | -"
        peer_s = peer.get("round_s")
        ratio = f"{ours['round_s'] / peer_s:.2f}" if peer_s and ours["round_s"] else "-"
        ours_s = f"{ours['round_s']:.1f}" if ours["round_s"] else "-"
        print(
            f"| {setting} | {method} | {ours['top1']:.1f} | {peer_top1} | {paired} | {ours_s} | "
            f"{f'{peer_s:.1f}' if peer_s else '-'} | {ratio} |"
        )


if __name__ == "__main__":
    main()
