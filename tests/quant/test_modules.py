"""QuantConv2d / QuantLinear against float layers and a manual torch.ao + torch.fake_quantize_* computation."""

import pickle

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver as AoMinMaxObserver
from torch.ao.quantization.observer import PerChannelMinMaxObserver as AoPerChannelMinMaxObserver

from lit_mpq.quant.modules import (
    MODES,
    ActivationQuantizer,
    QuantConv2d,
    QuantLinear,
    WeightQuantizer,
    is_quant_layer,
    quant_class,
    unsupported_reason,
)
from lit_mpq.quant.observers import MinMaxObserver

CONVS = {
    "plain": dict(in_channels=4, out_channels=6, kernel_size=3),
    "strided_grouped": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
    "dilated_no_bias": dict(in_channels=4, out_channels=4, kernel_size=(3, 1), dilation=2, padding=2, bias=False),
    "reflect_depthwise": dict(
        in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, padding_mode="reflect"
    ),
}


def wrap(layer: nn.Module, symmetric_act: bool = False, per_channel: bool = True, symmetric_w: bool = True):
    wq = WeightQuantizer(symmetric=symmetric_w, per_channel=per_channel)
    aq = ActivationQuantizer(MinMaxObserver(symmetric=symmetric_act))
    cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    return cls.from_float(layer, wq, aq)


def ao_weight_fq(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    obs = AoPerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=qmin, quant_max=qmax
    )
    obs(w.detach())
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, qmin, qmax)


def ao_act_observer(bits: int, symmetric: bool = False) -> AoMinMaxObserver:
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return AoMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=qmin, quant_max=qmax)
    return AoMinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=2**bits - 1)


def ao_act_fq(x: torch.Tensor, obs: AoMinMaxObserver) -> torch.Tensor:
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), obs.quant_min, obs.quant_max)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_from_float_shares_parameters_and_matches_float_when_off(name):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[name])
    q = wrap(conv)
    assert isinstance(q, nn.Conv2d) and is_quant_layer(q)
    assert q.weight is conv.weight and q.bias is conv.bias
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(q, attr) == getattr(conv, attr), attr
    assert q.weight_quantizer.mode == "off" and q.input_quantizer.mode == "off"
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(q(x), conv(x))


def test_linear_from_float_shares_parameters_and_matches_float_when_off():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    q = wrap(lin)
    assert isinstance(q, nn.Linear) and is_quant_layer(q)
    assert q.weight is lin.weight and q.bias is lin.bias
    x = torch.randn(2, 7, 5)  # token dimension
    assert torch.equal(q(x), lin(x))
    no_bias = wrap(nn.Linear(5, 3, bias=False))
    assert no_bias.bias is None
    assert not is_quant_layer(lin)


@pytest.mark.parametrize("symmetric_act", [False, True])
@pytest.mark.parametrize(("w_bits", "a_bits"), [(8, 8), (4, 6), (2, 3)])
def test_conv_quant_mode_equals_manual_torch_computation(symmetric_act, w_bits, a_bits):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    q = wrap(conv, symmetric_act=symmetric_act)
    ref_obs = ao_act_observer(a_bits, symmetric_act)
    calib = [torch.randn(3, 4, 8, 8) * (i + 1) + 0.5 for i in range(3)]
    q.input_quantizer.set_mode("observe")
    for x in calib:
        assert torch.equal(q(x), conv(x))  # observing changes nothing
        ref_obs(x)
    q.input_quantizer.set_mode("quant")
    q.weight_quantizer.set_mode("quant")
    q.input_quantizer.bits, q.weight_quantizer.bits = a_bits, w_bits
    x = torch.randn(2, 4, 8, 8) * 3  # partly outside the calibrated range
    expected = F.conv2d(ao_act_fq(x, ref_obs), ao_weight_fq(conv.weight, w_bits), conv.bias, 2, 1, 1, 2)
    assert torch.equal(q(x), expected)


def test_linear_quant_mode_equals_manual_torch_computation():
    torch.manual_seed(2)
    lin = nn.Linear(16, 5)
    q = wrap(lin)
    ref_obs = ao_act_observer(4)
    q.input_quantizer.set_mode("observe")
    for _ in range(2):
        x = torch.randn(4, 3, 16)
        q(x)
        ref_obs(x)
    q.input_quantizer.set_mode("quant")
    q.weight_quantizer.set_mode("quant")
    q.input_quantizer.bits, q.weight_quantizer.bits = 4, 5
    x = torch.randn(4, 3, 16)
    expected = F.linear(ao_act_fq(x, ref_obs), ao_weight_fq(lin.weight, 5), lin.bias)
    assert torch.equal(q(x), expected)


def test_per_tensor_asymmetric_weights_equal_torch_ao():
    torch.manual_seed(3)
    lin = nn.Linear(8, 4)
    q = wrap(lin, per_channel=False, symmetric_w=False)
    q.weight_quantizer.set_mode("quant")
    q.weight_quantizer.bits = 4
    obs = AoMinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=15)
    obs(lin.weight.detach())
    x = torch.randn(3, 8)
    expected = F.linear(x, ao_act_fq(lin.weight, obs), lin.bias)
    assert torch.equal(q(x), expected)


