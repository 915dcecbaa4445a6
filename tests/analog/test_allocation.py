"""Energy-per-MAC allocation: the exact solver against brute force and the continuous optimum; the noise probe."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lit_mpq.allocation import InfeasibleBudgetError
from lit_mpq.analog import (
    NoiseInjector,
    ThermalNoise,
    allocate_energy,
    analog_energy,
    energy_grid,
    probe_noise_sensitivity,
)
from lit_mpq.quant import QuantSettings, quantize_model
from lit_mpq.quant.apply import calibrate, set_mode

# A hand-made case: three layers, four energies each; sensitivities fall with energy, at different rates.
GRID = [1.0, 2.0, 4.0, 8.0]
SCORES = {
    "a": {1.0: 9.0, 2.0: 5.0, 4.0: 2.0, 8.0: 1.5},
    "b": {1.0: 3.0, 2.0: 2.5, 4.0: 2.2, 8.0: 2.1},
    "c": {1.0: 6.0, 2.0: 2.0, 4.0: 0.5, 8.0: 0.1},
}
MACS = {"a": 10, "b": 40, "c": 25}


def brute_force(scores, macs, energy_per_mac, floor=0.0):
    """Every combination, by hand: the smallest summed score whose energy fits."""
    names = list(scores)
    budget = energy_per_mac * sum(macs.values())
    best = (math.inf, None)
    for combo in itertools.product(*[[e for e in scores[n] if e >= floor] for n in names]):
        used = sum(macs[n] * e for n, e in zip(names, combo, strict=True))
        if used <= budget * (1 + 1e-12):
            best = min(best, (sum(scores[n][e] for n, e in zip(names, combo, strict=True)), combo))
    return best


@pytest.mark.parametrize("energy_per_mac", [1.0, 1.4, 2.0, 2.6, 3.0, 4.0, 5.5, 8.0])
def test_the_allocation_is_the_brute_force_optimum_at_every_budget(energy_per_mac):
    allocation = allocate_energy(SCORES, MACS, energy_per_mac)
    value, combo = brute_force(SCORES, MACS, energy_per_mac)
    assert allocation.objective == pytest.approx(value, abs=1e-12)
    assert sum(SCORES[n][e] for n, e in allocation.energies.items()) == pytest.approx(value, abs=1e-12)
    used = sum(MACS[n] * e for n, e in allocation.energies.items())
    assert used == pytest.approx(allocation.total_e0) and used <= energy_per_mac * 75 * (1 + 1e-9)
    assert allocation.macs == 75 and allocation.budget_e0 == pytest.approx(energy_per_mac * 75)
    assert allocation.mean_energy_per_mac == pytest.approx(used / 75)
    assert allocation.grid == GRID


def test_a_worked_case_by_hand():
    """At a mean of 2 (150 E0): uniform 2 scores 5 + 2.5 + 2 = 9.5. Dropping ``b`` (insensitive, 40 MACs) to 1 frees
    40 E0, of which ``a`` (10 MACs) takes 20 to go from 2 to 4: a=4, b=1, c=2 uses 40 + 40 + 50 = 130 and scores
    2 + 3 + 2 = 7. The 20 E0 left buy nothing more (c -> 4 needs 50, a -> 8 needs 40)."""
    allocation = allocate_energy(SCORES, MACS, 2.0)
    assert allocation.energies == {"a": 4.0, "b": 1.0, "c": 2.0}
    assert allocation.objective == 7.0 and allocation.total_e0 == 130.0


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_the_floor_keeps_every_layer_at_or_above_its_share_of_the_mean(ratio):
    allocation = allocate_energy(SCORES, MACS, 4.0, min_energy_ratio=ratio)
    assert min(allocation.energies.values()) >= ratio * 4.0
    value, _ = brute_force(SCORES, MACS, 4.0, floor=ratio * 4.0)
    assert allocation.objective == pytest.approx(value, abs=1e-12)
    assert allocate_energy(SCORES, MACS, 4.0, min_energy_ratio=1.0).energies == dict.fromkeys(SCORES, 4.0)


def test_on_a_fine_grid_the_solution_approaches_the_continuous_optimum():
    """``S_l = c_l / E``: the relaxation's optimum ``E_l = sqrt(c_l / M_l) B / sum_k sqrt(c_k M_k)`` bounds the
    discrete optimum from below, and a grid of 2^(1/16) steps gets within 1 % of it."""
    c = {"x": 4.0, "y": 1.0, "z": 0.25, "w": 9.0}
    macs = {"x": 1000, "y": 4000, "z": 250, "w": 16}
    grid = energy_grid(0.01, 100.0, steps_per_octave=16)
    scores = {n: {e: c[n] / e for e in grid} for n in c}
    budget = 2.0 * sum(macs.values())
    root = sum(math.sqrt(c[n] * macs[n]) for n in c)
    continuous = {n: math.sqrt(c[n] / macs[n]) * budget / root for n in c}
    best = sum(c[n] / continuous[n] for n in c)  # = root^2 / budget
    assert best == pytest.approx(root**2 / budget)
    allocation = allocate_energy(scores, macs, 2.0)
    assert best <= allocation.objective <= best * 1.01
    for n in c:  # each energy within a few grid steps of the continuous one
        assert allocation.energies[n] == pytest.approx(continuous[n], rel=0.15)


def test_an_infeasible_budget_gives_the_smallest_achievable_mean_energy():
    with pytest.raises(InfeasibleBudgetError, match=r"energy_per_mac=1 \(75 E0/image\)"):
        allocate_energy(SCORES, MACS, 0.5)


def test_bad_inputs_are_refused_with_a_short_message():
    with pytest.raises(ValueError, match="at least one layer"):
        allocate_energy({}, MACS, 1.0)
    with pytest.raises(ValueError, match="'a' needs a positive integer MAC count"):
        allocate_energy(SCORES, {"b": 1, "c": 1}, 1.0)
    with pytest.raises(ValueError, match="sensitivity at energy 2 is nan"):
        allocate_energy({"a": {1.0: 1.0, 2.0: float("nan")}}, MACS, 1.0)
    with pytest.raises(ValueError, match="finite positive energy"):
        allocate_energy({"a": {-1.0: 1.0}}, MACS, 1.0)
    with pytest.raises(ValueError, match="energy_per_mac"):
        allocate_energy(SCORES, MACS, 0.0)
    with pytest.raises(ValueError, match=r"min_energy_ratio=2 must be in \(0, 1\]"):
        allocate_energy(SCORES, MACS, 1.0, min_energy_ratio=2)
    with pytest.raises(ValueError, match="no sensitivity at or above 4"):
        allocate_energy({"a": {1.0: 1.0, 2.0: 0.5}}, MACS, 4.0, min_energy_ratio=1.0)
    with pytest.raises(ValueError, match="no MAC count"):
        analog_energy({"a": 1.0}, {})


def test_the_energy_grid():
    assert energy_grid(1, 8, 1) == [1.0, 2.0, 4.0, 8.0]
    assert energy_grid(0.5, 2, 2) == pytest.approx([0.5, 0.5 * 2**0.5, 1.0, 2**0.5, 2.0])
    assert energy_grid(3, 3) == [3.0]
    with pytest.raises(ValueError, match="below low"):
        energy_grid(2, 1)
    with pytest.raises(ValueError, match="steps_per_octave"):
        energy_grid(1, 2, 0)
    assert analog_energy({"a": 2.0, "b": 0.5}, {"a": 10, "b": 4}) == 22.0


# ------------------------------------------------------------------------------------------------------ probe
def probed_model() -> tuple[nn.Sequential, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4))
    quantize_model(model, QuantSettings())
    batches = [torch.rand(8, 3, 6, 6), torch.rand(5, 3, 6, 6)]
    calibrate(model, batches)
    set_mode(model, "quant", "quant")
    return model, batches


@torch.no_grad()
def test_the_probe_is_the_mean_kl_of_one_noisy_layer_computed_by_hand():
    model, batches = probed_model()
    sensitivity = probe_noise_sensitivity(model, batches, ThermalNoise(), [0.5, 4.0], seed=7, draws=2)
    assert sensitivity.images == 13 and sensitivity.draws == 2 and list(sensitivity.scores) == ["0", "3"]
    for name in ("0", "3"):
        for energy in (0.5, 4.0):
            total = 0.0
            for draw in range(2):
                with NoiseInjector(model, ThermalNoise(), {name: energy}, seed=7, stream=draw):
                    noisy = [model(x) for x in batches]
                for x, q in zip(batches, noisy, strict=True):
                    p = torch.softmax(model(x).double(), dim=1)
                    total += float((p * (p.log() - torch.softmax(q.double(), dim=1).log())).sum())
            assert sensitivity.scores[name][energy] == pytest.approx(total / 26, rel=1e-9)
        assert sensitivity.scores[name][0.5] > sensitivity.scores[name][4.0] > 0


def test_replaying_the_noise_free_prefix_changes_nothing():
    model, batches = probed_model()
    fast = probe_noise_sensitivity(model, batches, ThermalNoise(), [1.0, 2.0], seed=1)
    slow = probe_noise_sensitivity(model, batches, ThermalNoise(), [1.0, 2.0], seed=1, reuse_prefix=False)
    assert fast.scores == slow.scores
    assert all("forward" not in vars(layer) for layer in model)  # the layers compute again afterwards


def test_the_probe_refuses_bad_inputs():
    model, batches = probed_model()
    with pytest.raises(ValueError, match="at least one calibration batch"):
        probe_noise_sensitivity(model, [], ThermalNoise(), [1.0])
    with pytest.raises(ValueError, match="at least one energy"):
        probe_noise_sensitivity(model, batches, ThermalNoise(), [])
    with pytest.raises(ValueError, match="draws=0"):
        probe_noise_sensitivity(model, batches, ThermalNoise(), [1.0], draws=0)
    with pytest.raises(ValueError, match="no quantized Conv2d/Linear layer named"):
        probe_noise_sensitivity(model, batches, ThermalNoise(), [1.0], layers=["fc"])
