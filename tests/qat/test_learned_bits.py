"""Learned bit widths: the interpolated quantizer, the budget penalty, and rounding to a budget (brute force)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from lit_mpq.qat.learned_bits import LearnedBitWeightQuantizer, budget_penalty, relaxed_cost, round_to_budget
from lit_mpq.quant.modules import WeightQuantizer

pytestmark = pytest.mark.usefixtures("single_thread")


def _quantizer(candidates=(2, 3, 4, 6, 8), bits=4) -> LearnedBitWeightQuantizer:
    quantizer = LearnedBitWeightQuantizer(candidates, bits=bits)
    quantizer.set_mode("quant")
    quantizer.learning = True
    return quantizer


def test_at_a_candidate_width_it_is_the_usual_quantizer():
    weight = torch.randn(8, 3, 3, 3)
    plain = WeightQuantizer(bits=6)
    for width in (2, 3, 4, 6, 8):
        quantizer = _quantizer()
        with torch.no_grad():
            quantizer.bit_width.fill_(width)
        assert torch.equal(quantizer(weight).detach(), plain.quantize(weight, width))


def test_between_candidates_it_interpolates_and_its_bit_gradient_is_the_grid_difference():
    torch.manual_seed(0)
    weight = torch.randn(4, 16)
    q4, q6 = WeightQuantizer().quantize(weight, 4), WeightQuantizer().quantize(weight, 6)
    quantizer = _quantizer()
    with torch.no_grad():
        quantizer.bit_width.fill_(5.5)  # three quarters of the way from 4 to 6
    out = quantizer(weight.clone().requires_grad_(True))
    torch.testing.assert_close(out.detach(), q4 + 0.75 * (q6 - q4))
    read_out = torch.randn_like(weight)
    (out * read_out).sum().backward()
    # the map is linear in the width inside a bracket: the derivative is the slope between the two grids
    torch.testing.assert_close(quantizer.bit_width.grad, ((q6 - q4) / 2 * read_out).sum())


def test_width_is_clamped_to_the_candidates_range():
    quantizer = _quantizer()
    with torch.no_grad():
        quantizer.bit_width.fill_(11.0)
    weight = torch.randn(3, 5)
    assert torch.equal(quantizer(weight).detach(), WeightQuantizer().quantize(weight, 8))


def test_penalty_is_zero_at_the_target_and_its_gradient_points_toward_it():
    params = {"a": 100, "b": 300}
    total = sum(params.values())
    for start, target in ((6.0, 4.0), (3.0, 4.0), (4.0, 4.0)):
        widths = {name: torch.tensor(start, requires_grad=True) for name in params}
        average = sum(relaxed_cost(w, {b: params[n] / total * b for b in (2, 3, 4, 6, 8)}) for n, w in widths.items())
        penalty = budget_penalty(average, target)
        penalty.backward()
        if start == target:
            assert penalty.item() == 0.0
            assert all(w.grad.item() == 0.0 for w in widths.values())
        for w in widths.values():  # a gradient step moves every width toward the target
            assert (w.grad.item() > 0) == (start > target)
            assert (w.grad.item() < 0) == (start < target)
        assert penalty.item() == pytest.approx(((start - target) / target) ** 2)


def test_penalty_rejects_a_non_positive_target():
    with pytest.raises(ValueError, match="positive"):
        budget_penalty(torch.tensor(3.0), 0.0)


def test_relaxed_cost_is_exact_at_candidates_and_linear_between():
    costs = {2: 1.0, 4: 3.0, 8: 11.0}
    assert relaxed_cost(torch.tensor(4.0), costs).item() == 3.0
    assert relaxed_cost(torch.tensor(6.0), costs).item() == pytest.approx(7.0)
    assert relaxed_cost(torch.tensor(2.5), costs).item() == pytest.approx(1.5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fill", [None, 0.1])
def test_round_to_budget_is_the_brute_force_nearest_plan_within_the_budget(seed, fill):
    rng = random.Random(seed)
    candidates = [2, 3, 4, 6, 8]
    names = [f"l{i}" for i in range(5)]
    params = {name: rng.randint(10, 500) for name in names}
    total = sum(params.values()) + 50
    costs = {name: {b: params[name] * b / total for b in candidates} for name in names}
    fixed = 50 * 8 / total
    widths = {name: rng.uniform(2, 8) for name in names}
    budget = rng.uniform(3.0, 6.0)
    chosen = round_to_budget(widths, costs, budget, fixed, fill)

    def spent(combo: dict) -> float:
        return fixed + sum(costs[n][b] for n, b in combo.items())

    def distance(combo: dict) -> float:
        return sum((b - widths[n]) ** 2 for n, b in combo.items())

    combos = [dict(zip(names, c, strict=True)) for c in itertools.product(candidates, repeat=len(names))]
    feasible = [c for c in combos if spent(c) <= budget + 1e-9]
    filled = [c for c in feasible if fill is not None and spent(c) >= budget - fill - 1e-9]
    best = min(filled or feasible, key=distance)
    assert spent(chosen) <= budget + 1e-9
    if filled:
        assert spent(chosen) >= budget - fill - 1e-9
    assert distance(chosen) == pytest.approx(distance(best), abs=1e-9)


def test_round_to_budget_keeps_the_nearest_widths_when_they_fit():
    costs = {"a": {2: 2.0, 4: 4.0, 8: 8.0}, "b": {2: 2.0, 4: 4.0, 8: 8.0}}
    assert round_to_budget({"a": 3.8, "b": 7.1}, costs, budget=12.0) == {"a": 4, "b": 8}
    # over budget (12 > 10): a 4 -> 2 adds (1.8^2 - 0.2^2) = 3.2 to the squared distance, b 8 -> 4 adds 8.8
    assert round_to_budget({"a": 3.8, "b": 7.1}, costs, budget=10.0) == {"a": 2, "b": 8}


def test_round_to_budget_explains_an_impossible_budget():
    with pytest.raises(ValueError, match="smallest candidate"):
        round_to_budget({"a": 4.0}, {"a": {2: 2.0, 4: 4.0}}, budget=1.0)
