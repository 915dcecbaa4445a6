"""Benchmark: outlier-aware clipping of activation ranges (issue 8) on DeiT-Tiny and ResNet-20.

Which activation range should a post-training quantizer use: the observed min/max, the range that minimises the
expected squared error (MSE), or a percentile (99.9, 99, 95) of the calibration distribution? Each row of the table
quantizes **every** activation tensor with one range method, at INT8 and at INT4 activations; everything else stays
fixed so that the table isolates the activation clipping:

- weights at 8 bits, per output channel, symmetric, min/max (no bias correction);
- activations asymmetric, per tensor, all at the column's width: every Conv2d/Linear input (the network input and the
  classifier's input included) and, on DeiT, q, k and v of both attention matmuls (the plan's ``w_bits`` of a
  matmul row is its right operand, an activation, so it takes the activation width here);
- on DeiT the softmax output keeps its own quantizer at the same width: ``--softmax log2`` (default; FQ-ViT levels,
  scale = the observed maximum, nothing clipped) or ``uniform`` (levels over ``[0, observed max]``, nothing
  clipped); no range method is applied to it (a clipped softmax loses the few large probabilities that carry the
  attention, see :func:`lit_mpq.quant.softmax.build_softmax_quantizer`). A 4-bit uniform grid rounds every
  probability under a 30th of the maximum to zero (:mod:`lit_mpq.quant.softmax`), which would mix the softmax's own
  loss into the A4 column, hence the logarithmic default.

Each model is calibrated **once**: every activation quantizer gets a histogram observer (sign-split, fixed edges, see
:mod:`lit_mpq.quant.observers`), and every row's range is derived from that one histogram by swapping the observer
for one of the row's method that shares its statistics (min/max: the exact observed extremes; MSE: searched per bit
width; percentile: the ``100 - p`` and ``p`` quantiles). Each (row, width) is evaluated once. Data: DeiT-Tiny is
calibrated on ``--calibration`` (default 256) images of ``imagenet_sample_1000`` and evaluated on the 1300 images of
``imagenet_val_1300``; ResNet-20 on the first 512 lossless CIFAR-10 training images, evaluated on the 1000 lossless
test images (FP32 91.5 %). ``--val-limit`` evaluates an evenly spaced subset, for quick trials only.

For a few representative tensors the script also draws the calibration histogram before and after clipping, with
each method's range and the share of values it clips (``docs/figures/clipping_<model>.png``), and writes the same
histograms, the figure and the table to TensorBoard under ``logs/benchmarks/clipping_study/run_<k>``::

    python benchmarks/clipping_study.py [--models deit resnet20] [--calibration N] [--val-limit N]
        [--softmax log2|uniform] [--figures-dir docs/figures] [--data-root ../shared/data]

Run from the repository root (the data paths are relative to it, as in ``configs/``). Runtime on 2 CPU cores, from
the trial runs (``--val-limit 200``, the cores shared with other jobs at a load of about 7): DeiT-Tiny calibration
of 256 images took 100 s and each quantized evaluation of 200 images 85-110 s, so the full study (11 evaluations of
1300 images) should take about 35 minutes on idle cores and up to 2 hours on loaded ones; ResNet-20 takes 2-4
minutes. It prints a Markdown table (top-1 %, and the change from FP32 in points) and, per representative tensor,
each method's range and clipped share.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import torch
from _runs import cached_batches, evenly_spaced, fresh_run_dir, imagenet_data, top1
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lit_mpq.data import CIFARDataModule
from lit_mpq.models import create_backbone
from lit_mpq.plan import QuantPlan
from lit_mpq.quant.apply import (
    QuantSettings,
    apply_plan,
    invalidate_qparams,
    measure_model,
    quantize_model,
    quantizers_mode,
    set_mode,
)
from lit_mpq.quant.checks import check_calibrated
from lit_mpq.quant.modules import ActivationQuantizer
from lit_mpq.quant.observers import HistogramObserver, MSEObserver, PercentileObserver
from lit_mpq.report.figures import save_figure
from lit_mpq.report.histograms import ClippingPanel, Distribution, add_clipping_histograms, clipping_figure, tag_safe

WEIGHT_BITS = 8
ACT_BITS = (8, 4)
DEIT = "deit_tiny_patch16_224"


# ------------------------------------------------------------------------------------------------ models and data
@dataclass(frozen=True)
class Tap:
    """A representative tensor to draw: operand ``operand`` of module ``module`` as it enters the module."""

    module: str
    operand: int
    label: str
    description: str
    own_quantizer: bool = False
    """The tensor keeps its own quantizer (the softmax output): the methods' ranges are shown for comparison only."""


