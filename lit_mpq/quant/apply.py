"""Prepare a model for quantization by swapping submodules, measure its layers, and apply a plan.

``quantize_model`` follows torchao's ``quantize_``: it walks the model in place and replaces every
``nn.Conv2d`` / ``nn.Linear`` (subclasses included) selected by ``filter_fn(module, fqn)`` with its fake-quantized
twin, sharing the parameters, and every timm ``Attention`` with a twin whose two matmuls (q·kᵀ and softmax·V) are
quantized (:mod:`lit_mpq.quant.attention`). ``measure_model`` runs one dummy forward and returns the model's
:class:`~lit_mpq.plan.QuantPlan`: each quantized layer's :class:`~lit_mpq.plan.LayerSpec` (MACs, activation sizes),
the layers that see the input first and the classifier heads, and every weight layer left in floating point with the
reason (layers the forward never calls are swapped back to float on the way). ``apply_plan`` pushes a plan's bit
widths into the quantizers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lit_mpq.plan import LayerSpec, QuantPlan
from lit_mpq.quant.attention import (
    is_quant_attention,
    is_quant_matmul,
    is_supported_attention,
    quantize_attention,
)
from lit_mpq.quant.modules import (
    ActivationQuantizer,
    QuantLayerMixin,
    WeightQuantizer,
    is_quant_layer,
    quant_class,
    unsupported_reason,
)
from lit_mpq.quant.observers import OBSERVERS, build_observer
from lit_mpq.quant.operations import QuantOperation, QuantOutput, is_quant_operation
from lit_mpq.quant.softmax import SOFTMAX_QUANTIZERS, UNDERFLOW_VALUES, build_softmax_quantizer
from lit_mpq.quant.targets import QuantTarget, resolve_target
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
        attention: Quantize the two matmuls of every timm ``Attention`` (q, k, v and the softmax output become
            tensors of the plan).
        softmax_quantizer: Levels for the softmax output: ``"uniform"`` (over the observed range, never clipped),
            ``"log2"`` (FQ-ViT) or ``"log_sqrt2"`` (RepQ-ViT); see :mod:`lit_mpq.quant.softmax`.
        softmax_uniform_from_bits: With logarithmic softmax levels: the width from which the softmax output uses the
            uniform grid instead (its error shrinks with bits, the logarithmic one has a floor; 6 suits DeiT-Tiny).
            None: logarithmic at every width.
        softmax_underflow: With logarithmic softmax levels: what the zero code stands for, ``"zero"`` (FQ-ViT,
            RepQ-ViT) or ``"mean"``: the mean of the calibration probabilities under the smallest level, snapped to
            the logarithmic grid (at 4 bits a DeiT-Tiny row loses the mass of its many small probabilities without
            it; :mod:`lit_mpq.quant.softmax`).
        post_layernorm: Inputs of Linear layers fed by a LayerNorm: ``"per_tensor"`` like every other input, or
            ``"reparam"``: per-channel min/max ranges folded into the LayerNorm and the Linear (RepQ-ViT, see
            :mod:`lit_mpq.quant.layernorm`), per tensor at inference, or ``"reparam_mse"``: the same with each
            channel's range searched for the smallest squared error below 6 bits (min/max from 6 up). Applied by
            :func:`apply_post_layernorm`, which needs a forward pass.
        act_observer_overrides: ``(pattern, observer)`` pairs: the input of a Conv2d/Linear layer whose fully
            qualified name matches ``pattern`` (``re.fullmatch``; the first matching pair wins) gets ``observer``
            instead of ``act_observer``. For a tensor whose best range differs from the rest, e.g. the post-GELU
            inputs of a ViT's ``mlp.fc2``, whose rare large values an MSE range clips at the network's expense.
            Besides the observers, ``"ptf"`` gives a Linear layer's input FQ-ViT's power-of-two factors: one base
            scale, each channel's step that scale times ``2^0..2^3``, nothing clipped (a few huge channels, as in
            ViT-Tiny's post-GELU activations; :mod:`lit_mpq.quant.power_of_two`), and ``"twin_uniform"`` gives an input
            PTQ4ViT's separate grids for its negative and positive values (post-GELU inputs, whose short negative
            side a single 4-bit grid rounds away; :mod:`lit_mpq.quant.twin_uniform`).
        ptf_max_shift: ``K`` of the ``"ptf"`` overrides: channel factors ``2^0 .. 2^K`` (FQ-ViT uses 3; one channel
            of ViT-Tiny's block-7 fc2 input spans 69 times the median channel, which wants 6).
        target: The hardware target (:mod:`lit_mpq.quant.targets`): ``"lenient"`` (layer inputs only, the default),
            ``"integer_only"`` (every activation tensor quantized: residual adds' operands and the output too, BatchNorm
            folded) or ``"integer_only_pow2"`` (the same with power-of-two scales). A target that fixes the weights'
            or activations' range type overrides ``weight_symmetric`` / ``act_symmetric``.
    """

    weight_granularity: str = "per_channel"
    weight_symmetric: bool = True
    weight_observer: str = "minmax"
    act_observer: str = "minmax"
    act_symmetric: bool = False
    percentile: float = 99.99
    bias_correction: bool = False
    attention: bool = True
    softmax_quantizer: str = "uniform"
    softmax_uniform_from_bits: int | None = None
    softmax_underflow: str = "zero"
    post_layernorm: str = "per_tensor"
    act_observer_overrides: tuple[tuple[str, str], ...] = ()
    ptf_max_shift: int = 3
    target: str | dict = "lenient"

    def __post_init__(self) -> None:
        target = resolve_target(self.target)  # validates the name
        if target.weights is not None:
            object.__setattr__(self, "weight_symmetric", target.weights == "symmetric")
        if target.activations is not None:
            object.__setattr__(self, "act_symmetric", target.activations == "symmetric")
        if target.power_of_two:
            special = [
                f"{label} {value!r}"
                for label, value, plain in (
                    ("softmax_quantizer", self.softmax_quantizer, "uniform"),
                    ("post_layernorm", self.post_layernorm, "per_tensor"),
                )
                if value != plain
            ] + [f"act_observer_overrides {p!r}: {o!r}" for p, o in self.act_observer_overrides if o not in OBSERVERS]
            if special:
                raise ValueError(
                    f"target {target.name!r} needs uniform quantizers with one scale per tensor or channel, but "
                    f"{'; '.join(special)} give other levels: set softmax_quantizer 'uniform', post_layernorm "
                    "'per_tensor' and plain observers, or choose the 'integer_only' target"
                )
        if self.weight_granularity not in GRANULARITIES:
            raise ValueError(
                f"weight_granularity {self.weight_granularity!r} is not supported; choose one of {list(GRANULARITIES)}"
            )
        if self.weight_observer not in WEIGHT_METHODS:
            raise ValueError(f"weight_observer {self.weight_observer!r} unknown; choose one of {list(WEIGHT_METHODS)}")
        build_observer(self.act_observer, self.act_symmetric, self.percentile)  # validates name and percentile
        if self.softmax_quantizer not in SOFTMAX_QUANTIZERS:
            raise ValueError(
                f"softmax_quantizer {self.softmax_quantizer!r} is not known; choose one of {list(SOFTMAX_QUANTIZERS)}"
            )
        width = self.softmax_uniform_from_bits
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or not 2 <= width <= 16):
            raise ValueError(f"softmax_uniform_from_bits must be null or an integer from 2 to 16, got {width!r}")
        if width is not None and self.softmax_quantizer == "uniform":
            raise ValueError(
                "softmax_uniform_from_bits only applies to logarithmic softmax levels; set softmax_quantizer to "
                "'log2' or 'log_sqrt2', or leave softmax_uniform_from_bits null"
            )

        if self.softmax_underflow not in UNDERFLOW_VALUES:
            raise ValueError(
                f"softmax_underflow {self.softmax_underflow!r} is not known; choose one of {list(UNDERFLOW_VALUES)}"
            )
        if self.post_layernorm not in POST_LAYERNORM:
            raise ValueError(
                f"post_layernorm {self.post_layernorm!r} is not known; choose one of {list(POST_LAYERNORM)}"
            )
        if (
            isinstance(self.ptf_max_shift, bool)
            or not isinstance(self.ptf_max_shift, int)
            or not 0 <= self.ptf_max_shift <= 8
        ):
            raise ValueError(f"ptf_max_shift must be an integer from 0 to 8, got {self.ptf_max_shift!r}")
        for pattern, observer in self.act_observer_overrides:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"act_observer_overrides: {pattern!r} is not a regular expression ({err})") from None
            if observer not in OVERRIDE_RANGES:
                raise ValueError(
                    f"act_observer_overrides: {pattern!r} maps to unknown observer {observer!r}; choose one of "
                    f"{sorted(OVERRIDE_RANGES)}"
                )

    @property
    def quant_target(self) -> QuantTarget:
        """The :class:`~lit_mpq.quant.targets.QuantTarget` named by ``target``."""
        return resolve_target(self.target)

    def observer_for(self, name: str) -> str:
        """The activation observer of the layer named ``name`` (its override, or ``act_observer``)."""
        for pattern, observer in self.act_observer_overrides:
            if re.fullmatch(pattern, name):
                return observer
        return self.act_observer

    def activation_quantizer(self) -> ActivationQuantizer:
        """A fresh activation quantizer with these settings' observer."""
        return ActivationQuantizer(build_observer(self.act_observer, self.act_symmetric, self.percentile))


