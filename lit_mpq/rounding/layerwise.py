"""Round every weight layer of a fake-quantized model, layer by layer, with GPTQ, GPFQ or AdaRound.

:func:`round_model` walks the weight layers in the order the forward pass calls them. For each layer it collects, over
the calibration images, the second moments of the layer's inputs as its integer kernel sees them (after the layer's
own input quantizer; for a Linear behind a reparameterized LayerNorm, in the folded coordinates the deployment uses),
rounds the layer's weight at its allocated width onto its weight quantizer's grid, and stores the result in the
quantizer (:meth:`~lit_mpq.quant.modules.WeightQuantizer.set_rounded`), so the next layer's inputs already come from
the rounded network. Each collection pass stops at the layer (a forward pre-hook raises), so the whole walk costs about
half a forward pass per layer (GPTQ) or a whole one (GPFQ, which needs the float network's inputs too).

``upstream`` chooses what feeds a layer while its statistics are collected:

- ``"quantized"`` (the methods as published): the network with every earlier layer quantized and rounded. A layer's
  rounding then depends on the whole allocation before it;
- ``"float"``: the float network, with only the layer's own input quantized at its width. A layer's rounding then
  depends on nothing but its own ``(w_bits, a_bits)``, so a sweep reuses it for every budget that gives the layer the
  same widths (:class:`RoundingCache`), and the statistics of every candidate input width come from one pass.

Statistics are sums over images, so under DDP each rank collects its shard and ``reduce`` sums them; every rank then
rounds the same sums the same way (deterministic), and all ranks hold the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.quant.apply import current_modes, quant_layers, set_mode
from lit_mpq.quant.functional import quant_range
from lit_mpq.quant.modules import QuantLayerMixin, QuantLinear, is_quant_layer
from lit_mpq.quant.weights import weight_qparams
from lit_mpq.rounding.adaround import adaround
from lit_mpq.rounding.gpfq import gpfq_round, median_alphabet_scale
from lit_mpq.rounding.gptq import gptq_round
from lit_mpq.rounding.grid import Grid, as_groups
from lit_mpq.rounding.lockstep import Lockstep
from lit_mpq.rounding.refine import coordinate_descent
from lit_mpq.rounding.scale_fit import fit_scales

METHODS = ("nearest", "gptq", "gpfq", "adaround")
ADAROUND_TARGETS = ("float", "quantized")
UPSTREAM = ("quantized", "float")

Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class RoundingSettings:
    """How weights are rounded; recorded in the quantization card.

    Attributes:
        method: ``"nearest"``, ``"gptq"``, ``"gpfq"`` or ``"adaround"``.
        upstream: ``"quantized"`` or ``"float"`` (see the module docstring).
        damp: GPTQ dampening, a fraction of the mean Hessian diagonal.
        block_size: Columns per block update (GPTQ's lazy batches; GPFQ's matrix-product blocks).
        act_order: GPTQ rounds columns in order of decreasing Hessian diagonal.
        alphabet_scalar: GPFQ's ``C``: alphabet step from ``C · median|w|`` (:func:`median_alphabet_scale`) instead of
            the weight quantizer's own scales; null keeps the quantizer's grid.
        refine_passes: Passes of coordinate descent on the method's own objective after its greedy pass
            (:mod:`lit_mpq.rounding.refine`); 0 keeps the published algorithm as it is.
        scale_fit: Rounds of refitting each output row's scale to the rounded codes by least squares on the method's
            objective (:mod:`lit_mpq.rounding.scale_fit`), each followed by ``refine_passes`` of coordinate descent
            on the refitted grid; 0 keeps the weight quantizer's grid (computed from the original weight).
        adaround_iterations: AdaRound's Adam steps per layer (:mod:`lit_mpq.rounding.adaround`; the paper: 10,000).
        adaround_regularization: AdaRound's ``λ`` (the paper: 0.01).
        adaround_target: What AdaRound reconstructs: ``"float"``, the float network's output from the quantized
            network's inputs (the paper's asymmetric reconstruction, GPFQ's objective), or ``"quantized"``, the layer's
            own float-weight output on its quantized inputs (GPTQ's objective, dampened as GPTQ dampens it), for
            networks whose quantized inputs drift far from the float ones (ViTs at 4-bit activations).
    """

    method: str = "nearest"
    upstream: str = "quantized"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    alphabet_scalar: float | None = None
    refine_passes: int = 0
    scale_fit: int = 0
    adaround_iterations: int = 10000
    adaround_regularization: float = 0.01
    adaround_target: str = "float"

    @property
    def float_target(self) -> bool:
        """Whether the objective is the float network's output (GPFQ, AdaRound's default): it needs float inputs."""
        return self.method == "gpfq" or (self.method == "adaround" and self.adaround_target == "float")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"rounding method must be one of {list(METHODS)}, got {self.method!r}")
        if self.upstream not in UPSTREAM:
            raise ValueError(f"rounding upstream must be one of {list(UPSTREAM)}, got {self.upstream!r}")
        if not (isinstance(self.damp, int | float) and self.damp >= 0 and math.isfinite(self.damp)):
            raise ValueError(f"rounding damp must be a finite number >= 0 (GPTQ uses 0.01), got {self.damp!r}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"rounding block_size must be a positive integer (e.g. 128), got {self.block_size!r}")
        if self.alphabet_scalar is not None and not self.alphabet_scalar > 0:
            raise ValueError(f"rounding alphabet_scalar must be positive or null, got {self.alphabet_scalar!r}")
        if not (isinstance(self.refine_passes, int) and self.refine_passes >= 0):
            raise ValueError(f"rounding refine_passes must be an integer >= 0, got {self.refine_passes!r}")
        if not (isinstance(self.scale_fit, int) and self.scale_fit >= 0):
            raise ValueError(f"rounding scale_fit must be an integer >= 0, got {self.scale_fit!r}")
        if not (isinstance(self.adaround_iterations, int) and self.adaround_iterations >= 1):
            raise ValueError(
                f"rounding adaround_iterations must be a positive integer (the paper: 10000), got "
                f"{self.adaround_iterations!r}"
            )
        if not (isinstance(self.adaround_regularization, int | float) and self.adaround_regularization >= 0):
            raise ValueError(f"rounding adaround_regularization must be >= 0, got {self.adaround_regularization!r}")
        if self.adaround_target not in ADAROUND_TARGETS:
            raise ValueError(
                f"rounding adaround_target must be one of {list(ADAROUND_TARGETS)}, got {self.adaround_target!r}"
            )
        if self.alphabet_scalar is not None and self.method != "gpfq":
            raise ValueError("rounding alphabet_scalar is GPFQ's alphabet rule; set method: gpfq or leave it null")


@dataclass
class LayerRounding:
    """What rounding did to one layer (numbers for the run record).

    Attributes:
        name: Layer name.
        bits: Weight bit width.
        error_nearest: The method's objective with nearest rounding ``Q``, relative, on the calibration inputs:
            ``||(W - Q) X~||² / ||W X~||²`` for GPTQ, ``||W X - Q X~||² / ||W X||²`` for GPFQ.
        error_rounded: The same with the method's ``Q``.
        seconds: Collection and rounding time of this layer (0 when reused from the cache).
        reused: Taken from the cache.
        input_drift: GPFQ only: how far the quantized network's inputs have moved from the float network's, as the
            float weight sees them, ``||W X - W X~||² / ||W X||²`` (0 when the inputs are the float ones; None for
            GPTQ, which never sees the float network).
    """

    name: str
    bits: int
    error_nearest: float
    error_rounded: float
    seconds: float
    reused: bool = False
    input_drift: float | None = None


@dataclass
class RoundingCache:
    """Rounded weights by everything that determines them, kept across the validation runs of a sweep."""

    entries: dict[tuple, tuple[Tensor, Tensor, LayerRounding]] = field(default_factory=dict)

    def clear(self) -> None:
        """Forget every entry."""
        self.entries.clear()


class _StopForward(Exception):
    """Raised by the collection hook once the layer's input is captured: nothing after it needs computing."""