@dataclass
class Setup:
    """One model of the study, with its data.

    Attributes:
        key: Name on the command line (``--models``).
        title: Name in the table.
        slug: Name in file names and TensorBoard tags.
        model: The float model, eval mode.
        calibration: Calibration images.
        validation: Evaluation batches, decoded once and kept in memory (every row evaluates them again).
        example: One input for tracing.
        taps: Representative tensors for the histograms.
        fp32: FP32 top-1 on ``validation`` (percent), filled by :func:`evaluate_fp32`.
    """

    key: str
    title: str
    slug: str
    model: nn.Module
    calibration: DataLoader
    validation: list[tuple[Tensor, Tensor]]
    example: Tensor
    taps: list[Tap]
    fp32: float = float("nan")
    notes: list[str] = field(default_factory=list)


def load_deit(args: argparse.Namespace) -> Setup:
    """DeiT-Tiny on the shared weights; ImageNet sample to calibrate, the 1300 validation images to evaluate."""
    root = Path(args.data_root)
    model = create_backbone(DEIT, checkpoint_path=str(root / "deit_tiny_patch16_224.pt")).eval()
    data = imagenet_data(root, DEIT, args.calibration or 256, batch_size=64)
    taps = [
        Tap("blocks.5.attn.qkv", 0, "blocks.5.attn.qkv input", "after LayerNorm (norm1)"),
        Tap("blocks.5.mlp.fc2", 0, "blocks.5.mlp.fc2 input", "after GELU: a heavy tail"),
        Tap("blocks.5.attn.matmul_qk", 0, "blocks.5 attention query q", "left operand of q·kᵀ"),
        Tap("blocks.5.attn.matmul_av", 0, "blocks.5 softmax output", "left operand of softmax·V", own_quantizer=True),
    ]
    return Setup(
        key="deit",
        title="DeiT-Tiny",
        slug="deit_tiny",
        model=model,
        calibration=data.calib_dataloader(),
        validation=cached_batches(evenly_spaced(data.val_set, args.val_limit), 64, 2),
        example=torch.zeros(1, 3, 224, 224),
        taps=taps,
    )


def load_resnet20(args: argparse.Namespace) -> Setup:
    """ResNet-20 on the shared CIFAR-10 weights and lossless images, as ``configs/resnet20_cifar10.yaml``."""
    root = Path(args.data_root)
    model = create_backbone("cifar_resnet20", checkpoint_path=str(root / "cifar10_resnet20.pt")).eval()
    data = CIFARDataModule(
        dataset="cifar10",
        train_npz=str(root / "cifar10_train_4k_lossless.npz"),
        test_npz=str(root / "cifar10_test_1k_lossless.npz"),
        normalization="imagenet",
        batch_size=200,
        num_calibration_samples=args.calibration or 512,
        calibration_subset="first",
    )
    data.setup("validate")
    taps = [
        Tap("conv1", 0, "conv1 input", "the normalized image"),
        Tap("layer2.0.conv1", 0, "layer2.0.conv1 input", "first conv of stage 2 (after ReLU)"),
        Tap("layer3.0.conv1", 0, "layer3.0.conv1 input", "first conv of stage 3 (after ReLU)"),
        Tap("linear", 0, "linear input", "classifier input (after average pooling)"),
    ]
    return Setup(
        key="resnet20",
        title="ResNet-20",
        slug="resnet20",
        model=model,
        calibration=data.calib_dataloader(),
        validation=cached_batches(evenly_spaced(data.val_set, args.val_limit), 200, 0),
        example=torch.zeros(1, 3, 32, 32),
        taps=taps,
    )


