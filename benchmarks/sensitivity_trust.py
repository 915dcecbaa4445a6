r"""Benchmark: how far each sensitivity metric can be trusted (Kendall's tau against measured accuracy drops).

For each model, every quantized row of the plan is quantized alone (its ``"w"`` tensor, or its ``"a"`` tensor) at
each probed bit width, and the top-1 drop is measured; Kendall's tau (tau-b) between a metric's scores
``S[layer, bits]`` and those drops, over all layer x bits pairs per tensor kind, says how well the metric ranks what
actually hurts. The tensors are reached through ``layer.quantizer(kind)``, so an attention matmul's rows count too
(its ``"w"`` is the right operand, k or V; its ``"a"`` the left one, q or the softmax output), and tau is reported
over all rows and, when a model has matmuls, separately over the weight layers and over the matmul rows.

- CIFAR ResNets (``cifar_resnet*``): drops on the 10,000 CIFAR-10 test images of ``cifar10_test_jpeg10k.npz``
  (JPEG-degraded, so only drops relative to FP32 on the same file are used: a single layer at 3-4 bits moves the
  1000-image lossless set by less than its 0.1-point resolution); calibration and probing use the first 512
  lossless training images, MSE activation ranges.
- DeiT-Tiny (``deit_tiny_patch16_224``): the shared timm weights, drops on the 1300 ``imagenet_val_1300`` images,
  calibration on ``imagenet_sample_1000``, with the quantization settings of ``configs/deit.yaml`` (MSE activation and
  weight ranges, per-channel weights, log-sqrt2 softmax levels, post-LayerNorm reparameterization). 74 rows x 2 kinds
  x 2 bit widths is about 300 evaluations of the validation set: ``--eval-limit`` evaluates on N evenly spaced images
  only, ``--rows`` measures the rows whose names match a regular expression (e.g. four of the twelve blocks, the patch
  embedding and the head), and each evaluation resumes at the block its row lives in (the float blocks before it run
  once, their outputs are kept), which halves the cost on average. The script prints the number of evaluations and an
  estimate of their time before starting. Scores of every metric cover all rows; tau is taken over the measured ones.

Uses the pure-PyTorch API (no Trainer)::

    python benchmarks/sensitivity_trust.py [--models cifar_resnet20 cifar_resnet32] [--bits 2 3 4]
    python benchmarks/sensitivity_trust.py --models deit_tiny_patch16_224 [--bits 3 4] [--eval-limit 500] \
        [--rows 'patch_embed.*|head|blocks\.(0|4|8|11)\..*'] [--kl-samples 64]
    python benchmarks/sensitivity_trust.py --models deit_tiny_patch16_224 --metrics output_l2 fisher --dry-run
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from _runs import VIT_RECIPE, cached_batches, evenly_spaced, imagenet_data
from scipy.stats import kendalltau
from torch import Tensor, nn

from lit_mpq.data import CIFARDataModule
from lit_mpq.models import create_backbone
from lit_mpq.quant import QuantSettings, quant_layers, quantize_model, quantizers_mode, set_mode
from lit_mpq.quant.apply import apply_post_layernorm, invalidate_qparams, measure_model
from lit_mpq.quant.attention import is_quant_matmul
from lit_mpq.sensitivity import SENSITIVITY_METRICS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KINDS = ("w", "a")
VIT_MODELS = {"deit_tiny_patch16_224": "deit_tiny_patch16_224.pt"}
"""timm backbones this benchmark knows -> weights file in the shared data folder."""
DEFAULT_BITS = {"cifar": [2, 3, 4], "vit": [3, 4]}

Batches = list[tuple[Tensor, Tensor]]
Drops = dict[str, dict[str, dict[int, float]]]


@torch.no_grad()
def top1(model: nn.Module, batches: Batches) -> float:
    """Top-1 accuracy (percent) of ``model`` over ``batches`` of ``(images, labels)``."""
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(-1) == y).sum())
        total += int(y.numel())
    return 100.0 * correct / total


def first_images(loader, limit: int | None) -> Batches:
    """The loader's batches kept in memory (replayed for every evaluation), cut after ``limit`` images if given."""
    batches: Batches = []
    seen = 0
    for x, y, *_ in loader:
        if limit is not None and seen + len(y) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        if len(y):
            batches.append((x, y))
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    return batches


