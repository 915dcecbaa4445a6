"""Size of the packed checkpoint (``quantized.pt``) against the ideal, on ResNet-20 and DeiT-Tiny with real weights.

    python benchmarks/packed_size.py

For each model and plan: the shared weights, calibrated on real images (64 CIFAR-10 training images; 32 ImageNet
images of ``imagenet_sample_1000`` for DeiT-Tiny with the ``configs/deit.yaml`` recipe, attention matmuls included),
weights at the plan's widths, packed with :func:`lit_mpq.deploy.pack_model`. The ideal is ``Σ bits·params/8`` over
the quantized weights plus their scales (float32, one per output channel), the activation parameters and every tensor
left in floating point at its own width; the overhead is what the container, the index, the plan and the card add.
The "mixed" plans cycle the weight widths 2, 3, 4, 5, 6, 8 over the layers in order (every width appears, each about
equally often). Each file is reloaded with :func:`lit_mpq.deploy.load_quantized` and its logits on a real batch
compared with the run's (``max |Δ|`` = 0 is bit for bit).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _runs import VIT_RECIPE_4BIT, imagenet_data

from lit_mpq.deploy import load_quantized, pack_model, save_quantized
from lit_mpq.models import create_backbone
from lit_mpq.quant.apply import (
    QuantSettings,
    apply_plan,
    apply_post_layernorm,
    calibrate,
    measure_model,
    quantize_model,
)
from lit_mpq.quant.batchnorm import fold_batchnorm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MIXED = (2, 3, 4, 5, 6, 8)


def cifar_images(count: int) -> torch.Tensor:
    data = np.load(SHARED / "cifar10_train_4k_lossless.npz")["images"][:count].astype(np.float32) / 255.0
    data = (data - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(data.transpose(0, 3, 1, 2).copy())


def prepared(name: str):
    """The calibrated model, its plan, the settings, folded pairs, input size and a real batch."""
    torch.manual_seed(0)
    if name == "cifar_resnet20":
        model = create_backbone(name, checkpoint_path=str(SHARED / "cifar10_resnet20.pt")).eval()
        settings, size = QuantSettings(act_observer="mse", bias_correction=True), (3, 32, 32)
        images = cifar_images(64)
        pairs = fold_batchnorm(model, images[:1])
    else:
        model = create_backbone(name, checkpoint_path=str(SHARED / "deit_tiny_patch16_224.pt")).eval()
        settings, size = VIT_RECIPE_4BIT, (3, 224, 224)
        data = imagenet_data(SHARED, name, calibration=32, batch_size=32)
        images = next(iter(data.calib_dataloader()))[0]
        pairs = []
    example = torch.zeros(1, *size)
    quantize_model(model, settings)
    plan = measure_model(model, example)
    if settings.post_layernorm != "per_tensor":
        apply_post_layernorm(model, example, "mse" if settings.post_layernorm == "reparam_mse" else "minmax")
    if settings.bias_correction:
        for layer in model.modules():
            if hasattr(layer, "enable_bias_correction"):
                layer.enable_bias_correction()
    calibrate(model, [images])
    return model, plan, settings, pairs, size, images[:8]


def measure(name: str, model, plan, settings, pairs, size, batch, label: str, widths) -> dict:
    for index, row in enumerate(plan.names):
        plan[row].w_bits = widths[index % len(widths)]
        plan[row].a_bits = 8
    apply_plan(model, plan)
    with torch.no_grad():
        reference = model(batch)
    content = pack_model(
        model, plan, backbone=name, num_classes=int(reference.shape[1]), input_size=size, settings=settings,
        folded_batchnorms=pairs,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        packed = save_quantized(Path(folder) / "quantized.pt", content)
        with torch.no_grad():
            reloaded = load_quantized(Path(folder) / "quantized.pt").model(batch)
    return {
        "model": name,
        "plan": label,
        "avg_w_bits": plan.average_weight_bits(),
        "ideal": packed.ideal_bytes,
        "codes": packed.weight_bits_bytes,
        "rest": packed.ideal_bytes - packed.weight_bits_bytes,
        "file": packed.file_bytes,
        "overhead": packed.overhead,
        "max_diff": float((reloaded - reference).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar_resnet20", "deit_tiny_patch16_224"])
    args = parser.parse_args()
    rows = []
    for name in args.models:
        model, plan, settings, pairs, size, batch = prepared(name)
        for label, widths in (("mixed 2-8", MIXED), ("W4", (4,)), ("W8", (8,))):
            rows.append(measure(name, model, plan, settings, pairs, size, batch, label, widths))
    print(
        "| model | plan | avg W bits | ideal (kB) | of which codes | scales, act. params, float | file (kB) | "
        "overhead | reload max abs Δlogit |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['plan']} | {r['avg_w_bits']:.2f} | {r['ideal'] / 1e3:.1f} | {r['codes'] / 1e3:.1f} | "
            f"{r['rest'] / 1e3:.1f} | {r['file'] / 1e3:.1f} | {100 * r['overhead']:+.2f} % | {r['max_diff']:.1f} |"
        )


if __name__ == "__main__":
    main()