MODELS: dict[str, Callable[[argparse.Namespace], Setup]] = {"deit": load_deit, "resnet20": load_resnet20}


# ------------------------------------------------------------------------------------------ quantization helpers
def prepare(setup: Setup, settings: QuantSettings) -> QuantPlan:
    """Swap in the quantizers and measure the plan (quantizers off)."""
    quantize_model(setup.model, settings)
    return measure_model(setup.model, setup.example)


@torch.inference_mode()
def calibrate(
    setup: Setup,
    taps: dict[Tap, HistogramObserver] | None = None,
    only: Iterable[ActivationQuantizer] | None = None,
) -> float:
    """One calibration pass (weights off, activations observed), with extra observers on ``taps``; returns seconds.

    Args:
        setup: The model and its calibration images.
        taps: Extra observers of representative tensors.
        only: Observe these quantizers only (the others are off and keep their statistics); default: all.
    """
    model = setup.model
    handles = []
    for tap, observer in (taps or {}).items():
        # A pre-hook sees the operand before the module's own quantizer does; it returns None: input unchanged.
        hook = _tap_hook(observer, tap.operand)
        handles.append(model.get_submodule(tap.module).register_forward_pre_hook(hook))
    start = time.perf_counter()
    set_mode(model, weights="off", activations="observe" if only is None else "off")
    for quantizer in only or ():
        quantizer.set_mode("observe")
    try:
        for x, _ in setup.calibration:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        set_mode(model, weights="off", activations="off")
    invalidate_qparams(model)
    check_calibrated(model)
    return time.perf_counter() - start


def _tap_hook(observer: HistogramObserver, operand: int) -> Callable:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        observer(inputs[operand])

    return hook


def set_uniform_bits(setup: Setup, plan: QuantPlan, w_bits: int, a_bits: int) -> None:
    """Every layer at ``(w_bits, a_bits)``; an attention matmul's two operands are activations: both at ``a_bits``."""
    plan.set_bits({name: (a_bits if spec.kind == "matmul" else w_bits, a_bits) for name, spec in plan.specs.items()})
    apply_plan(setup.model, plan)


def evaluate_fp32(setup: Setup) -> float:
    """FP32 top-1 with every quantizer off (stored in ``setup.fp32``)."""
    with quantizers_mode(setup.model, "off"):
        setup.fp32 = top1(setup.model, setup.validation)
    return setup.fp32


def cell(top: float, fp32: float) -> str:
    """``top-1 (drop)``: accuracy in percent and its change from FP32 in points."""
    return f"{top:.1f} ({top - fp32:+.1f})"


def command_line() -> str:
    """The command this script was run with, for the record."""
    return " ".join(["python", "benchmarks/" + Path(sys.argv[0]).name, *map(shlex.quote, sys.argv[1:])])


# ----------------------------------------------------------------------------------------------- range methods
@dataclass(frozen=True)
class RangeMethod:
    """One way of turning the calibration histogram into an activation range (one row of the table)."""

    label: str
    observer: str
    percentile: float | None = None

    def from_histogram(self, calibrated: HistogramObserver) -> HistogramObserver:
        """An observer of this method holding ``calibrated``'s statistics (copied: no second calibration)."""
        symmetric, bins = calibrated.symmetric, calibrated.bins_per_octave
        if self.observer == "minmax":
            # The base class derives its range from the exact observed min and max, as MinMaxObserver does.
            observer = HistogramObserver(symmetric, bins_per_octave=bins)
        elif self.observer == "mse":
            observer = MSEObserver(symmetric, bins_per_octave=bins)
        else:
            observer = PercentileObserver(self.percentile, symmetric, bins_per_octave=bins)
        observer.load_state_dict(calibrated.state_dict())
        return observer.to(calibrated.min_val.device)

    @property
    def bit_dependent(self) -> bool:
        """Whether the range depends on the bit width (the MSE search does)."""
        return self.observer == "mse"

    def ranges(self, calibrated: HistogramObserver, bits: Iterable[int]) -> dict[str, tuple[float, float]]:
        """``{label: (low, high)}`` on ``calibrated``'s histogram: one entry, or one per width when bit-dependent.

        Each range is widened to contain 0, as the quantizer widens it (``qparams_from_range``): a percentile's lower
        end above 0 (an all-positive tensor) clips nothing in practice.
        """
        observer = self.from_histogram(calibrated)

        def widened(b: int) -> tuple[float, float]:
            low, high = observer.clip_range(b)
            return min(float(low), 0.0), max(float(high), 0.0)

        if not self.bit_dependent:
            return {self.label: widened(8)}
        return {f"{self.label} (A{b})": widened(b) for b in bits}


