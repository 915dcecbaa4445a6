"""Peer benchmark: Brevitas 0.13.4 post-training quantization of the shared CIFAR-10 ResNet-20.

Reproduces ``shared/reference/peer_results_resnet20.md`` with Brevitas' own PTQ flow, so that lit_mpq's numbers
(``benchmarks/ptq_resnet20.py``) have a measured peer on the same model and images. Run it with the interpreter of
``benchmarks/peers/.venv-brevitas`` (made by ``benchmarks/peers/setup_brevitas.sh``); Brevitas is not a dependency
of lit_mpq::

    bash benchmarks/peers/setup_brevitas.sh
    benchmarks/peers/.venv-brevitas/bin/python benchmarks/peers/brevitas_resnet20.py --out brevitas_resnet20.jsonl

Data and model: ``shared/data/cifar10_resnet20.pt`` in lit_mpq's ``cifar_resnet20`` ("option A" shortcuts), inputs
normalized with the ImageNet mean/std; calibration on the first 512 images of ``cifar10_train_4k_lossless.npz`` in
batches of 64 (the example's ``--batch-size-calibration``), top-1 on all 1000 images of
``cifar10_test_1k_lossless.npz``.

The flow is the one of ``brevitas_examples/imagenet_classification/ptq/ptq_evaluate.py`` with
``--target-backend layerwise``, the example's defaults and these overrides: ``--weight-quant-granularity
per_channel``, ``--act-quant-percentile 99.999`` (its default), bias correction only where the method asks for it:

1. ``brevitas.graph.quantize.preprocess_for_quantize(model, equalize_iters=0, equalize_merge_bias=True,
   merge_bn=True)`` (FX trace, batch norm folded into the convolutions). The example's default is 20 iterations of
   graph equalization (``--graph-eq-iterations``); this script runs none unless ``--equalize-iters 20`` is given:
   without it the W4A8 row comes closer to ``shared/reference/peer_results_resnet20.md`` (nearest 90.4 against its
   90.7, bias correction 92.0 against 91.8; with 20 iterations 89.3 and 91.1; docs/rounding.md);
2. ``ptq_common.create_quant_maps`` (int, float scales, sym, stats; ``Int8WeightPerChannelFloat`` weights,
   ``Int8ActPerTensorFloat`` inputs with ``high_percentile_q=99.999``, ``Int32Bias``, no narrow range) and
   ``brevitas.graph.quantize.layerwise_quantize``: every Conv2d/Linear gets its weights and its input quantized.
   ``ptq_common.quantize_model`` keeps "first and last" at ``layerwise_first_last_bit_width`` by matching
   ``Conv2d.in_channels == 3`` and ``Linear.out_features == 1000`` (ImageNet); here the last layer is the
   10-class ``linear``, so this script builds the same maps with the last-layer test on ``out_features ==
   num_classes`` (with ``--imagenet-last-layer-rule`` it keeps the example's test, and the 10-class head then
   gets the base bit widths);
3. one forward pass on a calibration batch, then ``ptq_common.calibrate`` (``calibration_mode``) over the 512
   images;
4. the method: ``nearest`` (nothing more), ``bias_corr`` (``ptq_common.apply_bias_correction``), ``gptq``
   (``ptq_common.apply_gptq(act_order=False, use_quant_activations=False, create_weight_orig=True)``: the
   example's defaults), ``gpfq`` (``ptq_common.apply_gpfq(act_order=False)``: the example's default; in 0.13
   there is a single ``brevitas.graph.gpfq.GPFQ``, the memory-efficient form that accumulates ``H`` and ``G``
   with quantized and float inputs of each layer, two forward passes per batch and layer; the example's
   ``--gpfq-p`` option is no longer passed anywhere and there is no v1/v2 switch), ``gpfq_bias_corr``
   (``apply_gpfq`` then ``apply_bias_correction``, as ``ptq_evaluate.py`` orders them);
5. top-1 of the fake-quantized model in eval mode, batches of 250 (``ptq_evaluate.py`` wraps this in
   ``brevitas.export.inference.quant_inference_mode``, which caches the quantized weights for speed; importing
   ``brevitas.export`` needs ``onnx`` in 0.13.4, which this venv does without).

Each (setting, method) starts again from the float model. One JSON line each: ``setting``, ``method``, ``top1``
(percent), ``round_s``, ``total_s`` and ``correct`` (one ``0``/``1`` per test image, in order, for paired tests).
``round_s`` is the wall time of the step that sets the rounding: the whole ``apply_gptq`` / ``apply_gpfq`` call
(every layer, each with its pass over the 512 calibration images, plus the per-layer solve), which is what the
reference's "GPFQ time" column covers (about 40 s on 2 cores); for ``bias_corr`` it is ``apply_bias_correction``,
for ``gpfq_bias_corr`` both, and 0 for ``nearest`` (the quantizers round to nearest when they run). ``total_s``
covers steps 1 to 5, evaluation included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # Brevitas' example helpers wrap every loop in tqdm
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # lit_mpq need not be installed in the venv: the checkout is enough
    sys.path.insert(0, str(REPO))

from lit_mpq.data.cifar import NORMALIZATIONS, normalize_uint8  # noqa: E402
from lit_mpq.models.cifar_resnet import cifar_resnet20  # noqa: E402

try:
    from brevitas.graph.quantize import layerwise_quantize, preprocess_for_quantize
    from brevitas.inject import value
    from brevitas_examples.imagenet_classification.ptq import ptq_common
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"brevitas_resnet20.py needs Brevitas ({exc}); run benchmarks/peers/setup_brevitas.sh and use its venv.")

DATA = REPO.parent / "shared" / "data"
METHODS = ("nearest", "bias_corr", "gptq", "gpfq", "gpfq_bias_corr")


@dataclass(frozen=True)
class Setting:
    """Bit widths of one row of the reference table."""

    weight_bits: int
    act_bits: int
    first_last_bits: int


SETTINGS: dict[str, Setting] = {
    "w8a8": Setting(8, 8, 8),
    "w4a8": Setting(4, 8, 8),
    "w4a4": Setting(4, 4, 8),
    "w4a4_all": Setting(4, 4, 4),
    "w3a8": Setting(3, 8, 8),
}


def load_npz(path: Path, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Return ImageNet-normalized images ``[N, 3, 32, 32]`` and labels from a CIFAR ``.npz`` file."""
    with np.load(path) as data:
        images = torch.from_numpy(np.ascontiguousarray(data["images"][:limit])).permute(0, 3, 1, 2)
        labels = torch.from_numpy(data["labels"][:limit]).long()
    mean, std = NORMALIZATIONS["imagenet"]
    return normalize_uint8(images, mean, std), labels


