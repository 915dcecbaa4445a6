"""The sensitivity probes on subclasses of Conv2d / Linear: timm's StdConv2d, ScaledStdConv2d, the SAME convolutions,
timm's Linear and torch's NonDynamicallyQuantizableLinear, next to plain layers in the same models.

These layers quantize their effective weight (the standardized kernel of the StdConv layers) and pad their input
themselves (dynamic SAME padding), so a probe that perturbs the raw ``weight`` or convolves the unpadded input gets
wrong numbers. The references do not use the probes' shortcuts:

- output error: the real quantized model with only that layer's weight (or input) quantizer on at ``b`` bits; the
  score is ``||y_quant - y_float||^2`` of that layer's output, summed over the batches (with ``subsample``, the same
  sum over every ``subsample``-th image and output row/column or token, scaled up);
- Fisher: the float model, whose ``conv2d`` / ``linear`` calls are handed a leaf copy of the kernel they receive and
  an alias of their input, so autograd gives ``dL/d(kernel)`` and ``dL/d(input)`` for that call;
  ``sum (g * (Q(t) - t))^2`` with ``torch.ao`` observers and ``torch.fake_quantize_*`` for ``Q``;
- KL: the float model with that layer's kernel (or input) fake-quantized by ``torch.ao`` inside its own forward.

``TokenNet`` feeds its first Linear's input to a residual shortcut too, and ``SharedConvNet`` calls one StdConv2d
twice: Fisher's input gradient is the one through the layer's own use of its input, and a weight's gradient sums
its calls. The plain Conv2d / Linear layers in the same models keep the numbers of ``test_output_error.py`` and
``test_gradient_and_end_to_end.py``.
"""

from __future__ import annotations

import copy
import functools
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.ao.quantization.observer import MinMaxObserver as AoMinMaxObserver
from torch.ao.quantization.observer import PerChannelMinMaxObserver as AoPerChannelMinMaxObserver
from torch.overrides import TorchFunctionMode

from lit_mpq.quant.apply import QuantSettings, measure_model, quant_layers, quantize_model, set_mode
from lit_mpq.sensitivity import probe_end_to_end, probe_fisher, probe_output_error

timm = pytest.importorskip("timm")
from timm.layers import Linear as TimmLinear  # noqa: E402
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame  # noqa: E402
from timm.layers.conv2d_same import Conv2dSame  # noqa: E402

CANDIDATES = [3, 4, 8]


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------------ models
class TokenNet(nn.Module):
    """A transformer-style MLP over tokens with a residual: its first Linear's input also feeds the shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = TimmLinear(12, 24)
        self.act = nn.GELU()
        self.fc2 = nn.modules.linear.NonDynamicallyQuantizableLinear(24, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.fc2(self.act(self.fc1(x)))
        return self.head(h.mean(dim=1))


class SharedConvNet(nn.Module):
    """One StdConv2d called twice per forward (its standardized weight is computed afresh in each call)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 6, 3, stride=2)
        self.conv = StdConv2d(6, 6, 3, padding=1)
        self.head = TimmLinear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.conv(h))
        h = F.relu(self.conv(h)) + h
        return self.head(h.mean(dim=(2, 3)))


