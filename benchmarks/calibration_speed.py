"""Benchmark: cost of the calibration pass in plain FP32 forward passes over the same images (issue 8, "Speed").

For DeiT-Tiny (timm ``deit_tiny_patch16_224`` with ``deit_tiny_patch16_224.pt``, 256 images of
``imagenet_sample_1000`` through :class:`~lit_mpq.data.ImageFolderDataModule`, batch 64) and ResNet-20
(``cifar_resnet20`` with ``cifar10_resnet20.pt``, the first 512 images of ``cifar10_train_4k_lossless.npz`` through
:class:`~lit_mpq.data.CIFARDataModule`, batch 200 as in ``configs/resnet20_cifar10.yaml``), and for each activation
observer (minmax, percentile, mse) with and without bias correction, it times in one process:

- **FP32 pass**: the float backbone, ``model.eval()`` under ``torch.inference_mode()``, after a warm-up forward of
  each batch shape;
- **calibration**: what ``lit_mpq.callbacks.Calibration.on_validation_start`` times as ``time/calibration_s``
  (quantizers set to ``weights="off", activations="observe"``, a forward per batch with the per-image SHA-256 digests
  the probe cache keys on, then observer sync, ``invalidate_qparams`` and ``check_calibrated``), on a fresh copy
  prepared by ``quantize_model`` + ``measure_model`` as the callback's ``setup`` does, under
  ``torch.inference_mode()`` as Lightning's validation loop runs it. It is reproduced step by step rather than run
  through a Trainer, so that data loading stays out of the clock (every image is preloaded into tensors first) and
  each step can be timed on its own. The same warm-up runs with the quantizers off first (it leaves no statistics).

Activation qparams (scale and zero point at 4, 6 and 8 bits for every layer: what the sensitivity probe derives
through ``input_quantizer.quantize(x, bits)`` for its usual candidate bits) are derived lazily after the callback's
timer in lit_mpq; they are timed here in a column of their own. A first row per model times the prepared model with
every quantizer off: the cost of the layer wrappers alone, the floor that calibration cannot go under.

DeiT-Tiny's attention matmuls are quantized as ``QuantSettings`` does by default: q, k and v get the run's activation
observer too and the softmax output a min/max one, and observing the softmax output runs attention step by step
instead of through the fused kernel the FP32 pass uses. ``--no-attention`` leaves attention in float (only the
Conv2d/Linear inputs observed, as before those quantizers).

Then one case (DeiT-Tiny, ``--profile-observer``, bias correction on) runs again under ``torch.profiler`` on
``--profile-images`` images, with lit_mpq's observer update, bias-correction statistics, layer arithmetic, image
digests and qparams derivation labelled (by wrapping those methods in ``record_function`` for the profile only), and
prints where the time goes: per label, then the top operators by self CPU time. Run::

    python benchmarks/calibration_speed.py [--models deit resnet20] [--data-root ../shared/data] [--no-profile]
                                           [--no-attention]

Everything runs on the CPU. On two cores the whole script takes about 3.5 minutes, two of them in the DeiT-Tiny
calibration passes being measured (``--observers minmax``, ``--models deit`` or ``--no-profile`` run a part).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function

from lit_mpq.data import CIFARDataModule, ImageFolderDataModule
from lit_mpq.models.factory import backbone_input_size, create_backbone
from lit_mpq.quant.apply import QuantSettings, invalidate_qparams, measure_model, quant_layers, quantize_model, set_mode
from lit_mpq.quant.checks import check_calibrated, check_finite_parameters
from lit_mpq.quant.modules import BiasCorrection, QuantConv2d, QuantLinear
from lit_mpq.quant.observers import HistogramObserver, MinMaxObserver, Observer, sync_observers
from lit_mpq.sensitivity.cache import image_digest, stack_digests, unstack_digests

REPO = Path(__file__).resolve().parents[1]
OBSERVER_NAMES = ("minmax", "percentile", "mse")
QPARAM_BITS = (4, 6, 8)


@dataclass(frozen=True)
class Case:
    """One model with its weights and its preloaded calibration batches."""

    name: str
    model: nn.Module
    batches: list[Tensor]


@dataclass
class CalibrationTime:
    """Seconds spent in each step of one calibration pass."""

    total: float = 0.0
    """What ``Calibration`` reports as ``time/calibration_s`` (data loading excluded)."""
    digests: float = 0.0
    """Per-image SHA-256 digests (part of ``total``)."""
    finish: float = 0.0
    """Sync, ``invalidate_qparams``, ``check_calibrated`` and the digest gather (part of ``total``)."""
    qparams: float = 0.0
    """Activation qparams of every layer at 4, 6 and 8 bits (after the callback, not part of ``total``)."""

    @property
    def forward(self) -> float:
        """Forward passes with the observers recording (``total`` less digests and the finish)."""
        return self.total - self.digests - self.finish


def preload(loader: torch.utils.data.DataLoader) -> list[Tensor]:
    """Every batch of ``loader`` as a contiguous float tensor, in order (labels dropped)."""
    return [batch[0].contiguous() for batch in loader]


def load_deit(data_root: Path, images: int, batch_size: int) -> Case:
    """DeiT-Tiny with the shared weights, and ``images`` calibration images of ``imagenet_sample_1000``."""
    data = ImageFolderDataModule(
        root=str(data_root),
        val_dir="imagenet_val_1300",
        calib_dir="imagenet_sample_1000",
        backbone="deit_tiny_patch16_224",
        classes_file=str(data_root / "imagenet_classes.txt"),
        batch_size=batch_size,
        num_calibration_samples=images,
    )
    data.setup("validate")
    model = create_backbone("deit_tiny_patch16_224", checkpoint_path=str(data_root / "deit_tiny_patch16_224.pt"))
    return Case("DeiT-Tiny", model, preload(data.calib_dataloader()))


def load_resnet20(data_root: Path, images: int, batch_size: int) -> Case:
    """CIFAR-10 ResNet-20 with the shared weights, and the first ``images`` lossless training images."""
    data = CIFARDataModule(
        dataset="cifar10",
        train_npz=str(data_root / "cifar10_train_4k_lossless.npz"),
        test_npz=str(data_root / "cifar10_test_1k_lossless.npz"),
        normalization="imagenet",
        batch_size=batch_size,
        num_calibration_samples=images,
        calibration_subset="first",
    )
    data.setup("validate")
    model = create_backbone("cifar_resnet20", checkpoint_path=str(data_root / "cifar10_resnet20.pt"))
    return Case("ResNet-20", model, preload(data.calib_dataloader()))


@torch.inference_mode()
def fp32_pass(model: nn.Module, batches: list[Tensor]) -> float:
    """Seconds of one eval-mode forward over ``batches``, after :func:`warm_up`."""
    model.eval()
    warm_up(model, batches)
    start = time.perf_counter()
    for x in batches:
        model(x)
    return time.perf_counter() - start


def warm_up(model: nn.Module, batches: list[Tensor]) -> None:
    """One forward of each distinct batch shape (the first and a smaller last batch), so no timed call is the first."""
    for x in {tuple(b.shape): b for b in batches}.values():
        model(x)


def prepare(case: Case, settings: QuantSettings) -> nn.Module:
    """A copy of the float model prepared as ``Calibration.setup`` does (quantize_model + measure_model), in eval."""
    model = copy.deepcopy(case.model)
    quantize_model(model, settings)
    measure_model(model, torch.zeros(1, *backbone_input_size(model)))
    return model.eval()


def identity_reduce(tensor: Tensor, op: str) -> Tensor:
    """``strategy_reduce`` on one device."""
    return tensor


@torch.inference_mode()
def calibrate(
    model: nn.Module, batches: list[Tensor], digest: Callable[[Tensor], bytes] = image_digest, warm: bool = True
) -> CalibrationTime:
    """``Calibration.on_validation_start`` on one device, step for step, over preloaded ``batches``; its timings.

    ``warm``: first run :func:`warm_up` with the quantizers off (no statistics recorded); the profile does it itself.
    """
    timing = CalibrationTime()
    check_finite_parameters(model)  # before the callback's timer starts
    set_mode(model, weights="off", activations="off")
    if warm:
        warm_up(model, batches)
    start = time.perf_counter()
    set_mode(model, weights="off", activations="observe")
    digests: list[bytes] = []
    try:
        for x in batches:
            model(x)
            mark = time.perf_counter()
            digests.extend(digest(image) for image in x)
            timing.digests += time.perf_counter() - mark
    finally:
        set_mode(model, weights="off", activations="off")
    mark = time.perf_counter()
    sync_observers(model, identity_reduce)
    invalidate_qparams(model)
    check_calibrated(model)
    digests = unstack_digests(stack_digests(digests))  # gather_rows is the identity on one device
    timing.finish = time.perf_counter() - mark
    timing.total = time.perf_counter() - start
    mark = time.perf_counter()
    derive_qparams(model)
    timing.qparams = time.perf_counter() - mark
    return timing


def derive_qparams(model: nn.Module) -> None:
    """Every layer's activation scale and zero point at each of :data:`QPARAM_BITS` (cached by the quantizer)."""
    for layer in quant_layers(model).values():
        for bits in QPARAM_BITS:
            layer.input_quantizer.qparams(bits)


