"""Analytic energy of a quantization plan: per-operation energy models (with sources) and plan accounting.

Plain PyTorch/NumPy, no Lightning: usable from a notebook or a test without a Trainer. Three models:
:class:`HorowitzEnergyModel` (default, ``"horowitz45nm"``), :class:`MaxBitWidthEnergyModel` (``"max_bit_width"``)
and :class:`TableEnergyModel` (``"table"``), each selectable in a config file with ``class_path``.

Example:
    >>> from lit_mpq.energy import build_energy_model, energy_report
    >>> model = build_energy_model("horowitz45nm")
    >>> model.source.startswith("M. Horowitz")
    True
"""

from lit_mpq.energy.accounting import energy_report, layer_energy, plan_energy, uniform_energy
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
    "HorowitzEnergyModel",
    "MaxBitWidthEnergyModel",
    "TableEnergyModel",
    "build_energy_model",
    "energy_report",
    "layer_energy",
    "parse_precision_key",
    "plan_energy",
    "precision_key",
    "uniform_energy",
]