def batches(images: Tensor, labels: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    """Split into ``(images, labels)`` batches, in order (what Brevitas' helpers iterate over)."""
    return list(zip(images.split(size), labels.split(size), strict=True))


def float_model(weights: Path) -> nn.Module:
    """Return ResNet-20 with the shared weights, in eval mode."""
    model = cifar_resnet20()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def quantize(
    model: nn.Module, setting: Setting, percentile: float, act_quant_type: str, num_classes: int | None
) -> nn.Module:
    """Layer-wise quantize ``model`` as ``ptq_common.quantize_model(backend='layerwise')`` does.

    Args:
        model: The preprocessed float model.
        setting: Bit widths.
        percentile: ``act_quant_percentile``.
        act_quant_type: ``"asym"`` or ``"sym"`` (``--act-quant-type``).
        num_classes: Output features of the last layer to keep at ``first_last_bits``; None keeps the example's
            ImageNet test (1000).
    """
    head = 1000 if num_classes is None else num_classes

    def bits(module: nn.Module, base: int) -> int:
        first = isinstance(module, nn.Conv2d) and module.in_channels == 3
        last = isinstance(module, nn.Linear) and module.out_features == head
        return setting.first_last_bits if first or last else base

    @value
    def weight_bit_width(module: nn.Module) -> int:
        return bits(module, setting.weight_bits)

    @value
    def act_bit_width(module: nn.Module) -> int:
        return bits(module, setting.act_bits)

    _, layer_map, _, _ = ptq_common.create_quant_maps(
        dtype=torch.float32,
        device="cpu",
        bias_bit_width=32,
        weight_bit_width=weight_bit_width,
        weight_param_method="stats",
        weight_scale_type="float_scale",
        weight_quant_type="sym",
        weight_quant_granularity="per_channel",
        weight_narrow_range=False,
        weight_quant_format="int",
        act_quant_format="int",
        act_bit_width=act_bit_width,
        act_scale_type="float_scale",
        act_scale_computation_type="static",
        act_param_method="stats",
        act_quant_type=act_quant_type,
        act_quant_granularity="per_tensor",
        act_quant_percentile=percentile,
    )
    return layerwise_quantize(model, compute_layer_map=layer_map)


@torch.no_grad()
def correct_images(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 250) -> Tensor:
    """Whether each test image is classified correctly (bool, in order)."""
    model.eval()
    return torch.cat([model(x).argmax(1) == y for x, y in batches(images, labels, batch_size)])


def timed(fn: Callable[[], Any]) -> float:
    """Run ``fn`` and return its wall time in seconds."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_one(
    name: str, method: str, args: argparse.Namespace, calib: list[tuple[Tensor, Tensor]], test: tuple[Tensor, Tensor]
) -> dict[str, Any]:
    """Quantize a fresh copy of the float model with one setting and method, and evaluate it."""
    start = time.perf_counter()
    model = float_model(args.weights)
    if args.merge_bn or args.equalize_iters:
        model = preprocess_for_quantize(
            model, equalize_iters=args.equalize_iters, equalize_merge_bias=True, merge_bn=args.merge_bn
        )
    qmodel = quantize(
        model,
        SETTINGS[name],
        args.act_percentile,
        args.act_quant_type,
        None if args.imagenet_last_layer_rule else 10,
    )
    with torch.no_grad():
        qmodel(calib[0][0])  # as ptq_evaluate.py: initializes the scale factors before any algorithm
    ptq_common.calibrate(calib, qmodel)
    round_s = 0.0
    if method in ("gpfq", "gpfq_bias_corr"):
        round_s += timed(lambda: ptq_common.apply_gpfq(calib, qmodel, act_order=args.gpxq_act_order))
    if method == "gptq":
        round_s += timed(
            lambda: ptq_common.apply_gptq(
                calib,
                qmodel,
                act_order=args.gpxq_act_order,
                use_quant_activations=args.gptq_use_quant_activations,
                create_weight_orig=True,
            )
        )
    if method in ("bias_corr", "gpfq_bias_corr"):
        round_s += timed(lambda: ptq_common.apply_bias_correction(calib, qmodel))
    correct = correct_images(qmodel, *test)
    return {
        "setting": name,
        "method": method,
        "top1": round(100.0 * float(correct.float().mean()), 2),
        "round_s": round(round_s, 2),
        "total_s": round(time.perf_counter() - start, 2),
        "correct": "".join("1" if c else "0" for c in correct.tolist()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here instead of stdout")
    p.add_argument("--weights", type=Path, default=DATA / "cifar10_resnet20.pt")
    p.add_argument("--train-npz", type=Path, default=DATA / "cifar10_train_4k_lossless.npz")
    p.add_argument("--test-npz", type=Path, default=DATA / "cifar10_test_1k_lossless.npz")
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--calib-batch-size", type=int, default=64)
    p.add_argument("--act-percentile", type=float, default=99.999)
    p.add_argument("--act-quant-type", choices=("asym", "sym"), default="asym")
    p.add_argument("--equalize-iters", type=int, default=0, help="graph equalization iterations (example: 20)")
    p.add_argument(
        "--merge-bn", action=argparse.BooleanOptionalAction, default=True, help="fold batch norm (example: yes)"
    )
    p.add_argument("--gpxq-act-order", action="store_true", help="GPTQ/GPFQ act_order (example: off)")
    p.add_argument(
        "--gptq-use-quant-activations", action="store_true", help="GPTQ use_quant_activations (example: off)"
    )
    p.add_argument(
        "--imagenet-last-layer-rule",
        action="store_true",
        help="keep quantize_model's out_features == 1000 test, so the 10-class head gets the base bit widths",
    )
    return p.parse_args(argv)


def rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Yield one result per (setting, method), settings outermost."""
    calib = batches(*load_npz(args.train_npz, args.calib_size), args.calib_batch_size)
    test = load_npz(args.test_npz)
    for name in args.settings:
        for method in args.methods:
            yield run_one(name, method, args, calib, test)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")  # as ptq_evaluate.py: Brevitas warns about __torch_function__ and more
    for row in rows(args):
        line = json.dumps(row)
        if args.out is None:
            print(line, flush=True)
        else:
            with args.out.open("a") as f:
                f.write(line + "\n")
            print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