def measured_drops(
    model: nn.Module, rows: Sequence[str], bits_list: list[int], reference: float, evaluate: Callable[[str], float]
) -> Drops:
    """Top-1 drop (points) with one quantizer on at a time: ``drops[name][kind][bits]`` for each of ``rows``.

    Every row of :func:`quant_layers` (weight layers and attention matmuls alike) is reached through
    ``layer.quantizer(kind)``; ``evaluate(row)`` gives the top-1 with that row's quantizer the only one on.
    """
    layers = quant_layers(model)
    drops: Drops = {}
    total, done, start = len(rows) * len(KINDS) * len(bits_list), 0, time.perf_counter()
    for name in rows:
        drops[name] = {kind: {} for kind in KINDS}
        for kind in KINDS:
            quantizer = layers[name].quantizer(kind)
            saved = quantizer.bits
            try:
                for bits in bits_list:
                    with quantizers_mode(model, "off"):
                        quantizer.mode, quantizer.bits = "quant", bits
                        drops[name][kind][bits] = reference - evaluate(name)
                    done += 1
            finally:
                quantizer.mode, quantizer.bits = "off", saved
        elapsed = time.perf_counter() - start
        print(
            f"  drops {done}/{total} evaluations, {elapsed:.0f} s, ~{elapsed / done * (total - done):.0f} s left",
            flush=True,
        )
    return drops


def whole_top1(model: nn.Module, batches: Batches, row: str) -> float:
    """Top-1 of the whole model, whichever ``row`` is on (models without a resumable block structure)."""
    return top1(model, batches)


class BlockResume:
    """Top-1 of a timm vision transformer resumed at the block a row lives in.

    The float tokens entering every block are computed once (all quantizers off); a row inside ``blocks.<k>`` then
    only needs blocks ``k..`` and the head, which is exact because the quantizer under test is the only one on and
    everything before block ``k`` is float. Rows outside the blocks (patch embedding, head) run the whole model.
    """

    def __init__(self, model: nn.Module, batches: Batches) -> None:
        self.model, self.batches = model, batches
        self.tokens: list[list[Tensor]] = []  # tokens[i][k]: batch i entering block k
        with torch.no_grad(), quantizers_mode(model, "off"):
            for x, _ in batches:
                t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
                entering = []
                for block in model.blocks:
                    entering.append(t)
                    t = block(t)
                self.tokens.append(entering)

    @staticmethod
    def block_of(row: str) -> int | None:
        """The index of the block ``row`` lives in, or None outside the blocks."""
        match = re.match(r"blocks\.(\d+)\.", row)
        return int(match.group(1)) if match else None

    @torch.no_grad()
    def top1(self, row: str) -> float:
        """Top-1 (percent) with the model's quantizers as they are now, ``row``'s being the only one on."""
        k = self.block_of(row)
        if k is None:
            return top1(self.model, self.batches)
        correct = total = 0
        for entering, (_, y) in zip(self.tokens, self.batches, strict=True):
            t = entering[k]
            for block in self.model.blocks[k:]:
                t = block(t)
            logits = self.model.forward_head(self.model.norm(t))
            correct += int((logits.argmax(-1) == y).sum())
            total += int(y.numel())
        return 100.0 * correct / total


def check_resume(
    model: nn.Module, rows: Sequence[str], bits: int, resumed: Callable[[str], float], whole: Callable[[str], float]
) -> None:
    """Stop unless resuming at a block gives the whole model's top-1 for the last measured row inside a block."""
    inside = [row for row in rows if BlockResume.block_of(row) not in (None, 0)]
    if not inside:
        return
    quantizer = quant_layers(model)[inside[-1]].quantizer("a")
    saved = quantizer.bits
    try:
        with quantizers_mode(model, "off"):
            quantizer.mode, quantizer.bits = "quant", bits
            got, want = resumed(inside[-1]), whole(inside[-1])
    finally:
        quantizer.mode, quantizer.bits = "off", saved
    if got != want:
        raise RuntimeError(f"resuming at a block changed the top-1 of {inside[-1]}: {got} vs {want}")
    print(f"  resuming at a block checked on {inside[-1]} A{bits}: top-1 {got:.2f} both ways", flush=True)


def tau(scores: Drops, drops: Drops, names: Sequence[str], kinds: Sequence[str], bits_list: list[int]) -> float:
    """Kendall's tau-b between scores and drops over ``names x kinds x bits`` (nan when empty or constant)."""
    pairs = [(scores[n][k][b], drops[n][k][b]) for n in names for k in kinds for b in bits_list]
    if len(pairs) < 2:
        return math.nan
    return float(kendalltau(*zip(*pairs, strict=True)).statistic)


