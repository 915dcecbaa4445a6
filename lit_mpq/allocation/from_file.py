"""Re-apply a saved allocation: the ``plan.yaml`` of an earlier run, possibly edited by hand.

The file is read and checked when the policy is built (every row must name its layer and give both bit widths), and
its layer names are checked against the model's as soon as the model's plan exists (``BitAllocator.setup``), so a
wrong or broken file stops the run before calibration and probing. Only ``name``, ``w_bits`` and ``a_bits`` of a
row are read; the rest (``spec``, ``sensitivity``, ``pinned``) is the earlier run's record.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from lit_mpq.allocation.base import Allocation, Policy
from lit_mpq.bits import SUPPORTED_BITS, validate_bits
from lit_mpq.energy.models import EnergyModel
from lit_mpq.plan import PLAN_FORMAT_VERSION, QuantPlan

__all__ = ["FromFile", "read_allocation"]

_SHOWN_NAMES = 5
"""Layer names listed in a mismatch message, per kind of mismatch."""


def _listed(names: list[str]) -> str:
    """``['a', 'b'] (7 in all)``: the first few names, and the count when some are left out."""
    more = f" ({len(names)} in all)" if len(names) > _SHOWN_NAMES else ""
    return f"{names[:_SHOWN_NAMES]}{more}"


def read_allocation(path: str | Path) -> Allocation:
    """The ``{layer: (w_bits, a_bits)}`` of a plan file, every row checked.

    Args:
        path: A ``plan.yaml`` written by a run (``QuantPlan.to_yaml``), possibly edited by hand.

    Returns:
        The bit widths by layer name, in the file's order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not YAML, not a plan, of a newer format, or a row lacks its name or a bit width,
            has an unsupported one, or repeats a layer (the message names the file, the row and the field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FromFile: plan file {str(path)!r} does not exist; point it at a run's plan.yaml")
    where = f"plan file {str(path)!r}"
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not valid YAML: {err}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("layers"), list):
        raise ValueError(f"{where} is not a lit_mpq plan: expected a mapping with a 'layers' list, as plan.yaml has")
    version = data.get("version", PLAN_FORMAT_VERSION)
    if version != PLAN_FORMAT_VERSION:
        raise ValueError(
            f"{where} has format version {version!r}; this lit_mpq reads version {PLAN_FORMAT_VERSION}: "
            "re-create it with this version"
        )
    bits: Allocation = {}
    for index, row in enumerate(data["layers"]):
        name = row.get("name") if isinstance(row, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}, layers[{index}]: a row needs 'name' (the layer's name), got {row!r}")
        at = f"{where}, layers[{index}] (layer {name!r})"
        for field in ("w_bits", "a_bits"):
            if field not in row:
                raise ValueError(f"{at} has no {field!r}: give one of {list(SUPPORTED_BITS)}, or null for FP32")
        if name in bits:
            raise ValueError(f"{at} repeats a layer named in an earlier row: keep one row per layer")
        try:
            bits[name] = (validate_bits(row["w_bits"], "w_bits"), validate_bits(row["a_bits"], "a_bits"))
        except ValueError as err:
            raise ValueError(f"{at}: {err}") from None
    if not bits:
        raise ValueError(f"{where} lists no layers")
    return bits


class FromFile(Policy):
    """Bits read from a plan file written by the ``Report`` callback.

    Args:
        path: Path of the ``plan.yaml`` to re-apply.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a row is malformed (see :func:`read_allocation`). Both are checked at construction, before any
            work.
    """

    overrides_pins = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.bits = read_allocation(path)
        """The file's allocation, read once: the run applies what the file said when the run began."""

    def check_plan(self, plan: QuantPlan, energy_model: object = None) -> None:
        """Check that the file names exactly the model's quantized layers (in any order).

        Raises:
            ValueError: If it does not; the message lists the differences.
        """
        missing = [name for name in plan.names if name not in self.bits]
        unknown = [name for name in self.bits if name not in plan]
        if not missing and not unknown:
            return
        parts = []
        if missing:
            parts.append(f"the model's layers {_listed(missing)} are not in the file")
        floating = [name for name in unknown if name in plan.float_layers]
        if floating:
            parts.append(f"layers {_listed(floating)} are left in floating point in this model")
        unknown = [name for name in unknown if name not in plan.float_layers]
        if unknown:
            parts.append(f"the file's layers {_listed(unknown)} are not in the model")
        raise ValueError(
            f"plan file {self.path!r} does not fit this model: {'; '.join(parts)}. Use the plan.yaml of a run of the "
            "same model, or fix the file's layer names"
        )

    def allocate(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> Allocation:
        """The saved bit widths, in the model's layer order.

        Raises:
            ValueError: If the saved plan's layers differ from the model's (see :meth:`check_plan`).
        """
        self.check_plan(plan)
        return {name: self.bits[name] for name in plan}

    def describe(self) -> str:
        """E.g. ``FromFile(logs/run/plan.yaml)``."""
        return f"FromFile({self.path})"
