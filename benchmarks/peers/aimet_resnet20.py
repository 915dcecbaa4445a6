"""Peer benchmark: Qualcomm AIMET 2.42 automatic mixed precision (AMP) on the shared CIFAR-10 ResNet-20 (issue 13).

Measures what AIMET (PyPI ``aimet-torch``) reaches with its own mixed-precision search under the budgets of issue 13,
on the model and images lit_mpq's benchmarks use. Run it with the interpreter of ``benchmarks/peers/.venv-aimet``
(made by ``benchmarks/peers/setup_aimet.sh``); AIMET is not a dependency of lit_mpq::

    bash benchmarks/peers/setup_aimet.sh
    benchmarks/peers/.venv-aimet/bin/python benchmarks/peers/aimet_resnet20.py --out aimet_resnet20.jsonl
    benchmarks/peers/.venv-aimet/bin/python benchmarks/peers/aimet_resnet20.py --act-bits 8 \
        --rows size_w4 bitops_w4a8 bitops_1.09G --out aimet_resnet20_act8.jsonl

Data, model, rows and output come from the harness in ``mct_resnet20.py`` (same folder, imported without MCT):
``shared/data/cifar10_resnet20.pt`` in lit_mpq's ``cifar_resnet20``, ImageNet mean/std; calibration (AIMET's
``compute_encodings`` forward pass) on the first 512 images of ``cifar10_train_4k_lossless.npz`` in batches of 64
(``--max-calib``, ``--calib-batch-size``); top-1 on all 1000 images of ``cifar10_test_1k_lossless.npz``
(``--max-eval``; FP32 91.5 %).

The strict default graph, as AIMET's documentation orders it:

1. ``aimet_torch.model_preparer.prepare_model`` (torch.fx: the residual ``+`` becomes an ``Add`` module and the
   shortcut's ``F.pad`` a ``Pad`` module, so they get quantizers);
2. ``aimet_torch.batch_norm_fold.fold_all_batch_norms`` (all 19 batch norms into their convolutions);
3. ``QuantizationSimModel(model, dummy_input, quant_scheme=QuantScheme.post_training_tf_enhanced,
   default_output_bw=A, default_param_bw=W, config_file=--config)``; ``--config default`` is AIMET's default
   config, which in 2.42 is ``default_config_per_channel.json``: weights symmetric per output channel, activations
   asymmetric per tensor, biases float, the model input and every op output quantized except inside the
   supergroups Conv+ReLU and Add+ReLU (so: the input, each conv+ReLU, each conv feeding an add, each add+ReLU, the
   pooled features and the logits; the shortcut's slice and pad keep their input's grid);
4. ``sim.compute_encodings`` over the calibration images.

Rows (``--rows``):

* ``uniform_w4a8`` / ``uniform_w4a4``: ``default_param_bw=4`` and ``default_output_bw=8`` / ``4`` (every quantized
  tensor, input and logits included); no search.
* ``bitops_w4a8`` / ``bitops_1.09G``: one AMP run shared by both rows (rows with the same candidates share their
  run: with ``--act-bits 8`` the bit-ops rows use the one of ``size_w4``). ``aimet_torch.mixed_precision.
  choose_mixed_precision`` on the W8A8 sim with candidates (activation bits, weight bits) in {8, 4} x {8, 4, 2}
  (``--act-bits``; AIMET accepts 2-bit weights through AMP although the sim's default widths must be 4 to 31),
  ``allowed_accuracy_drop=None`` and ``AMPSearchAlgo.BruteForce``, so that AIMET evaluates every point of its Pareto
  curve: phase 1 ranks each quantizer group at each candidate by the eval score with only that group quantized
  (``phase1_optimize=True``, the default); phase 2 lowers the groups cumulatively in that order, and each point
  carries AIMET's relative bit-ops (sum over conv/linear of MACs x input-activation bits x weight bits, divided by
  the W8A8 sum). Each row then takes, among the points whose relative bit-ops are at most 0.5 (uniform W4A8) or
  0.42 (1.09 G), the first in AMP's order (where a walk down the curve meets the budget: the point that keeps the
  most bits; the phase-2 scores are recorded, not used to choose), sets the sim to it (AMP's own
  ``QuantizerGroup.set_quantizers_to_candidate``), recomputes the encodings at those widths (as AMP does before each
  phase-2 evaluation, so the recorded score is that of the model tested) and is evaluated on the test images.
* ``size_w4``: AIMET has no size constraint, so this row runs AMP with weight-only candidates {8} x {8, 4, 2} and
  takes the first Pareto point whose weight memory, counted by this script from the sim's weight quantizers
  (parameters x bits / 8, bytes; biases are float), is at most that of all weights at 4 bits.

AMP's eval callbacks (``eval_callback_for_phase1`` and ``_for_phase2``) compute top-1 on labelled images that are
neither calibration nor test images: images 512 to 1535 of ``cifar10_train_4k_lossless.npz`` (``--search-start``,
``--search-images``). These are training images (FP32 is near 100 % on them), so AMP's scores are coarse; the
test images are never seen by the search.

One JSON line per row to ``--out`` (appended) and a table on stdout: ``tool``, ``version``, ``budget``,
``budget_as_counted`` (``value``, ``unit`` and, for bit-ops, ``relative_to_w8a8``), ``chosen`` (the Pareto point:
index, relative bit-ops, weight bytes, phase-2 score, Pareto points available), ``top1`` (percent), ``seconds``
(sim creation, encodings, the AMP run and setting the chosen point; a shared AMP run is counted in full in each of
its rows), ``evaluations`` (calls of the eval callbacks during the AMP run; ``evaluations_by_phase`` splits them;
phase 2's callback also gives the FP32 and baseline scores), ``bits`` (``weights``: bits per weight quantizer;
``activations``: bits per input/output quantizer) and ``correct`` (one ``0``/``1`` per test image, in order). AMP's
own files (sensitivity and Pareto plots, pickles) go to ``--results-dir``, by default a new temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mct_resnet20 import (  # noqa: E402
    W8A8_FRACTION,
    bit_string,
    float_model,
    harness_parser,
    load_npz,
    predictions,
    write_rows,
)

try:
    import aimet_torch
    from aimet_torch._base.amp.quantizer_groups import get_module_name_to_module_dict
    from aimet_torch._base.amp.utils import create_mac_dict
    from aimet_torch.amp.utils import _mock_v1_quantizers
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.common.amp.utils import AMPSearchAlgo
    from aimet_torch.common.defs import CallbackFunc, QuantizationDataType, QuantScheme
    from aimet_torch.common.utils import AimetLogger
    from aimet_torch.mixed_precision import choose_mixed_precision
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"aimet_resnet20.py needs AIMET ({exc}); run benchmarks/peers/setup_aimet.sh and use its venv.")

BITOPS_FRACTION = {"bitops_w4a8": 0.5, "bitops_1.09G": W8A8_FRACTION}
"""Relative bit-ops (AIMET's unit: fraction of the W8A8 model's) of each bit-ops row."""
INPUT_SHAPE = (1, 3, 32, 32)


@dataclass
class AmpRun:
    """One ``choose_mixed_precision`` run: the sim it leaves, its Pareto list, time and eval-callback calls."""

    sim: Any
    pareto: list[tuple[float, float, Any, Any]]
    seconds: float
    evaluations: dict[str, int]


def candidate(act_bits: int, weight_bits: int) -> tuple[tuple[int, Any], tuple[int, Any]]:
    """An AMP candidate ``((activation bits, int), (weight bits, int))``."""
    return (act_bits, QuantizationDataType.int), (weight_bits, QuantizationDataType.int)


class Bench:
    """The prepared model, the data, and the AIMET steps every row uses."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.calib, _ = load_npz(args.train_npz, 0, args.max_calib)
        stop = args.search_start + args.search_images
        self.search_images, self.search_labels = load_npz(args.train_npz, args.search_start, stop)
        self.test_images, self.test_labels = load_npz(args.test_npz, 0, args.max_eval)
        self.dummy = torch.zeros(INPUT_SHAPE)
        self.model = prepare_model(float_model(args.weights))
        folded = fold_all_batch_norms(self.model, INPUT_SHAPE)
        print(f"folded {len(folded)} batch norms", file=sys.stderr)
        self.eval_calls = {"phase1": 0, "phase2": 0}

    @torch.no_grad()
    def calibrate(self, model: nn.Module, _args: Any = None) -> None:
        """AIMET's forward-pass callback: the calibration images, in batches."""
        model.eval()
        for batch in self.calib.split(self.args.calib_batch_size):
            model(batch)

    def search_score(self, model: nn.Module, phase: str) -> float:
        """Top-1 (fraction) on the search images; counts the calls of each phase's callback."""
        self.eval_calls[phase] += 1
        return float((predictions(model, self.search_images) == self.search_labels).float().mean())

    def phase1_score(self, model: nn.Module) -> float:
        """AMP's ``eval_callback_for_phase1``."""
        return self.search_score(model, "phase1")

    def phase2_score(self, model: nn.Module) -> float:
        """AMP's ``eval_callback_for_phase2`` (also its FP32 and baseline-candidate scores)."""
        return self.search_score(model, "phase2")

    def sim(self, act_bits: int, weight_bits: int) -> Any:
        """A calibrated QuantizationSimModel of the prepared, folded model."""
        sim = QuantizationSimModel(
            self.model,
            self.dummy,
            quant_scheme=QuantScheme.post_training_tf_enhanced,
            default_output_bw=act_bits,
            default_param_bw=weight_bits,
            config_file=self.args.config,
        )
        sim.compute_encodings(self.calibrate, None)
        return sim

    def amp(self, candidates: list[Any], results_dir: Path) -> AmpRun:
        """Run AMP over ``candidates`` with the full (brute-force) Pareto curve."""
        start = time.perf_counter()
        self.eval_calls = {"phase1": 0, "phase2": 0}
        sim = self.sim(8, 8)
        pareto = choose_mixed_precision(
            sim,
            self.dummy,
            candidates,
            self.phase1_score,
            self.phase2_score,
            None,
            str(results_dir),
            True,
            CallbackFunc(self.calibrate, None),
            amp_search_algo=AMPSearchAlgo.BruteForce,
        )
        if not pareto:
            raise RuntimeError("choose_mixed_precision returned no Pareto list")
        return AmpRun(sim, list(pareto), time.perf_counter() - start, dict(self.eval_calls))

    def apply_point(self, run: AmpRun, index: int) -> None:
        """Set ``run.sim`` to Pareto point ``index`` (groups 0..index lowered, in AMP's order) and recalibrate."""
        baseline = candidate(8, 8)
        with _mock_v1_quantizers(run.sim):
            names = get_module_name_to_module_dict(run.sim)
            for _, _, group, _ in run.pareto:
                group.set_quantizers_to_candidate(names, baseline)
            for _, _, group, cand in run.pareto[: index + 1]:
                group.set_quantizers_to_candidate(names, cand)
        run.sim.compute_encodings(self.calibrate, None)

    def test(self, model: nn.Module) -> Tensor:
        """Whether each test image is classified correctly."""
        return predictions(model, self.test_images) == self.test_labels


