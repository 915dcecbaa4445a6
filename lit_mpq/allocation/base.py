"""The allocation-policy interface: a plan in, bit widths out; no modules, no Lightning."""

from __future__ import annotations

from abc import ABC, abstractmethod

from lit_mpq.energy.models import EnergyModel
from lit_mpq.plan import QuantPlan

Allocation = dict[str, tuple[int | None, int | None]]
"""``{layer name: (weight bits, activation bits)}``; ``None`` keeps a tensor in FP32."""


class Policy(ABC):
    """Decides per-layer bit widths from a :class:`~lit_mpq.plan.QuantPlan`.

    Subclasses are constructed from YAML (``class_path`` / ``init_args``), validate their arguments in
    ``__init__``, and implement :meth:`allocate`, which must not change the plan.
    """

    requires_sensitivity: bool = False
    """True when :meth:`allocate` reads ``plan[name].sensitivity`` (a ``SensitivityProbe`` must run first)."""

    overrides_pins: bool = False
    """True when the policy's decision also replaces pinned layers (re-applying a saved plan)."""

    def check_plan(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> None:  # noqa: B027 - optional
        """Check the policy against the model's layers as soon as they are known, before calibration and probing.

        ``BitAllocator.setup`` calls it, so that a configuration error surfaces before any expensive work. The
        default checks nothing.

        Args:
            plan: The model's measured layers, pins applied (no sensitivities yet).
            energy_model: The run's energy model, for budget checks.

        Raises:
            ValueError: If the policy cannot apply to this model.
        """

    @abstractmethod
    def allocate(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> Allocation:
        """Return the bit widths for the layers of ``plan`` (pinned layers may be omitted).

        Args:
            plan: Measured layers, current decisions and sensitivities.
            energy_model: The run's energy model (``BitAllocator`` passes the ``EnergyMeter``'s), for budget-aware
                policies; ``None`` lets such a policy use its default.
        """

    def describe(self) -> str:
        """One-line description for logs and the results file."""
        return type(self).__name__
