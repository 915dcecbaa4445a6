"""The ``BitAllocator`` callback.

Decides every layer's weight and activation bit widths with a policy, applies them to the quantizers, and writes the
plan to ``plan.yaml`` straight away. Pinned layers (the entry and exit layers when ``first_last_bits`` is set, and
every layer named in ``overrides``) keep their configured bits (:func:`lit_mpq.allocation.pin_layers`). The policy
prices options with the run's energy model, the one of the ``EnergyMeter`` callback (:func:`energy_model_of`).

The configuration is checked against the model as soon as the model's layers are known (in ``setup``, after
``Calibration.setup`` built the plan): override patterns that match nothing and a ``FromFile`` plan of another model
stop the run before calibration and probing.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_mpq.allocation import BitOverride, Policy, Uniform, pin_layers
from lit_mpq.bits import validate_bits
from lit_mpq.callbacks._common import (
    is_quant_run,
    quantizes_in_stage,
    require_before,
    require_plan,
    run_dir,
    timer,
    trained_model_is_final,
)
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.callbacks.energy import EnergyMeter
from lit_mpq.callbacks.sensitivity import SensitivityProbe
from lit_mpq.energy import EnergyModel, HorowitzEnergyModel
from lit_mpq.plan import QuantPlan
from lit_mpq.quant.apply import apply_plan
from lit_mpq.quant.targets import QuantTarget, pair_violations, resolve_target
from lit_mpq.report.record import AllocationRecord

__all__ = ["BitAllocator", "BitOverride", "energy_model_of"]


def energy_model_of(trainer: pl.Trainer) -> EnergyModel:
    """The run's energy model: that of the first ``EnergyMeter`` in ``trainer.callbacks``, else the default.

    The allocation and the reported energy then price a plan with the same model.

    Args:
        trainer: The trainer (anything with a ``callbacks`` list).

    Returns:
        ``EnergyMeter.energy_model``, or a :class:`~lit_mpq.energy.HorowitzEnergyModel` when no meter is listed.
    """
    return next((cb.energy_model for cb in trainer.callbacks if isinstance(cb, EnergyMeter)), HorowitzEnergyModel())


class BitAllocator(Callback):
    """Allocate per-layer bit widths with ``policy`` and apply them.

    Every validation run (each ``trainer.validate`` call) allocates once, with the policy set at that time: a sweep
    sets ``allocator.policy`` between calls.

    Args:
        policy: A :class:`~lit_mpq.allocation.Policy` (``Uniform``, ``SensitivityPercentile``, ``FromFile``, ...).
        first_last_bits: Pin the entry layers (those that see the input) and the exit layers (the classifier heads)
            to this many bits, weights and activations; null leaves them to the policy.
        overrides: ``{layer name or "re:<regex>": {w_bits, a_bits}}`` pinned per layer; later entries win.

    Raises:
        ValueError: On unsupported bit widths.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        first_last_bits: int | None = None,
        overrides: dict[str, BitOverride] | None = None,
    ) -> None:
        self.policy = policy if policy is not None else Uniform()
        self.first_last_bits = validate_bits(first_last_bits, "BitAllocator.first_last_bits")
        self.overrides = {
            key: value if isinstance(value, BitOverride) else BitOverride(**value)
            for key, value in (overrides or {}).items()
        }
        self.output_dir: str | None = None
        """Where ``plan.yaml`` goes; None: the run's folder. A sweep points it at each point's folder."""
        self._done = False

    @staticmethod
    def _target(trainer: pl.Trainer) -> QuantTarget:
        calibration = next((cb for cb in trainer.callbacks if isinstance(cb, Calibration)), None)
        return calibration.settings.quant_target if calibration is not None else resolve_target("lenient")

    @staticmethod
    def _check_pairs(plan: QuantPlan, bits: dict, target: QuantTarget) -> None:
        """Raise when a row's bits are not a pair the hardware target runs (``Calibration.target``'s bit_pairs)."""
        rows = {name: (plan.specs[name].kind, *pair) for name, pair in bits.items()}
        violations = pair_violations(target, rows)
        if violations:
            raise ValueError(
                f"BitAllocator: target {target.name!r} runs only the pairs {[list(p) for p in target.bit_pairs]} "
                f"(activation-only rows: widths {sorted(target.activation_widths())}), but {violations[0]}"
                f"{f' and {len(violations) - 1} more rows' if len(violations) > 1 else ''} would get another; change "
                "the policy's candidates or bits, first_last_bits or the overrides"
            )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not quantizes_in_stage(trainer, stage):
            return
        require_before(trainer, self, Calibration, "needs the plan of measured layers")
        if self.policy.requires_sensitivity:
            require_before(
                trainer, self, SensitivityProbe, f"with policy {type(self.policy).__name__} needs sensitivities"
            )
        # Calibration.setup (earlier in the list) has built the plan: check the configuration against the model
        # now, so that a typo fails in seconds rather than after calibration and probing.
        plan = require_plan(pl_module, "BitAllocator")
        pin_layers(plan, self.first_last_bits, self.overrides)  # the same pins on_validation_start applies
        target = self._target(trainer)
        if hasattr(self.policy, "hardware_target"):
            self.policy.hardware_target = target
        bits = plan.bits()
        pinned = {name: bits[name] for name in plan if plan[name].pinned}
        if isinstance(self.policy, Uniform):  # known before any probe: fail now, not after calibration
            pinned = {**self.policy.allocate(plan), **pinned}
        self._check_pairs(plan, pinned, target)
        self.policy.check_plan(plan, energy_model_of(trainer))
        self._done = False  # each validation run allocates with the policy set now

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done or not is_quant_run(trainer) or trained_model_is_final(pl_module, "BitAllocator"):
            return
        plan = require_plan(pl_module, "BitAllocator")
        start = timer()
        pinned = pin_layers(plan, self.first_last_bits, self.overrides)
        if getattr(self.policy, "requires_weights", False):  # e.g. VarianceMixed: a statistic of each layer's weight
            self.policy.observe(pl_module.model, plan)
        decision = self.policy.allocate(plan, energy_model_of(trainer))
        if not self.policy.overrides_pins:
            decision = {name: bits for name, bits in decision.items() if not plan[name].pinned}
        # Decide on rank 0 and broadcast, so every rank applies the same allocation.
        decision = trainer.strategy.broadcast(decision, src=0)
        self._check_pairs(plan, {**plan.bits(), **decision}, self._target(trainer))
        plan.set_bits(decision)
        apply_plan(pl_module.model, plan)
        self._done = True
        seconds = timer() - start
        pl_module.record.allocation = AllocationRecord(policy=self.policy.describe(), seconds=seconds, pinned=pinned)
        out = run_dir(trainer)  # trainer.log_dir is a collective under DDP: every rank asks
        if self.output_dir is not None:
            out = Path(self.output_dir)
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            plan.to_yaml(out / "plan.yaml")
        pl_module.log("time/allocation_s", seconds)