def sim_bits(sim: Any) -> dict[str, dict[str, int]]:
    """Bits of every enabled weight, input and output quantizer of ``sim``."""
    bits: dict[str, dict[str, int]] = {"weights": {}, "activations": {}}
    for name, qmodule in sim.named_qmodules():
        weight = qmodule.param_quantizers["weight"] if "weight" in qmodule.param_quantizers else None
        if weight is not None:
            bits["weights"][name] = int(weight.bitwidth)
        for kind, quantizers in (("input", qmodule.input_quantizers), ("output", qmodule.output_quantizers)):
            for i, quantizer in enumerate(quantizers):
                if quantizer is not None:
                    bits["activations"][f"{name}.{kind}{i}"] = int(quantizer.bitwidth)
    return bits


def weight_bytes(model: nn.Module, pareto: list[Any], index: int | None) -> float:
    """Weight memory (bytes) of Pareto point ``index`` (None: all weights at 4 bits), starting from 8 bits."""
    numel = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if index is None:
        return sum(numel.values()) * 4 / 8
    bits = dict.fromkeys(numel, 8)
    for _, _, group, cand in pareto[: index + 1]:
        for name in group.parameter_quantizers:
            bits[name] = cand[1][0]
    return sum(n * bits[name] for name, n in numel.items()) / 8


