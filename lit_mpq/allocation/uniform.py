"""Uniform precision: every layer at the same weight and activation bit width (the usual baseline)."""

from __future__ import annotations

from lit_mpq.allocation.base import Allocation, Policy
from lit_mpq.bits import format_setting, validate_bits
from lit_mpq.energy.models import EnergyModel
from lit_mpq.plan import QuantPlan, uniform_setting


class Uniform(Policy):
    """Every layer at ``w_bits`` / ``a_bits``.

    An attention matmul, whose two operands are activations, runs both at ``a_bits``.

    Args:
        w_bits: Weight bit width, or null for FP32 weights.
        a_bits: Input-activation bit width, or null for FP32 activations.

    Example:
        >>> Uniform(w_bits=4, a_bits=8).describe()
        'Uniform(W4A8)'
    """

    def __init__(self, w_bits: int | None = 8, a_bits: int | None = 8) -> None:
        self.w_bits = validate_bits(w_bits, "Uniform.w_bits")
        self.a_bits = validate_bits(a_bits, "Uniform.a_bits")

    def allocate(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> Allocation:
        """Same bits for every layer; both operands of a matmul are activations (``plan.uniform_setting``)."""
        return {name: uniform_setting(plan.specs[name], self.w_bits, self.a_bits) for name in plan}

    def describe(self) -> str:
        """E.g. ``Uniform(W4A8)``, ``Uniform(WFPAFP)``."""
        return f"Uniform({format_setting(self.w_bits, self.a_bits)})"