def conv_net() -> nn.Module:
    # 13 x 11 inputs: SAME padding is asymmetric, and different along the two axes.
    return nn.Sequential(
        StdConv2d(3, 8, 3, padding=1),  # 13 x 11
        nn.ReLU(),
        ScaledStdConv2d(8, 8, 3, gamma=1.7, groups=2),  # grouped: the probe's one-call-per-candidate path
        nn.ReLU(),
        Conv2dSame(8, 8, 4, stride=2),  # dynamic SAME padding: 7 x 6
        nn.ReLU(),
        ScaledStdConv2dSame(8, 8, 3, stride=2),  # dynamic SAME padding and standardization: 4 x 3
        nn.ReLU(),
        StdConv2dSame(8, 6, 3),  # SAME made static at construction
        nn.ReLU(),
        nn.Conv2d(6, 6, 1),
        nn.Flatten(),
        TimmLinear(6 * 4 * 3, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "convs": (conv_net, (4, 3, 13, 11)),
    "tokens": (TokenNet, (4, 10, 12)),
    "shared": (SharedConvNet, (4, 3, 9, 7)),
}


def float_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def prepared(kind: str) -> tuple[nn.Module, nn.Module, list[Tensor]]:
    """(float model, quantized + measured + calibrated copy, batches), every quantizer off."""
    build, shape = MODELS[kind]
    torch.manual_seed(0)
    float_model = build().eval()
    with torch.no_grad():  # timm initialises gains to 1: make them tell the scaled weight from the standardized one
        for module in float_model.modules():
            if isinstance(getattr(module, "gain", None), nn.Parameter):
                module.gain.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(shape, generator=gen) * (1 + 0.5 * i) for i in range(3)]
    model = copy.deepcopy(float_model)
    quantize_model(model, QuantSettings())
    plan = measure_model(model, batches[0][:1])
    assert plan.names == list(quant_layers(model)) == list(float_layers(float_model))
    set_mode(model, weights="off", activations="observe")
    with torch.no_grad():
        for batch in batches:
            model(batch)
    set_mode(model, weights="off", activations="off")
    return float_model, model, batches


def test_models_cover_the_layers_the_probes_got_wrong():
    """Guards the references: the effective weights differ from the raw ones, SAME padding changes the input."""
    _, model, batches = prepared("convs")
    layers = list(quant_layers(model).values())
    standardized = [
        m for m in layers if isinstance(m, StdConv2d | ScaledStdConv2d | StdConv2dSame | ScaledStdConv2dSame)
    ]
    assert len(standardized) == 4
    for layer in standardized:
        assert not torch.allclose(layer.effective_weight(), layer.weight, rtol=0.1)
    assert layers[2].pad_input(batches[0]).shape[-2:] != batches[0].shape[-2:]  # Conv2dSame pads itself


# ------------------------------------------------------------------------------------------ output-error reference
@torch.no_grad()
def layer_output_change(model: nn.Module, batches: list[Tensor], name: str, kind: str, bits: int) -> list[Tensor]:
    """Per batch, ``y_quant - y_float`` of layer ``name`` in the real model, only its ``kind`` quantizer on."""
    layer = quant_layers(model)[name]
    quantizer = layer.weight_quantizer if kind == "w" else layer.input_quantizer
    outputs: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: outputs.append(output.double()))
    saved_bits = quantizer.bits
    try:
        for batch in batches:
            model(batch)
        reference = list(outputs)
        outputs.clear()
        quantizer.bits = bits
        quantizer.set_mode("quant")
        for batch in batches:
            model(batch)
    finally:
        handle.remove()
        quantizer.set_mode("off")
        quantizer.bits = saved_bits
    return [q - f for q, f in zip(outputs, reference, strict=True)]


def subsampled_sum_sq(change: Tensor, subsample: int) -> float:
    """Sum of squares over every ``subsample``-th image and output row/column (or token), scaled to all of them."""
    sampled = change[::subsample]
    if change.dim() == 4:
        sampled = sampled[:, :, ::subsample, ::subsample]
    elif change.dim() == 3:
        sampled = sampled[:, ::subsample]
    per_channel = lambda t: t.numel() / t.shape[1 if t.dim() == 4 else -1]  # noqa: E731
    return float((sampled**2).sum()) * per_channel(change) / per_channel(sampled)


