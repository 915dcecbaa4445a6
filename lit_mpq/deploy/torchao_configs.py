"""Run a lit_mpq plan's Linear layers with torchao's real low-precision kernels (``quantize_``, filtered by name).

A plan row of kind ``linear`` at ``(w_bits, a_bits)`` maps to one torchao config (:func:`torchao_config`):

=====================  ==================  ==================================================================
weights                activations         torchao config (tensor subclass of the weight; CPU op that runs)
=====================  ==================  ==================================================================
FP32 / 16 (FP16)       any                 none: the layer stays a float ``nn.Linear``
8                      <= 8                ``Int8DynamicActivationInt8WeightConfig`` (``Int8Tensor``;
                                           per-token int8 activations, ``aten._int_mm``)
8                      FP32 / 16           ``Int8WeightOnlyConfig`` (``Int8Tensor``; float ``mm`` on the int8
                                           weight, per-row scale)
4                      FP32 / 16           ``PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``, groups of
                                           ``group_size``; ``aten._weight_int4pack_mm_for_cpu``) on CPU when the
                                           input features divide by ``group_size`` and the output features by
                                           16, else as 2-7 bits below
2-7                    FP32 / 16           ``IntxWeightOnlyConfig(weight_dtype=torch.int<b>)``
                                           (``IntxUnpackedToInt8Tensor``: codes in int8, dequantized per call)
2-7                    <= 8                ``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int<b>)``
                                           (``IntxUnpackedToInt8Tensor``)
=====================  ==================  ==================================================================

Activation widths below 8 run at 8 (torchao's dynamic activation quantization is int8): the kernels compute with
more activation bits than the plan asked for, so a plan's fake-quantized accuracy at 4-bit activations is a lower
bound of what these kernels give. Weight ranges are torchao's own (per-row absmax for int8, per-group min/max for
int4), not the plan's calibrated ones: this path reproduces the widths of a plan, not its exact numbers (the QDQ
ONNX export does that).

torchao is optional (``pip install 'lit_mpq[torchao]'``); importing this module does not need it.

Example:
    >>> torchao_config_name(8, 8), torchao_config_name(8, None), torchao_config_name(None, 8)
    ('Int8DynamicActivationInt8WeightConfig', 'Int8WeightOnlyConfig', None)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from lit_mpq.plan import QuantPlan

__all__ = [
    "FLOAT_WIDTHS",
    "TorchaoLayer",
    "apply_torchao_plan",
    "torchao_config",
    "torchao_config_name",
    "torchao_plan",
]

FLOAT_WIDTHS = (None, 16)
"""Widths a Linear layer keeps in floating point under torchao (``16`` stands for FP16)."""

DEFAULT_GROUP_SIZE = 32
"""Input features per int4 scale group (torchao accepts 32, 64, 128, 256)."""

INT4_OUT_MULTIPLE = 16
"""``aten._convert_weight_to_int4pack_for_cpu`` needs the output features to be a multiple of this."""


def torchao_config_name(
    w_bits: int | None, a_bits: int | None, in_features: int | None = None, out_features: int | None = None
) -> str | None:
    """The name of the torchao config for a Linear layer at ``(w_bits, a_bits)``; ``None`` when it stays float.

    Args:
        w_bits: Weight bits (``None`` or 16: float).
        a_bits: Input-activation bits (``None`` or 16: float; 2-8: int8 dynamic activations).
        in_features: The layer's input features, to check the int4 group size (``None``: assume it fits).
        out_features: The layer's output features; the CPU int4 packing needs a multiple of 16 (``None``: assume so).
    """
    if w_bits in FLOAT_WIDTHS:
        return None
    float_act = a_bits in FLOAT_WIDTHS
    if w_bits == 8:
        return "Int8WeightOnlyConfig" if float_act else "Int8DynamicActivationInt8WeightConfig"
    fits = (in_features is None or in_features % DEFAULT_GROUP_SIZE == 0) and (
        out_features is None or out_features % INT4_OUT_MULTIPLE == 0
    )
    if w_bits == 4 and float_act and fits:
        return "PrototypeInt4WeightOnlyConfig"
    return "IntxWeightOnlyConfig" if float_act else "Int8DynamicActivationIntxWeightConfig"


def torchao_config(
    w_bits: int | None, a_bits: int | None, in_features: int | None = None, out_features: int | None = None
) -> Any:
    """The torchao config object for a Linear layer at ``(w_bits, a_bits)`` (see the module table); ``None``: float.

    Raises:
        ImportError: If torchao is not installed.
    """
    import torch
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis

    name = torchao_config_name(w_bits, a_bits, in_features, out_features)
    if name is None:
        return None
    if name == "Int8WeightOnlyConfig":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if name == "Int8DynamicActivationInt8WeightConfig":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if name == "PrototypeInt4WeightOnlyConfig":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=DEFAULT_GROUP_SIZE, set_inductor_config=False)
    dtype = getattr(torch, f"int{w_bits}")
    if name == "IntxWeightOnlyConfig":
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0))
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=PerAxis(0))


@dataclass(frozen=True)
class TorchaoLayer:
    """What :func:`apply_torchao_plan` did to one Linear layer.

    Attributes:
        name: Fully qualified module name.
        w_bits: The plan's weight bits.
        a_bits: The plan's activation bits.
        config: The torchao config's class name, or ``None`` when the layer stayed float.
        tensor: The class name of the layer's weight after ``quantize_`` (``Parameter`` / ``Tensor`` when float).
    """

    name: str
    w_bits: int | None
    a_bits: int | None
    config: str | None
    tensor: str


def torchao_plan(plan: QuantPlan, model: nn.Module | None = None) -> dict[str, tuple[int | None, int | None]]:
    """The plan's Linear rows as ``{name: (w_bits, a_bits)}`` (other rows are not torchao's: they stay float).

    Args:
        plan: The plan.
        model: When given, only rows that are ``nn.Linear`` modules of ``model`` (a plan row of kind ``linear`` may
            be a 1x1 convolution in another model family).
    """
    modules = dict(model.named_modules()) if model is not None else {}
    return {
        name: (lp.w_bits, lp.a_bits)
        for spec, lp in plan.items()
        if spec.kind == "linear"
        for name in [spec.name]
        if model is None or isinstance(modules.get(name), nn.Linear)
    }


def apply_torchao_plan(
    model: nn.Module, bits: QuantPlan | Mapping[str, tuple[int | None, int | None]]
) -> list[TorchaoLayer]:
    """Quantize the float ``model``'s Linear layers in place with torchao, each at its plan's widths.

    One ``torchao.quantization.quantize_`` call per distinct config, with a ``filter_fn`` that selects those layers
    by fully qualified name; layers at FP32 / 16 bits, and modules that are not ``nn.Linear``, are left alone.

    Args:
        model: A float model (no lit_mpq quantizers), on CPU, in FP32 (or FP16/BF16 for weight-only configs).
        bits: A plan, or ``{fully qualified name: (w_bits, a_bits)}``.

    Returns:
        One :class:`TorchaoLayer` per Linear layer named in ``bits``, in model order.

    Raises:
        ImportError: If torchao is not installed.
        ValueError: If ``bits`` names a module that ``model`` does not have or that is not an ``nn.Linear``.
    """
    from torchao.quantization import quantize_

    wanted = torchao_plan(bits) if isinstance(bits, QuantPlan) else dict(bits)
    modules = dict(model.named_modules())
    wrong = [name for name in wanted if not isinstance(modules.get(name), nn.Linear)]
    if wrong:
        raise ValueError(f"apply_torchao_plan: these names are not nn.Linear modules of the model: {wrong[:5]}")
    groups: dict[str, list[str]] = {}
    configs: dict[str, Any] = {}
    chosen: dict[str, str | None] = {}
    for name, (w_bits, a_bits) in wanted.items():
        shape = (modules[name].in_features, modules[name].out_features)
        config_name = torchao_config_name(w_bits, a_bits, *shape)
        chosen[name] = config_name
        if config_name is None:
            continue
        key = f"{config_name}:{w_bits}"
        groups.setdefault(key, []).append(name)
        configs.setdefault(key, torchao_config(w_bits, a_bits, *shape))
    for key, names in groups.items():
        selected = frozenset(names)
        quantize_(model, configs[key], filter_fn=lambda module, fqn, selected=selected: fqn in selected)
    modules = dict(model.named_modules())
    return [
        TorchaoLayer(name, *wanted[name], chosen[name], type(modules[name].weight).__name__)
        for name in modules
        if name in wanted
    ]
