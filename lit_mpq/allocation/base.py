"""The allocation-policy interface: a plan in, bit widths out; no modules, no Lightning."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

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

    @abstractmethod
    def allocate(self, plan: QuantPlan, energy_model: Any = None) -> Allocation:
        """Return the bit widths for the layers of ``plan`` (pinned layers may be omitted).

        Args:
            plan: Measured layers, current decisions and sensitivities.
            energy_model: The run's energy model, for budget-aware policies.
        """

    def describe(self) -> str:
        """One-line description for logs and the results file."""
        return type(self).__name__