@pytest.mark.parametrize("kind", ["convs", "tokens"])
@pytest.mark.parametrize("subsample", [1, 2, 3])
def test_output_error_equals_the_real_quantized_layer(kind, subsample):
    _, model, batches = prepared(kind)
    stats = probe_output_error(model, batches, CANDIDATES, subsample=subsample)
    assert stats.num_samples == sum(b.shape[0] for b in batches)
    for name in quant_layers(model):
        for tensor_kind, sums in (("w", stats.weight_sq), ("a", stats.act_sq)):
            for bits in CANDIDATES:
                changes = layer_output_change(model, batches, name, tensor_kind, bits)
                expected = sum(subsampled_sum_sq(c, subsample) for c in changes)
                assert expected > 0
                # The probe computes f(x, dW) instead of f(x, W_q) - f(x, W): equal up to float32 rounding, which
                # the difference of two float32 outputs magnifies at 8 bits (2.4e-5 seen for the TimmLinear).
                assert sums[name][bits] == pytest.approx(expected, rel=1e-4), (name, tensor_kind, bits)


# ------------------------------------------------------------------------------------------------ torch.ao references
def ao_weight_fq(w: Tensor, bits: int) -> Tensor:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    obs = AoPerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=qmin, quant_max=qmax
    )
    obs(w.detach())
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, qmin, qmax)


def ao_act_fq(x: Tensor, obs: AoMinMaxObserver) -> Tensor:
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), obs.quant_min, obs.quant_max)


@torch.no_grad()
def ao_input_observers(float_model: nn.Module, batches: list[Tensor]) -> dict[str, dict[int, AoMinMaxObserver]]:
    """``{layer: {bits: torch.ao MinMaxObserver}}`` fed every float input of the layer (every call) in ``batches``."""
    observers = {
        name: {b: AoMinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=2**b - 1) for b in CANDIDATES}
        for name in float_layers(float_model)
    }

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            for obs in observers[name].values():
                obs(args[0])

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in float_layers(float_model).items()]
    try:
        for batch in batches:
            float_model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return observers


class CallTaps(TorchFunctionMode):
    """Hands every ``conv2d`` / ``linear`` call of a layer a leaf copy of its kernel and an alias of its (padded)
    input, and records both per layer: their gradients are that call's ``dL/d(kernel)`` and ``dL/d(input)``."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.layer: str | None = None  # the layer whose forward is running
        self.kernels: dict[str, list[Tensor]] = defaultdict(list)
        self.inputs: dict[str, list[Tensor]] = defaultdict(list)
        self.handles = [m.register_forward_pre_hook(functools.partial(self._enter, n)) for n, m in layers.items()]
        self.handles += [m.register_forward_hook(self._leave) for m in layers.values()]

    def _enter(self, name: str, module: nn.Module, args: tuple) -> None:
        self.layer = name

    def _leave(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.layer = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, F.linear) and self.layer is not None:
            x, kernel = args[0].view_as(args[0]), args[1].detach().clone().requires_grad_(True)
            self.inputs[self.layer].append(x)
            self.kernels[self.layer].append(kernel)
            args = (x, kernel, *args[2:])
        return func(*args, **kwargs)


def fisher_reference(float_model: nn.Module, batches: list[Tensor], subsample: int) -> tuple[dict, dict]:
    """``({layer: {bits: sum}}`` for weights, the same for inputs``)``, written out from the definition."""
    names = list(float_layers(float_model))
    observers = ao_input_observers(float_model, batches)  # calibrated on all images, as the model was
    weight_sq = {n: dict.fromkeys(CANDIDATES, 0.0) for n in names}
    act_sq = {n: dict.fromkeys(CANDIDATES, 0.0) for n in names}
    for batch in batches:
        x = batch[::subsample].clone().requires_grad_(True)
        scale = batch.shape[0] / x.shape[0]
        taps = CallTaps(float_layers(float_model))
        try:
            with taps:
                logits = float_model(x)
        finally:
            taps.remove()
        loss = F.cross_entropy(logits, logits.detach().argmax(-1), reduction="sum")
        tensors = [t for n in names for t in (*taps.kernels[n], *taps.inputs[n])]
        grads = dict(zip(map(id, tensors), torch.autograd.grad(loss, tensors), strict=True))
        with torch.no_grad():
            for name in names:
                # One weight, however many calls: its gradient is the sum of the calls'.
                w = taps.kernels[name][0].detach()
                g_w = sum(grads[id(k)] for k in taps.kernels[name])
                for b in CANDIDATES:
                    weight_sq[name][b] += float(((g_w * (ao_weight_fq(w, b) - w)).double() ** 2).sum()) * scale
                # Each call quantizes its own input. Padding adds zeros, which quantize to zero: no contribution.
                for inp in taps.inputs[name]:
                    g_x, value = grads[id(inp)], inp.detach()
                    for b in CANDIDATES:
                        delta = ao_act_fq(value, observers[name][b]) - value
                        act_sq[name][b] += float(((g_x * delta).double() ** 2).sum()) * scale
    return weight_sq, act_sq


@pytest.mark.parametrize("kind", ["convs", "tokens", "shared"])
@pytest.mark.parametrize("subsample", [1, 3])
def test_fisher_equals_the_definition_on_the_effective_weight(kind, subsample):
    float_model, model, batches = prepared(kind)
    stats = probe_fisher(model, batches, CANDIDATES, subsample=subsample)
    expected_w, expected_a = fisher_reference(float_model, batches, subsample)
    assert stats.num_samples == sum(b.shape[0] for b in batches)
    for name in quant_layers(model):
        for bits in CANDIDATES:
            assert expected_w[name][bits] > 0 and expected_a[name][bits] > 0
            assert stats.weight_sq[name][bits] == pytest.approx(expected_w[name][bits], rel=1e-4), (name, bits)
            assert stats.act_sq[name][bits] == pytest.approx(expected_a[name][bits], rel=1e-4), (name, bits)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for layer in quant_layers(model).values():
        assert not layer._forward_hooks and not layer._forward_pre_hooks and not layer.weight_quantizer._forward_hooks


# ------------------------------------------------------------------------------------------------------ KL reference
class KernelQuant(TorchFunctionMode):
    """Fake-quantizes (torch.ao) the kernel handed to every ``conv2d`` / ``linear`` call while it is active."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, F.linear):
            args = (args[0], ao_weight_fq(args[1], self.bits), *args[2:])
        return func(*args, **kwargs)