POWER_OF_TWO = "ptf"
"""The ``act_observer_overrides`` name of FQ-ViT's power-of-two-factor quantizer (:mod:`lit_mpq.quant.power_of_two`)."""

TWIN_UNIFORM = "twin_uniform"
"""The ``act_observer_overrides`` name of PTQ4ViT's twin-uniform quantizer (:mod:`lit_mpq.quant.twin_uniform`)."""

OVERRIDE_RANGES = (*OBSERVERS, POWER_OF_TWO, TWIN_UNIFORM)
"""What ``act_observer_overrides`` may name: an observer, ``"ptf"`` (power-of-two factors, Linear inputs) or
``"twin_uniform"`` (separate grids for the negative and positive values, post-GELU inputs)."""


def _input_quantizer(name: str, module: nn.Module, settings: QuantSettings) -> ActivationQuantizer:
    """The input quantizer of layer ``name``: its observer per tensor, or power-of-two factors per channel."""
    observer = settings.observer_for(name)
    if observer == TWIN_UNIFORM:
        from lit_mpq.quant.twin_uniform import TwinUniformQuantizer

        return TwinUniformQuantizer()
    if observer != POWER_OF_TWO:
        return ActivationQuantizer(build_observer(observer, settings.act_symmetric, settings.percentile))
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"act_observer_overrides maps {name} ({type(module).__name__}) to 'ptf', whose channels are the last "
            "dimension: only Linear inputs can have power-of-two factors; narrow the pattern to Linear layers"
        )
    from lit_mpq.quant.power_of_two import PowerOfTwoFactorQuantizer  # imports lit_mpq.quant.layernorm

    return PowerOfTwoFactorQuantizer(module.in_features, max_shift=settings.ptf_max_shift)


