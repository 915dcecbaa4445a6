"""Analog noise simulation with energy per MAC as the allocatable variable (Garg et al., arXiv:2102.06365).

Pure PyTorch: noise models whose size is set by the energy per MAC (:mod:`lit_mpq.analog.noise`), their injection
at the outputs of the quantized Conv2d/Linear layers (:mod:`lit_mpq.analog.inject`), and per-layer noise
sensitivities with the exact allocation of energy per MAC under a total budget (:mod:`lit_mpq.analog.allocation`).
The :class:`~lit_mpq.callbacks.AnalogNoise` callback runs them in ``validate``.
"""

from lit_mpq.analog.allocation import (
    EnergyAllocation,
    NoiseSensitivity,
    allocate_energy,
    analog_energy,
    energy_grid,
    probe_noise_sensitivity,
)
from lit_mpq.analog.inject import NoiseInjector, check_energy, noisy_layers
from lit_mpq.analog.noise import (
    NOISE_MODELS,
    PHOTON_ENERGY_1550NM_AJ,
    NoiseModel,
    ShotNoise,
    ThermalNoise,
    WeightNoise,
    build_noise,
)

__all__ = [
    "NOISE_MODELS",
    "PHOTON_ENERGY_1550NM_AJ",
    "EnergyAllocation",
    "NoiseInjector",
    "NoiseModel",
    "NoiseSensitivity",
    "ShotNoise",
    "ThermalNoise",
    "WeightNoise",
    "allocate_energy",
    "analog_energy",
    "build_noise",
    "check_energy",
    "energy_grid",
    "noisy_layers",
    "probe_noise_sensitivity",
]
