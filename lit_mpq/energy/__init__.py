"""Analytic energy of a quantization plan: per-operation energy models (with sources) and plan accounting.

Plain PyTorch/NumPy, no Lightning: usable from a notebook or a test without a Trainer.

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
    build_energy_model,
)

__all__ = [
    "ENERGY_MODELS",
    "EnergyModel",
    "EnergyTerms",
    "HorowitzEnergyModel",
    "build_energy_model",
    "energy_report",
    "layer_energy",
    "plan_energy",
    "uniform_energy",
]
