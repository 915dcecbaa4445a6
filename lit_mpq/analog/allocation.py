"""Energy per MAC per layer as the allocatable variable: noise sensitivities, and their exact allocation.

Every noisy layer ``l`` (``M_l`` MACs per image) gets one energy per MAC ``E_l`` from a discrete set (a geometric
grid, :func:`energy_grid`). The analog MAC energy of an image is ``sum_l M_l E_l`` (units of ``E0``); a budget is
given as a mean energy per MAC ``E_bar``, i.e. ``sum_l M_l E_l <= E_bar sum_l M_l``. Uniform energy is ``E_l =
E_bar`` for every layer; the allocation chooses

    ``min sum_l S_l(E_l)  subject to  sum_l M_l E_l <= E_bar sum_l M_l``

where ``S_l(E)`` is the sensitivity of layer ``l`` to noise at energy ``E``: the mean ``KL(p || p_l,E)`` over the
calibration images between the noise-free quantized model's softmax ``p`` and the softmax with noise at ``E`` in
layer ``l`` only (:func:`probe_noise_sensitivity`, the analogue of the end-to-end bit-width probe,
:mod:`lit_mpq.sensitivity.end_to_end`). It is the same multiple-choice knapsack as the bit allocation and is solved
by the same exact MILP (:func:`lit_mpq.allocation.solver.solve_multiple_choice`, HiGHS). Summing per-layer
sensitivities assumes the layers' effects add, as the bit allocation does; with the uniform energy on the grid,
the solver's choice is never worse than uniform *by that sum*, and the benchmark checks the accuracy.

For small noise the KL grows as the output noise variance, ``S_l(E) ~ c_l / E``; the continuous relaxation then has
the closed form ``E_l ~ sqrt(c_l / M_l)`` (spend more energy per MAC on sensitive layers with few MACs), which the
tests use as an independent check.

Example:
    >>> scores = {"a": {1.0: 4.0, 4.0: 1.0}, "b": {1.0: 1.0, 4.0: 0.25}}
    >>> allocation = allocate_energy(scores, {"a": 10, "b": 30}, energy_per_mac=1.75)
    >>> allocation.energies, allocation.total_e0
    ({'a': 4.0, 'b': 1.0}, 70.0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.allocation.solver import Constraint, InfeasibleBudgetError, solve_multiple_choice
from lit_mpq.analog.inject import NoiseInjector, check_energy, noisy_layers
from lit_mpq.analog.noise import NoiseModel

__all__ = [
    "EnergyAllocation",
    "NoiseSensitivity",
    "allocate_energy",
    "analog_energy",
    "energy_grid",
    "probe_noise_sensitivity",
]


def energy_grid(low: float, high: float, steps_per_octave: int = 2) -> list[float]:
    """Geometric grid ``low * 2^(k / steps_per_octave)`` from ``low`` up to ``high`` (included when on the grid).

    Example:
        >>> energy_grid(1, 8, steps_per_octave=1)
        [1.0, 2.0, 4.0, 8.0]

    Raises:
        ValueError: If ``low`` or ``high`` is not finite and positive, ``high < low``, or ``steps_per_octave`` is
            not a positive integer.
    """
    low, high = float(check_energy(low, "energy_grid low")), float(check_energy(high, "energy_grid high"))
    if high < low:
        raise ValueError(f"energy_grid: high={high} is below low={low}")
    if isinstance(steps_per_octave, bool) or not isinstance(steps_per_octave, int) or steps_per_octave < 1:
        raise ValueError(f"energy_grid: steps_per_octave={steps_per_octave!r} must be a positive integer")
    steps = math.floor(math.log2(high / low) * steps_per_octave + 1e-9)
    return [low * 2.0 ** (k / steps_per_octave) for k in range(steps + 1)]


def analog_energy(energies: Mapping[str, float], macs: Mapping[str, int]) -> float:
    """``sum_l M_l E_l``: the analog MAC energy per image, units of ``E0``.

    Raises:
        ValueError: If a layer of ``energies`` has no MAC count.
    """
    missing = [name for name in energies if name not in macs]
    if missing:
        raise ValueError(f"no MAC count for layers {missing[:3]}")
    return float(sum(macs[name] * float(energy) for name, energy in energies.items()))


# ------------------------------------------------------------------------------------------------- sensitivity
@dataclass
class NoiseSensitivity:
    """Per-layer noise sensitivities measured by :func:`probe_noise_sensitivity`.

    Attributes:
        scores: ``{layer: {energy per MAC: mean KL(p || p_noisy), nats per image}}``.
        noise: The noise model's settings.
        images: Calibration images per draw.
        draws: Noise draws averaged per (layer, energy).
        seed: Seed of the draws.
        seconds: Wall time.
    """

    scores: dict[str, dict[float, float]]
    noise: dict[str, Any]
    images: int
    draws: int
    seed: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (energies as string keys)."""
        return {
            "scores": {name: {repr(e): s for e, s in row.items()} for name, row in self.scores.items()},
            "noise": dict(self.noise),
            "images": self.images,
            "draws": self.draws,
            "seed": self.seed,
            "seconds": self.seconds,
        }


