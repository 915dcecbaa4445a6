"""The ``BitWidthLearning`` callback: learn each layer's weight bit width in ``fit`` toward a budget, then round it.

Listed after the post-training callbacks, as :class:`~lit_mpq.callbacks.QuantizationAwareTraining` is. Before the
first step it runs them once (the ``BitAllocator`` gives the starting widths, e.g. ``Uniform`` W8 with the activation
bits to keep), then every non-pinned layer's weight bit width becomes a continuous parameter
(:mod:`lit_mpq.qat.learned_bits`) trained with the network, the loss plus ``penalty_weight`` times the budget
penalty (zero at the target: the parameter-weighted average weight width, or the analytic energy of the run's energy
model). At the end the widths are rounded to the candidates nearest them within the budget, spending at least the
budget less 0.1 bit (average) or 1 % (energy) when some plan can (:func:`~lit_mpq.qat.round_to_budget`), and
the run folder gets a normal ``plan.yaml``, the packed ``quantized.pt`` and ``learned_bits.json``: the continuous and
rounded widths, the budget and what the rounded plan spends, and, when the probe ran, the exact allocator's plan at the
same budget (``plan_exact.yaml``) with both plans' summed sensitivities, for comparison.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_mpq.allocation.exact import ExactAllocation
from lit_mpq.bits import effective_bits, parse_setting
from lit_mpq.callbacks._common import require_plan, run_dir, timer
from lit_mpq.callbacks._training import (
    check_training_setup,
    run_post_training_steps,
    training_progress,
    write_training_outputs,
)
from lit_mpq.callbacks.allocation import energy_model_of
from lit_mpq.energy import uniform_energy
from lit_mpq.plan import OPERATION_KINDS, QuantPlan
from lit_mpq.qat.learned_bits import (
    LearnedBitWeightQuantizer,
    budget_penalty,
    learned_bit_quantizers,
    relaxed_cost,
    round_to_budget,
)
from lit_mpq.qat.start import start_from_post_training
from lit_mpq.quant.apply import apply_plan, quant_layers
from lit_mpq.quant.modules import WeightQuantizer


class BitWidthLearning(Callback):
    """Learn per-layer weight bit widths toward an average-width or energy budget during ``fit``.

    Args:
        target_avg_bits: Budget: the parameter-weighted average weight bit width (pinned layers included).
        energy_uj: Budget: analytic energy, µJ per image (the run's energy model, activations at their plan widths).
        energy_relative_to: Budget: the energy of a uniform setting such as ``"W4A4"``, times ``energy_ratio``.
        energy_ratio: Multiplier for ``energy_relative_to``.
        candidate_bits: Widths a layer may end with (the continuous width moves between the smallest and largest).
        init_bits: Starting width of every learned layer; default: its width in the plan (the ``BitAllocator``'s).
        penalty_weight: Weight of the budget penalty in the loss.
        bits_lr_scale: The bit widths' learning rate relative to the module's ``lr`` (no weight decay on them).
        save_checkpoint: Write ``plan.yaml``, ``quantized.pt`` and ``learned_bits.json`` at the end.

    Raises:
        ValueError: Unless exactly one budget is given, or on fewer than two candidates, a non-positive weight or
            learning-rate scale, or ``init_bits`` outside the candidates' range.
    """

    trains_quantized = True
    """Marks a callback that trains the quantized model: the post-training callbacks set up in ``fit`` too."""

    def __init__(
        self,
        target_avg_bits: float | None = None,
        energy_uj: float | None = None,
        energy_relative_to: str | None = None,
        energy_ratio: float = 1.0,
        candidate_bits: list[int] = [2, 3, 4, 6, 8],  # noqa: B006 - jsonargparse shows list defaults
        init_bits: float | None = None,
        penalty_weight: float = 1.0,
        bits_lr_scale: float = 10.0,
        save_checkpoint: bool = True,
    ) -> None:
        budgets = [b for b in (target_avg_bits, energy_uj, energy_relative_to) if b is not None]
        if len(budgets) != 1:
            raise ValueError(
                "BitWidthLearning needs exactly one budget: target_avg_bits, energy_uj or energy_relative_to "
                f"(got {len(budgets)})"
            )
        self.candidate_bits = sorted({int(b) for b in candidate_bits})
        if len(self.candidate_bits) < 2 or self.candidate_bits[0] < 1:
            raise ValueError(f"BitWidthLearning.candidate_bits needs two or more widths >= 1, got {candidate_bits}")
        if init_bits is not None and not self.candidate_bits[0] <= init_bits <= self.candidate_bits[-1]:
            raise ValueError(
                f"BitWidthLearning.init_bits={init_bits} is outside the candidates' range "
                f"[{self.candidate_bits[0]}, {self.candidate_bits[-1]}]"
            )
        for name, value in (("penalty_weight", penalty_weight), ("bits_lr_scale", bits_lr_scale)):
            if not value > 0:
                raise ValueError(f"BitWidthLearning.{name} must be positive, got {value}")
        self.target_avg_bits = target_avg_bits
        self.energy_uj = energy_uj
        self.energy_relative_to = energy_relative_to
        self.energy_ratio = energy_ratio
        self.init_bits = init_bits
        self.penalty_weight = penalty_weight
        self.bits_lr_scale = bits_lr_scale
        self.save_checkpoint = save_checkpoint
        self._costs: dict[str, dict[int, float]] = {}
        self._fixed_cost = 0.0
        self._budget = 0.0
        self._record: dict = {}
        self._fit_start = 0.0
        self._last_total: torch.Tensor | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_training_setup(trainer, self)
        plan = require_plan(pl_module, "BitWidthLearning")
        for name, layer in quant_layers(pl_module.model).items():
            quantizer = getattr(layer, "weight_quantizer", None)
            if plan[name].pinned or type(quantizer) is not WeightQuantizer or plan.specs[name].kind in OPERATION_KINDS:
                continue
            learned = LearnedBitWeightQuantizer.from_quantizer(quantizer, self.candidate_bits)
            learned.bit_width.optimizer_settings = {"lr_scale": self.bits_lr_scale, "weight_decay": 0.0}
            layer.weight_quantizer = learned.to(layer.weight.device)

    def _cost_tables(self, trainer: pl.Trainer, plan: QuantPlan, learned: list[str]) -> None:
        """Each learned layer's cost at each candidate, the pinned layers' fixed cost, and the budget."""
        if self.target_avg_bits is not None:  # as QuantPlan.average_weight_bits counts it
            total = max(sum(spec.params for spec in plan.specs.values()), 1)
            share = {name: spec.params / total for name, spec in plan.specs.items()}
            self._costs = {name: {b: share[name] * b for b in self.candidate_bits} for name in learned}
            self._fixed_cost = sum(
                share[name] * effective_bits(plan[name].w_bits) for name in plan.names if name not in self._costs
            )
            self._budget = float(self.target_avg_bits)
            return
        model = energy_model_of(trainer)
        self._costs = {
            name: {b: model.layer(plan.specs[name], b, plan[name].a_bits).total_pj / 1e6 for b in self.candidate_bits}
            for name in learned
        }
        self._fixed_cost = sum(
            model.layer(plan.specs[name], plan[name].w_bits, plan[name].a_bits).total_pj / 1e6
            for name in plan.names
            if name not in self._costs
        )
        if self.energy_uj is not None:
            self._budget = float(self.energy_uj)
        else:
            w_bits, a_bits = parse_setting(self.energy_relative_to, "BitWidthLearning.energy_relative_to")
            self._budget = self.energy_ratio * uniform_energy(plan, model, w_bits, a_bits).total_pj / 1e6

    def relaxed_total(self, widths: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The budget's quantity at continuous ``widths`` (``{layer: width}``; differentiable in them)."""
        return self._fixed_cost + sum(relaxed_cost(width, self._costs[name]) for name, width in widths.items())

    def current_widths(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The learned layers' continuous widths now."""
        return {name: q.continuous_bits() for name, q in learned_bit_quantizers(pl_module.model).items()}

    def _penalty(self, pl_module: pl.LightningModule) -> torch.Tensor:
        total = self.relaxed_total(self.current_widths(pl_module))
        self._last_total = total.detach()  # logged after the step, not computed twice
        return self.penalty_weight * budget_penalty(total, self._budget)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = run_post_training_steps(trainer, pl_module, self)
        start = start_from_post_training(pl_module.model)
        plan = require_plan(pl_module, "BitWidthLearning")
        quantizers = learned_bit_quantizers(pl_module.model)
        self._cost_tables(trainer, plan, list(quantizers))
        with torch.no_grad():
            for name, quantizer in quantizers.items():
                first = self.init_bits if self.init_bits is not None else plan[name].w_bits or self.candidate_bits[-1]
                quantizer.bit_width.fill_(float(min(max(first, self.candidate_bits[0]), self.candidate_bits[-1])))
                quantizer.learning = True
        pl_module.loss_terms["bit_penalty"] = lambda images, logits: self._penalty(pl_module)
        self._record = {
            "budget": self._budget_description(),
            "budget_value": self._budget,
            "candidate_bits": self.candidate_bits,
            "penalty_weight": self.penalty_weight,
            "bits_lr_scale": self.bits_lr_scale,
            "post_training_seconds": seconds,
            "start": dataclasses.asdict(start),
            "learned_layers": len(quantizers),
        }
        rank_zero_info(
            f"learning the weight bit widths of {len(quantizers)} layers toward {self._budget_description()} "
            f"= {self._budget:.4g} (now {float(self.relaxed_total(self.current_widths(pl_module))):.4g})"
        )
        self._fit_start = timer()

    def _budget_description(self) -> str:
        if self.target_avg_bits is not None:
            return "average weight bits"
        if self.energy_uj is not None:
            return "energy, µJ/image"
        return f"energy of uniform {self.energy_relative_to} x {self.energy_ratio}, µJ/image"

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        for quantizer in learned_bit_quantizers(pl_module.model).values():
            quantizer.project()
        if self._last_total is not None:
            pl_module.log("bits/learned_budget_quantity", float(self._last_total))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.loss_terms.pop("bit_penalty", None)
        plan = require_plan(pl_module, "BitWidthLearning")
        quantizers = learned_bit_quantizers(pl_module.model)
        widths = {name: float(q.continuous_bits().detach()) for name, q in quantizers.items()}
        fill = 0.1 if self.target_avg_bits is not None else 0.01 * self._budget
        rounded = round_to_budget(widths, self._costs, self._budget, self._fixed_cost, fill)
        rounded = trainer.strategy.broadcast(rounded, src=0)  # one plan on every rank
        plan.set_bits({name: (bits, plan[name].a_bits) for name, bits in rounded.items()})
        layers = quant_layers(pl_module.model)
        for name, quantizer in quantizers.items():
            quantizer.learning = False
            layers[name].weight_quantizer = quantizer.frozen().to(layers[name].weight.device)
        apply_plan(pl_module.model, plan)
        spent = self._fixed_cost + sum(self._costs[name][bits] for name, bits in rounded.items())
        record = {
            **self._record,
            **training_progress(trainer, pl_module, self._fit_start),
            "continuous_bits": widths,
            "rounded_bits": rounded,
            "relaxed_value_at_end": float(self.relaxed_total({n: torch.tensor(w) for n, w in widths.items()})),
            "rounded_value": spent,
            "last_validation_before_rounding": {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
            },
        }
        record["exact_allocation"] = self._exact_comparison(trainer, plan, spent)
        rank_zero_info(
            f"learned bit widths rounded: {self._budget_description()} {spent:.4g} (budget {self._budget:.4g})"
        )
        settings = {
            "method": "learned_bit_widths",
            "budget": record["budget"],
            "budget_value": self._budget,
            "candidate_bits": self.candidate_bits,
            "penalty_weight": self.penalty_weight,
            "bits_lr_scale": self.bits_lr_scale,
            "epochs": record["epochs"],
            **record["optimizer"],
        }
        pl_module.record.training = {"settings": settings, **record}  # in the packed file's card
        if self.save_checkpoint:
            write_training_outputs(trainer, pl_module, "learned_bits", record)

    def _exact_comparison(self, trainer: pl.Trainer, plan: QuantPlan, spent: float) -> dict | None:
        """The exact allocator's plan at the budget the rounded plan spends, when every candidate was probed."""
        probed = all(set(self.candidate_bits) <= set(plan[name].sensitivity.get("w", {})) for name in self._costs)
        if not probed:
            return None
        a_bits = sorted({plan[name].a_bits for name in self._costs if plan[name].a_bits is not None})
        if len(a_bits) != 1:
            return None
        budget = {"avg_weight_bits": spent} if self.target_avg_bits is not None else {"energy_uj": spent}
        exact = ExactAllocation(w_candidates=self.candidate_bits, a_candidates=a_bits, act_weight=0.0, **budget)
        trial = copy.deepcopy(plan)
        trial.set_bits(exact.allocate(trial, energy_model_of(trainer)))
        out = run_dir(trainer)
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            trial.to_yaml(out / "plan_exact.yaml")

        def summed(candidate: QuantPlan) -> float:
            return sum(candidate[name].sensitivity["w"][candidate[name].w_bits] for name in self._costs)

        return {
            "plan": str(out / "plan_exact.yaml"),
            "budget": budget,
            "summed_w_sensitivity_exact": summed(trial),
            "summed_w_sensitivity_learned": summed(plan),
            "bits": {name: trial[name].w_bits for name in self._costs},
        }