@contextmanager
def labelled(cls: type, method: str, label: str) -> Iterator[None]:
    """Wrap ``cls.method`` in ``record_function(label)`` for the duration (profile only; restored afterwards)."""
    original = cls.__dict__[method]

    def wrapped(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(cls, method, wrapped)
    try:
        yield
    finally:
        setattr(cls, method, original)


LABELS: list[tuple[type, str, str]] = [
    (HistogramObserver, "forward", "lit_mpq: histogram observer update"),
    (MinMaxObserver, "forward", "lit_mpq: minmax observer update"),
    (QuantLinear, "input_feature_sum", "lit_mpq: bias correction input_feature_sum"),
    (QuantConv2d, "input_feature_sum", "lit_mpq: bias correction input_feature_sum"),
    (BiasCorrection, "observe", "lit_mpq: bias correction observe (sum into buffer)"),
    (QuantLinear, "float_forward", "lit_mpq: layer arithmetic (F.linear / conv)"),
    (QuantConv2d, "float_forward", "lit_mpq: layer arithmetic (F.linear / conv)"),
    (Observer, "qparams", "lit_mpq: activation qparams derivation"),
]


def profile_case(case: Case, observer: str, images: int, top: int, attention: bool = True) -> None:
    """Profile calibration (bias correction on) plus qparams derivation, and print where the time goes."""
    settings = QuantSettings(act_observer=observer, bias_correction=True, attention=attention)
    model = prepare(case, settings)
    batch_size = case.batches[0].shape[0]
    batches = case.batches[: max(1, -(-images // batch_size))]
    n = sum(int(x.shape[0]) for x in batches)

    def digest(image: Tensor) -> bytes:
        with record_function("lit_mpq: image_digest (SHA-256)"):
            return image_digest(image)

    with torch.inference_mode():
        warm_up(model, batches)  # outside the profile: quantizers are off after prepare
    with ExitStack() as stack:
        for cls, method, label in LABELS:
            stack.enter_context(labelled(cls, method, label))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("calibration (callback timer) + qparams"):
                timing = calibrate(model, batches, digest, warm=False)
    events = prof.key_averages()
    wall = timing.total + timing.qparams
    print()
    print(
        f"### Profile: {case.name}, {observer} observer, bias correction on, {n} images "
        f"(profiled wall {wall:.2f} s; calibration {timing.total:.2f} s + qparams {timing.qparams:.2f} s)"
    )
    print()
    print("| scope (inclusive CPU time) | calls | s | share of profiled wall |")
    print("|---|---:|---:|---:|")
    for label in [*dict.fromkeys(label for _, _, label in LABELS), "lit_mpq: image_digest (SHA-256)"]:
        rows = [e for e in events if e.key == label]
        if not rows:
            continue
        seconds = sum(e.cpu_time_total for e in rows) / 1e6
        calls = sum(e.count for e in rows)
        print(f"| {label} | {calls} | {seconds:.2f} | {100 * seconds / wall:.0f} % |")
    print()
    print(f"Top {top} operators by self CPU time:")
    print()
    print("| operator | calls | self CPU s | share of profiled wall |")
    print("|---|---:|---:|---:|")
    operators = [e for e in events if not e.key.startswith(("lit_mpq:", "calibration ("))]
    for e in sorted(operators, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        seconds = e.self_cpu_time_total / 1e6
        print(f"| `{e.key}` | {e.count} | {seconds:.2f} | {100 * seconds / wall:.1f} % |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["deit", "resnet20"], default=["deit", "resnet20"])
    parser.add_argument(
        "--observers", nargs="*", choices=OBSERVER_NAMES, default=list(OBSERVER_NAMES), help="none: profile only"
    )
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--deit-images", type=int, default=256)
    parser.add_argument("--deit-batch-size", type=int, default=64)
    parser.add_argument("--resnet-images", type=int, default=512)
    parser.add_argument("--resnet-batch-size", type=int, default=200)
    parser.add_argument("--deit-repeats", type=int, default=1, help="rows keep the fastest of the repeats")
    parser.add_argument("--resnet-repeats", type=int, default=3, help="rows keep the fastest of the repeats")
    parser.add_argument("--profile-observer", choices=OBSERVER_NAMES, default="mse")
    parser.add_argument("--profile-images", type=int, default=64)
    parser.add_argument("--top", type=int, default=15, help="operators listed in the profile")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--no-attention", action="store_true", help="leave ViT attention matmuls (q, k, v, softmax) unquantized"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    loaders = {
        "deit": lambda: load_deit(args.data_root, args.deit_images, args.deit_batch_size),
        "resnet20": lambda: load_resnet20(args.data_root, args.resnet_images, args.resnet_batch_size),
    }
    cases = {key: loaders[key]() for key in args.models}
    reps = {"deit": max(1, args.deit_repeats), "resnet20": max(1, args.resnet_repeats)}
    attention = not args.no_attention

    print(f"`python {' '.join(['benchmarks/calibration_speed.py', *sys.argv[1:]])}`")
    print()
    print(
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}; "
        "images preloaded; FP32 pass timed next to each calibration (same process, same images); "
        f"fastest of {args.deit_repeats} (DeiT-Tiny) / {args.resnet_repeats} (ResNet-20) interleaved repeats; "
        f"attention matmuls {'quantized' if attention else 'float (--no-attention)'}."
    )
    print()
    header = (
        "| model | images | observer | bias corr. | FP32 pass s | calibration s | FP32 passes "
        "| of which forward+observe s | digests s | sync+checks s | act qparams 4/6/8 b s |"
    )
    print(header)
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, case in cases.items():
        images = sum(int(x.shape[0]) for x in case.batches)
        # The floor: the prepared model with every quantizer off costs the layer wrappers, and nothing else.
        passthrough = prepare(case, QuantSettings(attention=attention))
        set_mode(passthrough, weights="off", activations="off")
        runs = [(fp32_pass(case.model, case.batches), fp32_pass(passthrough, case.batches)) for _ in range(reps[key])]
        fp32, floor = min(f for f, _ in runs), min(q for _, q in runs)
        print(
            f"| {case.name} | {images} | none (quantizers off: wrapper floor) | - | {fp32:.2f} | {floor:.2f} "
            f"| {floor / fp32:.2f} | {floor:.2f} | - | - | - |",
            flush=True,
        )
        for observer in args.observers:
            for bias_correction in (False, True):
                settings = QuantSettings(act_observer=observer, bias_correction=bias_correction, attention=attention)
                runs = [
                    (fp32_pass(case.model, case.batches), calibrate(prepare(case, settings), case.batches))
                    for _ in range(reps[key])
                ]
                fp32 = min(f for f, _ in runs)
                timing = min((t for _, t in runs), key=lambda t: t.total)
                print(
                    f"| {case.name} | {images} | {observer} | {'on' if bias_correction else 'off'} | {fp32:.2f} "
                    f"| {timing.total:.2f} | {timing.total / fp32:.2f} | {timing.forward:.2f} | {timing.digests:.2f} "
                    f"| {timing.finish:.3f} | {timing.qparams:.3f} |",
                    flush=True,
                )
    if not args.no_profile and "deit" in cases:
        profile_case(cases["deit"], args.profile_observer, args.profile_images, args.top, attention)
    print()
    print(f"Total wall time of this script: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