def execution_order(model: nn.Module, example: Tensor) -> tuple[list[str], dict[str, int]]:
    """Rows of the plan (weight layers and matmuls) in the order of their first call, and how often each is called."""
    rows = quant_layers(model)
    order: list[str] = []
    calls: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if name not in calls:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in rows.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return order, calls


def _reparameterization(layer: nn.Module):
    if isinstance(layer, QuantLinear):
        return layer._reparameterization(active=True)
    return None


def rounding_target(layer: QuantLayerMixin) -> Tensor:
    """The weight the deployment quantizes: the effective weight, or ``W diag(r1)`` behind a folded LayerNorm."""
    weight = layer.effective_weight().detach()
    rep = _reparameterization(layer)
    if rep is not None:
        weight = weight * rep.r1.to(weight)
    return weight


def kernel_input(layer: QuantLayerMixin, x: Tensor, quantize: bool) -> Tensor:
    """``x`` as the layer's integer kernel sees it: input-quantized if ``quantize``, folded behind a LayerNorm."""
    rep = _reparameterization(layer)
    if quantize:
        x = layer.input_quantizer(x)
    if rep is not None:
        x = x / rep.r1.to(x) + rep.shift.to(x)
    return x


def input_columns(layer: QuantLayerMixin, x: Tensor) -> Tensor:
    """The layer's input as ``[groups, samples, fan_in]`` rows, in the column order of :func:`column_order`.

    A Linear's columns are its input features. A convolution's are its im2col patches in *tap-major* order
    (``[kh * kw, in / groups]`` per group: every kernel tap's channels side by side), which is what a fast im2col
    writes; :func:`column_order` maps them back to the order of a flattened kernel (``[in / groups, kh * kw]``).

    Raises:
        NotImplementedError: For a convolution with a non-zero padding mode or string padding.
    """
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise NotImplementedError(
                f"rounding supports zero-padded convolutions with numeric padding, not {layer.padding_mode!r} / "
                f"{layer.padding!r}"
            )
        cols = im2col(layer.pad_input(x), layer.kernel_size, layer.padding, layer.stride, layer.dilation)
        groups = layer.groups
        if groups == 1:
            return cols.unsqueeze(0)
        taps = layer.kernel_size[0] * layer.kernel_size[1]
        per_group = cols.shape[1] // (taps * groups)
        return cols.reshape(-1, taps, groups, per_group).permute(2, 0, 1, 3).reshape(groups, -1, taps * per_group)
    return x.reshape(1, -1, x.shape[-1])