POST_LAYERNORM = ("per_tensor", "reparam", "reparam_mse")
"""Treatments of post-LayerNorm activations accepted in configs."""

FilterFn = Callable[[nn.Module, str], bool]

NOT_CALLED = (
    "not called by the forward pass in eval mode (a training-only auxiliary head, or a weight its parent uses "
    "directly); left in FP32, costs nothing at inference"
)
"""Reason recorded in ``QuantPlan.float_layers`` for a layer that the eval forward never calls."""

NOT_SELECTED = "not selected by filter_fn; left in FP32"
"""Reason recorded for a layer that could be quantized but was not selected."""

MULTIHEAD_ATTENTION = (
    "nn.MultiheadAttention computes its input projections from its own weights (in_proj_weight), not through a "
    "Linear module; left in FP32"
)
"""Reason recorded for ``nn.MultiheadAttention`` (its ``out_proj`` is reported on its own)."""

_WEIGHT_LAYER_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.Bilinear,
    nn.MultiheadAttention,
)


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` computes with a learned kernel or matrix (what nobody should find left in FP32 silently).

    Convolutions of any dimension, Linear, Bilinear and MultiheadAttention, and any other module owning a weight of
    two or more dimensions (timm's ``CondConv2d``, say), except embedding tables (look-ups, no multiply-accumulates).
    Subclasses included, quantized layers included.
    """
    if isinstance(module, _WEIGHT_LAYER_TYPES):
        return True
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() >= 2 and not isinstance(module, nn.Embedding | nn.EmbeddingBag)


def default_filter(module: nn.Module, name: str) -> bool:
    """Every ``nn.Conv2d`` / ``nn.Linear`` that can be quantized, subclasses included (see ``unsupported_reason``)."""
    return isinstance(module, nn.Conv2d | nn.Linear) and unsupported_reason(module) is None


def quantize_model(model: nn.Module, settings: QuantSettings, filter_fn: FilterFn | None = None) -> list[str]:
    """Replace every selected ``nn.Conv2d`` / ``nn.Linear`` of ``model`` in place with its fake-quantized twin.

    Subclasses get a twin of their own class that reproduces their forward (see
    :func:`~lit_mpq.quant.modules.quant_class`). Already-quantized layers are left alone, so the call is idempotent.
    With ``settings.attention``, every timm ``Attention`` (selected by ``filter_fn`` too, when one is given) gets
    quantized matmuls ``<fqn>.matmul_qk`` and ``<fqn>.matmul_av`` (:mod:`lit_mpq.quant.attention`).

    Args:
        model: The float model.
        settings: Quantizer settings for all layers.
        filter_fn: ``filter_fn(module, fqn) -> bool`` selecting layers; default :func:`default_filter`: every
            Conv2d / Linear (and subclass) that lit_mpq can quantize, and every supported attention.

    Returns:
        Fully qualified names of the quantized layers and matmuls, in model order.

    Raises:
        ValueError: If ``filter_fn`` selects a layer that cannot be quantized (the reason is in the message).
    """
    filter_fn = filter_fn or default_filter
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and not is_quant_layer(module) and filter_fn(module, name)
    ]
    unsupported = [f"{name}: {reason}" for name, module in targets if (reason := unsupported_reason(module))]
    if unsupported:
        raise ValueError(f"filter_fn selected layers that lit_mpq cannot quantize: {'; '.join(unsupported[:5])}")
    for name, module in targets:
        weight_quantizer = WeightQuantizer(
            symmetric=settings.weight_symmetric,
            per_channel=settings.weight_granularity == "per_channel",
            method=settings.weight_observer,
        )
        input_quantizer = _input_quantizer(name, module, settings).to(module.weight.device)
        layer = quant_class(type(module)).from_float(module, weight_quantizer, input_quantizer)
        if settings.bias_correction:
            layer.enable_bias_correction()
        _replace(model, name, layer)
    if settings.attention:
        attentions = [
            (name, module)
            for name, module in model.named_modules()
            if name and is_supported_attention(module) and (filter_fn is default_filter or filter_fn(module, name))
        ]
        for name, module in attentions:
            twin = quantize_attention(
                module,
                settings.activation_quantizer,
                lambda: build_softmax_quantizer(
                    settings.softmax_quantizer, settings.softmax_uniform_from_bits, settings.softmax_underflow
                ),
            )
            _replace(model, name, twin)
    target = settings.quant_target
    if target.quantizes_everything:
        from lit_mpq.quant.strict_graph import quantize_adds, quantize_output

        quantize_adds(model, settings.activation_quantizer)

        def output_quantizer() -> ActivationQuantizer:
            quantizer = settings.activation_quantizer()
            quantizer.bits = target.output_bits
            return quantizer

        quantize_output(model, output_quantizer)
    if target.power_of_two:
        _use_power_of_two_scales(model)
    return quant_layer_names(model)


def _use_power_of_two_scales(model: nn.Module) -> None:
    """Make every quantizer of ``model`` round its scale up to a power of two.

    A quantizer whose levels are not one uniform step per tensor or channel (logarithmic softmax levels,
    twin-uniform, per-channel post-LayerNorm) is an error.
    """
    unsupported = []
    for name, quantizer in model.named_modules():
        if isinstance(quantizer, WeightQuantizer | ActivationQuantizer):
            if not quantizer.supports_power_of_two:
                unsupported.append(f"{name} ({type(quantizer).__name__})")
            quantizer.power_of_two = True
    if unsupported:
        raise ValueError(
            f"the power-of-two target needs uniform quantizers; these are not: {', '.join(unsupported[:4])}"
            f"{f' and {len(unsupported) - 4} more' if len(unsupported) > 4 else ''}. Use softmax_quantizer 'uniform', "
            "post_layernorm 'per_tensor' and no 'ptf'/'twin_uniform' overrides, or the 'integer_only' target"
        )


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _hooked_eval_forward(model: nn.Module, example_input: Tensor, handles: list) -> None:
    """One eval-mode forward with every quantizer off; removes ``handles`` and restores the training flag after."""
    was_training = model.training
    try:
        with quantizers_mode(model, "off"):
            model.eval()
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


@torch.no_grad()
def post_layernorm_layers(model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """``{linear: layernorm}``: quantized Linear layers whose input is the output tensor of a ``nn.LayerNorm``.

    Found with one eval forward pass (quantizers off) by tensor identity: the Linear receives the very tensor the
    LayerNorm returned (timm's ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1``).
    """
    outputs: dict[int, tuple[Tensor, str]] = {}
    found: dict[str, str | None] = {}
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    linears = [(name, m) for name, m in model.named_modules() if is_quant_layer(m) and isinstance(m, nn.Linear)]

    def norm_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            outputs[id(output)] = (output, name)  # the reference keeps the id from being reused by a later tensor

        return hook

    def linear_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            norm_output, norm = outputs.get(id(inputs[0]), (None, None))
            found.setdefault(name, norm if norm_output is inputs[0] else None)

        return hook

    handles = [m.register_forward_hook(norm_hook(name)) for name, m in norms]
    handles += [m.register_forward_pre_hook(linear_hook(name)) for name, m in linears]
    _hooked_eval_forward(model, example_input, handles)
    return {linear: norm for linear, norm in found.items() if norm is not None}


def apply_post_layernorm(model: nn.Module, example_input: Tensor, ranges: str = "minmax") -> list[str]:
    """Give every Linear fed by a LayerNorm a per-channel input quantizer to fold (RepQ-ViT); returns their names.

    The new quantizers have no statistics: call this before calibration. See :mod:`lit_mpq.quant.layernorm`.

    Args:
        model: Model prepared by :func:`quantize_model`.
        example_input: One input batch, to find which Linear layers a LayerNorm feeds.
        ranges: Each channel's range: ``"minmax"`` (``post_layernorm: reparam``) or ``"mse"`` (``reparam_mse``).
    """
    from lit_mpq.quant.layernorm import (
        ChannelwiseActivationQuantizer,
        ChannelwiseMinMaxObserver,
        ChannelwiseMSEObserver,
    )

    observers = {"minmax": ChannelwiseMinMaxObserver, "mse": ChannelwiseMSEObserver}
    if ranges not in observers:
        raise ValueError(f"ranges must be one of {list(observers)}, got {ranges!r}")
    names = list(post_layernorm_layers(model, example_input))
    for name in names:
        layer = model.get_submodule(name)
        observer = observers[ranges](layer.in_features, symmetric=layer.input_quantizer.symmetric)
        layer.input_quantizer = ChannelwiseActivationQuantizer(observer, layer.input_quantizer.bits).to(
            layer.weight.device
        )
    return names


def quant_layers(model: nn.Module) -> dict[str, QuantLayerMixin | QuantOperation]:
    """``{fqn: layer}`` for every row of the plan, in model order: quantized layers and operations on activations.

    The operations are the attention matmuls and, under an integer-only target, the residual adds and the output. All
    answer ``quantizer("w")`` / ``quantizer("a")`` and have an ``input_quantizer``; only layers have a ``weight``
    (:func:`~lit_mpq.quant.operations.is_quant_operation` tells them apart; the output's ``quantizer("w")`` is None).
    """
    return {
        name: module for name, module in model.named_modules() if is_quant_layer(module) or is_quant_operation(module)
    }


def quant_layer_names(model: nn.Module) -> list[str]:
    """Names of the fake-quantized layers, in model order."""
    return list(quant_layers(model))


@dataclass
class _Trace:
    """What one eval forward pass showed about the model's weight layers."""

    specs: dict[str, LayerSpec] = field(default_factory=dict)
    """Measured quantized layers (the ones called)."""
    called: dict[str, None] = field(default_factory=dict)
    """Weight layers (quantized or not) in the order of their first call (a dict as an ordered set)."""
    reads_input: set[str] = field(default_factory=set)
    """Quantized layers fed the network input itself, or the same tensor as the first quantized layer."""


@torch.no_grad()
def _trace(model: nn.Module, example_input: Tensor) -> _Trace:
    """Run ``example_input`` through ``model`` in eval mode, quantizers off, hooking every weight layer."""
    trace = _Trace()
    batch = example_input.shape[0]
    first_input: list[Tensor] = []  # the first quantized layer's input, once it has run

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            trace.called.setdefault(name)
            if is_quant_operation(module):
                _record_operation(trace, name, module, inputs, output, batch)
                return
            if not is_quant_layer(module):
                return
            x = inputs[0]
            if not first_input:
                first_input.append(x)
            if x is example_input or x is first_input[0]:
                trace.reads_input.add(name)
            out_per_image = output.numel() // batch
            in_per_image = x.numel() // batch
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs = out_per_image * (module.in_channels // module.groups) * kh * kw
                kind = "conv2d"
            else:
                macs = out_per_image * module.in_features
                kind = "linear"
            previous = trace.specs.get(name)
            if previous is not None:  # a layer called twice per forward: add up its work
                macs += previous.macs
                in_per_image += previous.act_in
                out_per_image += previous.act_out
            trace.specs[name] = LayerSpec(
                name=name,
                kind=kind,
                params=module.weight.numel(),
                macs=int(macs),
                act_in=int(in_per_image),
                act_out=int(out_per_image),
                weight_shape=tuple(module.weight.shape),
            )

        return hook

    handles = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if name and (is_weight_layer(module) or is_quant_operation(module))
    ]
    _hooked_eval_forward(model, example_input, handles)
    return trace


def _record_operation(
    trace: _Trace, name: str, module: QuantOperation, inputs: tuple, output: object, batch: int
) -> None:
    """Record an operation's spec, no weights.

    A matmul's MACs ``out_elements * inner_dim`` and its two operands' sizes; an add's two operands' sizes (its
    additions are its output elements); the output's size. An add that only ever adds numbers (``x.shape[0] + 1``)
    is no row.
    """
    a = inputs[0]
    b = inputs[1] if len(inputs) > 1 else None
    if not isinstance(a, Tensor) or (module.other_quantizer is not None and not isinstance(b, Tensor)):
        return
    if isinstance(module, QuantOutput):
        output = a  # the hook sees the tensor; the model's output may be a tuple of them, each its own call
    out_per_image = output.numel() // batch
    spec = LayerSpec(
        name=name,
        kind=module.kind,
        params=0,
        macs=out_per_image * a.shape[-1] if module.kind == "matmul" else 0,
        act_in=a.numel() // batch,
        act_out=out_per_image,
        act_other=0 if b is None else b.numel() // batch,
    )
    previous = trace.specs.get(name)
    if previous is not None:  # called twice per forward: add up its work
        spec = dataclasses.replace(
            spec,
            macs=spec.macs + previous.macs,
            act_in=spec.act_in + previous.act_in,
            act_out=spec.act_out + previous.act_out,
            act_other=spec.act_other + previous.act_other,
        )
    trace.specs[name] = spec


def measure_layers(model: nn.Module, example_input: Tensor) -> list[LayerSpec]:
    """Measure every fake-quantized layer with one forward pass of ``example_input`` (batch of 1 or more).

    MACs per image: Conv2d ``out_elements * in_channels / groups * kh * kw``, Linear
    ``out_elements * in_features`` (tokens included, so a ViT's Linear counts every token), an attention matmul
    ``out_elements * inner_dimension`` (``heads * N * N * head_dim`` for each of q·kᵀ and softmax·V).
    :func:`measure_model` builds the whole plan and copes with layers that are never called; this function refuses them.

    Returns:
        One :class:`LayerSpec` per quantized layer, in model order.

    Raises:
        RuntimeError: If the forward pass does not call every quantized layer.
    """
    layers = quant_layers(model)
    trace = _trace(model, example_input)
    missing = [name for name in layers if name not in trace.specs]
    if missing:
        raise RuntimeError(f"layers never called by the forward pass cannot be quantized or costed: {missing[:5]}")
    return [trace.specs[name] for name in layers]


def measure_model(model: nn.Module, example_input: Tensor) -> QuantPlan:
    """Measure a model prepared by :func:`quantize_model` into its :class:`QuantPlan`, with one forward pass.

    The forward runs in eval mode with the quantizers off. Quantized layers it never calls (training-only auxiliary
    heads, a ``MultiheadAttention``'s ``out_proj``) are swapped back to their float layers: they cost nothing at
    inference and have no input to calibrate. Besides one :class:`LayerSpec` per quantized layer (model order, MACs as
    in :func:`measure_layers`) the plan records:

    - ``entry_layers``: the first quantized layer to run, and any other fed the network input itself or the same
      tensor as that first layer, in execution order;
    - ``exit_layers``: the classifier head(s). For a timm model (a module with ``pretrained_cfg["classifier"]``,
      one name or several: LeViT's ``head.linear`` and ``head_dist.linear``) the quantized layer(s) named there,
      or the last to run inside a named module; otherwise, or when none is quantized, the last quantized layer to
      run;
    - ``float_layers``: every weight layer (:func:`is_weight_layer`) that is not quantized, with the reason.

    Args:
        model: Model prepared by :func:`quantize_model` (changed in place as described).
        example_input: A batch (of one or more) of the model's input size, on the model's device.

    Returns:
        The plan, every layer at the default bit widths.
    """
    trace = _trace(model, example_input)
    unused_adds = set()
    for name, layer in quant_layers(model).items():
        if name in trace.specs:
            continue
        if is_quant_layer(layer):
            _replace(model, name, layer.to_float())
        elif layer.kind == "add":
            unused_adds.add(name)
    if unused_adds:
        from lit_mpq.quant.strict_graph import drop_unused_adds

        drop_unused_adds(model, unused_adds)
    for name, module in list(model.named_modules()):
        if is_quant_attention(module) and not {f"{name}.matmul_qk", f"{name}.matmul_av"} <= set(trace.specs):
            _replace(model, name, module.to_float())  # an attention the eval forward never runs
    float_layers = {}
    for name, module in model.named_modules():
        if name and is_weight_layer(module) and not is_quant_layer(module):
            float_layers[name] = _float_reason(module, called=name in trace.called)
        elif name and _has_float_matmuls(module):
            float_layers[name] = _float_matmul_reason(module)
    names = quant_layer_names(model)
    # Quantized layers and matmuls in execution order; adds and the output never count as a first or last layer.
    order = [name for name in trace.called if name in trace.specs and trace.specs[name].kind not in ("add", "output")]
    return QuantPlan(
        [trace.specs[name] for name in names],
        entry_layers=[name for name in order if name in trace.reads_input],
        exit_layers=_exit_layers(model, order),
        float_layers=float_layers,
    )


def _has_float_matmuls(module: nn.Module) -> bool:
    """An attention module (by class name) whose matmuls are not quantized (MultiheadAttention is a weight layer)."""
    return (
        "Attention" in type(module).__name__
        and not is_quant_attention(module)
        and not isinstance(module, nn.MultiheadAttention)
        and not any(is_quant_matmul(child) for child in module.children())
    )


def _float_matmul_reason(module: nn.Module) -> str:
    if is_supported_attention(module):
        return "attention matmuls (q·kᵀ, softmax·V) not quantized: QuantSettings.attention is off; left in FP32"
    return (
        f"attention matmuls (q·kᵀ, softmax·V) of {type(module).__name__} not quantized: lit_mpq reproduces timm's "
        "Attention forward only; left in FP32 and not costed"
    )


def _float_reason(module: nn.Module, called: bool) -> str:
    if not called:
        return NOT_CALLED
    if isinstance(module, nn.MultiheadAttention):
        return MULTIHEAD_ATTENTION
    reason = unsupported_reason(module)
    return f"{reason}; left in FP32" if reason else NOT_SELECTED


def _classifier_names(model: nn.Module) -> list[str]:
    """Fully qualified classifier names from the outermost timm ``pretrained_cfg`` in ``model``, if any."""
    for prefix, module in model.named_modules():
        cfg = getattr(module, "pretrained_cfg", None)
        classifier = cfg.get("classifier") if isinstance(cfg, Mapping) else None
        if classifier:
            names = [classifier] if isinstance(classifier, str) else list(classifier)
            return [f"{prefix}.{name}" if prefix else name for name in names]
    return []


def _exit_layers(model: nn.Module, order: list[str]) -> list[str]:
    """The classifier head(s) among the quantized layers ``order`` (execution order); see :func:`measure_model`."""
    heads = set()
    for classifier in _classifier_names(model):
        inside = [name for name in order if name == classifier or name.startswith(classifier + ".")]
        if inside:
            heads.add(inside[-1])
    return [name for name in order if name in heads] or order[-1:]


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


def calibrate(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Record activation statistics over ``batches`` (no gradient), then leave every quantizer off.

    The single-process form of the ``Calibration`` callback's pass (which also merges statistics across ranks):
    cached parameters are forgotten afterwards, so the next quantized forward derives them from the new statistics.

    Returns:
        The number of images seen.
    """
    seen = 0
    set_mode(model, weights="off", activations="observe")
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                seen += int(x.shape[0])
    finally:
        set_mode(model, weights="off", activations="off")
    invalidate_qparams(model)
    return seen


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
        for kind, bits in (("w", decision.w_bits), ("a", decision.a_bits)):
            quantizer = layer.quantizer(kind)
            if quantizer is None:  # the output row has no right-hand operand
                continue
            quantizer.bits = bits
            quantizer.set_mode("quant")
