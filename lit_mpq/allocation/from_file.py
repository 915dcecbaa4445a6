"""Re-apply a saved allocation: the ``plan.yaml`` of an earlier run, possibly edited by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lit_mpq.allocation.base import Allocation, Policy
from lit_mpq.plan import QuantPlan


class FromFile(Policy):
    """Bits read from a plan file written by the ``Report`` callback.

    Args:
        path: Path of the ``plan.yaml`` to re-apply.

    Raises:
        FileNotFoundError: If the file does not exist (checked at construction, before any work).
    """

    overrides_pins = True

    def __init__(self, path: str) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"FromFile: plan file {path!r} does not exist; point it at a run's plan.yaml")
        self.path = path

    def allocate(self, plan: QuantPlan, energy_model: Any = None) -> Allocation:
        """The saved bit widths; the saved plan must name exactly the model's layers.

        Raises:
            ValueError: If the saved plan's layers differ from the model's.
        """
        saved = QuantPlan.from_yaml(self.path)
        if saved.names != plan.names:
            if sorted(saved.names) == sorted(plan.names):
                return saved.bits()  # same layers in another order: the names are the keys
            missing = sorted(set(plan.names) - set(saved.names))[:5]
            extra = sorted(set(saved.names) - set(plan.names))[:5]
            raise ValueError(
                f"plan file {self.path!r} was made for another model: missing layers {missing}, unknown layers {extra}"
            )
        return saved.bits()

    def describe(self) -> str:
        """E.g. ``FromFile(logs/run/plan.yaml)``."""
        return f"FromFile({self.path})"