METHODS = [
    RangeMethod("min/max", "minmax"),
    RangeMethod("MSE", "mse"),
    RangeMethod("percentile 99.9", "percentile", 99.9),
    RangeMethod("percentile 99", "percentile", 99.0),
    RangeMethod("percentile 95", "percentile", 95.0),
]


def use_method(model: nn.Module, method: RangeMethod) -> int:
    """Give every histogram-observed activation quantizer an observer of ``method``; returns how many.

    The softmax quantizers (min/max observer or logarithmic levels) are not histogram-observed and keep their own
    range.
    """
    count = 0
    for quantizer in model.modules():
        if isinstance(quantizer, ActivationQuantizer) and isinstance(quantizer.observer, HistogramObserver):
            quantizer.observer = method.from_histogram(quantizer.observer)
            count += 1
    invalidate_qparams(model)
    return count


def own_quantizer_count(model: nn.Module) -> int:
    """Activation quantizers that keep their own range (not histogram-observed): the softmax outputs."""
    return sum(
        isinstance(q, ActivationQuantizer) and not isinstance(q.observer, HistogramObserver) for q in model.modules()
    )


# --------------------------------------------------------------------------------------------------- the study
def study(setup: Setup, args: argparse.Namespace, writer) -> dict[str, dict[int, float]]:
    """Calibrate once, evaluate every (method, width); draw and log the representative histograms."""
    # Any histogram observer serves: every method's range is derived from its statistics afterwards.
    settings = QuantSettings(act_observer="mse", weight_granularity="per_channel", softmax_quantizer=args.softmax)
    plan = prepare(setup, settings)
    taps = {tap: HistogramObserver() for tap in setup.taps}
    seconds = calibrate(setup, taps)
    print(f"[{setup.title}] calibrated on {len(setup.calibration.dataset)} images in {seconds:.0f} s", flush=True)
    start = time.perf_counter()
    evaluate_fp32(setup)
    print(f"[{setup.title}] FP32 {setup.fp32:.1f} % ({time.perf_counter() - start:.0f} s)", flush=True)

    results: dict[str, dict[int, float]] = {}
    for method in METHODS:
        swapped = use_method(setup.model, method)
        results[method.label] = {}
        for a_bits in ACT_BITS:
            set_uniform_bits(setup, plan, WEIGHT_BITS, a_bits)
            start = time.perf_counter()
            results[method.label][a_bits] = top1(setup.model, setup.validation)
            print(
                f"[{setup.title}] {method.label:>16} W{WEIGHT_BITS}A{a_bits}: {results[method.label][a_bits]:.1f} % "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    kept = own_quantizer_count(setup.model)
    setup.notes.append(
        f"{setup.title}: {len(plan)} plan rows; each method applied to {swapped} activation tensors"
        + (f"; {kept} softmax outputs keep their own quantizer ({args.softmax})" if kept else "")
    )
    draw(setup, taps, args, writer)
    return results


def draw(setup: Setup, taps: dict[Tap, HistogramObserver], args: argparse.Namespace, writer) -> None:
    """Histogram figure and TensorBoard histograms of the representative tensors; print their ranges."""
    panels = []
    # One colour per method in every panel (the softmax panel has an extra first entry that would shift them).
    labels = [label for method in METHODS for label in method.ranges(next(iter(taps.values())), ACT_BITS)]
    colors = {label: matplotlib.colormaps["tab10"](i) for i, label in enumerate(labels)}
    print(f"\nRanges of representative {setup.title} tensors (calibration histogram), and the share of values clipped:")
    for tap, observer in taps.items():
        dist = Distribution.from_observer(observer)
        ranges: dict[str, tuple[float, float]] = {}
        if tap.own_quantizer:
            own = f"its own quantizer ({args.softmax})"
            ranges[own] = (min(dist.min, 0.0), dist.max)
            colors[own] = "black"
        for method in METHODS:
            ranges.update(method.ranges(observer, ACT_BITS))
        note = (
            "The study keeps this tensor's own quantizer (range = observed, nothing clipped); the methods' ranges "
            "are shown for comparison only."
            if tap.own_quantizer
            else ""
        )
        panels.append(ClippingPanel(tap.label, dist, ranges, subtitle=tap.description, note=note, colors=colors))
        add_clipping_histograms(writer, f"{setup.slug}/{tag_safe(tap.label)}", dist, ranges)
        listed = ", ".join(
            f"{label} [{low:.3g}, {high:.3g}] {100 * dist.clipped_fraction(low, high):.2g} %"
            for label, (low, high) in ranges.items()
        )
        print(f"- {tap.label}, {tap.description}: {listed}")
    fig = clipping_figure(
        panels,
        f"{setup.title}: activation histograms on {len(setup.calibration.dataset)} calibration images, before and "
        "after clipping to each method's range",
    )
    path = save_figure(fig, Path(args.figures_dir) / f"clipping_{setup.slug}.png")
    writer.add_figure(f"{setup.slug}/clipping_histograms", fig)
    print(f"figure: {path}")


def table(setups: list[Setup], results: dict[str, dict[str, dict[int, float]]]) -> str:
    """The Markdown table: rows = range method, columns = model x activation width, cells = top-1 (drop)."""
    head = ["range method"] + [f"{s.title} W{WEIGHT_BITS}A{a}" for s in setups for a in ACT_BITS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| FP32 | " + " | ".join(f"{s.fp32:.1f}" for s in setups for _ in ACT_BITS) + " |")
    for method in METHODS:
        cells = [cell(results[s.key][method.label][a], s.fp32) for s in setups for a in ACT_BITS]
        lines.append(f"| {method.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--calibration", type=int, default=None, help="calibration images (default: DeiT 256, ResNet-20 512)"
    )
    parser.add_argument("--val-limit", type=int, default=None, help="evaluate N evenly spaced images (trials only)")
    parser.add_argument("--softmax", choices=["log2", "uniform", "log_sqrt2"], default="log2")
    parser.add_argument("--figures-dir", default="docs/figures")
    parser.add_argument("--log-dir", type=Path, default=Path("logs/benchmarks/clipping_study"))
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()

    from torch.utils.tensorboard import SummaryWriter

    start = time.perf_counter()
    log_dir = fresh_run_dir(args.log_dir)
    setups, results = [], {}
    with SummaryWriter(log_dir) as writer:
        for key in args.models:
            setup = MODELS[key](args)
            results[key] = study(setup, args, writer)
            setups.append(setup)
        markdown = table(setups, results)
        writer.add_text("clipping_study/table", markdown)
    print(f"\n`{command_line()}`\n")
    sizes = ", ".join(f"{s.title} {sum(len(y) for _, y in s.validation)}" for s in setups)
    print(f"Top-1 % (change from FP32 in points); evaluation images: {sizes}. Weights W{WEIGHT_BITS} per channel.\n")
    print(markdown)
    print()
    for setup in setups:
        for note in setup.notes:
            print(f"- {note}")
    print(f"\nTensorBoard: {log_dir}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