class OneTensorQuantized(nn.Module):
    """The float layer's own forward with its input, or the kernel it hands to ``conv2d`` / ``linear``, quantized."""

    def __init__(self, layer: nn.Module, weight_bits: int | None, input_observer: AoMinMaxObserver | None) -> None:
        super().__init__()
        self.layer, self.weight_bits, self.input_observer = layer, weight_bits, input_observer

    def forward(self, x: Tensor) -> Tensor:
        if self.input_observer is not None:
            return self.layer(ao_act_fq(x, self.input_observer))
        with KernelQuant(self.weight_bits):
            return self.layer(x)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@pytest.mark.parametrize("kind", ["convs", "tokens"])
def test_end_to_end_kl_equals_the_float_model_with_one_tensor_quantized(kind):
    float_model, model, batches = prepared(kind)
    stats = probe_end_to_end(model, batches, CANDIDATES)
    observers = ao_input_observers(float_model, batches)
    with torch.no_grad():
        log_p = [F.log_softmax(float_model(x).double(), -1) for x in batches]
        for name, layer in float_layers(float_model).items():
            for bits in CANDIDATES:
                for tensor_kind in ("w", "a"):
                    if tensor_kind == "w":
                        set_submodule(float_model, name, OneTensorQuantized(layer, bits, None))
                    else:
                        set_submodule(float_model, name, OneTensorQuantized(layer, None, observers[name][bits]))
                    try:
                        total = 0.0
                        for x, lp in zip(batches, log_p, strict=True):
                            log_q = F.log_softmax(float_model(x).double(), -1)
                            total += float(F.kl_div(log_q, lp, log_target=True, reduction="sum"))
                    finally:
                        set_submodule(float_model, name, layer)
                    got = (stats.weight_sq if tensor_kind == "w" else stats.act_sq)[name][bits]
                    assert got == pytest.approx(total, rel=1e-5, abs=1e-12), (name, tensor_kind, bits)
