"""MPQModule: the LightningModule that wraps any image classifier for quantized evaluation (and FP32 training).

The backbone is built from a registry *name* (timm, ``torchvision:<name>``, or lit_mpq's own models) so the
module's hyperparameters stay plain strings. Quantization is not done here: callbacks swap the backbone's
layers for fake-quantized twins, and this module only evaluates whatever the backbone is, with torchmetrics,
optionally next to an FP32 reference computed in the same pass (quantizers temporarily off). Accuracy is logged in
percent (``val/top1`` = 91.5 means 91.5 %), the one unit lit_mpq uses everywhere.

``fit`` trains the backbone in plain FP32 (SGD with momentum, cosine schedule); the embedded default's
checkpoint is produced that way. With a training callback (:class:`~lit_mpq.callbacks.QuantizationAwareTraining`,
:class:`~lit_mpq.callbacks.BitWidthLearning`) it trains under the plan's fake quantization instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lit_mpq.deploy.checkpoint import load_packed_if_any, load_quantized, read_index
from lit_mpq.models import backbone_input_size, create_backbone
from lit_mpq.plan import QuantPlan
from lit_mpq.quant.apply import quant_layer_names, quantizers_mode
from lit_mpq.report.record import RunRecord

OPTIMIZERS = ("sgd", "adamw")


class MPQModule(LightningModule):
    """Image classifier under mixed-precision quantization.

    Args:
        backbone: Model name: one of lit_mpq's registry (``cifar_resnet20``, ``digits_cnn``, ...), a timm name
            (``deit_tiny_patch16_224``, ``resnet18``), or ``torchvision:<name>``.
        pretrained: Load the library's pretrained weights (needs a network for timm/torchvision).
        checkpoint_path: Local weights to load: a plain state_dict, a Lightning checkpoint, or a packed quantized
            checkpoint (``quantized.pt`` of an ``Export`` callback): then the model comes back quantized, at the run's
            bit widths and quantization parameters, with no calibration (its logits are the run's, bit for bit).
        num_classes: Output classes; default: the backbone's own.
        fp32_reference: Also evaluate the unquantized model in the same validation pass (``val/top1_fp32``).
        optimizer: ``"sgd"`` (momentum 0.9, nesterov) or ``"adamw"``, for ``fit``.
        lr: Peak learning rate for ``fit`` (cosine-annealed over ``trainer.max_epochs``).
        weight_decay: Weight decay for ``fit``.
        model_kwargs: Further keyword arguments of the backbone's builder (see
            :func:`~lit_mpq.models.create_backbone`), e.g. ``{img_size: 64, window_size: 4}`` for a small Swin.

    Raises:
        ValueError: On an unknown optimizer or a non-positive learning rate.
    """

    def __init__(
        self,
        backbone: str = "digits_cnn",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        num_classes: int | None = None,
        fp32_reference: bool = True,
        optimizer: str = "sgd",
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r} unknown; choose one of {list(OPTIMIZERS)}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters()
        self.plan: QuantPlan | None = None
        """Set by the ``Calibration`` callback (or a packed checkpoint); read and written by the other callbacks."""
        self.quantization_frozen = False
        """True when the model was loaded quantized from a packed checkpoint: nothing recalibrates or reallocates it."""
        packed = load_packed_if_any(checkpoint_path)
        if packed is not None:
            self.model = self._load_packed(backbone, num_classes, checkpoint_path, packed)
        else:
            self.model = create_backbone(
                backbone,
                pretrained=pretrained,
                num_classes=num_classes,
                checkpoint_path=checkpoint_path,
                model_kwargs=model_kwargs,
            )
        self.input_size: tuple[int, int, int] = backbone_input_size(self.model)
        self.num_classes = num_classes or self._infer_num_classes()
        top_k = min(5, self.num_classes)
        self.val_top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(self.num_classes, top_k=top_k, average="micro")
        self.val_top1_fp32 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.val_top5_fp32 = MulticlassAccuracy(self.num_classes, top_k=top_k, average="micro")
        self.train_top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        # A metric, not a plain mean: per-rank shard sizes may differ, and sums merge exactly across ranks.
        self.val_loss = MeanMetric()
        self.record = RunRecord()
        """What the run measured besides the plan (calibration, probe, allocation, energy), filled by the callbacks."""
        self.loss_terms: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}
        """``{name: term(images, logits)}`` added to the training loss and logged as ``train/<name>`` (the bit-width
        penalty of :class:`~lit_mpq.callbacks.BitWidthLearning`, the distillation term of QAT)."""

    def _load_packed(self, backbone: str, num_classes: int | None, path: str, content: dict) -> torch.nn.Module:
        stored = content["backbone"]
        if backbone != stored:
            raise ValueError(f"{path!r} holds a quantized {stored!r}, not {backbone!r}: set model.backbone: {stored}")
        stored_classes = read_index(content)["num_classes"]
        if num_classes is not None and num_classes != stored_classes:
            raise ValueError(f"{path!r} has {stored_classes} classes, not num_classes={num_classes}")
        loaded = load_quantized(content)
        if self.hparams.fp32_reference:  # the float weights are not in the file: the "FP32" pass would be dequantized
            rank_zero_warn(f"{path!r} is a packed quantized model without float weights: fp32_reference is turned off")
            self.hparams.fp32_reference = False
        self.plan = loaded.plan
        self.quantization_frozen = True
        return loaded.model

    @torch.no_grad()
    def _infer_num_classes(self) -> int:
        was_training = self.model.training
        self.model.eval()
        out = self.model(torch.zeros(1, *self.input_size))
        self.model.train(was_training)
        return int(out.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the backbone (quantized or not, as its quantizers are set)."""
        return self.model(x)

    @property
    def is_quantized(self) -> bool:
        """Whether callbacks have swapped in fake-quantized layers."""
        return bool(quant_layer_names(self.model))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on a training batch."""
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        for name, term in self.loss_terms.items():
            value = term(x, logits)
            self.log(f"train/{name}", value.detach())
            loss = loss + value
        self.train_top1(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Quantized top-1/top-5 (and the FP32 reference when enabled) on a validation batch."""
        x, y = batch
        logits = self(x)
        self.val_top1.update(logits, y)
        self.val_top5.update(logits, y)
        self.val_loss.update(F.cross_entropy(logits, y), weight=y.numel())
        if self.hparams.fp32_reference:
            if self.is_quantized:
                with quantizers_mode(self.model, "off"):
                    logits = self(x)
            self.val_top1_fp32.update(logits, y)
            self.val_top5_fp32.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        """Log accuracy in percent (every accuracy lit_mpq shows is in %), summed exactly over ranks."""
        metrics = {"val/top1": self.val_top1, "val/top5": self.val_top5}
        if self.hparams.fp32_reference:
            metrics |= {"val/top1_fp32": self.val_top1_fp32, "val/top5_fp32": self.val_top5_fp32}
        for key, metric in metrics.items():
            self.log(key, 100.0 * metric.compute().double().item(), sync_dist=False)
            metric.reset()
        self.log("val/loss", self.val_loss.compute().item(), sync_dist=False)
        self.val_loss.reset()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Same as :meth:`validation_step`."""
        self.validation_step(batch, batch_idx)

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups: one for the weights, one per quantizer parameter setting.

        A quantization parameter (a learned step, a bit width) carries ``optimizer_settings`` (``lr_scale``,
        ``weight_decay``), set by the callback that adds it: weight decay would drive it toward zero.
        """
        hp = self.hparams
        groups: dict[tuple, dict[str, Any]] = {}
        for parameter in self.parameters():
            if not parameter.requires_grad:
                continue
            settings = getattr(parameter, "optimizer_settings", {})
            lr = hp.lr * settings.get("lr_scale", 1.0)
            decay = settings.get("weight_decay", hp.weight_decay)
            group = groups.setdefault((lr, decay), {"params": [], "lr": lr, "weight_decay": decay})
            group["params"].append(parameter)
        return list(groups.values())

    def configure_optimizers(self) -> Any:
        """SGD or AdamW with a cosine schedule over ``trainer.max_epochs``."""
        hp = self.hparams
        groups = self._parameter_groups()
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, nesterov=True, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
