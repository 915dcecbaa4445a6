"""Benchmark: which tensors of a ViT cost accuracy at a uniform bit width (DeiT-Tiny or ViT-Tiny, real images).

Calibrates the config's recipe once (MSE activation and weight ranges, weights per channel, log√2 softmax, the
post-LayerNorm reparameterization; 256 images of ``imagenet_sample_1000``), then evaluates variants on ``--images``
evenly spaced images of ``imagenet_val_1300`` (the first N would be a few classes, and the rows of docs/vit.md dated
before 2026-12-03 were on the first 500): every tensor at W8A8 or W6A6, one kind of tensor at a time at 6 bits (the
inputs of qkv, proj, fc1, fc2; the operands of q·kᵀ and softmax·V), and the fc2 inputs with other observers (the same
histogram, read as min/max or percentile 99.99). The patch embedding and the head stay at W8A8, as the configs pin them.
``--study a4`` finds where 4-bit activations cost (weights FP32 but the pinned layers'; one kind at 4 bits alone, 4
bits everywhere but one kind at 8, each matmul operand alone, the fc2 inputs' other range readings). ``--study w8a8``
asks the same of W8A8 instead: the recipe against MSE, min/max or percentile ranges everywhere, weights or activations
alone at 8 bits, and one kind of tensor at a time at 8 bits with everything else in FP32 (the patch
embedding and head included). One row per variant: top-1 and the evaluation time::

    python benchmarks/vit_tensor_study.py [--model deit|vit] [--images 500] [--study w6a6|w8a8|a4] [--only REGEX]
        [--recipe before|4bit]

Results: docs/vit.md ("Which tensors cost W6A6").
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import timm
import torch
from _runs import VIT_RECIPE, VIT_RECIPE_4BIT, cached_batches, evenly_spaced, imagenet_data

from lit_mpq.quant.apply import (
    apply_plan,
    apply_post_layernorm,
    invalidate_qparams,
    measure_model,
    quantize_model,
    quantizers_mode,
    set_mode,
)
from lit_mpq.quant.observers import HistogramObserver, MSEObserver, PercentileObserver

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODELS = {
    "deit": ("deit_tiny_patch16_224", "deit_tiny_patch16_224.pt"),
    "vit": ("vit_tiny_patch16_224", "vit_tiny_patch16_224_augreg.pt"),
}
READ_AS = {"mse": MSEObserver, "percentile": PercentileObserver, "minmax": HistogramObserver}
"""The same histogram read three ways (HistogramObserver's own range is the observed min/max)."""

# (label, {tensor kind: (w_bits, a_bits)}, bits of every other tensor, {tensor kind or "*": observer}); None = FP32
W6A6_VARIANTS = [
    ("W8A8 everything", {}, (8, 8), {}),
    ("W6A6 everything", {}, (6, 6), {}),
    ("W6 weights, A8", {}, (6, 8), {}),
    ("W8, A6 activations", {}, (8, 6), {}),
    *[(f"A6 at {kind} only", {kind: (8, 6)}, (8, 8), {}) for kind in ("qkv", "proj", "fc1", "fc2")],
    *[(f"A6 at {kind} operands only", {kind: (6, 6)}, (8, 8), {}) for kind in ("q·kᵀ", "softmax·V")],
    ("W6A6, fc2 inputs min/max", {}, (6, 6), {"fc2": "minmax"}),
    ("W6A6, fc2 inputs at 8 bits", {"fc2": (6, 8)}, (6, 6), {}),
    ("W6A6, fc2 inputs percentile 99.99", {}, (6, 6), {"fc2": "percentile"}),
    ("W8A8, fc2 inputs percentile 99.99", {}, (8, 8), {"fc2": "percentile"}),
]
RECIPE = {"fc2": "percentile"}
LINEAR_KINDS = ("qkv", "proj", "fc1", "fc2")
W8A8_VARIANTS = [
    ("W8A8 recipe (fc2 inputs percentile 99.99, MSE elsewhere)", {}, (8, 8), RECIPE),
    ("W8A8, MSE ranges everywhere", {}, (8, 8), {}),
    ("W8A8, min/max ranges everywhere", {}, (8, 8), {"*": "minmax"}),
    ("W8A8, percentile 99.99 everywhere", {}, (8, 8), {"*": "percentile"}),
    ("W8, activations FP32", {}, (8, None), RECIPE),
    ("A8, weights FP32", {}, (None, 8), RECIPE),
    *[
        (f"A8 at the {kind} inputs only", {kind: (None, 8)}, (None, None), RECIPE)
        for kind in ("qkv", "proj", "fc1", "fc2")
    ],
    *[(f"{kind} operands at 8 bits only", {kind: (8, 8)}, (None, None), RECIPE) for kind in ("q·kᵀ", "softmax·V")],
    ("A8 at patch embedding and head inputs only", {"pinned": (None, 8)}, (None, None), RECIPE),
]
MATMUL_KINDS = ("q·kᵀ", "softmax·V")
A4_VARIANTS = [
    ("A8, weights FP32", {}, (None, 8), RECIPE),
    ("A4, weights FP32", {}, (None, 4), RECIPE),
    *[(f"A4 at the {kind} inputs only", {kind: (None, 4)}, (None, None), RECIPE) for kind in LINEAR_KINDS],
    *[(f"{kind} operands at 4 bits only", {kind: (4, 4)}, (None, None), RECIPE) for kind in MATMUL_KINDS],
    *[(f"A4, but the {kind} inputs at 8 bits", {kind: (None, 8)}, (None, 4), RECIPE) for kind in LINEAR_KINDS],
    *[(f"A4, but the {kind} operands at 8 bits", {kind: (8, 8)}, (None, 4), RECIPE) for kind in MATMUL_KINDS],
    *[
        (f"A4 at the fc2 inputs only, {read_as} ranges", {"fc2": (None, 4)}, (None, None), {"fc2": read_as})
        for read_as in ("mse", "minmax")
    ],
    *[
        (f"A4 at the {side} operand of softmax·V only", {"softmax·V": bits}, (None, None), RECIPE)
        for side, bits in (("left (softmax)", (None, 4)), ("right (v)", (4, None)))
    ],
    *[
        (f"A4 at the {side} operand of q·kᵀ only", {"q·kᵀ": bits}, (None, None), RECIPE)
        for side, bits in (("left (q)", (None, 4)), ("right (k)", (4, None)))
    ],
]
STUDIES = {"w6a6": W6A6_VARIANTS, "w8a8": W8A8_VARIANTS, "a4": A4_VARIANTS}
"""``w6a6`` and ``a4``: the patch embedding and head stay at W8A8 (the configs pin them); ``w8a8``: they follow each
row."""


def tensor_kind(name: str, is_matmul: bool) -> str:
    """``pinned`` (patch embedding, head), ``q·kᵀ``, ``softmax·V`` or the Linear's own name (qkv, proj, fc1, fc2)."""
    if name in ("patch_embed.proj", "head"):
        return "pinned"
    if is_matmul:
        return "q·kᵀ" if name.endswith("matmul_qk") else "softmax·V"
    return name.rsplit(".", 1)[-1]


def main() -> None:
    """Calibrate once, then print one row per variant."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="deit")
    parser.add_argument("--images", type=int, default=500, help="N evenly spaced validation images")
    parser.add_argument("--study", choices=sorted(STUDIES), default="w6a6", help="which set of variants")
    parser.add_argument("--only", default="", help="run only the variants whose label matches this regex")
    parser.add_argument(
        "--recipe",
        choices=["before", "4bit"],
        default="before",
        help="the calibration recipe: configs/deit.yaml's until 2026-12-03, or its 4-bit one since (twin-uniform fc2 "
        "inputs, mean softmax zero code, per-channel MSE post-LayerNorm ranges)",
    )
    args = parser.parse_args()
    backbone, weights = MODELS[args.model]
    model = timm.create_model(backbone, pretrained=False)
    model.load_state_dict(torch.load(DATA / weights, weights_only=True))
    model.eval()
    data = imagenet_data(DATA, backbone, 256)
    recipe = VIT_RECIPE_4BIT if args.recipe == "4bit" else VIT_RECIPE
    quantize_model(model, recipe)
    example = torch.zeros(1, 3, 224, 224)
    plan = measure_model(model, example)
    apply_post_layernorm(model, example, "mse" if recipe.post_layernorm == "reparam_mse" else "minmax")
    set_mode(model, weights="off", activations="observe")
    with torch.inference_mode():
        for x, *_ in data.calib_dataloader():
            model(x)
    set_mode(model, weights="off", activations="off")
    invalidate_qparams(model)
    batches = cached_batches(evenly_spaced(data.val_set, args.images), 100, 2)

    def top1() -> float:
        correct = total = 0
        with torch.inference_mode():
            for x, y in batches:
                correct += int((model(x).argmax(-1) == y).sum())
                total += len(y)
        return 100 * correct / total

    with quantizers_mode(model, "off"):
        print(f"| FP32 | {top1():.1f} | |", flush=True)
    modules = dict(model.named_modules())
    kinds = {name: tensor_kind(name, plan.specs[name].kind == "matmul") for name in plan.layers}
    float_tensors = []
    for label, bits_of_kind, default, observer_of_kind in STUDIES[args.study]:
        if not re.search(args.only, label):
            continue
        pinned = default if args.study == "w8a8" else (8, 8)
        float_tensors.clear()
        for name, layer in plan.layers.items():
            observer = getattr(getattr(modules[name], "input_quantizer", None), "observer", None)
            if isinstance(observer, HistogramObserver):  # not the reparameterized (per-channel min/max) inputs
                kind_observer = observer_of_kind.get(kinds[name], observer_of_kind.get("*", "mse"))
                observer.__class__ = READ_AS[kind_observer]
                observer.percentile, observer.num_candidates = 99.99, 200
            bits = bits_of_kind.get(kinds[name], pinned if kinds[name] == "pinned" else default)
            float_tensors += [(name, kind) for kind, b in zip("wa", bits, strict=True) if b is None]
            layer.w_bits, layer.a_bits = (8 if b is None else b for b in bits)  # FP32 tensors switched off below
        invalidate_qparams(model)
        apply_plan(model, plan)
        for name, kind in float_tensors:
            modules[name].quantizer(kind).bits = None
        start = time.perf_counter()
        accuracy = top1()
        print(f"| {label} | {accuracy:.1f} | {time.perf_counter() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
