"""The quantization card: every setting needed to reproduce a result or compare it with another, as one YAML file.

A card records how the model was quantized (granularity, symmetry, observers, rounding, BatchNorm handling), how
it was calibrated (images, seed, subset, dataset), how bits were chosen (candidates, sensitivity metric, policy,
first and last layer precision), how energy was priced (model, source, constants), and the software versions.
Results (accuracy, energy totals) live in ``results.json``; the allocation itself in ``plan.yaml``.

The argument names of :func:`build_card` match the fields of :class:`lit_mpq.quant.apply.QuantSettings`, so a
caller can pass ``**dataclasses.asdict(settings)``.

Example:
    >>> from lit_mpq.energy import HorowitzEnergyModel
    >>> from lit_mpq.plan import LayerSpec, QuantPlan
    >>> plan = QuantPlan([LayerSpec(name="fc", kind="linear", params=20, macs=20, act_in=4, act_out=5)])
    >>> card = build_card(
    ...     plan=plan, energy_model=HorowitzEnergyModel(), weight_granularity="per_channel", weight_symmetric=True,
    ...     weight_observer="minmax", act_observer="minmax", act_symmetric=False, percentile=None,
    ...     bias_correction=False, bn_folded=False, calibration_images=256, calibration_seed=0,
    ...     calibration_subset="first 256 training images", dataset="digits", sensitivity_metric=None,
    ...     policy="Uniform(w_bits=8, a_bits=8)", bits_candidates=[4, 8], seed_everything=0,
    ... )
    >>> card["first_last_precision"]
    {'first': 'W8A8', 'last': 'W8A8'}
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

import lit_mpq
from lit_mpq.energy.models import EnergyModel, precision_key
from lit_mpq.plan import QuantPlan, validate_bits
from lit_mpq.quant.targets import resolve_target
from lit_mpq.quant.weights import GRANULARITIES
from lit_mpq.report.files import to_plain

__all__ = ["CARD_FORMAT_VERSION", "build_card", "write_card"]

CARD_FORMAT_VERSION = 1

BN_NOT_FOLDED_PER_CHANNEL = (
    "not folded (BatchNorm kept in float after the quantized convolution, if the model has any; per-channel weight "
    "quantization is invariant to folding except at the edge of the signed grid, which has one level more below zero: "
    "a channel's largest weight, or all of a channel whose BatchNorm scale is negative, can round differently)"
)
BN_NOT_FOLDED = "not folded"
BN_FOLDED = "folded into the preceding convolution's weights and bias before quantization"
ROUNDING = "nearest (round half to even)"
BIAS_CORRECTION = " + bias correction"


ROUNDING_METHODS = {
    "gptq": "GPTQ (Frantar et al., ICLR 2023)",
    "gpfq": "GPFQ (Lybrand and Saab, JMLR 2021; Zhang, Zhou and Saab, SIMODS 2023)",
    "adaround": "AdaRound (Nagel et al., ICML 2020), pre-activation reconstruction",
}


def _data_driven(weight_rounding: Mapping[str, Any] | None) -> bool:
    return bool(weight_rounding) and weight_rounding.get("method", "nearest") != "nearest"


def rounding_text(weight_rounding: Mapping[str, Any] | None) -> str:
    """How weights were rounded, in words: nearest, or the data-driven method and what fed it.

    Example:
        >>> rounding_text(None)
        'nearest (round half to even)'
        >>> rounding_text({"method": "gptq", "upstream": "quantized"})
        "GPTQ (Frantar et al., ICLR 2023), layer by layer on the quantized network's inputs"
    """
    if not _data_driven(weight_rounding):
        return ROUNDING
    method = weight_rounding["method"]
    inputs = {"quantized": "the quantized network's inputs", "float": "the float network's inputs"}
    source = inputs.get(weight_rounding.get("upstream", "quantized"), weight_rounding.get("upstream"))
    return f"{ROUNDING_METHODS.get(method, method)}, layer by layer on {source}"


def batchnorm_folding_text(bn_folded: bool, weight_granularity: str) -> str:
    """How BatchNorm was handled, in words.

    Folding BatchNorm scales each output channel's weights by a positive or negative constant; a per-channel
    weight quantizer derives one scale per output channel, so its result is nearly the same whether BatchNorm was
    folded first or not: the signed grid (-8..7 at 4 bits, scale ``max|w| / 7.5``) puts a channel's largest weight on
    a rounding tie, and a negative BatchNorm scale swaps which side clips, so a few codes differ (542 of 267,696 on
    ResNet-20 at W4A8, docs/confounders.md). A per-tensor quantizer is not invariant.

    Args:
        bn_folded: True if BatchNorm was folded into the convolution before quantization.
        weight_granularity: ``"per_channel"`` or ``"per_tensor"``.

    Returns:
        The sentence recorded under ``batchnorm_folding``.
    """
    if bn_folded:
        return BN_FOLDED
    return BN_NOT_FOLDED_PER_CHANNEL if weight_granularity == "per_channel" else BN_NOT_FOLDED


def first_last_precision(plan: QuantPlan) -> dict[str, str | None]:
    """Precision of the plan's entry and exit layers as ``"W<bits>A<bits>"`` (``"FP"`` for FP32).

    The entry layers are those that see the network input first; the exit layers are the classifier head(s)
    (:attr:`QuantPlan.entry_layers`, :attr:`QuantPlan.exit_layers`, in execution order). Several layers with different
    precisions are joined with ``"/"``.

    Args:
        plan: The plan at its current bit widths.

    Returns:
        ``{"first": ..., "last": ...}``; both ``None`` for an empty plan.
    """
    if len(plan) == 0:
        return {"first": None, "last": None}

    def precision(names: list[str]) -> str:
        keys = dict.fromkeys(precision_key(plan[name].w_bits, plan[name].a_bits) for name in names)
        return "/".join(keys)

    return {"first": precision(plan.entry_layers), "last": precision(plan.exit_layers)}


def build_card(
    *,
    plan: QuantPlan,
    energy_model: EnergyModel,
    weight_granularity: str,
    weight_symmetric: bool,
    weight_observer: str,
    act_observer: str,
    act_symmetric: bool,
    percentile: float | None,
    bias_correction: bool,
    bn_folded: bool,
    calibration_images: int,
    calibration_seed: int | None,
    calibration_subset: str,
    dataset: str,
    sensitivity_metric: str | None,
    policy: str,
    bits_candidates: Sequence[int | None],
    seed_everything: int | None,
    attention: bool = False,
    softmax_quantizer: str = "uniform",
    softmax_uniform_from_bits: int | None = None,
    softmax_underflow: str = "zero",
    post_layernorm: str = "per_tensor",
    ranking_refinement: Mapping[str, Any] | None = None,
    block_ranges: Mapping[str, Any] | None = None,
    act_observer_overrides: Mapping[str, str] | None = None,
    ptf_max_shift: int | None = None,
    weight_rounding: Mapping[str, Any] | None = None,
    pruning: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    analog_noise: Mapping[str, Any] | None = None,
    target: str = "lenient",
    cross_layer_equalization: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The quantization card of a run, as plain data ready for YAML or JSON.

    Args:
        plan: The plan at its final bit widths (first/last precision and a short summary are taken from it).
        energy_model: The energy model that priced the plan (name, source and constants are recorded).
        weight_granularity: ``"per_channel"`` or ``"per_tensor"``.
        weight_symmetric: Signed symmetric weight range.
        weight_observer: Weight range method, e.g. ``"minmax"`` or ``"mse"``.
        act_observer: Activation observer, e.g. ``"minmax"``, ``"percentile"`` or ``"mse"``.
        act_symmetric: Signed symmetric activation range.
        percentile: Percentile kept by the percentile observer; recorded only when ``act_observer`` or an
            override is ``"percentile"`` (``None`` otherwise, since it had no effect).
        bias_correction: Whether bias correction was applied after weight quantization.
        bn_folded: Whether BatchNorm was folded into the convolutions before quantization (lit_mpq's fake
            quantization does not fold: pass ``False``).
        calibration_images: Number of calibration images.
        calibration_seed: Seed that chose the calibration images, or ``None``.
        calibration_subset: Which images, in words (e.g. ``"first 512 images of the training split"``).
        dataset: Dataset name (e.g. ``"cifar10"``).
        sensitivity_metric: Name of the sensitivity probe's metric, or ``None`` when no probe ran.
        policy: The allocation policy's ``describe()`` string.
        bits_candidates: Candidate bit widths the policy chose from (``None`` = FP32).
        seed_everything: The run's global seed (``seed_everything``), or ``None``.
        attention: Whether attention matmuls (q·kᵀ, softmax·V) were quantized.
        softmax_quantizer: Levels of the softmax output (``"uniform"``, ``"log2"``, ``"log_sqrt2"``).
        softmax_uniform_from_bits: The width from which logarithmic softmax levels give way to the uniform grid
            (``None``: none; recorded only with logarithmic levels).
        softmax_underflow: What the zero code of logarithmic softmax levels stands for (``"zero"`` or ``"mean"``;
            recorded only with logarithmic levels).
        post_layernorm: Treatment of LayerNorm outputs feeding a Linear (``"per_tensor"``, ``"reparam"`` or
            ``"reparam_mse"``).
        ranking_refinement: Settings of the ranking-aware refinement of the attention ranges, or ``None`` when it
            did not run.
        block_ranges: Settings of the block-output search of the activation ranges (``BlockRangeSearch``), or
            ``None`` when it did not run.
        act_observer_overrides: ``{pattern: observer}`` for the layers whose input another observer watched.
        ptf_max_shift: ``K`` of the power-of-two-factor inputs; recorded only when an override is ``"ptf"``.
        weight_rounding: Settings of the data-driven weight rounding (``WeightRounding``), or ``None`` when weights
            were rounded to nearest.
        pruning: Settings of the pruning before quantization (``Pruning``), or ``None`` when nothing was pruned.
        training: Settings of the training under quantization (``QuantizationAwareTraining``, ``BitWidthLearning``),
            or ``None`` for a post-training model.
        analog_noise: Settings of the analog noise the evaluation ran with (``AnalogNoise``: model, sigma, mean
            energy per MAC, allocated or uniform), or ``None`` for a noise-free evaluation.
        target: The hardware target's name (:mod:`lit_mpq.quant.targets`); the card records all its fields.
        cross_layer_equalization: ``{iterations, pairs}`` of the cross-layer equalization before quantization, or
            ``None`` when it did not run.

    Returns:
        The card: an ordered dict of plain values (see the module docstring for the sections).

    Raises:
        ValueError: If ``weight_granularity`` is unknown, ``calibration_images`` is negative, or a candidate bit
            width is not supported.
    """
    if weight_granularity not in GRANULARITIES:
        raise ValueError(f"weight_granularity={weight_granularity!r} is unknown: use one of {list(GRANULARITIES)}")
    if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 0:
        raise ValueError(f"calibration_images={calibration_images!r} must be a non-negative integer")
    candidates = [validate_bits(bits, "bits_candidates") for bits in bits_candidates]
    candidates.sort(key=lambda bits: (bits is None, bits or 0))
    observers_used = {act_observer, *(act_observer_overrides or {}).values()}
    card: dict[str, Any] = {
        "card_version": CARD_FORMAT_VERSION,
        "weight_granularity": weight_granularity,
        "weight_symmetric": bool(weight_symmetric),
        "weight_observer": weight_observer,
        "act_observer": act_observer,
        "act_symmetric": bool(act_symmetric),
        "act_observer_overrides": dict(act_observer_overrides) if act_observer_overrides else None,
        "percentile": float(percentile) if "percentile" in observers_used and percentile is not None else None,
        "ptf_max_shift": int(ptf_max_shift) if "ptf" in observers_used and ptf_max_shift is not None else None,
        "block_ranges": dict(block_ranges) if block_ranges else None,
        "target": resolve_target(target).to_dict(),
        "first_last_precision": first_last_precision(plan),
        "attention": {
            "matmuls_quantized": bool(attention) and any(spec.kind == "matmul" for spec in plan.specs.values()),
            "softmax_quantizer": softmax_quantizer if attention else None,
            "softmax_uniform_from_bits": (
                int(softmax_uniform_from_bits)
                if attention and softmax_quantizer != "uniform" and softmax_uniform_from_bits is not None
                else None
            ),
            "softmax_underflow": softmax_underflow if attention and softmax_quantizer != "uniform" else None,
            "post_layernorm": post_layernorm,
            "ranking_refinement": dict(ranking_refinement) if ranking_refinement else None,
        },
        "batchnorm_folding": batchnorm_folding_text(bn_folded, weight_granularity),
        "cross_layer_equalization": dict(cross_layer_equalization) if cross_layer_equalization else None,
        "calibration": {
            "images": calibration_images,
            "seed": calibration_seed,
            "subset": calibration_subset,
            "dataset": dataset,
        },
        "rounding": rounding_text(weight_rounding) + (BIAS_CORRECTION if bias_correction else ""),
        "rounding_settings": dict(weight_rounding) if _data_driven(weight_rounding) else None,
        "pruning": dict(pruning) if pruning else None,
        "training": dict(training) if training else None,
        "analog_noise": dict(analog_noise) if analog_noise else None,
        "sensitivity_metric": sensitivity_metric,
        "policy": policy,
        "bits_candidates": candidates,
        "energy_model": {
            "name": energy_model.name,
            "source": energy_model.source,
            "constants": dict(energy_model.constants()),
        },
        "plan": {
            "layers": len(plan),
            "entry_layers": list(plan.entry_layers),
            "exit_layers": list(plan.exit_layers),
            "left_in_float": dict(plan.float_layers),
            "pinned": [spec.name for spec, lp in plan.items() if lp.pinned],
            "average_weight_bits": plan.average_weight_bits(),
            "average_act_bits": plan.average_act_bits(),
        },
        "lit_mpq_version": lit_mpq.__version__,
        "torch_version": str(torch.__version__),
        "library_versions": library_versions(),
        "seed_everything": seed_everything,
    }
    return to_plain(card)


NUMERIC_LIBRARIES = ("numpy", "scipy", "lightning", "torchvision", "timm")
"""Libraries besides torch whose versions a card records: a fresh environment with the same torch moved recorded
ResNet-20 results by up to 10 test images (docs/qat.md, docs/rounding.md), so a number is only comparable with the
versions it was measured with."""


def library_versions() -> dict[str, str | None]:
    """Installed versions of :data:`NUMERIC_LIBRARIES` (None for one that is not installed)."""
    versions: dict[str, str | None] = {}
    for name in NUMERIC_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_card(path: str | Path, card: Mapping[str, Any]) -> Path:
    """Write ``card`` as YAML (keys in the card's order); parent folders are created.

    Args:
        path: Destination file, e.g. ``<log_dir>/quantization_card.yaml``.
        card: The dict returned by :func:`build_card` (NumPy/torch values are converted to plain Python).

    Returns:
        The path written.

    Raises:
        ValueError: If ``card`` is not a mapping.
    """
    if not isinstance(card, Mapping):
        raise ValueError(f"card must be the dict returned by build_card, got {type(card).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_plain(card), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
