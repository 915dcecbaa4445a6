"""The ``Export`` callback: the run's quantized model as files you can ship.

At the end of a ``validate`` run (and of each sweep point) it writes, into the run folder:

- ``quantized.pt``, the packed checkpoint (:mod:`lit_mpq.deploy.checkpoint`): integer weights bit-packed at their
  widths, scales, activation parameters, the plan and the card. ``MPQModule(checkpoint_path=".../quantized.pt")``
  gives the run's logits back, bit for bit, with no calibration data;
- ``model.onnx``, the QDQ ONNX graph (:mod:`lit_mpq.deploy.onnx_export`), and, with ``evaluate_onnx``, its top-1 in
  ONNX Runtime on the validation images next to the run's own.

A model that cannot be exported to ONNX (a width above 8 bits, a weight-standardized layer) gets a one-line
warning saying which layer and why; the packed checkpoint is still written. The figures land in the run record
(``results.json``'s ``export``) when ``Export`` is listed before ``Report``. By default ``Calibration`` folds BatchNorm
when an ``Export`` is in the trainer (``Calibration.fold_batchnorm``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lit_mpq.callbacks._common import QUANT_STAGES, is_quant_run, require_before, require_plan, run_dir, timer
from lit_mpq.callbacks.allocation import energy_model_of
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.deploy.checkpoint import QuantizedExportError, pack_model, save_quantized
from lit_mpq.deploy.onnx_export import DEFAULT_OPSET, evaluate_onnx, export_onnx, missing_packages
from lit_mpq.report.results import run_card


class Export(Callback):
    """Write the quantized model as ``quantized.pt`` and ``model.onnx`` at the end of the run.

    Args:
        checkpoint: Write the packed checkpoint ``quantized.pt``.
        onnx: Write the QDQ ONNX graph ``model.onnx``.
        evaluate_onnx: Run ``model.onnx`` in ONNX Runtime (CPU) over the validation images and record its top-1.
        opset: ONNX opset of the export.
        output_dir: Folder for the files; default: the run folder (the logger's version directory).
    """

    def __init__(
        self,
        checkpoint: bool = True,
        onnx: bool = True,
        evaluate_onnx: bool = True,
        opset: int = DEFAULT_OPSET,
        output_dir: str | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.onnx = onnx
        self.evaluate_onnx = evaluate_onnx
        self.opset = opset
        self.output_dir = output_dir

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in QUANT_STAGES:
            return
        require_before(trainer, self, Calibration, "exports the calibrated model")
        missing = missing_packages(self.evaluate_onnx) if self.onnx else []
        if missing:  # before any work: the run would otherwise end without its model.onnx
            raise MisconfigurationException(
                f"Export(onnx=True) needs {', '.join(missing)}: pip install 'lit_mpq[export]', or set onnx: false"
            )
        from lit_mpq.callbacks.report import Report  # imports this module's neighbours

        callbacks = trainer.callbacks
        if any(isinstance(cb, Report) for cb in callbacks[: callbacks.index(self)]):
            raise MisconfigurationException(
                "Export is listed after Report: list it before Report, so that results.json records the export"
            )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer):
            return
        out = Path(self.output_dir) if self.output_dir else run_dir(trainer)  # a collective under DDP: every rank
        if not trainer.is_global_zero:
            return
        require_plan(pl_module, "Export")
        calibration = next(cb for cb in trainer.callbacks if isinstance(cb, Calibration))
        size = getattr(trainer.datamodule, "input_size", None) or pl_module.input_size
        record: dict[str, Any] = {"bn_folded": bool(calibration.folded_batchnorms)}
        start = timer()
        if self.checkpoint:
            record.update(write_packed_checkpoint(trainer, pl_module, out / "quantized.pt"))
        if self.onnx:
            self._export_onnx(trainer, pl_module, out / "model.onnx", tuple(size), record)
        record["seconds"] = timer() - start
        pl_module.record.export = record

    def _export_onnx(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path, size: tuple, record: dict
    ) -> None:
        was_training = pl_module.model.training
        try:
            export_onnx(pl_module.model, path, size, self.opset)
        except QuantizedExportError as exc:
            rank_zero_warn(f"model.onnx not written: {exc}")
            record["onnx_error"] = str(exc)
            return
        finally:
            pl_module.model.train(was_training)
        record["onnx"] = {"path": str(path), "file_bytes": path.stat().st_size, "opset": self.opset}
        if not self.evaluate_onnx:
            return
        datamodule = trainer.datamodule  # this rank alone: all images, not its DDP shard
        loader = datamodule.full_val_dataloader() if hasattr(datamodule, "full_val_dataloader") else None
        if loader is None:
            rank_zero_warn("the datamodule has no full_val_dataloader: model.onnx is evaluated on val_dataloader()")
            loader = datamodule.val_dataloader()
        batches = ((x, y) for x, y in loader)
        with torch.no_grad():
            result = evaluate_onnx(path, batches)
        run_top1 = trainer.callback_metrics.get("val/top1")
        record["onnx"] |= {key: result[key] for key in ("top1", "images", "providers", "session_config")}
        message = f"model.onnx in ONNX Runtime: top-1 {result['top1']:.2f} % on {result['images']} images"
        if run_top1 is not None:
            record["onnx"]["top1_run"] = float(run_top1)
            record["onnx"]["top1_difference"] = result["top1"] - float(run_top1)
            message += f" (the run's fake-quantized model: {float(run_top1):.2f} %)"
        rank_zero_info(message)


def write_packed_checkpoint(trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> dict[str, Any]:
    """Pack the run's quantized model into ``path`` (rank 0 only); what was written, for the run record.

    A model that cannot be packed gets a warning and ``{"checkpoint_error": reason}``: the run's other results stand.
    """
    plan = require_plan(pl_module, "the packed checkpoint")
    calibration = next(cb for cb in trainer.callbacks if isinstance(cb, Calibration))
    size = getattr(trainer.datamodule, "input_size", None) or pl_module.input_size
    hparams = dict(getattr(trainer.datamodule, "hparams", {}))
    card = run_card(
        plan,
        pl_module.record,
        energy_model_of(trainer),
        hparams,
        dataset=str(hparams.get("dataset", type(trainer.datamodule).__name__)),
    )
    try:
        content = pack_model(
            pl_module.model,
            plan,
            backbone=pl_module.hparams.backbone,
            num_classes=pl_module.num_classes,
            input_size=tuple(size),
            settings=calibration.settings,
            folded_batchnorms=calibration.folded_batchnorms,
            card=card,
            model_kwargs=pl_module.hparams.get("model_kwargs"),
        )
    except QuantizedExportError as exc:
        rank_zero_warn(f"{path.name} not written: {exc}")
        return {"checkpoint_error": str(exc)}
    packed = save_quantized(path, content)
    rank_zero_info(
        f"{path.name}: {packed.file_bytes / 1e6:.3f} MB, {100 * packed.overhead:+.1f} % against the ideal "
        f"{packed.ideal_bytes / 1e6:.3f} MB (bits·params/8 + scales + float tensors)"
    )
    return {
        "checkpoint": {
            "path": str(path),
            "file_bytes": packed.file_bytes,
            "ideal_bytes": packed.ideal_bytes,
            "overhead": packed.overhead,
            "weight_bits_bytes": packed.weight_bits_bytes,
            "scale_bytes": packed.scale_bytes,
            "activation_bytes": packed.activation_bytes,
            "float_bytes": packed.float_bytes,
        }
    }