def calibrate(model: nn.Module, calib: list[Tensor]) -> None:
    """Observe activation ranges on ``calib``, then leave every quantizer off with fresh qparams."""
    set_mode(model, weights="off", activations="observe")
    with torch.no_grad():
        for x in calib:
            model(x)
    set_mode(model, weights="off", activations="off")
    invalidate_qparams(model)


def prepare_cifar(backbone: str, args: argparse.Namespace) -> tuple[nn.Module, list[Tensor], Batches, str]:
    """A calibrated CIFAR ResNet, its calibration batches, its evaluation batches and their description."""
    model = create_backbone(backbone, checkpoint_path=str(SHARED / f"cifar10_{backbone.split('_')[-1]}.pt")).eval()
    data = CIFARDataModule(
        train_npz=str(SHARED / "cifar10_train_4k_lossless.npz"),
        test_npz=str(SHARED / args.eval_file),
        batch_size=256,
        num_calibration_samples=args.calibration_samples or 512,
        calibration_subset="first",
    )
    data.setup("validate")
    calib = [x for x, *_ in data.calib_dataloader()]
    quantize_model(model, QuantSettings(act_observer="mse"))
    calibrate(model, calib)
    return model, calib, first_images(data.val_dataloader(), args.eval_limit), args.eval_file


def prepare_vit(backbone: str, args: argparse.Namespace) -> tuple[nn.Module, list[Tensor], Batches, str]:
    """A calibrated timm vision transformer (``configs/deit.yaml`` settings), its batches and their description."""
    import timm

    model = timm.create_model(backbone, pretrained=False)
    model.load_state_dict(torch.load(SHARED / VIT_MODELS[backbone], weights_only=True))
    model.eval()
    data = imagenet_data(SHARED, backbone, args.calibration_samples or 512)
    quantize_model(model, VIT_RECIPE)
    example = torch.zeros(1, 3, 224, 224)
    measure_model(model, example)
    apply_post_layernorm(model, example, "mse" if VIT_RECIPE.post_layernorm == "reparam_mse" else "minmax")
    calib = [x for x, *_ in data.calib_dataloader()]
    start = time.perf_counter()
    calibrate(model, calib)
    print(f"  calibrated on {sum(len(x) for x in calib)} images in {time.perf_counter() - start:.0f} s", flush=True)
    # evenly spaced: the class folders are sorted, so the first N images would be a few classes
    return model, calib, cached_batches(evenly_spaced(data.val_set, args.eval_limit), 100, 2), "imagenet_val_1300"


def probe_batches(calib: list[Tensor], metric: str, args: argparse.Namespace) -> list[Tensor]:
    """The calibration images a metric probes: ``--probe-samples`` of them (``--kl-samples`` for ``kl``)."""
    limit = args.kl_samples if metric == "kl" else args.probe_samples
    if limit is None:
        return calib
    out, seen = [], 0
    for x in calib:
        if seen >= limit:
            break
        out.append(x[: limit - seen])
        seen += len(out[-1])
    return out


