"""The ``AnalogNoise`` callback: evaluate the quantized model as an analog accelerator would compute it.

After calibration and bit allocation, ``on_validation_start`` chooses each quantized Conv2d/Linear layer's energy
per MAC (uniform, or allocated under a total budget from noise sensitivities probed on the calibration images) and
attaches the noise (:mod:`lit_mpq.analog`); the validation pass then measures top-1 with that noise, while the FP32
reference pass stays noise-free. At the end of the epoch the settings, the per-layer energies and the analog MAC
energy, beside the digital model's, go to the run record (``results.json`` section ``analog``, the card's
``analog_noise``), and the noise is removed.

The work is in :mod:`lit_mpq.analog`; this callback only wires it to the trainer (data, ranks, record, logs).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lit_mpq.analog import (
    NoiseInjector,
    allocate_energy,
    analog_energy,
    build_noise,
    check_energy,
    energy_grid,
    noisy_layers,
    probe_noise_sensitivity,
)
from lit_mpq.callbacks._common import (
    QUANT_STAGES,
    calibration_batches,
    is_quant_run,
    measure_phase,
    progress,
    require_before,
    require_plan,
    strategy_reduce,
    timer,
)
from lit_mpq.callbacks.allocation import BitAllocator, energy_model_of
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.energy import energy_report

__all__ = ["AnalogNoise"]

AJ_PER_UJ = 1e12
"""Attojoules in one microjoule."""


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"AnalogNoise.{what}={value!r} must be a positive integer")
    return value


class AnalogNoise(Callback):
    """Analog noise at the outputs of the quantized layers during ``validate``, energy per MAC uniform or allocated.

    Args:
        noise: ``"thermal"``, ``"shot"`` or ``"weight"`` (:mod:`lit_mpq.analog.noise`).
        sigma: The model's relative noise at ``E = 1`` (null: its default, 0.01 thermal, 1 shot, 0.1 weight).
        energy_per_mac: Mean energy per MAC, units of ``E0``: every layer's energy, or with ``allocate`` the budget
            ``sum_l M_l E_l <= energy_per_mac sum_l M_l``.
        allocate: Allocate the energies with the exact solver from noise sensitivities probed on the calibration
            images (:func:`lit_mpq.analog.allocate_energy`) instead of giving every layer ``energy_per_mac``.
        energy_grid: The energies a layer may get when allocating (null: ``energy_per_mac x 2^(k/2)`` for
            ``k = -2 .. 8``, 1/2 to 16 times the mean).
        min_energy_ratio: No layer gets less than this times ``energy_per_mac`` when allocating (a trust region for
            the single-layer sensitivities, see :func:`lit_mpq.analog.allocate_energy`; ``docs/analog.md`` has the
            measurement behind the default); null allows the whole grid.
        num_samples: Calibration images of the sensitivity probe (the first ones of the calibration split).
        draws: Noise draws averaged per (layer, energy) in the probe.
        seed: Seed of the noise (each rank draws its own stream).
        unit_energy_aj: Attojoules of one ``E0``, to report the analog MAC energy in µJ beside the digital model
            (null: one 1550 nm photon, 0.128 aJ, for shot noise, whose ``E`` counts photons; none for thermal and
            weight noise, whose unit the paper leaves abstract: their energy is then reported in ``E0`` only).

    Raises:
        ValueError: On an unknown noise model, a non-positive energy, sigma, grid value or count.
    """

    def __init__(
        self,
        noise: str = "thermal",
        sigma: float | None = None,
        energy_per_mac: float = 16.0,
        allocate: bool = False,
        energy_grid: list[float] | None = None,
        min_energy_ratio: float | None = 0.5,
        num_samples: int = 256,
        draws: int = 1,
        seed: int = 0,
        unit_energy_aj: float | None = None,
    ) -> None:
        self.noise = build_noise(noise, sigma)
        self.energy_per_mac = float(check_energy(energy_per_mac, "AnalogNoise.energy_per_mac"))
        self.allocate = bool(allocate)
        if energy_grid is not None and not energy_grid:
            raise ValueError("AnalogNoise.energy_grid must list at least one energy (or be null for the default)")
        self.energy_grid = (
            sorted({float(check_energy(e, "AnalogNoise.energy_grid value")) for e in energy_grid})
            if energy_grid is not None
            else energy_grid_around(self.energy_per_mac)
        )
        ratio_ok = isinstance(min_energy_ratio, int | float) and not isinstance(min_energy_ratio, bool)
        if min_energy_ratio is not None and not (ratio_ok and 0 < min_energy_ratio <= 1):
            raise ValueError(f"AnalogNoise.min_energy_ratio={min_energy_ratio!r} must be in (0, 1] or null")
        self.min_energy_ratio = min_energy_ratio
        self.num_samples = _positive_int(num_samples, "num_samples")
        self.draws = _positive_int(draws, "draws")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"AnalogNoise.seed={seed!r} must be a non-negative integer")
        self.seed = seed
        if unit_energy_aj is not None:
            unit_energy_aj = float(check_energy(unit_energy_aj, "AnalogNoise.unit_energy_aj"))
        self.unit_energy_aj = unit_energy_aj if unit_energy_aj is not None else self.noise.default_unit_aj
        self.injector: NoiseInjector | None = None
        self.energies: dict[str, float] = {}
        """The energy per MAC of every noisy layer, after ``on_validation_start``."""
        self._details: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in QUANT_STAGES:
            return
        require_before(trainer, self, Calibration, "needs the quantized layers and their calibrated ranges")
        require_before(trainer, self, BitAllocator, "adds noise to the quantized model, so the bits must be applied")

    def settings(self) -> dict[str, Any]:
        """The callback's settings, for the run record and the card."""
        return {
            **self.noise.describe(),
            "energy_per_mac": self.energy_per_mac,
            "allocate": self.allocate,
            "energy_grid": list(self.energy_grid) if self.allocate else None,
            "min_energy_ratio": self.min_energy_ratio if self.allocate else None,
            "num_samples": self.num_samples if self.allocate else None,
            "draws": self.draws if self.allocate else None,
            "seed": self.seed,
            "unit_energy_aj": self.unit_energy_aj,
        }

    def _allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, macs: dict[str, int]) -> dict[str, float]:
        """Probe every layer at every grid energy on this rank's calibration images, sum over ranks, solve."""
        batches = list(calibration_batches(trainer, "analog noise probe", self.num_samples))
        steps = len(macs) * len(self.energy_grid)
        with progress(trainer, steps, "analog sensitivity", "setting") as advance, measure_phase(pl_module, "probe"):
            sensitivity = probe_noise_sensitivity(
                pl_module.model, batches, self.noise, self.energy_grid, self.seed, self.draws, list(macs), None, advance
            )
        # Every rank probed its own images: the mean over all of them is the sum of the per-rank sums over the total.
        reduce = strategy_reduce(trainer)
        names = list(macs)
        local = torch.tensor(
            [[sensitivity.scores[n][e] * sensitivity.images for e in self.energy_grid] for n in names],
            dtype=torch.float64,
        )
        images = int(reduce(torch.tensor(sensitivity.images, dtype=torch.int64), "sum"))
        totals = reduce(local, "sum") / images
        rows = zip(names, totals.tolist(), strict=True)
        scores = {name: dict(zip(self.energy_grid, row, strict=True)) for name, row in rows}
        sensitivity.scores, sensitivity.images = scores, images
        allocation = allocate_energy(scores, macs, self.energy_per_mac, self.min_energy_ratio)
        on_grid = self.energy_per_mac in self.energy_grid
        uniform = sum(row[self.energy_per_mac] for row in scores.values()) if on_grid else None
        self._details = {
            "sensitivity": sensitivity.to_dict(),
            "allocation": allocation.to_dict() | {"uniform_objective": uniform},
        }
        return allocation.energies

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer):
            return
        plan = require_plan(pl_module, "AnalogNoise")
        start = timer()
        layers = noisy_layers(pl_module.model)
        macs = {name: int(plan.specs[name].macs) for name in layers if name in plan}
        if not macs:
            raise MisconfigurationException("AnalogNoise found no quantized Conv2d/Linear layer in the plan")
        self._details = {}
        if self.allocate:
            self.energies = self._allocate(trainer, pl_module, macs)
        else:
            self.energies = dict.fromkeys(macs, self.energy_per_mac)
        self._details["seconds"] = timer() - start
        self.detach()
        self.injector = NoiseInjector(pl_module.model, self.noise, self.energies, self.seed, trainer.global_rank)
        self.injector.attach()

    # ---------------------------------------------------------------------------------------------- reporting
    def energy_summary(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> dict[str, Any]:
        """The analog MAC energy of the current energies, beside the digital model's energy of the same plan."""
        plan = require_plan(pl_module, "AnalogNoise")
        macs = {name: int(plan.specs[name].macs) for name in self.energies}
        total_e0 = analog_energy(self.energies, macs)
        analog_uj = total_e0 * self.unit_energy_aj / AJ_PER_UJ if self.unit_energy_aj is not None else None
        digital = energy_report(plan, energy_model_of(trainer))
        mac_uj = digital["mac_uj_per_image"]
        return {
            "e0_per_image": total_e0,
            "mean_energy_per_mac": total_e0 / sum(macs.values()),
            "macs_per_image": sum(macs.values()),
            "unit_energy_aj": self.unit_energy_aj,
            "analog_mac_uj_per_image": analog_uj,
            "digital": {
                "model": digital["model"],
                "total_uj_per_image": digital["total_uj_per_image"],
                "mac_uj_per_image": mac_uj,
                "memory_uj_per_image": digital["weight_mem_uj_per_image"] + digital["act_mem_uj_per_image"],
            },
            "analog_over_digital_mac": analog_uj / mac_uj if analog_uj is not None and mac_uj > 0 else None,
        }

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quant_run(trainer) or self.injector is None:
            return
        plan = require_plan(pl_module, "AnalogNoise")
        energy = self.energy_summary(pl_module, trainer)
        pl_module.record.analog = {
            "settings": self.settings(),
            "layers": {
                name: {"macs": int(plan.specs[name].macs), "energy_per_mac": e} for name, e in self.energies.items()
            },
            "energy": energy,
            **self._details,
        }
        pl_module.log("analog/mean_energy_per_mac", energy["mean_energy_per_mac"])
        pl_module.log("analog/e0_per_image", energy["e0_per_image"])
        if energy["analog_mac_uj_per_image"] is not None and math.isfinite(energy["analog_mac_uj_per_image"]):
            pl_module.log("analog/mac_uj_per_image", energy["analog_mac_uj_per_image"])
        self.detach()

    def detach(self) -> None:
        """Remove the noise from the model (the next validation attaches it again)."""
        if self.injector is not None:
            self.injector.detach()
            self.injector = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.detach()


def energy_grid_around(energy_per_mac: float) -> list[float]:
    """The default grid: ``energy_per_mac x 2^(k/2)`` for ``k = -2 .. 8`` (1/2 to 16 times the mean, 11 energies)."""
    return energy_grid(energy_per_mac / 2, energy_per_mac * 16, steps_per_octave=2)