class _Replay:
    """Makes layers return recorded outputs instead of computing them (the noise-free prefix of a probe)."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.layers = layers
        self.outputs: dict[str, Tensor] = {}

    def record(self, name: str, calls: dict[str, int]):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.outputs[name] = output
            calls[name] = calls.get(name, 0) + 1

        return hook

    def skip(self, names: Iterable[str]) -> None:
        for name in names:
            self.layers[name].forward = lambda *args, _name=name, **kwargs: self.outputs[_name]

    def restore(self) -> None:
        for layer in self.layers.values():
            layer.__dict__.pop("forward", None)


@torch.no_grad()
def probe_noise_sensitivity(
    model: nn.Module,
    batches: Iterable[Tensor],
    noise: NoiseModel,
    energies: Sequence[float],
    seed: int = 0,
    draws: int = 1,
    layers: Sequence[str] | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
    reuse_prefix: bool = True,
) -> NoiseSensitivity:
    """``S_l(E)``: mean ``KL(p || p_l,E)`` per image with noise at energy ``E`` in layer ``l`` only.

    ``p`` is the softmax of the model as it is (quantized, noise-free), ``p_l,E`` the same with ``noise`` at ``E``
    per MAC in layer ``l``. Each (layer, draw) restarts the layer's noise stream from ``(seed, draw)``, so the
    energies of a layer are compared on the same standard normal draws and its curve is smooth in ``E``.

    The layers that run before ``l`` see no noise, so with ``reuse_prefix`` they return the outputs recorded in the
    noise-free pass instead of computing them again (exact: same inputs, same outputs; about half the work). It is
    turned off by itself when a layer runs more than once per forward (shared weights).

    Args:
        model: A quantized, calibrated model with its plan applied (quantizers on); no noise attached.
        batches: Calibration inputs on the model's device; kept in memory and replayed.
        noise: The noise model.
        energies: Energies per MAC to probe (units of ``E0``).
        seed: Seed of the draws.
        draws: Noise draws to average per (layer, energy).
        layers: Probe only these layers (default: every quantized Conv2d/Linear).
        forward: Callable running the model on a batch (default ``model``).
        progress: Called with 1 after each (layer, energy).
        reuse_prefix: Replay the noise-free outputs of the layers that run before the probed one (keeps every
            noisy layer's output of every batch in memory).

    Raises:
        ValueError: On an empty batch list or energy list, a bad energy, ``draws < 1`` or an unknown layer.
    """
    start = perf_counter()
    run = forward or model
    inputs = list(batches)
    if not inputs:
        raise ValueError("probe_noise_sensitivity needs at least one calibration batch")
    grid = [float(check_energy(e, "probed energy")) for e in energies]
    if not grid:
        raise ValueError("probe_noise_sensitivity needs at least one energy to probe")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws={draws!r} must be a positive integer")
    all_layers = noisy_layers(model)
    names = list(layers) if layers is not None else list(all_layers)
    unknown = [name for name in names if name not in all_layers]
    if unknown:
        raise ValueError(f"no quantized Conv2d/Linear layer named {unknown[:3]}; the layers are {list(all_layers)[:4]}")
    images = sum(int(x.shape[0]) for x in inputs)

    # The noise-free pass: reference log-probabilities, and (for the replay) every layer's output and the order.
    replay = _Replay(all_layers)
    recorded: list[dict[str, Tensor]] = []
    calls: dict[str, int] = {}
    hooked = all_layers.items() if reuse_prefix else ()
    handles = [layer.register_forward_hook(replay.record(name, calls)) for name, layer in hooked]
    reference = []
    try:
        for x in inputs:
            replay.outputs = {}
            reference.append(F.log_softmax(run(x).double(), dim=-1))
            recorded.append(replay.outputs)
    finally:
        for handle in handles:
            handle.remove()
    order = list(recorded[0]) if reuse_prefix else []
    if any(count > len(inputs) for count in calls.values()):
        order = []  # a layer runs twice per forward: its output is not one tensor per batch

    scores: dict[str, dict[float, float]] = {}
    with NoiseInjector(model, noise, seed=seed) as injector:
        for name in names:
            row = {}
            try:
                replay.skip(order[: order.index(name)] if name in order else [])
                for energy in grid:
                    injector.set_energies({name: energy})
                    total = 0.0
                    for draw in range(draws):
                        injector.reseed(seed, draw)
                        for x, log_p, outputs in zip(inputs, reference, recorded, strict=True):
                            replay.outputs = outputs
                            log_q = F.log_softmax(run(x).double(), dim=-1)
                            total += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))
                    row[energy] = total / (images * draws)
                    if progress is not None:
                        progress(1)
            finally:
                replay.restore()
            scores[name] = row
    return NoiseSensitivity(scores, noise.describe(), images, draws, seed, perf_counter() - start)


# -------------------------------------------------------------------------------------------------- allocation
@dataclass
class EnergyAllocation:
    """The energy per MAC of every layer, chosen by :func:`allocate_energy`.

    Attributes:
        energies: ``{layer: energy per MAC}``, units of ``E0``, in the order of the scores.
        total_e0: ``sum_l M_l E_l`` per image, units of ``E0``.
        budget_e0: The budget ``E_bar sum_l M_l``, units of ``E0``.
        macs: ``sum_l M_l`` per image.
        objective: The summed sensitivity of the choice.
        solve_seconds: Time in the solver.
        grid: The energies a layer could get.
    """

    energies: dict[str, float]
    total_e0: float
    budget_e0: float
    macs: int
    objective: float
    solve_seconds: float
    grid: list[float] = field(default_factory=list)

    @property
    def mean_energy_per_mac(self) -> float:
        """``sum_l M_l E_l / sum_l M_l``, units of ``E0``."""
        return self.total_e0 / self.macs

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the run record."""
        return {
            "energies": dict(self.energies),
            "total_e0_per_image": self.total_e0,
            "budget_e0_per_image": self.budget_e0,
            "mean_energy_per_mac": self.mean_energy_per_mac,
            "macs_per_image": self.macs,
            "objective": self.objective,
            "solve_seconds": self.solve_seconds,
            "grid": list(self.grid),
        }


def allocate_energy(
    scores: Mapping[str, Mapping[float, float]],
    macs: Mapping[str, int],
    energy_per_mac: float,
    min_energy_ratio: float | None = None,
) -> EnergyAllocation:
    """The energies per MAC minimising the summed sensitivity at a mean energy per MAC of at most ``energy_per_mac``.

    Args:
        scores: ``{layer: {energy: sensitivity}}`` (e.g. :attr:`NoiseSensitivity.scores`); a layer may lack some
            energies of the union grid (they are unavailable to it).
        macs: ``{layer: MACs per image}`` for every layer of ``scores``.
        energy_per_mac: The budget as a mean energy per MAC, units of ``E0``.
        min_energy_ratio: If set, no layer gets less than ``min_energy_ratio x energy_per_mac`` (a trust region:
            the sensitivities are measured with one layer noisy at a time, and far below the mean energy the noise
            of the other layers compounds with it, which the sum of single-layer scores does not see).

    Raises:
        ValueError: If ``scores`` is empty, a layer has no scores (above the floor) or no (positive) MAC count, a
            score is not finite, an energy is not positive, or ``min_energy_ratio`` is not in ``(0, 1]``.
        InfeasibleBudgetError: If even the lowest energies exceed the budget; the message gives the smallest
            achievable ``energy_per_mac``.
    """
    if not scores:
        raise ValueError("allocate_energy needs the sensitivity of at least one layer")
    budget = float(check_energy(energy_per_mac, "energy_per_mac"))
    floor = 0.0
    if min_energy_ratio is not None:
        if isinstance(min_energy_ratio, bool) or not isinstance(min_energy_ratio, numbers.Real):
            raise ValueError(f"min_energy_ratio={min_energy_ratio!r} must be a number in (0, 1] or None")
        if not 0 < min_energy_ratio <= 1:
            raise ValueError(f"min_energy_ratio={min_energy_ratio!r} must be in (0, 1]")
        floor = float(min_energy_ratio) * budget * (1 - 1e-12)  # an energy equal to the floor is allowed
    table: dict[str, dict[float, float]] = {}
    for name, row in scores.items():
        count = macs.get(name)
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count <= 0:
            raise ValueError(f"layer {name!r} needs a positive integer MAC count, got {count!r}")
        table[name] = {}
        for energy, score in row.items():
            energy = float(check_energy(energy, f"energy of {name!r}"))
            if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
                raise ValueError(f"layer {name!r}: sensitivity at energy {energy:g} is {score!r}; probe it again")
            if energy >= floor:
                table[name][energy] = float(score)
        if not table[name]:
            above = f" at or above {floor:g} (min_energy_ratio x energy_per_mac)" if floor else ""
            raise ValueError(f"layer {name!r} has no sensitivity{above}: probe it at one such energy at least")
    names = list(table)
    grid = sorted({energy for row in table.values() for energy in row})
    objective = np.full((len(names), len(grid)), np.inf)
    for i, name in enumerate(names):
        for energy, score in table[name].items():
            objective[i, grid.index(energy)] = score
    layer_macs = np.array([int(macs[name]) for name in names], dtype=np.float64)
    total_macs = int(layer_macs.sum())
    constraint = Constraint(
        "analog energy",
        layer_macs[:, None] * np.array(grid)[None, :],
        budget * total_macs,
        "E0/image",
        ratio_of=("energy_per_mac", float(total_macs)),
    )
    start = perf_counter()
    try:
        choice = solve_multiple_choice(objective, [constraint])
    except InfeasibleBudgetError as err:
        raise InfeasibleBudgetError(f"energy allocation over {len(names)} layers: {err}") from None
    seconds = perf_counter() - start
    energies = {name: grid[int(k)] for name, k in zip(names, choice, strict=True)}
    return EnergyAllocation(
        energies=energies,
        total_e0=constraint.total(choice),
        budget_e0=budget * total_macs,
        macs=total_macs,
        objective=float(objective[np.arange(len(names)), choice].sum()),
        solve_seconds=seconds,
        grid=grid,
    )
