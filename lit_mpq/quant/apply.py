"""Prepare a model for quantization by swapping submodules, measure its layers, and apply a plan.

``quantize_model`` follows torchao's ``quantize_``: it walks the model in place and replaces every
``nn.Conv2d`` / ``nn.Linear`` selected by ``filter_fn(module, fqn)`` with its fake-quantized twin, sharing the
parameters. ``measure_layers`` runs one dummy forward to fill each layer's :class:`~lit_mpq.plan.LayerSpec`
(MACs, activation sizes), and ``apply_plan`` pushes a plan's bit widths into the quantizers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_mpq.plan import LayerSpec, QuantPlan
from lit_mpq.quant.modules import (
    ActivationQuantizer,
    QuantConv2d,
    QuantLayerMixin,
    QuantLinear,
    WeightQuantizer,
    is_quant_layer,
)
from lit_mpq.quant.observers import build_observer
from lit_mpq.quant.weights import GRANULARITIES, WEIGHT_METHODS


@dataclass(frozen=True)
class QuantSettings:
    """How every layer is fake-quantized (bit widths come from the plan, not from here).

    Attributes:
        weight_granularity: ``"per_channel"`` (one scale per output channel) or ``"per_tensor"``.
        weight_symmetric: Signed symmetric weight range (zero point 0).
        weight_observer: ``"minmax"`` or ``"mse"``.
        act_observer: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        act_symmetric: Signed symmetric activation range; asymmetric (unsigned with zero point) otherwise.
        percentile: Percentile kept by the ``"percentile"`` activation observer.
        bias_correction: Correct the output shift caused by weight quantization with calibration statistics.
    """

    weight_granularity: str = "per_channel"
    weight_symmetric: bool = True
    weight_observer: str = "minmax"
    act_observer: str = "minmax"
    act_symmetric: bool = False
    percentile: float = 99.99
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if self.weight_granularity not in GRANULARITIES:
            raise ValueError(
                f"weight_granularity {self.weight_granularity!r} is not supported; choose one of {list(GRANULARITIES)}"
            )
        if self.weight_observer not in WEIGHT_METHODS:
            raise ValueError(f"weight_observer {self.weight_observer!r} unknown; choose one of {list(WEIGHT_METHODS)}")
        build_observer(self.act_observer, self.act_symmetric, self.percentile)  # validates name and percentile


FilterFn = Callable[[nn.Module, str], bool]


def _default_filter(module: nn.Module, name: str) -> bool:
    return type(module) in (nn.Conv2d, nn.Linear)


def quantize_model(model: nn.Module, settings: QuantSettings, filter_fn: FilterFn | None = None) -> list[str]:
    """Replace every selected ``nn.Conv2d`` / ``nn.Linear`` of ``model`` in place with its fake-quantized twin.

    Already-quantized layers are left alone, so the call is idempotent.

    Args:
        model: The float model.
        settings: Quantizer settings for all layers.
        filter_fn: ``filter_fn(module, fqn) -> bool`` selecting layers; default: every exact Conv2d / Linear.

    Returns:
        Fully qualified names of the quantized layers, in model order.
    """
    filter_fn = filter_fn or _default_filter
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and not is_quant_layer(module) and filter_fn(module, name)
    ]
    unsupported = [name for name, module in targets if not isinstance(module, nn.Conv2d | nn.Linear)]
    if unsupported:
        raise ValueError(f"only nn.Conv2d and nn.Linear layers can be quantized; filter_fn selected {unsupported[:5]}")
    for name, module in targets:
        weight_quantizer = WeightQuantizer(
            symmetric=settings.weight_symmetric,
            per_channel=settings.weight_granularity == "per_channel",
            method=settings.weight_observer,
        )
        input_quantizer = ActivationQuantizer(
            build_observer(settings.act_observer, settings.act_symmetric, settings.percentile)
        ).to(module.weight.device)
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = cls.from_float(module, weight_quantizer, input_quantizer)
        if settings.bias_correction:
            layer.enable_bias_correction()
        setattr(parent, child, layer)
    return quant_layer_names(model)


def quant_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    """``{fqn: layer}`` for every fake-quantized layer, in model order."""
    return {name: module for name, module in model.named_modules() if is_quant_layer(module)}


def quant_layer_names(model: nn.Module) -> list[str]:
    """Names of the fake-quantized layers, in model order."""
    return list(quant_layers(model))


@torch.no_grad()
def measure_layers(model: nn.Module, example_input: Tensor) -> list[LayerSpec]:
    """Measure every fake-quantized layer with one forward pass of ``example_input`` (batch of 1 or more).

    MACs per image: Conv2d ``out_elements * in_channels / groups * kh * kw``, Linear
    ``out_elements * in_features`` (tokens included, so a ViT's Linear counts every token).

    Returns:
        One :class:`LayerSpec` per quantized layer, in model order.
    """
    layers = quant_layers(model)
    measured: dict[str, LayerSpec] = {}
    batch = example_input.shape[0]

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            out_per_image = output.numel() // batch
            in_per_image = inputs[0].numel() // batch
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs = out_per_image * (module.in_channels // module.groups) * kh * kw
                kind = "conv2d"
            else:
                macs = out_per_image * module.in_features
                kind = "linear"
            previous = measured.get(name)
            if previous is not None:  # a layer called twice per forward: add up its work
                macs += previous.macs
                in_per_image += previous.act_in
                out_per_image += previous.act_out
            measured[name] = LayerSpec(
                name=name,
                kind=kind,
                params=module.weight.numel(),
                macs=int(macs),
                act_in=int(in_per_image),
                act_out=int(out_per_image),
                weight_shape=tuple(module.weight.shape),
            )

        return hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    was_training = model.training
    try:
        with quantizers_mode(model, "off"):
            model.eval()
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name in layers if name not in measured]
    if missing:
        raise RuntimeError(f"layers never called by the forward pass cannot be quantized or costed: {missing[:5]}")
    return [measured[name] for name in layers]


def _quantizers(model: nn.Module) -> Iterator[WeightQuantizer | ActivationQuantizer]:
    for module in model.modules():
        if isinstance(module, WeightQuantizer | ActivationQuantizer):
            yield module


def set_mode(model: nn.Module, weights: str | None = None, activations: str | None = None) -> None:
    """Set the mode (``off`` / ``observe`` / ``quant``) of all weight and/or activation quantizers."""
    for quantizer in _quantizers(model):
        if isinstance(quantizer, WeightQuantizer) and weights is not None:
            quantizer.set_mode("off" if weights == "observe" else weights)  # weights need no observing
        elif isinstance(quantizer, ActivationQuantizer) and activations is not None:
            quantizer.set_mode(activations)


def invalidate_qparams(model: nn.Module) -> None:
    """Forget cached quantization parameters (after statistics changed outside ``observe`` mode, e.g. a sync)."""
    for quantizer in _quantizers(model):
        quantizer._cache.clear()


def current_modes(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every quantizer with its current mode (to restore later)."""
    return [(q, q.mode) for q in _quantizers(model)]


@contextmanager
def quantizers_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Temporarily put every quantizer in ``mode`` (e.g. ``"off"`` for an FP32 reference pass)."""
    saved = current_modes(model)
    set_mode(model, mode, mode)
    try:
        yield
    finally:
        for quantizer, previous in saved:
            quantizer.mode = previous


def apply_plan(model: nn.Module, plan: QuantPlan) -> None:
    """Set every layer's weight and input bit widths from ``plan`` and switch the quantizers to ``quant`` mode.

    Raises:
        ValueError: If the plan and the model name different layers.
    """
    layers = quant_layers(model)
    if set(layers) != set(plan.names):
        missing, extra = set(plan.names) - set(layers), set(layers) - set(plan.names)
        raise ValueError(
            "the plan does not match the model: "
            f"layers only in the plan {sorted(missing)[:5]}, layers only in the model {sorted(extra)[:5]}"
        )
    for name, layer in layers.items():
        decision = plan[name]
        layer.weight_quantizer.bits = decision.w_bits
        layer.input_quantizer.bits = decision.a_bits
        layer.weight_quantizer.set_mode("quant")
        layer.input_quantizer.set_mode("quant")