def first_fit(fits: list[bool]) -> int:
    """Index of the first Pareto point (in AMP's order, so the most bits kept) that fits the budget."""
    if not any(fits):
        raise RuntimeError("no point of AMP's Pareto curve fits the budget")
    return fits.index(True)


def aimet_rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Quantize and evaluate each selected row with AIMET."""
    bench = Bench(args)
    w8a8_bitops = 64 * sum(create_mac_dict(bench.sim(8, 8).model, bench.dummy).values())
    runs: dict[str, AmpRun] = {}
    results = Path(args.results_dir or tempfile.mkdtemp(prefix="aimet_amp_"))
    for name in args.rows:
        start = time.perf_counter()
        counted: dict[str, Any] | None = None
        chosen: dict[str, Any] | None = None
        evaluations: dict[str, int] = {}
        if name.startswith("uniform_"):
            sim = bench.sim(8 if name == "uniform_w4a8" else 4, 4)
            seconds = time.perf_counter() - start
        else:
            acts = (8,) if name == "size_w4" else tuple(sorted(args.act_bits, reverse=True))
            key = "a" + "_".join(map(str, acts))  # rows with the same candidates share one AMP run
            if key not in runs:
                runs[key] = bench.amp([candidate(a, w) for a in acts for w in (8, 4, 2)], results / key)
            run = runs[key]
            if name == "size_w4":
                budget = weight_bytes(bench.model, run.pareto, None)
                fits = [weight_bytes(bench.model, run.pareto, i) <= budget for i in range(len(run.pareto))]
                counted = {"value": budget, "unit": "bytes (weights, counted by this script)"}
            else:
                fraction = BITOPS_FRACTION[name]
                fits = [point[0] <= fraction + 1e-9 for point in run.pareto]
                counted = {"value": int(fraction * w8a8_bitops), "unit": "BitOps", "relative_to_w8a8": fraction}
            index = first_fit(fits)
            apply_start = time.perf_counter()
            bench.apply_point(run, index)
            sim = run.sim
            seconds = run.seconds + time.perf_counter() - apply_start
            evaluations = run.evaluations
            chosen = {
                "index": index,
                "relative_bitops": round(float(run.pareto[index][0]), 4),
                "weight_bytes": weight_bytes(bench.model, run.pareto, index),
                "search_score": run.pareto[index][1],
                "points": len(run.pareto),
            }
        correct = bench.test(sim.model)
        yield {
            "tool": "aimet",
            "version": aimet_torch.__version__,
            "budget": name,
            "budget_as_counted": counted,
            "chosen": chosen,
            "top1": round(100.0 * float(correct.float().mean()), 2),
            "seconds": round(seconds, 2),
            "evaluations": sum(evaluations.values()),
            "evaluations_by_phase": evaluations or None,
            "bits": sim_bits(sim),
            "correct": bit_string(correct),
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness_parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default="default", help="QuantizationSimModel config_file (alias or path)")
    p.add_argument(
        "--act-bits", type=int, nargs="+", default=[8, 4], help="activation candidates of the bitops rows (8 4)"
    )
    p.add_argument("--search-start", type=int, default=512, help="first train image of AMP's eval data (512)")
    p.add_argument("--search-images", type=int, default=1024, help="train images in AMP's eval data (1024)")
    p.add_argument("--results-dir", type=Path, default=None, help="AMP's results_dir (default: a new temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    AimetLogger.set_level_for_all_areas(logging.ERROR)  # e.g. ConnectedGraph's benign output warnings
    write_rows(aimet_rows(args), args.out)


if __name__ == "__main__":
    main()
