"""The ``BitAllocator`` callback.

Decides every layer's weight and activation bit widths with a policy, applies them to the quantizers, and
writes the plan to ``plan.yaml`` straight away. Pinned layers (the first and last layers when
``first_last_bits`` is set, and every layer named in ``overrides``) keep their configured bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_mpq.allocation import Policy, Uniform
from lit_mpq.callbacks._common import QUANT_STAGES, require_before, require_plan, run_dir, timer
from lit_mpq.callbacks.sensitivity import SensitivityProbe
from lit_mpq.plan import QuantPlan, validate_bits
from lit_mpq.quant.apply import apply_plan


@dataclass
class BitOverride:
    """Bits for the layers an override pattern selects.

    Attributes:
        w_bits: Weight bits (null: FP32).
        a_bits: Input-activation bits (null: FP32).
    """

    w_bits: int | None = 8
    a_bits: int | None = 8

    def __post_init__(self) -> None:
        validate_bits(self.w_bits, "override w_bits")
        validate_bits(self.a_bits, "override a_bits")


class BitAllocator(Callback):
    """Allocate per-layer bit widths with ``policy`` and apply them.

    Args:
        policy: A :class:`~lit_mpq.allocation.Policy` (``Uniform``, ``SensitivityPercentile``, ``FromFile``, ...).
        first_last_bits: Pin the first and last quantized layers to this many bits (weights and activations);
            null leaves them to the policy.
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
        self._done = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage in QUANT_STAGES and self.policy.requires_sensitivity:
            require_before(
                trainer, self, SensitivityProbe, f"with policy {type(self.policy).__name__} needs sensitivities"
            )

    def pin(self, plan: QuantPlan) -> None:
        """Mark and set the pinned layers of ``plan``.

        Raises:
            ValueError: If an override pattern matches no layer (a typo would otherwise pass silently).
        """
        names = plan.names
        if self.first_last_bits is not None and names:
            for name in (names[0], names[-1]):
                plan[name].w_bits = plan[name].a_bits = self.first_last_bits
                plan[name].pinned = True
        for pattern, bits in self.overrides.items():
            matched = plan.match(pattern)
            if not matched:
                raise ValueError(
                    f"override {pattern!r} matches no quantized layer; layer names look like {names[:3]} "
                    "(use an exact name or 're:<regex>')"
                )
            for name in matched:
                plan[name].w_bits, plan[name].a_bits, plan[name].pinned = bits.w_bits, bits.a_bits, True

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done or trainer.sanity_checking:
            return
        plan = require_plan(pl_module, "BitAllocator")
        start = timer()
        self.pin(plan)
        decision = self.policy.allocate(plan, getattr(pl_module, "energy_model", None))
        if not self.policy.overrides_pins:
            decision = {name: bits for name, bits in decision.items() if not plan[name].pinned}
        # Decide on rank 0 and broadcast, so every rank applies the same allocation.
        decision = trainer.strategy.broadcast(decision, src=0)
        plan.set_bits(decision)
        apply_plan(pl_module.model, plan)
        self._done = True
        seconds = timer() - start
        pl_module.results["allocation"] = {"policy": self.policy.describe(), "seconds": seconds}
        out = run_dir(trainer)  # trainer.log_dir is a collective under DDP: every rank asks
        if trainer.is_global_zero:
            plan.to_yaml(out / "plan.yaml")
        pl_module.log("time/allocation_s", seconds)
