"""Energy accounting over a :class:`~lit_mpq.plan.QuantPlan`: pure functions, no modules, no Lightning.

Each function prices the plan's layers with an :class:`~lit_mpq.energy.models.EnergyModel`; the result is in
pJ per image (``EnergyTerms``) or, for :func:`energy_report`, a plain dict ready for JSON, TensorBoard and figures.

Example:
    >>> from lit_mpq.plan import LayerSpec, QuantPlan
    >>> from lit_mpq.energy.models import HorowitzEnergyModel
    >>> plan = QuantPlan([LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10)])
    >>> energy_report(plan, HorowitzEnergyModel())["relative_to_int8"]
    1.0
"""

from __future__ import annotations

from typing import Any

from lit_mpq.energy.models import EnergyModel, EnergyTerms
from lit_mpq.plan import QuantPlan, uniform_setting

__all__ = ["energy_report", "layer_energy", "plan_energy", "uniform_energy"]

PJ_PER_UJ = 1e6
"""Picojoules in one microjoule."""


def layer_energy(plan: QuantPlan, model: EnergyModel) -> dict[str, EnergyTerms]:
    """Energy of every layer at the plan's current bit widths.

    Args:
        plan: The plan; its ``w_bits`` / ``a_bits`` are priced (``None`` = FP32).
        model: The energy model.

    Returns:
        ``{layer name: EnergyTerms}`` in model order, pJ per image.
    """
    return {spec.name: model.layer(spec, lp.w_bits, lp.a_bits) for spec, lp in plan.items()}


def plan_energy(plan: QuantPlan, model: EnergyModel) -> EnergyTerms:
    """Total energy of the plan at its current bit widths, pJ per image.

    Args:
        plan: The plan.
        model: The energy model.

    Returns:
        The sum of :func:`layer_energy` over all layers (zero terms for an empty plan).
    """
    return sum(layer_energy(plan, model).values(), EnergyTerms.zero())


def uniform_energy(plan: QuantPlan, model: EnergyModel, w_bits: int | None, a_bits: int | None) -> EnergyTerms:
    """Energy of the plan's layers if every layer ran at the same bit widths, pJ per image.

    Used as the reference for relative energies (uniform W8A8, FP32) and for energy budgets. Both operands of an
    attention matmul are activations: they run at ``a_bits`` (:func:`lit_mpq.plan.uniform_setting`).

    Args:
        plan: The plan (only its layer specs are used; its decisions are ignored).
        model: The energy model.
        w_bits: Weight bit width for every layer, or ``None`` for FP32.
        a_bits: Activation bit width for every layer, or ``None`` for FP32.

    Returns:
        The summed energy terms.

    Raises:
        ValueError: If the model rejects a bit width.
    """
    return sum(
        (model.layer(spec, *uniform_setting(spec, w_bits, a_bits)) for spec, _ in plan.items()), EnergyTerms.zero()
    )


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or NaN when the denominator is zero (an empty plan)."""
    return numerator / denominator if denominator > 0 else float("nan")


def energy_report(plan: QuantPlan, model: EnergyModel) -> dict[str, Any]:
    """Everything a report, a logger or a figure needs about the plan's analytic energy.

    Args:
        plan: The plan at its current bit widths.
        model: The energy model.

    Returns:
        A JSON-ready dict:

        - ``total_uj_per_image``, ``mac_uj_per_image``, ``weight_mem_uj_per_image``, ``act_mem_uj_per_image``:
          energy per image in microjoules (µJ);
        - ``relative_to_int8``: plan total / total at uniform W8A8 (dimensionless; 1.0 at W8A8);
        - ``relative_to_fp32``: plan total / total with every layer in FP32 (dimensionless);
        - ``int8_uj_per_image``, ``fp32_uj_per_image``: the two reference totals, µJ per image;
        - ``per_layer``: one dict per layer in model order with ``name``, ``w_bits``, ``a_bits`` and
          ``mac_pj``, ``weight_mem_pj``, ``act_mem_pj``, ``total_pj`` (pJ per image);
        - ``model``: the model's name; ``source``: the citation of its constants; ``constants``: the
          constants in pJ.

        Ratios are NaN for an empty plan.
    """
    per_layer = layer_energy(plan, model)
    total = sum(per_layer.values(), EnergyTerms.zero())
    int8 = uniform_energy(plan, model, 8, 8)
    fp32 = uniform_energy(plan, model, None, None)
    rows = []
    for name, terms in per_layer.items():
        rows.append({"name": name, "w_bits": plan[name].w_bits, "a_bits": plan[name].a_bits, **terms.to_dict()})
    return {
        "total_uj_per_image": total.total_pj / PJ_PER_UJ,
        "mac_uj_per_image": total.mac_pj / PJ_PER_UJ,
        "weight_mem_uj_per_image": total.weight_mem_pj / PJ_PER_UJ,
        "act_mem_uj_per_image": total.act_mem_pj / PJ_PER_UJ,
        "int8_uj_per_image": int8.total_pj / PJ_PER_UJ,
        "fp32_uj_per_image": fp32.total_pj / PJ_PER_UJ,
        "relative_to_int8": _ratio(total.total_pj, int8.total_pj),
        "relative_to_fp32": _ratio(total.total_pj, fp32.total_pj),
        "per_layer": rows,
        "model": model.name,
        "source": model.source,
        "constants": dict(model.constants()),
    }