def column_order(layer: QuantLayerMixin) -> Tensor | None:
    """Index that puts :func:`input_columns`' columns in flattened-kernel order (None: they already are).

    ``kernel_columns = columns[..., column_order(layer)]``: kernel column ``c * kh * kw + t`` (channel ``c``, tap
    ``t``) is tap-major column ``t * channels + c``.
    """
    if not isinstance(layer, nn.Conv2d):
        return None
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    if taps == 1:
        return None
    channels = layer.in_channels // layer.groups
    return torch.arange(taps * channels).reshape(taps, channels).t().reshape(-1)


def im2col(
    x: Tensor,
    kernel_size: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Patches of ``x`` ``[N, C, H, W]`` as rows ``[N * Ho * Wo, kh * kw * C]``, columns tap-major.

    Column ``t * C + c`` is channel ``c`` at kernel tap ``t`` (row-major over ``kh, kw``): the columns of
    ``F.unfold(x, ...).transpose(1, 2)`` (channel-major) permuted by :func:`column_order`'s inverse. Built from
    ``kh * kw`` strided slices of a channels-last copy of ``x`` laid side by side, each a run of whole channel
    vectors: several times faster than ``F.unfold`` on CPU (``tests/rounding/test_layerwise.py`` checks the two
    agree).
    """
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = kernel_size, padding, stride, dilation
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()
    n, h, w, c = padded.shape
    out_h = (h - dh * (kh - 1) - 1) // sh + 1
    out_w = (w - dw * (kw - 1) - 1) // sw + 1
    taps = [
        padded[:, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.cat(taps, dim=-1).reshape(n * out_h * out_w, kh * kw * c)


class _Moments:
    """Running sums over the calibration inputs of one layer, float64.

    ``gram = X~ᵀ X~``; for GPFQ and AdaRound also ``cross = X~ᵀ X`` and ``float_energy = ||W X||²`` (the float
    output's energy, for the relative error: cheaper from the outputs than from a third ``columns × columns`` matrix);
    ``samples``, the input columns summed (images × output positions).
    """

    def __init__(self, with_cross: bool, weight: Tensor) -> None:
        self.with_cross = with_cross
        self.weight = weight.float()  # [groups, rows, columns]
        self.gram: Tensor | None = None
        self.cross: Tensor | None = None
        self.float_energy = torch.zeros((), dtype=torch.float64, device=weight.device)
        self.samples = torch.zeros((), dtype=torch.float64, device=weight.device)

    def add(self, quantized: Tensor, float_: Tensor | None) -> None:
        q = quantized.float()
        self.samples += q.shape[1]
        gram = (q.transpose(1, 2) @ q).double()
        self.gram = gram if self.gram is None else self.gram + gram
        if self.with_cross:
            f = float_.float()
            cross = (q.transpose(1, 2) @ f).double()
            self.cross = cross if self.cross is None else self.cross + cross
            self.float_energy += (f @ self.weight.transpose(1, 2)).double().square().sum()

    def reduced(self, reduce: Reduce | None) -> tuple[Tensor, Tensor | None, Tensor | None, int]:
        """``(gram, cross, float_energy, samples)``, summed over ranks when ``reduce`` is given."""
        energy = self.float_energy if self.with_cross else None
        if reduce is None:
            return self.gram, self.cross, energy, int(self.samples)
        samples = int(reduce(self.samples.clone()))
        if self.cross is None:
            return reduce(self.gram), None, None, samples
        return reduce(self.gram), reduce(self.cross), reduce(energy), samples


def _capture(model: nn.Module, layers: dict[str, nn.Module], x: Tensor, stop: bool) -> dict[str, list[Tensor]]:
    """The inputs each of ``layers`` receives when ``model`` runs on ``x``.

    With ``stop`` (one layer, called once per forward) the forward ends at that call: nothing after it is computed.
    """
    seen: dict[str, list[Tensor]] = {name: [] for name in layers}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            seen[name].append(args[0].detach())
            if stop:
                raise _StopForward

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            model(x)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _cached(cache: RoundingCache | None, key: tuple, layer: QuantLayerMixin) -> bool:
    """Whether ``cache`` holds the rounding of ``key`` for the layer's current weight."""
    if cache is None or key not in cache.entries:
        return False
    source = cache.entries[key][0]
    target = rounding_target(layer)
    return source.shape == target.shape and torch.equal(source, target)


def _grid(layer: QuantLayerMixin, target: Tensor, bits: int, settings: RoundingSettings) -> Grid:
    quantizer = layer.weight_quantizer
    groups = getattr(layer, "groups", 1)
    rows = target.shape[0] // groups
    if settings.alphabet_scalar is not None:
        scale = median_alphabet_scale(target, bits, settings.alphabet_scalar, quantizer.per_channel)
        qmin, qmax = quant_range(bits, symmetric=True)
        return Grid.from_qparams(scale, torch.zeros_like(scale), qmin, qmax, groups, rows)
    scale, zero_point = weight_qparams(target, bits, quantizer.symmetric, quantizer.per_channel, quantizer.method)
    qmin, qmax = quant_range(bits, quantizer.symmetric)
    return Grid.from_qparams(scale.to(target.device), zero_point.to(target.device), qmin, qmax, groups, rows)


def _relative_error(
    weight: Tensor, rounded: Tensor, gram: Tensor, cross: Tensor | None = None, float_energy: Tensor | None = None
) -> float:
    """The method's objective, relative to the output's energy.

    ``||(W - Q) X~||² / ||W X~||²`` (GPTQ) from ``X~ᵀ X~``; given ``X~ᵀ X`` and ``||W X||²``,
    ``||W X - Q X~||² / ||W X||²`` (GPFQ).
    """

    def form(a: Tensor, matrix: Tensor, b: Tensor) -> Tensor:
        return torch.einsum("grc,gcd,grd->", a, matrix, b)

    if cross is None:
        delta = weight - rounded
        error, reference = form(delta, gram, delta), form(weight, gram, weight)
    else:
        reference = float_energy
        error = reference - 2 * form(rounded, cross, weight) + form(rounded, gram, rounded)
    return float(error / reference) if float(reference) > 0 else 0.0


def _upstream_key(model_rows: dict[str, nn.Module], before: Sequence[str]) -> tuple:
    """What the inputs of a layer depend on: the widths (and activation range factors) of every row before it."""
    key = []
    for name in before:
        row = model_rows[name]
        a_quantizer = row.quantizer("a")
        w_quantizer = row.quantizer("w")
        a_bits, w_bits = a_quantizer.bits, w_quantizer.bits
        factors = (
            getattr(a_quantizer, "range_factors", {}).get(a_bits),
            getattr(w_quantizer, "range_factors", {}).get(w_bits),
        )
        w_bits = w_bits if w_quantizer.mode == "quant" else None
        a_bits = a_bits if a_quantizer.mode == "quant" else None
        key.append((name, w_bits, a_bits, factors))
    return tuple(key)


def round_model(
    model: nn.Module,
    batches: Sequence[Tensor],
    settings: RoundingSettings,
    reduce: Reduce | None = None,
    cache: RoundingCache | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[LayerRounding]:
    """Round every weight layer that is quantized now (mode ``quant``, a weight width set) with ``settings.method``.

    The model's quantizers must hold their allocation (:func:`~lit_mpq.quant.apply.apply_plan`); nearest rounding
    clears any earlier data-driven rounding.

    Args:
        model: The fake-quantized backbone.
        batches: Calibration images (on the model's device), this rank's shard.
        settings: The method and its options.
        reduce: Sums a tensor across ranks (DDP); None on one process.
        cache: Rounded weights to reuse, and where new ones go (a sweep keeps one across its points).
        progress: Called with a short line per layer.

    Returns:
        One :class:`LayerRounding` per rounded layer, in execution order.

    Raises:
        ValueError: If ``batches`` is empty.
    """
    rows = quant_layers(model)
    layers = {
        name: module
        for name, module in rows.items()
        if is_quant_layer(module) and module.weight_quantizer.mode == "quant" and module.weight_quantizer.bits
    }
    for module in rows.values():
        if is_quant_layer(module):
            module.weight_quantizer.clear_rounded()
    if settings.method == "nearest" or not layers:
        return []
    if not batches:
        raise ValueError("rounding needs calibration images; the calibration split gave none")
    order, calls = execution_order(model, batches[0][:1])
    keys = {}
    for position, name in enumerate(order):
        if name in layers:
            layer = layers[name]
            a_bits = layer.input_quantizer.bits if layer.input_quantizer.mode == "quant" else None
            upstream = _upstream_key(rows, order[:position]) if settings.upstream == "quantized" else ()
            keys[name] = (settings, name, int(layer.weight_quantizer.bits), a_bits, upstream)
    to_round = [name for name in keys if not _cached(cache, keys[name], layers[name])]
    done: dict[str, LayerRounding] = {}
    for name in keys:  # reused roundings first: the walk below passes through them without stopping
        if name not in to_round:
            _, rounded, record = cache.entries[keys[name]]
            layers[name].weight_quantizer.set_rounded(keys[name][2], rounding_target(layers[name]), rounded)
            done[name] = replace(record, seconds=0.0, reused=True)
    work = _Work(settings, reduce, cache, progress, done)
    if any(calls.get(name, 1) != 1 for name in to_round):
        _round_by_partial_passes(model, {name: layers[name] for name in to_round}, keys, batches, calls, work)
    else:
        _round_in_lockstep(model, {name: layers[name] for name in to_round}, keys, batches, work)
    return [done[name] for name in keys]


@dataclass
class _Work:
    """What every layer's rounding shares: settings, the rank reduction, the cache, progress and the results."""

    settings: RoundingSettings
    reduce: Reduce | None
    cache: RoundingCache | None
    progress: Callable[[str], None] | None
    done: dict[str, LayerRounding]

    def round_layer(
        self,
        name: str,
        layer: QuantLayerMixin,
        key: tuple,
        quantized_inputs: Sequence[Tensor],
        float_inputs: Sequence[Tensor] | None,
        start: float,
    ) -> None:
        """Round ``layer`` from its raw inputs (one tensor per batch and call) and store the result."""
        settings = self.settings
        bits, a_bits = key[2], key[3]
        target = rounding_target(layer)
        weight = as_groups(target, getattr(layer, "groups", 1))
        order = column_order(layer)
        # The moments are summed in the columns' own (tap-major) order and put in kernel order once, at the end.
        float_target = settings.float_target
        moments = _Moments(float_target, weight if order is None else weight[:, :, torch.argsort(order)])
        with torch.no_grad():
            for i, raw in enumerate(quantized_inputs):
                q_cols = input_columns(layer, kernel_input(layer, raw, quantize=a_bits is not None))
                f_cols = None
                if float_target:
                    f_cols = input_columns(layer, kernel_input(layer, float_inputs[i], quantize=False))
                moments.add(q_cols, f_cols)
        gram, cross, float_energy, samples = moments.reduced(self.reduce)
        if order is not None:
            order = order.to(gram.device)
            gram = gram[:, order][:, :, order]
            cross = None if cross is None else cross[:, order][:, :, order]
        grid = _grid(layer, target, bits, settings).to(weight.device)
        if settings.refine_passes or settings.scale_fit or settings.method == "adaround":
            linear, quadratic = method_objective(settings, weight, gram, cross)
        if settings.method == "gptq":
            rounded = gptq_round(weight, gram, grid, settings.damp, settings.block_size, settings.act_order)
        elif settings.method == "gpfq":
            rounded = gpfq_round(weight, cross, gram, grid, settings.block_size)
        else:
            rounded = adaround(
                weight,
                linear,
                quadratic,
                grid,
                samples,
                settings.adaround_iterations,
                settings.adaround_regularization,
            )
        if settings.refine_passes:
            rounded = coordinate_descent(rounded, linear, quadratic, grid, settings.refine_passes)
        if settings.scale_fit:  # the grid then follows the rounded codes: off the weight quantizer's own grid
            per_channel = layer.weight_quantizer.per_channel
            rounded, _ = fit_scales(
                rounded, linear, quadratic, grid, per_channel, settings.scale_fit, settings.refine_passes
            )
        rounded_weight = rounded.reshape(target.shape).to(target.dtype)
        layer.weight_quantizer.set_rounded(bits, target, rounded_weight)
        errors = tuple(_relative_error(weight, q, gram, cross, float_energy) for q in (grid.round(weight), rounded))
        drift = _relative_error(weight, weight, gram, cross, float_energy) if cross is not None else None
        record = LayerRounding(name, bits, *errors, time.perf_counter() - start, input_drift=drift)
        if self.cache is not None:
            self.cache.entries[key] = (target.clone(), rounded_weight, record)
        self.done[name] = record
        if self.progress is not None:
            self.progress(
                f"{name}: W{bits} output error {record.error_nearest:.3g} nearest -> {record.error_rounded:.3g} "
                f"{settings.method} ({record.seconds:.1f} s)"
            )


def method_objective(
    settings: RoundingSettings, weight: Tensor, gram: Tensor, cross: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(b, B)`` of the method's objective ``qᵀ B q - 2 qᵀ b`` (:mod:`lit_mpq.rounding.refine`), float64.

    GPFQ and AdaRound on the float target: ``b = X~ᵀ X w``, ``B = X~ᵀ X~``. GPTQ and AdaRound on the quantized target:
    ``B = H`` dampened as GPTQ dampens it, ``b = H w``.
    """
    w, gram = weight.double(), gram.double()
    if settings.float_target:
        return w @ cross.double().transpose(1, 2), gram
    hessian = gram.clone()
    diagonal = torch.diagonal(hessian, dim1=-2, dim2=-1)
    diagonal += settings.damp * diagonal.mean(dim=-1, keepdim=True)
    return w @ hessian, hessian


def _float_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every quantizer off: the float network GPFQ compares against."""
    with torch.inference_mode(False):  # a copy made in inference mode would have no version counters
        copy_ = copy.deepcopy(model)
    set_mode(copy_, weights="off", activations="off")
    return copy_


def _round_in_lockstep(
    model: nn.Module,
    layers: dict[str, QuantLayerMixin],
    keys: dict[str, tuple],
    batches: Sequence[Tensor],
    work: _Work,
) -> None:
    """Round ``layers`` in one forward pass over ``batches`` (:class:`~lit_mpq.rounding.lockstep.Lockstep`)."""
    settings = work.settings
    needs_float = settings.float_target or settings.upstream == "float"
    with contextlib.ExitStack() as stack:
        float_walk = quantized_walk = None
        if needs_float:
            float_model = _float_copy(model)
            float_layers = dict(float_model.named_modules())
            float_walk = stack.enter_context(Lockstep(float_model, {n: float_layers[n] for n in layers}, batches))
        if settings.upstream == "quantized":
            quantized_walk = stack.enter_context(Lockstep(model, layers, batches))
        for name in keys:
            if name not in layers:
                continue
            start = time.perf_counter()
            float_inputs = float_walk.inputs_at(name) if float_walk is not None else None
            quantized_inputs = quantized_walk.inputs_at(name) if quantized_walk is not None else float_inputs
            work.round_layer(name, layers[name], keys[name], quantized_inputs, float_inputs, start)
            for walk in (float_walk, quantized_walk):
                if walk is not None:
                    walk.release(name)


def _round_by_partial_passes(
    model: nn.Module,
    layers: dict[str, QuantLayerMixin],
    keys: dict[str, tuple],
    batches: Sequence[Tensor],
    calls: dict[str, int],
    work: _Work,
) -> None:
    """Round ``layers`` one after the other, each from forward passes run up to it.

    Slower than :func:`_round_in_lockstep`, but it copes with a layer called more than once per forward, which a
    :class:`~lit_mpq.rounding.lockstep.Lockstep` cannot pause at.
    """
    settings = work.settings
    needs_float = settings.float_target or settings.upstream == "float"
    for name in keys:
        layer = layers.get(name)
        if layer is None:
            continue
        start = time.perf_counter()
        stop = calls.get(name, 1) == 1
        quantized_inputs: list[Tensor] = []
        float_inputs: list[Tensor] | None = [] if needs_float else None
        for x in batches:
            if needs_float:
                saved = current_modes(model)
                set_mode(model, weights="off", activations="off")
                try:
                    float_inputs.extend(_capture(model, {name: layer}, x, stop)[name])
                finally:
                    _restore(saved)
            if settings.upstream == "quantized":
                quantized_inputs.extend(_capture(model, {name: layer}, x, stop)[name])
        if settings.upstream == "float":
            quantized_inputs = float_inputs
        work.round_layer(name, layer, keys[name], quantized_inputs, float_inputs, start)


def _restore(saved: list[tuple[nn.Module, str]]) -> None:
    for quantizer, mode in saved:
        quantizer.mode = mode


__all__ = [
    "METHODS",
    "UPSTREAM",
    "LayerRounding",
    "RoundingCache",
    "RoundingSettings",
    "execution_order",
    "column_order",
    "input_columns",
    "kernel_input",
    "round_model",
    "rounding_target",
]