def test_bits_none_is_pass_through_in_quant_mode():
    torch.manual_seed(4)
    lin = nn.Linear(6, 6)
    q = wrap(lin)
    q.input_quantizer.set_mode("observe")
    q(torch.randn(10, 6))
    q.input_quantizer.set_mode("quant")
    q.weight_quantizer.set_mode("quant")
    x = torch.randn(3, 6)
    q.weight_quantizer.bits, q.input_quantizer.bits = None, None
    assert torch.equal(q(x), lin(x))
    q.weight_quantizer.bits = 3  # weights only
    assert torch.equal(q(x), F.linear(x, ao_weight_fq(lin.weight, 3), lin.bias))


def test_weight_cache_follows_in_place_weight_updates():
    torch.manual_seed(5)
    lin = nn.Linear(6, 4)
    q = wrap(lin)
    q.weight_quantizer.set_mode("quant")
    q.weight_quantizer.bits = 4
    x = torch.randn(2, 6)
    first = q(x)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    second = q(x)
    assert not torch.equal(first, second)
    assert torch.equal(second, F.linear(x, ao_weight_fq(lin.weight, 4), lin.bias))


def test_quantize_helpers_ignore_mode():
    torch.manual_seed(6)
    lin = nn.Linear(6, 4)
    q = wrap(lin)
    obs = ao_act_observer(8)
    x = torch.randn(5, 6)
    q.input_quantizer.observer(x)
    obs(x)
    assert q.weight_quantizer.mode == "off"
    assert torch.equal(q.weight_quantizer.quantize(lin.weight, 6), ao_weight_fq(lin.weight, 6))
    assert torch.equal(q.input_quantizer.quantize(x, 8), ao_act_fq(x, obs))


def test_quant_mode_before_calibration_raises():
    q = wrap(nn.Linear(3, 3))
    q.input_quantizer.set_mode("quant")
    with pytest.raises(RuntimeError, match="calibration"):
        q(torch.randn(2, 3))


@pytest.mark.parametrize("quantizer", ["weight_quantizer", "input_quantizer"])
def test_set_mode_rejects_unknown_modes(quantizer):
    q = wrap(nn.Linear(3, 3))
    assert MODES == ("off", "observe", "quant")
    with pytest.raises(ValueError, match="off") as err:
        getattr(q, quantizer).set_mode("calibrate")
    assert "observe" in str(err.value) and "quant" in str(err.value)


def test_ste_gradients_equal_torch_fake_quantize_chain():
    torch.manual_seed(7)
    lin = nn.Linear(8, 4)
    q = wrap(lin)
    obs = ao_act_observer(4)
    calib = torch.randn(16, 8)
    q.input_quantizer.observer(calib)
    obs(calib)
    q.input_quantizer.set_mode("quant")
    q.weight_quantizer.set_mode("quant")
    q.input_quantizer.bits, q.weight_quantizer.bits = 4, 4
    x = torch.randn(6, 8) * 0.5  # inside the calibrated range: the STE passes every gradient
    x1 = x.clone().requires_grad_()
    q(x1).square().sum().backward()
    w_grad, b_grad = lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.zero_grad()
    x2 = x.clone().requires_grad_()
    F.linear(ao_act_fq(x2, obs), ao_weight_fq(lin.weight, 4), lin.bias).square().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-6, atol=1e-7)
    assert torch.allclose(w_grad, lin.weight.grad, rtol=1e-6, atol=1e-7)
    assert torch.allclose(b_grad, lin.bias.grad, rtol=1e-6, atol=1e-7)


def test_quant_forward_in_inference_mode_then_input_gradients_outside():
    """Validation runs under inference_mode; a later gradient pass (inference_mode(False) + enable_grad, e.g. a
    gradient-based sensitivity with frozen weights) must not trip over tensors cached during validation."""
    torch.manual_seed(8)
    lin = nn.Linear(8, 4)
    lin.requires_grad_(False)  # post-training: frozen weights
    q = wrap(lin)
    q.input_quantizer.set_mode("observe")
    with torch.inference_mode():
        q(torch.randn(16, 8))
    q.input_quantizer.set_mode("quant")
    q.weight_quantizer.set_mode("quant")
    x = torch.randn(6, 8) * 0.5
    with torch.inference_mode():
        validation_out = q(x)
    with torch.inference_mode(False), torch.enable_grad():
        x1 = x.clone().requires_grad_()
        out = q(x1)
        out.square().sum().backward()
    assert torch.equal(out.detach(), validation_out)
    obs = ao_act_observer(8)
    obs.min_val, obs.max_val = q.input_quantizer.observer.min_val.clone(), q.input_quantizer.observer.max_val.clone()
    x2 = x.clone().requires_grad_()
    F.linear(ao_act_fq(x2, obs), ao_weight_fq(lin.weight, 8), lin.bias).square().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-6, atol=1e-7)


