"""The seed project's two hand-made mixed schemes as policies: Linear layers low, and low-variance layers low.

- :class:`LinearLowBits` ("Linear-INT4 / rest-FP16"): every ``linear`` row gets ``linear_bits`` weights, every other
  weight layer (convolutions) ``other_bits``; all activations, and both operands of an attention matmul, ``a_bits``.
  The defaults (4, 16, 16) stand for the seed's INT4 weight-only Linear layers with everything else in FP16:
  lit_mpq has no floating-point format, so ``16`` is its 16-bit grid, which the accounting (bit-ops, size, the
  analytic energy model) prices as a 16-bit operand, as it would an FP16 one.
- :class:`VarianceMixed` ("low-variance layers INT4"): a weight layer whose weight variance is strictly below the
  ``quantile`` of the variances of the layers it decides gets ``low_bits``, the others ``high_bits``; activations
  ``a_bits``. Variances are population variances of the float weight tensor (:func:`weight_variances`). The plan
  does not carry them, so the policy needs them before it allocates: pass ``variances`` (a mapping or a plan-sized
  dict) or call :meth:`VarianceMixed.observe` with the model (what ``BitAllocator`` does for a policy whose
  ``requires_weights`` is true).

Both are pure functions of the plan (and, for :class:`VarianceMixed`, of one number per layer), so they run from
YAML (``class_path: lit_mpq.allocation.LinearLowBits``) and as a sweep's configured policy.

Example:
    >>> from lit_mpq.plan import LayerSpec, QuantPlan
    >>> plan = QuantPlan([
    ...     LayerSpec("conv", "conv2d", params=27, macs=270, act_in=30, act_out=10, weight_shape=(3, 1, 3, 3)),
    ...     LayerSpec("fc", "linear", params=20, macs=20, act_in=4, act_out=5, weight_shape=(5, 4)),
    ... ])
    >>> LinearLowBits().allocate(plan)
    {'conv': (16, 16), 'fc': (4, 16)}
    >>> VarianceMixed(quantile=0.5, variances={"conv": 0.1, "fc": 2.0}).allocate(plan)
    {'conv': (4, 8), 'fc': (8, 8)}
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from lit_mpq.allocation.base import Allocation, Policy
from lit_mpq.bits import FP, validate_bits, validate_width
from lit_mpq.energy.models import EnergyModel
from lit_mpq.plan import QuantPlan, uniform_setting

__all__ = ["LinearLowBits", "VarianceMixed", "weight_variances"]

WEIGHT_KINDS = ("conv2d", "linear")
"""Plan row kinds that hold a weight tensor (a ``matmul`` row multiplies two activations)."""


def _width(bits: int | None) -> str:
    """A width as a setting string writes it: the number, or ``FP`` for FP32."""
    return FP if bits is None else str(bits)


class LinearLowBits(Policy):
    """Linear layers at ``linear_bits`` weights, every other weight layer at ``other_bits``.

    Attention matmuls (rows of kind ``matmul``) take ``a_bits`` for both operands, like every activation.

    Args:
        linear_bits: Weight bits of every ``linear`` row (the seed: INT4 weight-only), or null for FP32.
        other_bits: Weight bits of every other weight layer (16 stands for the seed's FP16), or null for FP32.
        a_bits: Input-activation bits of every layer (16 stands for FP16), or null for FP32.

    Raises:
        ValueError: On an unsupported bit width.

    Example:
        >>> LinearLowBits().describe()
        'LinearLowBits(linear W4, other W16, A16)'
    """

    def __init__(self, linear_bits: int | None = 4, other_bits: int | None = 16, a_bits: int | None = 16) -> None:
        self.linear_bits = validate_bits(linear_bits, "LinearLowBits.linear_bits")
        self.other_bits = validate_bits(other_bits, "LinearLowBits.other_bits")
        self.a_bits = validate_bits(a_bits, "LinearLowBits.a_bits")

    def check_plan(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> None:
        """Refuse a model without Linear layers, where the scheme would silently be uniform ``other_bits``.

        Raises:
            ValueError: If no row of ``plan`` is a ``linear`` layer.
        """
        if not any(spec.kind == "linear" for spec in plan.specs.values()):
            raise ValueError(
                "LinearLowBits: the model has no Linear layer in the plan, so every layer would get other_bits; "
                "use Uniform instead, or a model with Linear layers"
            )

    def allocate(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> Allocation:
        """``linear_bits`` for Linear weights, ``other_bits`` for other weights, ``a_bits`` for every activation.

        Pinned layers are left out (they keep their configured bits).
        """
        allocation: Allocation = {}
        for name, spec in plan.specs.items():
            if plan[name].pinned:
                continue
            w_bits = self.linear_bits if spec.kind == "linear" else self.other_bits
            allocation[name] = uniform_setting(spec, w_bits, self.a_bits)
        return allocation

    def describe(self) -> str:
        """E.g. ``LinearLowBits(linear W4, other W16, A16)``."""
        return (
            f"LinearLowBits(linear W{_width(self.linear_bits)}, other W{_width(self.other_bits)}, "
            f"A{_width(self.a_bits)})"
        )


def weight_variances(model: nn.Module, plan: QuantPlan) -> dict[str, float]:
    """Population variance of the float weight of every weight layer of ``plan`` (matmul rows have none).

    Args:
        model: The model whose fully qualified module names are the plan's row names (quantizer-wrapped or not).
        plan: The plan whose rows to measure.

    Returns:
        ``{layer name: variance}`` for every ``conv2d`` / ``linear`` row, in plan order.

    Raises:
        ValueError: If a row names a module that ``model`` does not have or that has no ``weight``.
    """
    modules = dict(model.named_modules())
    variances: dict[str, float] = {}
    for name, spec in plan.specs.items():
        if spec.kind not in WEIGHT_KINDS:
            continue
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"weight_variances: the model has no weight tensor at plan row {name!r}")
        variances[name] = float(weight.detach().double().var(unbiased=False))
    return variances


class VarianceMixed(Policy):
    """Low-variance weight layers at ``low_bits``, the rest at ``high_bits`` (the seed's "low-variance layers INT4").

    The threshold is ``numpy.quantile(v, quantile)`` (linear interpolation) of the variances ``v`` of the unpinned
    weight layers; a layer strictly below it gets ``low_bits``. With the default ``quantile=0.5`` the lower half of
    the layers (by weight variance) is quantized to 4 bits. Attention matmuls take ``a_bits`` for both operands.

    Args:
        quantile: Threshold quantile in (0, 1).
        low_bits: Weight bits of the low-variance layers.
        high_bits: Weight bits of the other weight layers, or null for FP32.
        a_bits: Input-activation bits of every layer, or null for FP32.
        variances: ``{layer name: weight variance}``; null until :meth:`observe` measures them from the model.

    Raises:
        ValueError: On a quantile outside (0, 1), an unsupported bit width, or a negative or non-finite variance.
    """

    requires_weights: bool = True
    """True: ``BitAllocator`` calls :meth:`observe` with the model before :meth:`allocate`."""

    def __init__(
        self,
        quantile: float = 0.5,
        low_bits: int = 4,
        high_bits: int | None = 8,
        a_bits: int | None = 8,
        variances: dict[str, float] | None = None,
    ) -> None:
        if not 0.0 < float(quantile) < 1.0:
            raise ValueError(f"VarianceMixed.quantile={quantile!r} must lie strictly between 0 and 1, e.g. 0.5")
        self.quantile = float(quantile)
        self.low_bits = validate_width(low_bits, "VarianceMixed.low_bits")
        self.high_bits = validate_bits(high_bits, "VarianceMixed.high_bits")
        self.a_bits = validate_bits(a_bits, "VarianceMixed.a_bits")
        self.variances: dict[str, float] | None = None
        if variances is not None:
            self.set_variances(variances)

    def set_variances(self, variances: Mapping[str, float]) -> None:
        """Use ``variances`` (``{layer name: weight variance}``) from now on.

        Raises:
            ValueError: If a variance is negative or not finite.
        """
        bad = {name: v for name, v in variances.items() if not np.isfinite(float(v)) or float(v) < 0.0}
        if bad:
            raise ValueError(f"VarianceMixed: variances must be finite and non-negative, got {bad}")
        self.variances = {str(name): float(v) for name, v in variances.items()}

    def observe(self, model: nn.Module, plan: QuantPlan) -> None:
        """Measure the weight variance of every weight layer of ``plan`` on ``model`` (:func:`weight_variances`)."""
        self.set_variances(weight_variances(model, plan))

    def allocate(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> Allocation:
        """Bits by weight-variance quantile over the unpinned weight layers; pinned layers are left out.

        Raises:
            ValueError: If no variances were given or observed, or a weight layer has none.
        """
        if self.variances is None:
            raise ValueError(
                "VarianceMixed has no weight variances: pass variances={layer: variance}, or call "
                "policy.observe(model, plan) first (BitAllocator does this for a policy with requires_weights)"
            )
        decided = [n for n, s in plan.specs.items() if s.kind in WEIGHT_KINDS and not plan[n].pinned]
        missing = [name for name in decided if name not in self.variances]
        if missing:
            raise ValueError(f"VarianceMixed: no weight variance for layers {missing[:5]}; observe this model first")
        threshold = float(np.quantile([self.variances[n] for n in decided], self.quantile)) if decided else 0.0
        allocation: Allocation = {}
        for name, spec in plan.specs.items():
            if plan[name].pinned:
                continue
            low = spec.kind in WEIGHT_KINDS and name in self.variances and self.variances[name] < threshold
            allocation[name] = uniform_setting(spec, self.low_bits if low else self.high_bits, self.a_bits)
        return allocation

    def describe(self) -> str:
        """E.g. ``VarianceMixed(var<q0.5: W4, else W8, A8)``."""
        return (
            f"VarianceMixed(var<q{self.quantile:g}: W{self.low_bits}, else W{_width(self.high_bits)}, "
            f"A{_width(self.a_bits)})"
        )
