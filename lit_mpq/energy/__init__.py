"""Analytic energy of a quantization plan: per-operation energy models (with sources) and plan accounting.

Plain PyTorch/NumPy, no Lightning: usable from a notebook or a test without a Trainer. Four models:
:class:`HorowitzEnergyModel` (default, ``"horowitz45nm"``), :class:`MaxBitWidthEnergyModel` (``"max_bit_width"``),
:class:`TableEnergyModel` (``"table"``) and :class:`MemoryHierarchyEnergyModel` (``"memory_hierarchy"``: DRAM, SRAM
and register files, weights reused across a batch), each selectable in a config file with ``class_path``.

Example:
    >>> from lit_mpq.energy import build_energy_model, energy_report
    >>> model = build_energy_model("horowitz45nm")
    >>> model.source.startswith("M. Horowitz")
    True
"""

from lit_mpq.energy.accounting import energy_report, layer_energy, plan_energy, uniform_energy
from lit_mpq.energy.hierarchy import HierarchyEnergy, MemoryHierarchyEnergyModel, hierarchy_report
from lit_mpq.energy.models import (
    ENERGY_MODELS,
    EnergyModel,
    EnergyTerms,
    HorowitzEnergyModel,
    MaxBitWidthEnergyModel,
    TableEnergyModel,
    build_energy_model,
    parse_precision_key,
    precision_key,
)

__all__ = [
    "ENERGY_MODELS",
    "EnergyModel",
    "EnergyTerms",
    "HierarchyEnergy",
    "HorowitzEnergyModel",
    "MaxBitWidthEnergyModel",
    "MemoryHierarchyEnergyModel",
    "TableEnergyModel",
    "build_energy_model",
    "energy_report",
    "hierarchy_report",
    "layer_energy",
    "parse_precision_key",
    "plan_energy",
    "precision_key",
    "uniform_energy",
]