def test_extra_repr_shows_settings():
    q = wrap(nn.Linear(3, 3))
    text = repr(q)
    assert "bits=8" in text and "mode=off" in text and "per_channel=True" in text and "MinMaxObserver" in text


# ------------------------------------------------------------------------------------ twins and the float round trip
def test_quant_class_of_the_float_layers_and_of_subclasses():
    assert quant_class(nn.Conv2d) is QuantConv2d and quant_class(nn.Linear) is QuantLinear
    subclass = nn.modules.linear.NonDynamicallyQuantizableLinear
    twin = quant_class(subclass)
    assert twin is quant_class(subclass)  # made once
    assert issubclass(twin, QuantLinear) and issubclass(twin, subclass) and twin.float_class is subclass
    assert twin.__name__ == "QuantNonDynamicallyQuantizableLinear"


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    ("cls", "words"),
    [
        (nn.Conv1d, ["Conv1d is not supported"]),
        (nn.ConvTranspose2d, ["ConvTranspose2d is not supported"]),
        (OwnForward, ["OwnForward", "own forward", "test_modules.OwnForward.forward"]),
        (QuantConv2d, ["already quantized"]),
        (nn.LazyConv2d, ["LazyConv2d is not initialized", "forward"]),
    ],
)
def test_layers_that_cannot_be_quantized_say_why(cls, words):
    reason = unsupported_reason(cls)
    assert all(word in reason for word in words), reason
    with pytest.raises(TypeError, match="cannot quantize") as err:
        quant_class(cls)
    assert reason in str(err.value)


def test_from_float_refuses_a_layer_of_the_other_kind():
    with pytest.raises(TypeError, match="Linear"):
        QuantConv2d.from_float(nn.Linear(2, 2), WeightQuantizer(), ActivationQuantizer(MinMaxObserver()))


def test_to_float_gives_back_the_float_layer_sharing_its_parameters():
    torch.manual_seed(9)
    conv = nn.Conv2d(**CONVS["strided_grouped"])
    q = wrap(conv)
    q.enable_bias_correction()
    back = q.to_float()
    assert type(back) is nn.Conv2d and back.weight is conv.weight and back.bias is conv.bias
    assert set(back.state_dict()) == set(conv.state_dict()) and not list(back.children())
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(back(x), conv(x))


def test_quantized_layer_pickles_with_its_statistics():
    torch.manual_seed(10)
    q = wrap(nn.Linear(6, 4))
    q.input_quantizer.set_mode("observe")
    q(torch.randn(8, 6))
    q.input_quantizer.set_mode("quant")
    q.weight_quantizer.set_mode("quant")
    copied = pickle.loads(pickle.dumps(q))
    assert type(copied) is QuantLinear
    x = torch.randn(3, 6)
    assert torch.equal(copied(x), q(x))


def test_weight_quantizer_cache_is_keyed_by_the_given_version():
    """A weight computed afresh per forward is identified by the version its layer passes, not by its storage."""
    quantizer = WeightQuantizer()
    first = torch.randn(4, 3)
    cached = quantizer.quantize(first, 4, version=(1,))
    assert quantizer.quantize(first.clone(), 4, version=(1,)) is cached  # same content, as the layer vouches
    other = torch.randn(4, 3)
    assert torch.equal(quantizer.quantize(other, 4, version=(2,)), ao_weight_fq(other, 4))


@pytest.mark.parametrize("name", ["plain", "strided_grouped"])
def test_bias_correction_adds_back_the_mean_output_shift(name):
    """Nagel et al.: y_q + (W - W_q) E[x_patch]; E over every input patch (padding included) of the calibration."""
    torch.manual_seed(11)
    conv = nn.Conv2d(**CONVS[name])
    q = wrap(conv)
    q.enable_bias_correction()
    calib = [torch.randn(3, 4, 8, 8) + 0.3 for _ in range(2)]
    q.input_quantizer.set_mode("observe")
    for x in calib:
        q(x)
    q.input_quantizer.set_mode("off")
    q.weight_quantizer.set_mode("quant")
    q.weight_quantizer.bits = 3
    # Every input patch of every calibration image, as rows: [images * positions, in_channels * kh * kw].
    patches = torch.cat([F.unfold(x, 3, padding=conv.padding, stride=conv.stride).transpose(1, 2) for x in calib])
    mean = patches.reshape(-1, patches.shape[-1]).double().mean(0)
    wq = ao_weight_fq(conv.weight, 3)
    delta = (conv.weight - wq).detach().double()
    g = conv.groups
    per_group = mean.reshape(g, -1)
    shift = torch.cat([delta[i * (6 // g) : (i + 1) * (6 // g)].reshape(6 // g, -1) @ per_group[i] for i in range(g)])
    x = torch.randn(2, 4, 8, 8)
    expected = conv._conv_forward(x, wq, conv.bias) + shift.float().reshape(1, -1, 1, 1)
    assert torch.allclose(q(x), expected, atol=1e-5)
