"""Assemble what a run found: ``results.json``, the quantization card, and the short summary printed at the end.

Pure functions over the plan, the run record and the logged metrics (accuracy in percent): the ``Report`` callback
decides where the outputs go and calls these.

Example:
    >>> from lit_mpq.plan import LayerSpec, QuantPlan
    >>> plan = QuantPlan([LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10)])
    >>> results = run_results(plan, RunRecord(), {"val/top1": 91.5, "val/top1_fp32": 92.0}, backbone="net")
    >>> results["top1"], results["top1_fp32"], results["top1_delta"]
    (91.5, 92.0, -0.5)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lit_mpq.energy.models import EnergyModel
from lit_mpq.plan import QuantPlan
from lit_mpq.report.card import build_card
from lit_mpq.report.record import RunRecord

__all__ = ["ACCURACY_UNIT", "run_card", "run_results", "run_summary"]

ACCURACY_UNIT = "%"
"""Every accuracy lit_mpq writes or shows is in percent."""


def _metric(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None or not math.isfinite(float(value)) else float(value)


def run_results(
    plan: QuantPlan, record: RunRecord, metrics: Mapping[str, float], backbone: str | None
) -> dict[str, Any]:
    """The content of ``results.json``.

    Args:
        plan: The applied plan.
        record: The run record filled by the callbacks.
        metrics: Logged metrics (``val/top1`` etc., accuracy in percent).
        backbone: The backbone's name.

    Returns:
        Plain data: accuracy (%), its difference to FP32, plan summaries, every record section and all metrics.
    """
    top1, fp32 = _metric(metrics, "val/top1"), _metric(metrics, "val/top1_fp32")
    results: dict[str, Any] = {
        "accuracy_unit": ACCURACY_UNIT,
        "top1": top1,
        "top5": _metric(metrics, "val/top5"),
        "top1_fp32": fp32,
        "top5_fp32": _metric(metrics, "val/top5_fp32"),
        "top1_delta": None if top1 is None or fp32 is None else round(top1 - fp32, 10),
        "avg_weight_bits": plan.average_weight_bits(),
        "avg_act_bits": plan.average_act_bits(),
        "weights_mb": plan.weight_size_mb(),
        "bit_ops_per_image": plan.bit_ops(),
        "num_quantized_layers": len(plan),
        "layers_left_in_float": dict(plan.float_layers),
        "backbone": backbone,
        "metrics": dict(metrics),
    }
    results.update(record.to_dict())
    return results


def run_card(
    plan: QuantPlan,
    record: RunRecord,
    energy_model: EnergyModel,
    data_hparams: Mapping[str, Any],
    dataset: str,
) -> dict[str, Any]:
    """The quantization card of a run (see :func:`lit_mpq.report.card.build_card`).

    Args:
        plan: The applied plan.
        record: The run record (calibration settings, probe, policy, seed).
        energy_model: The model that priced the plan.
        data_hparams: The DataModule's hyperparameters (calibration seed and subset).
        dataset: Dataset name, in words.
    """
    calibration = record.calibration
    settings = calibration.settings if calibration is not None else {}
    images = calibration.images if calibration is not None else 0
    subset = data_hparams.get("calibration_subset", "random")
    candidates = (
        record.sensitivity.candidate_bits
        if record.sensitivity is not None
        else sorted({b for pair in plan.bits().values() for b in pair if b is not None})
    )
    return build_card(
        plan=plan,
        energy_model=energy_model,
        weight_granularity=settings.get("weight_granularity", "per_channel"),
        weight_symmetric=bool(settings.get("weight_symmetric", True)),
        weight_observer=settings.get("weight_observer", "minmax"),
        act_observer=settings.get("act_observer", "minmax"),
        act_symmetric=bool(settings.get("act_symmetric", False)),
        percentile=settings.get("percentile"),
        bias_correction=bool(settings.get("bias_correction", False)),
        bn_folded=bool(settings.get("bn_folded", False)),
        calibration_images=images,
        calibration_seed=data_hparams.get("calibration_seed"),
        calibration_subset=f"{subset} {images} images of the calibration pool",
        dataset=dataset,
        sensitivity_metric=record.sensitivity.metric if record.sensitivity is not None else None,
        policy=record.allocation.policy if record.allocation is not None else "none",
        bits_candidates=candidates,
        seed_everything=record.seed_everything,
        attention=bool(settings.get("attention", False)),
        softmax_quantizer=settings.get("softmax_quantizer", "uniform"),
        softmax_uniform_from_bits=settings.get("softmax_uniform_from_bits"),
        softmax_underflow=settings.get("softmax_underflow", "zero"),
        post_layernorm=settings.get("post_layernorm", "per_tensor"),
        ranking_refinement=record.refinement.get("settings") if record.refinement else None,
        block_ranges=record.block_ranges.get("settings") if record.block_ranges else None,
        act_observer_overrides=dict(settings.get("act_observer_overrides") or ()),
        ptf_max_shift=settings.get("ptf_max_shift"),
        weight_rounding=record.rounding.settings if record.rounding is not None else None,
        pruning=record.pruning.get("settings") if record.pruning else None,
        training=record.training.get("settings") if record.training else None,
        analog_noise=record.analog.get("settings") if record.analog else None,
        target=settings.get("target", "lenient"),
        cross_layer_equalization=settings.get("cross_layer_equalization"),
    )


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:{spec}}{unit}"


def run_summary(results: Mapping[str, Any], run_dir: str | Path) -> str:
    """A few lines that say what the run gave: accuracy next to FP32, energy, bits, size, policy, where the files are.

    Args:
        results: The dict of :func:`run_results`.
        run_dir: The run folder.
    """
    energy = results.get("energy") or {}
    top1, fp32, delta = results.get("top1"), results.get("top1_fp32"), results.get("top1_delta")
    accuracy = f"top-1 {_fmt(top1, '.2f', ' %')}"
    if fp32 is not None:
        accuracy += f" (FP32 {_fmt(fp32, '.2f', ' %')}, {_fmt(delta, '+.2f', ' points')})"
    images = energy.get("evaluated_images")
    lines = [
        f"lit_mpq: {results.get('backbone')} on {images if images is not None else '?'} images: {accuracy}",
        f"  energy    {_fmt(energy.get('total_uj_per_image'), '.4g', ' µJ/image')}"
        f" = {_fmt(energy.get('relative_to_int8'), '.3f')} x INT8, {_fmt(energy.get('relative_to_fp32'), '.3f')} x FP32"
        + (f" ({energy['model']})" if energy.get("model") else ""),
        f"  bits      W {_fmt(results.get('avg_weight_bits'), '.2f')} / A {_fmt(results.get('avg_act_bits'), '.2f')}"
        f" on average, {results.get('num_quantized_layers')} layers quantized"
        + (f", {len(results['layers_left_in_float'])} left in float" if results.get("layers_left_in_float") else ""),
        f"  size      {_fmt(results.get('weights_mb'), '.4g', ' MB')} of weights",
        f"  policy    {(results.get('allocation') or {}).get('policy', 'none')}",
        f"  run       {run_dir}",
    ]
    return "\n".join(lines)
