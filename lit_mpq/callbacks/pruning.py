"""The ``Pruning`` callback: prune the model before it is quantized, and cost the result dense and sparsity-aware.

Listed before ``Calibration`` in ``trainer.callbacks``:

* ``setup`` (structure only) prunes the backbone with :mod:`lit_mpq.pruning`, before ``Calibration`` swaps in the
  fake-quantized layers and measures the plan: unstructured magnitude pruning zeroes weights (permanently:
  ``prune.remove``), structured channel pruning makes a smaller model, whose plan then has fewer MACs and parameters.
* ``on_validation_start`` (before the calibration, probe and allocation) records every plan row's nonzero weights
  (:attr:`~lit_mpq.plan.LayerSpec.nonzero_params`, written to ``plan.yaml``), so a sparsity-aware energy model
  (:class:`~lit_mpq.energy.sparsity.SparsityAwareEnergyModel` as the ``EnergyMeter``'s model) prices the allocation.
* ``on_validation_epoch_end`` costs the allocated plan on dense hardware (the run's energy model) and on
  sparsity-aware hardware (:func:`~lit_mpq.energy.sparsity.sparsity_report`) and logs ``prune/*`` and
  ``energy/sparse_uj_per_image``; ``on_validation_end`` writes ``pruning.json`` (settings, per-layer sparsity and
  channels, both energies side by side) beside the ``Report``'s files.

The model is pruned once per callback: the points of a ``sweep`` re-validate the same pruned model. ``amount: 0``
prunes nothing and only records the model's zeros (a model pruned and fine-tuned elsewhere).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lit_mpq.callbacks._common import QUANT_STAGES, is_quant_run, require_plan, run_dir
from lit_mpq.callbacks.allocation import energy_model_of
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.callbacks.report import Report
from lit_mpq.energy.sparsity import INDEX_FORMATS, SparsityAwareEnergyModel, sparsity_report
from lit_mpq.pruning import SCOPES, annotate_nonzeros, classifier_layers, magnitude_prune, prune_channels
from lit_mpq.pruning.magnitude import check_amount
from lit_mpq.report.files import write_results_json

METHODS = ("unstructured", "structured")
"""``unstructured``: magnitude pruning of single weights; ``structured``: whole channels, with their dependencies."""


class Pruning(Callback):
    """Prune the backbone before quantization; report its sparsity and its dense and sparsity-aware energy.

    Args:
        method: ``"unstructured"`` (zero the smallest-magnitude weights, ``torch.nn.utils.prune``) or
            ``"structured"`` (remove the lowest-L1 channels with torch-pruning's dependency graph).
        amount: Fraction of the weights (unstructured) or channels (structured) to remove, in [0, 1); 0 only
            records the model's zeros.
        scope: ``"global"`` (rank weights or channels over the whole model) or ``"layer"`` (the same fraction in each
            layer, or each channel group).
        ignored_layers: Names or ``"re:<regex>"`` patterns of Conv2d/Linear layers left alone; default (null): the
            classifier head(s). Structured pruning always keeps the classifier's outputs (the classes).
        index_format: Compressed weight format of the sparsity-aware energy: ``"bitmap"`` (1 bit per weight position)
            or ``"csr"`` (column indices and row pointers); see :mod:`lit_mpq.energy.sparsity`. When the
            ``EnergyMeter`` prices with a :class:`~lit_mpq.energy.sparsity.SparsityAwareEnergyModel`, its format must
            be the same.

    Raises:
        ValueError: On an unknown method, scope or index format, or an amount outside [0, 1).
    """

    def __init__(
        self,
        method: str = "unstructured",
        amount: float = 0.5,
        scope: str = "global",
        ignored_layers: list[str] | None = None,
        index_format: str = "bitmap",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"Pruning.method={method!r} is unknown: use one of {list(METHODS)}.")
        if scope not in SCOPES:
            raise ValueError(f"Pruning.scope={scope!r} is unknown: use one of {list(SCOPES)}.")
        if index_format not in INDEX_FORMATS:
            raise ValueError(f"Pruning.index_format={index_format!r} is unknown: use one of {list(INDEX_FORMATS)}.")
        self.method = method
        self.amount = check_amount(amount, "Pruning.amount")
        self.scope = scope
        self.ignored_layers = None if ignored_layers is None else list(ignored_layers)
        self.index_format = index_format
        self.ignored: list[str] = []
        """The layers actually left alone (the classifier when ``ignored_layers`` is null)."""
        self.channels: dict[str, dict[str, int]] = {}
        """Structured pruning: each layer's input and output channels before and after."""
        self.report: dict[str, Any] | None = None
        """The last validation run's :func:`~lit_mpq.energy.sparsity.sparsity_report`."""
        self._pruned: torch.nn.Module | None = None

    def settings(self) -> dict[str, Any]:
        """The settings that change the numbers: method, amount, scope, ignored layers, index format."""
        return {
            "method": self.method,
            "amount": self.amount,
            "scope": self.scope,
            "ignored_layers": self.ignored_layers,
            "ignored": self.ignored,
            "index_format": self.index_format,
        }

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in QUANT_STAGES:
            raise MisconfigurationException(
                f"Pruning prunes for validate (and each sweep point), not for {stage!r}: fine-tuning a pruned model "
                "is described in docs/pruning.md (benchmarks/pruning_table.py --finetune-epochs)"
            )
        mine = trainer.callbacks.index(self)
        if any(isinstance(callback, Calibration) for callback in trainer.callbacks[:mine]):
            raise MisconfigurationException(
                "Pruning must come before Calibration in trainer.callbacks: the quantized layers and the plan are made "
                "from the pruned model"
            )
        meter_model = energy_model_of(trainer)
        if isinstance(meter_model, SparsityAwareEnergyModel) and meter_model.index_format != self.index_format:
            raise MisconfigurationException(
                f"Pruning.index_format={self.index_format!r} but the EnergyMeter's SparsityAwareEnergyModel stores "
                f"weights as {meter_model.index_format!r}: set both to the same format"
            )
        if getattr(pl_module, "quantization_frozen", False) or getattr(pl_module, "plan", None) is not None:
            if self._pruned is pl_module.model:  # a sweep's next point: pruned already
                return
            raise MisconfigurationException(
                "Pruning needs the float model: this one is quantized already (a packed checkpoint, or Calibration "
                "ran first)"
            )
        if self._pruned is pl_module.model:
            return
        model = pl_module.model
        example = torch.zeros(1, *pl_module.input_size, device=next(model.parameters()).device)
        classifier = classifier_layers(model, example)
        self.ignored = list(classifier) if self.ignored_layers is None else list(self.ignored_layers)
        if self.method == "unstructured":
            magnitude_prune(model, self.amount, self.scope, self.ignored, permanent=True)
        else:
            ignored = self.ignored + [name for name in classifier if name not in self.ignored]
            changes = prune_channels(model, example, self.amount, ignored, self.scope)
            self.channels = {name: dataclasses.asdict(change) for name, change in changes.items()}
        self._pruned = model

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer):
            return
        annotate_nonzeros(require_plan(pl_module, "Pruning"), pl_module.model)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer):
            return
        plan = require_plan(pl_module, "Pruning")
        self.report = sparsity_report(plan, energy_model_of(trainer), self.index_format)
        pl_module.record.pruning = {"settings": self.settings(), **self.report}
        pl_module.log("prune/sparsity_pct", self.report["sparsity_pct"])
        pl_module.log("prune/nonzero_params", float(self.report["nonzero_params"]))
        pl_module.log("prune/effective_macs_m", self.report["effective_macs"] / 1e6)
        pl_module.log("size/stored_weights_mb", self.report["stored_weight_bits"] / 8 / 1e6)
        pl_module.log("energy/dense_uj_per_image", self.report["dense"]["total_uj_per_image"])
        pl_module.log("energy/sparse_uj_per_image", self.report["sparse"]["total_uj_per_image"])

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer) or self.report is None:
            return
        report = next((callback for callback in trainer.callbacks if isinstance(callback, Report)), None)
        out = Path(report.output_dir) if report is not None and report.output_dir else run_dir(trainer)
        if not trainer.is_global_zero:
            return
        write_results_json(
            out / "pruning.json", {"settings": self.settings(), "channels": self.channels, **self.report}
        )
