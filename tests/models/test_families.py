"""The model families of the source projects go through ``validate`` and ONNX export without code changes.

Each family (random weights, made small where the builder allows it, 3 classes) runs ``python cli.py validate`` on a
tiny image folder with calibration, a mixed plan (4-bit weights, 8-bit inputs, the first and last layer at 8 bits),
the Export callback and the Report; every Conv2d and Linear must be in the plan, ONNX Runtime must load and run
the exported ``model.onnx`` on the validation images, and ``quantized.pt`` must give the run's logits back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lit_mpq.cli import main
from lit_mpq.deploy import load_quantized

pytest.importorskip("onnxruntime")

SMALL_SWIN = {"img_size": 64, "window_size": 4, "embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}
FAMILIES = {
    # name: (backbone, model_kwargs, input size)
    "vgg11": ("cifar_vgg11_bn", {}, 32),
    "mobilenet_v2": ("torchvision:mobilenet_v2", {}, 32),
    "resnet50": ("torchvision:resnet50", {}, 32),
    "shufflenet_v2": ("cifar_shufflenetv2_x0_5", {}, 32),
    "googlenet": ("torchvision:googlenet", {"aux_logits": False, "init_weights": False}, 32),
    "mlp_mixer": ("mixer_s32_224", {"img_size": 64}, 64),
    "efficientnet": ("test_efficientnet", {}, 64),
    "convnext": ("test_convnext", {}, 64),
    "swin": ("swin_tiny_patch4_window7_224", SMALL_SWIN, 64),
}


def family_config(tmp_path: Path, root: Path, backbone: str, model_kwargs: dict, size: int) -> Path:
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "lit_mpq.module.MPQModule",
            "init_args": {"backbone": backbone, "num_classes": 3, "model_kwargs": model_kwargs},
        },
        "data": {
            "class_path": "lit_mpq.data.ImageFolderDataModule",
            "init_args": {
                "root": str(root),
                "val_dir": "val",
                "calib_dir": "train",
                "input_size": size,
                "batch_size": 6,
                "num_workers": 0,
                "num_calibration_samples": 12,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "family", "default_hp_metric": False},
            },
            "callbacks": [
                {"class_path": "lit_mpq.callbacks.Calibration"},
                {
                    "class_path": "lit_mpq.callbacks.BitAllocator",
                    "init_args": {
                        "first_last_bits": 8,
                        "policy": {"class_path": "lit_mpq.allocation.Uniform", "init_args": {"w_bits": 4, "a_bits": 8}},
                    },
                },
                {"class_path": "lit_mpq.callbacks.Export"},
                {"class_path": "lit_mpq.callbacks.Report", "init_args": {"save_figures": False}},
            ],
        },
    }
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_validates_with_every_layer_quantized_and_exports_to_onnx_runtime(family, tiny_image_folder, tmp_path):
    backbone, model_kwargs, size = FAMILIES[family]
    cli = main(["validate", "--config", str(family_config(tmp_path, tiny_image_folder, backbone, model_kwargs, size))])
    out = Path(cli.trainer.log_dir)
    model = cli.model.model
    left_in_float = [name for name, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert left_in_float == [], f"layers left in float: {left_in_float[:5]}"
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    weight_rows = [row for row in plan["layers"] if row["spec"]["kind"] != "matmul"]
    quantized = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert sorted(row["name"] for row in weight_rows) == sorted(quantized)
    assert all(row["w_bits"] is not None and row["a_bits"] is not None for row in weight_rows)
    export = json.loads((out / "results.json").read_text())["export"]
    assert "onnx_error" not in export and "checkpoint_error" not in export, export
    assert export["onnx"]["images"] == 12  # ONNX Runtime loaded model.onnx and ran every validation image
    assert 0.0 <= export["onnx"]["top1"] <= 100.0
    # The packed checkpoint rebuilds the family (its builder arguments are stored) and computes the same logits.
    loaded = load_quantized(out / "quantized.pt").model
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
