"""Benchmark: speed of the exact allocation MILP (``ExactAllocation`` / ``scipy.optimize.milp``, HiGHS).

A synthetic plan of 50 layers (ResNet/ViT-like shapes: parameters, MACs and input activations spanning four
orders of magnitude), weight candidates ``[2, 3, 4, 6, 8]`` x activation candidates ``[4, 6, 8]`` = 15 options per
layer, and sensitivities that fall about 4x per extra bit with a random scale per layer. Two budgets at once:
energy (Horowitz 45 nm, relative to uniform W8A8) and weight size. Run::

    python benchmarks/solver_speed.py [--layers 50] [--repeats 5] [--points 20] [--seed 0]

It prints a Markdown table: the median of ``--repeats`` single allocations (``ExactAllocation.allocate``, which
builds the coefficients and solves; and the MILP alone), then a sweep of ``--points`` energy budgets linearly
spaced between the smallest feasible energy and the largest (every layer at W8A8). Goals: <= 1 s for one
allocation, <= 10 s for the 20-budget sweep.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import numpy as np
import scipy

from lit_mpq.allocation import ExactAllocation
from lit_mpq.energy import HorowitzEnergyModel, uniform_energy
from lit_mpq.plan import LayerPlan, LayerSpec, QuantPlan

W_CANDIDATES = [2, 3, 4, 6, 8]
A_CANDIDATES = [4, 6, 8]


def synthetic_plan(num_layers: int, seed: int) -> QuantPlan:
    """Random conv/linear layers with realistic magnitudes and sensitivities decreasing in bits."""
    rng = np.random.default_rng(seed)
    specs, layers = [], {}
    for i in range(num_layers):
        c_in, c_out = (int(c) for c in rng.choice([16, 32, 64, 128, 256, 512], size=2))
        kernel = int(rng.choice([1, 3]))
        side = int(rng.choice([7, 14, 28, 56]))
        params = c_in * c_out * kernel * kernel
        name = f"layer{i:02d}"
        specs.append(
            LayerSpec(
                name=name,
                kind="conv2d",
                params=params,
                macs=params * side * side,
                act_in=c_in * side * side,
                act_out=c_out * side * side,
                weight_shape=(c_out, c_in, kernel, kernel),
            )
        )
        w_scale, a_scale = 10.0 ** rng.uniform(-2, 1, size=2)
        sens = {
            "w": {b: float(w_scale * 4.0 ** (-b) * rng.uniform(0.7, 1.3)) for b in W_CANDIDATES},
            "a": {b: float(a_scale * 4.0 ** (-b) * rng.uniform(0.7, 1.3)) for b in A_CANDIDATES},
        }
        layers[name] = LayerPlan(sensitivity=sens)
    return QuantPlan(specs, layers)


def time_allocation(policy: ExactAllocation, plan: QuantPlan) -> tuple[float, float]:
    """Wall seconds of one ``allocate`` call and the MILP's share of it."""
    start = time.perf_counter()
    policy.allocate(plan)
    return time.perf_counter() - start, policy.last_solution_info["solve_seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    plan = synthetic_plan(args.layers, args.seed)
    model = HorowitzEnergyModel()
    int8 = uniform_energy(plan, model, 8, 8).total_pj
    lowest = uniform_energy(plan, model, min(W_CANDIDATES), min(A_CANDIDATES)).total_pj
    min_ratio, max_ratio = lowest / int8, 1.0
    size_mid = 0.5 * sum(spec.params * (min(W_CANDIDATES) + max(W_CANDIDATES)) for spec, _ in plan.items()) / 8 / 1e6

    def policy(ratio: float) -> ExactAllocation:
        return ExactAllocation(
            W_CANDIDATES, A_CANDIDATES, energy_relative_to="W8A8", energy_ratio=ratio, size_mb=size_mid
        )

    single = policy(0.5 * (min_ratio + max_ratio))
    time_allocation(single, plan)  # warm-up: imports, HiGHS start-up
    runs = [time_allocation(single, plan) for _ in range(args.repeats)]
    one_total = statistics.median(t for t, _ in runs)
    one_milp = statistics.median(s for _, s in runs)

    sweep = [time_allocation(policy(float(r)), plan) for r in np.linspace(min_ratio, max_ratio, args.points)]
    sweep_total = sum(t for t, _ in sweep)
    slowest = max(t for t, _ in sweep)

    options = len(W_CANDIDATES) * len(A_CANDIDATES)
    print(f"`python {' '.join(['benchmarks/solver_speed.py', *sys.argv[1:]])}`")
    print()
    print(
        f"{args.layers} layers x {options} options (W{W_CANDIDATES} x A{A_CANDIDATES}), budgets: energy "
        f"(Horowitz 45 nm, x uniform W8A8) + weight size <= {size_mid:.3g} MB; Python {platform.python_version()}, "
        f"SciPy {scipy.__version__} (HiGHS), {platform.processor() or platform.machine()}"
    )
    print()
    print("| measurement | wall time | goal |")
    print("|---|---:|---:|")
    print(
        f"| one allocation, median of {args.repeats} (`ExactAllocation.allocate`) | {one_total * 1e3:.1f} ms | <= 1 s |"
    )
    print(f"| of which the MILP (`solve_multiple_choice`) | {one_milp * 1e3:.1f} ms | |")
    print(
        f"| {args.points}-budget sweep, energy {min_ratio:.3f}-{max_ratio:.3f} x W8A8, total | {sweep_total:.2f} s "
        "| <= 10 s |"
    )
    print(f"| slowest allocation in the sweep | {slowest * 1e3:.1f} ms | |")


if __name__ == "__main__":
    main()
