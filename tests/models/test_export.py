"""export_backbone: a Lightning checkpoint's backbone as a plain state_dict, read weights-only."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from lit_mpq.models import create_backbone
from lit_mpq.models.export import export_backbone


class _RunsCode:
    """Unpickling this creates the file ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_exports_model_tensors_without_prefix(tmp_path):
    source = create_backbone("digits_cnn")
    state = {f"model.{k}": v for k, v in source.state_dict().items()} | {"fp32_reference.w": torch.zeros(1)}
    torch.save({"state_dict": state, "epoch": 1, "hyper_parameters": {"backbone": "digits_cnn"}}, tmp_path / "a.ckpt")
    out = export_backbone(tmp_path / "a.ckpt", tmp_path / "sub" / "w.pt")
    exported = torch.load(out, weights_only=True)
    assert exported.keys() == source.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in source.state_dict().items())


def test_code_in_the_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    state = {f"model.{k}": v for k, v in create_backbone("digits_cnn").state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"x": _RunsCode(str(marker))}}, evil)
    with pytest.raises(ValueError, match=f"Refusing to load '{evil}'"):
        export_backbone(evil, tmp_path / "out.pt")
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        export_backbone(tmp_path / "nowhere.ckpt", tmp_path / "out.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="plain.pt.*no 'state_dict' entry"):
        export_backbone(tmp_path / "plain.pt", tmp_path / "out.pt")
    torch.save({"state_dict": {"other.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="other.ckpt.*no 'model.\\*' tensors"):
        export_backbone(tmp_path / "other.ckpt", tmp_path / "out.pt")


def test_command_line_prints_the_message_alone(tmp_path):
    torch.save({"x": _RunsCode(str(tmp_path / "pwned"))}, tmp_path / "evil.ckpt")
    proc = subprocess.run(
        [sys.executable, "-m", "lit_mpq.models.export", str(tmp_path / "evil.ckpt"), str(tmp_path / "o.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Refusing to load" in proc.stderr
    assert not (tmp_path / "pwned").exists()
