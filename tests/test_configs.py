"""The shipped ImageNet configs: FP32 top-1 of the shared transformers, built from the config files themselves, and
the override lines (config header, README) that switch a config to full ImageNet and to timm's hub weights."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from lit_mpq.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

FP32_CORRECT = {"deit.yaml": 1060, "vit_tiny.yaml": 1074}
"""Correct FP32 top-1 predictions out of the 1300 images of imagenet_val_1300 (shared/data/README.md: DeiT-Tiny
81.5 %, ViT-Tiny 82.6 %). Measured with the configs' own settings (batch 64, 2 workers); the closest call is 1e-3 logits
for DeiT (image 570) and 2.5e-3 for ViT (image 783), against 1e-5 of batch- and thread-dependent float noise."""

EXPECTED_OVERRIDES = {
    "data": {"root": "/data/imagenet", "val_dir": "val", "calib_dir": "train", "classes_file": None},
    "model": {"pretrained": True, "checkpoint_path": None},
}
"""What the header's override lines must set: the full ImageNet folders and the hub weights, nothing from shared/."""


def override_lines(config: Path) -> list[str]:
    """The command-line override lines in a config's header comment (``#   --key value ...``)."""
    header = config.read_text().split("\nseed_everything:")[0]
    return [m.group(1).strip() for m in re.finditer(r"^#\s+(--\S.*)$", header, flags=re.MULTILINE)]


@pytest.mark.parametrize("name", sorted(FP32_CORRECT))
def test_the_override_lines_parse_and_leave_nothing_on_shared(name, capsys):
    """Each header line parses through the CLI (no run) and together they switch data and weights completely."""
    lines = override_lines(CONFIGS / name)
    assert len(lines) == 2, lines  # one for the data, one for the weights: each usable alone
    readme = (REPO / "README.md").read_text()
    for line in lines:
        assert line in readme, f"README.md lacks the override line of configs/{name}: {line}"
    args = [arg for line in lines for arg in shlex.split(line)]
    with pytest.raises(SystemExit) as info:
        main(["validate", "--config", str(CONFIGS / name), *args, "--print_config"])
    assert info.value.code == 0, capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    for section, expected in EXPECTED_OVERRIDES.items():
        init_args = printed[section]["init_args"]
        assert {key: init_args[key] for key in expected} == expected
    assert "shared" not in yaml.safe_dump({k: printed[k] for k in ("model", "data")})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FP32_CORRECT))
def test_fp32_top1_of_the_config_on_imagenet_val_1300(name, shared_data, monkeypatch):
    """Model and data come from the config file as it stands (its relative paths resolve from the repository root)."""
    monkeypatch.chdir(REPO)
    # run=False instantiates what the config describes without validating, so no calibration runs.
    cli = main(["--config", str(CONFIGS / name), "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
    model, data = cli.model.eval(), cli.datamodule
    assert data.batch_size == 64 and data.num_workers == 2 and data.num_calibration_samples == 512
    data.check_num_outputs(model.num_classes)
    data.setup("validate")
    assert len(data.val_set) == 1300 and len({label for _, label in data.val_set.samples}) == 725
    calibration = {path for path, _ in data.calib_pool.samples}
    assert len(calibration) == 1000 and len(data.calib_dataset) == 512
    assert not calibration & {path for path, _ in data.val_set.samples}
    correct = total = 0
    with torch.inference_mode():
        for x, y in data.val_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    assert total == 1300
    assert correct == FP32_CORRECT[name], f"{correct}/1300 = {100 * correct / 1300:.2f} %"
