"""The ``QuantizationAwareTraining`` callback: fine-tune the post-training quantized model in ``fit``.

``python cli.py fit --config configs/resnet20_qat.yaml``: the config lists the same post-training callbacks as a
``validate`` config (``Calibration``, ``SensitivityProbe``, ``BitAllocator``, ``WeightRounding``...) and then this
one. Before the first step it runs them once (calibrate, probe, allocate, round: the PTQ model), makes that model
trainable without changing its outputs (:func:`~lit_mpq.qat.start_from_post_training`: roundings become the weights,
bias corrections constant shifts) and trains under its fake quantization: the straight-through estimator for the
weights and inputs, and with ``learn_steps`` every uniform quantizer's step as a parameter (LSQ, Esser et al. 2020;
:mod:`lit_mpq.qat.lsq`), optionally distilling the float model's outputs (``distill_weight``). The bit widths are the
allocation's and do not change.

At the end of ``fit`` it writes into the run folder ``plan.yaml``, the packed ``quantized.pt`` (the learned steps as
fixed parameters) and ``qat.json`` (settings, time, last validation top-1): ``python cli.py validate --config
configs/resnet20_reload.yaml --model.init_args.checkpoint_path <run>/quantized.pt`` evaluates or exports it with no
calibration. Under DDP every rank runs the post-training steps on its shard (they reduce across ranks as in
``validate``) and Lightning averages the gradients.
"""

from __future__ import annotations

import copy
import dataclasses

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_mpq.callbacks._common import require_plan, timer
from lit_mpq.callbacks._training import (
    check_training_setup,
    run_post_training_steps,
    training_progress,
    write_training_outputs,
)
from lit_mpq.qat.distill import distillation_loss
from lit_mpq.qat.lsq import (
    MIN_STEP,
    LearnedStepActivationQuantizer,
    LearnedStepWeightQuantizer,
    add_learned_steps,
    freeze_learned_steps,
)
from lit_mpq.qat.start import start_from_post_training


class QuantizationAwareTraining(Callback):
    """Train the post-training quantized model under its fake quantization (``fit``).

    Args:
        learn_steps: Train each uniform quantizer's step (LSQ); off: the weights' steps follow their range (min-max
            or MSE of the current weight) and the inputs' stay as calibrated (plain straight-through training).
        step_lr_scale: The steps' learning rate relative to the module's ``lr`` (no weight decay on steps).
        distill_weight: Weight of a distillation term from the float model (:mod:`lit_mpq.qat.distill`; its logits on
            the same training batch) added to the cross-entropy; 0 trains on the labels only.
        distill_temperature: Softmax temperature of the distillation term.
        save_checkpoint: Write ``plan.yaml``, ``quantized.pt`` and ``qat.json`` into the run folder at the end.

    Raises:
        ValueError: If ``step_lr_scale`` or ``distill_temperature`` is not positive, or ``distill_weight`` negative.
    """

    trains_quantized = True
    """Marks a callback that trains the quantized model: the post-training callbacks set up in ``fit`` too."""

    def __init__(
        self,
        learn_steps: bool = True,
        step_lr_scale: float = 1.0,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        save_checkpoint: bool = True,
    ) -> None:
        if not step_lr_scale > 0:
            raise ValueError(f"QuantizationAwareTraining.step_lr_scale must be positive, got {step_lr_scale}")
        if not distill_weight >= 0:
            raise ValueError(f"QuantizationAwareTraining.distill_weight must be >= 0, got {distill_weight}")
        if not distill_temperature > 0:
            raise ValueError(f"QuantizationAwareTraining.distill_temperature must be > 0, got {distill_temperature}")
        self.learn_steps = learn_steps
        self.step_lr_scale = step_lr_scale
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.save_checkpoint = save_checkpoint
        self._teacher: torch.nn.Module | None = None
        self._record: dict = {}
        self._fit_start = 0.0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_training_setup(trainer, self)
        require_plan(pl_module, "QuantizationAwareTraining")
        if self.distill_weight > 0:  # the float model, before anything is quantized (its quantizers stay off)
            self._teacher = copy.deepcopy(pl_module.model).eval().requires_grad_(False)
        if self.learn_steps:  # here, before the optimizer is built from the module's parameters
            add_learned_steps(pl_module.model)
            for module in pl_module.model.modules():
                if isinstance(module, LearnedStepWeightQuantizer | LearnedStepActivationQuantizer):
                    module.step.optimizer_settings = {"lr_scale": self.step_lr_scale, "weight_decay": 0.0}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = run_post_training_steps(trainer, pl_module, self)
        start = start_from_post_training(pl_module.model)
        rank_zero_info(
            f"QAT starts from the post-training model ({seconds:.1f} s): {start.learned_steps} learned steps, "
            f"{start.rounded_weights} rounded weights, {start.frozen_bias_corrections} bias corrections made constant"
        )
        if self._teacher is not None:
            teacher = self._teacher.to(pl_module.device)

            def distill(images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    target = teacher(images)
                return self.distill_weight * distillation_loss(logits, target, self.distill_temperature)

            pl_module.loss_terms["distill"] = distill
        self._record = {
            "learn_steps": self.learn_steps,
            "step_lr_scale": self.step_lr_scale,
            "distill_weight": self.distill_weight,
            "distill_temperature": self.distill_temperature,
            "post_training_seconds": seconds,
            "start": dataclasses.asdict(start),
        }
        self._fit_start = timer()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        collapsed = [
            name
            for name, module in pl_module.model.named_modules()
            if isinstance(module, LearnedStepWeightQuantizer | LearnedStepActivationQuantizer)
            and module.step_bits is not None
            and bool((module.step.detach() <= 10 * MIN_STEP).any())
        ]
        if collapsed:  # every value of such a layer rounds to its zero point: the model is broken, say so
            rank_zero_warn(
                f"{len(collapsed)} learned quantization steps collapsed to ~0 (first: {collapsed[0]}): lower "
                "QuantizationAwareTraining.step_lr_scale or the learning rate"
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.loss_terms.pop("distill", None)
        freeze_learned_steps(pl_module.model)  # the outputs stay; the model is now a plain calibrated one
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        record = {**self._record, **training_progress(trainer, pl_module, self._fit_start), "last_validation": metrics}
        settings = {"method": "qat", "learn_steps": self.learn_steps, "step_lr_scale": self.step_lr_scale}
        settings |= {"distill_weight": self.distill_weight, "distill_temperature": self.distill_temperature}
        settings |= {"epochs": record["epochs"], **record["optimizer"]}
        pl_module.record.training = {"settings": settings, **record}  # in the packed file's card
        if self.save_checkpoint:
            out = write_training_outputs(trainer, pl_module, "qat", record)
            rank_zero_info(f"QAT model written to {out / 'quantized.pt'}")