def main() -> None:
    """Parse the options, measure drops and probe every metric for each model, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet32"])
    parser.add_argument(
        "--bits", nargs="+", type=int, default=None, help="probed bit widths (default: 2 3 4 for CIFAR, 3 4 for DeiT)"
    )
    parser.add_argument("--metrics", nargs="+", default=list(SENSITIVITY_METRICS), choices=list(SENSITIVITY_METRICS))
    parser.add_argument("--kl-samples", type=int, default=256, help="calibration images the kl probe uses")
    parser.add_argument("--probe-samples", type=int, default=None, help="images the other probes use (default all)")
    parser.add_argument(
        "--calibration-samples", type=int, default=None, help="calibration images (default 512; also probed)"
    )
    parser.add_argument(
        "--eval-limit", type=int, default=None, help="measure drops on N evaluation images (CIFAR: the first N)"
    )
    parser.add_argument("--eval-file", default="cifar10_test_jpeg10k.npz", help="CIFAR evaluation file")
    parser.add_argument(
        "--rows", default=None, help="measure drops only for rows whose names fully match this regular expression"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the evaluation count and time estimate, stop")
    args = parser.parse_args()
    for model_name in args.models:
        if model_name not in VIT_MODELS and not model_name.startswith("cifar_"):
            parser.error(f"unknown model {model_name!r}: cifar_* backbones or one of {list(VIT_MODELS)}")
    try:
        row_filter = re.compile(args.rows) if args.rows else None
    except re.error as error:
        parser.error(f"--rows {args.rows!r} is not a regular expression: {error}")
    torch.manual_seed(0)
    rows = []
    for backbone in args.models:
        family = "vit" if backbone in VIT_MODELS else "cifar"
        bits_list = args.bits or DEFAULT_BITS[family]
        print(f"{backbone}: preparing", flush=True)
        model, calib, batches, eval_name = (prepare_vit if family == "vit" else prepare_cifar)(backbone, args)
        layers = quant_layers(model)
        matmuls = [n for n, layer in layers.items() if is_quant_matmul(layer)]
        weighted = [n for n in layers if n not in matmuls]
        measured = [n for n in layers if row_filter is None or row_filter.fullmatch(n)]
        if not measured:
            parser.error(f"--rows {args.rows!r} matches none of {backbone}'s rows ({', '.join(list(layers)[:4])}, ...)")
        images = sum(len(y) for _, y in batches)
        start = time.perf_counter()
        with quantizers_mode(model, "off"):
            reference = top1(model, batches)
        seconds = time.perf_counter() - start
        whole = functools.partial(whole_top1, model, batches)
        evaluate = BlockResume(model, batches).top1 if family == "vit" else whole
        if family == "vit" and not args.dry_run:
            check_resume(model, measured, min(bits_list), evaluate, whole)
        evaluations = len(measured) * len(KINDS) * len(bits_list)
        print(
            f"{backbone}: FP32 top-1 {reference:.2f} % on {images} images of {eval_name} ({seconds:.1f} s); "
            f"{len(measured)} of {len(layers)} rows ({len(weighted)} weight layers, {len(matmuls)} matmuls) x "
            f"{len(KINDS)} kinds x {len(bits_list)} bit widths = {evaluations} evaluations, at most "
            f"~{evaluations * seconds / 60:.0f} min (fake quantization adds a little, resuming at a block saves more)",
            flush=True,
        )
        if args.dry_run:
            continue
        drops = measured_drops(model, measured, bits_list, reference, evaluate)
        for metric in args.metrics:
            probe, transform = SENSITIVITY_METRICS[metric]
            inputs = probe_batches(calib, metric, args)
            start = time.perf_counter()
            # the end-to-end probe costs a network pass per setting: only the measured rows are probed
            extra = {"rows": measured} if metric == "kl" else {}
            stats = probe(model, inputs, bits_list, **extra)
            seconds = time.perf_counter() - start
            scores = stats.scores(transform)
            names = [n for n in scores if n in drops]
            groups = {
                "all": names,
                "layers": [n for n in names if n in weighted],
                "matmuls": [n for n in names if n in matmuls],
            }
            taus = {
                (group, kind): tau(scores, drops, members, kinds, bits_list)
                for group, members in groups.items()
                for kind, kinds in (("w", ("w",)), ("a", ("a",)), ("both", KINDS))
            }
            probed = sum(int(x.shape[0]) for x in inputs)
            rows.append((backbone, metric, taus, seconds, probed, images))
            print(f"{backbone}: {metric} probed in {seconds:.0f} s", flush=True)
    if not rows:
        return
    split = any(row[0] in VIT_MODELS for row in rows)  # models with attention matmuls
    print(
        f"\n`python benchmarks/sensitivity_trust.py --models {' '.join(args.models)}"
        f"{' --bits ' + ' '.join(map(str, args.bits)) if args.bits else ''}"
        f"{f' --eval-limit {args.eval_limit}' if args.eval_limit else ''}"
        f"{f' --rows {shlex.quote(args.rows)}' if args.rows else ''}"
        f"{f' --kl-samples {args.kl_samples}' if 'kl' in args.metrics else ''}`: "
        "Kendall's tau between S[layer, bits] and the measured top-1 drop of quantizing that tensor alone\n"
    )
    header = "| model | metric | tau w | tau a | tau both |"
    if split:
        header += " layers w | layers a | layers both | matmuls w | matmuls a | matmuls both |"
    header += " probe s | probe images | eval images |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for backbone, metric, taus, seconds, probed, images in rows:
        keys = [("all", k) for k in ("w", "a", "both")]
        if split:
            keys += [(g, k) for g in ("layers", "matmuls") for k in ("w", "a", "both")]
        values = " | ".join("–" if math.isnan(taus[key]) else f"{taus[key]:.3f}" for key in keys)
        print(f"| {backbone} | {metric} | {values} | {seconds:.1f} | {probed} | {images} |")


if __name__ == "__main__":
    main()
