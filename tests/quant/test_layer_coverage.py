"""No layer left in FP32 silently: subclasses of Conv2d/Linear, uncalled heads, several heads, unsupported layers.

References are independent of lit_mpq's layers: the float module's own forward (bit for bit, quantizers off), and
the float module's own forward with its input and the kernel it hands to ``conv2d``/``linear`` fake-quantized by
``torch.ao`` observers (quantizers on). Models are timm / torchvision architectures built with ``pretrained=False``.
"""

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver as AoMinMaxObserver
from torch.ao.quantization.observer import PerChannelMinMaxObserver as AoPerChannelMinMaxObserver
from torch.overrides import TorchFunctionMode

from lit_mpq.plan import LayerSpec, QuantPlan
from lit_mpq.quant.apply import (
    MULTIHEAD_ATTENTION,
    NOT_CALLED,
    NOT_SELECTED,
    QuantSettings,
    apply_plan,
    measure_model,
    quant_layers,
    quantize_model,
    set_mode,
)
from lit_mpq.quant.attention import is_quant_matmul
from lit_mpq.quant.modules import (
    ActivationQuantizer,
    QuantConv2d,
    QuantLinear,
    WeightQuantizer,
    is_quant_layer,
    quant_class,
)
from lit_mpq.quant.observers import MinMaxObserver

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers import Linear as TimmLinear  # noqa: E402
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame  # noqa: E402
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport  # noqa: E402

# What counts as a weight layer, written out independently of lit_mpq.quant.apply.is_weight_layer.
WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.MultiheadAttention)


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------- references
def ao_weight_fq(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    obs = AoPerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=qmin, quant_max=qmax
    )
    obs(w.detach())
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, qmin, qmax)


def ao_act_fq(x: torch.Tensor, obs: AoMinMaxObserver) -> torch.Tensor:
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), obs.quant_min, obs.quant_max)


class KernelCapture(TorchFunctionMode):
    """Records (and optionally replaces) the input and weight a float module hands to ``conv2d`` / ``linear``."""

    def __init__(self, replace=None) -> None:
        super().__init__()
        self.replace = replace
        self.inputs: list[torch.Tensor] = []
        self.kernels: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, F.linear):
            self.inputs.append(args[0])
            self.kernels.append(args[1])
            if self.replace is not None:
                args = (args[0], self.replace(args[1]), *args[2:])
        return func(*args, **kwargs)


def wrap(layer: nn.Module) -> nn.Module:
    return quant_class(type(layer)).from_float(layer, WeightQuantizer(), ActivationQuantizer(MinMaxObserver()))


def randomize(layer: nn.Module) -> nn.Module:
    """Non-trivial parameters (timm initialises gains to 1 and biases to 0)."""
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn_like(param) * 0.5 + 0.1)
    return layer


# ------------------------------------------------------------------------------------------ single subclasses
SUBCLASSES = {
    "StdConv2d": lambda: StdConv2d(4, 6, 3, bias=True),
    "StdConv2dSame_dynamic": lambda: StdConv2dSame(4, 6, 3, stride=2),
    "StdConv2dSame_static": lambda: StdConv2dSame(4, 6, 3, stride=1),
    "ScaledStdConv2d": lambda: ScaledStdConv2d(4, 6, 3, gamma=1.7, groups=2),
    "ScaledStdConv2dSame": lambda: ScaledStdConv2dSame(4, 6, 3, stride=2),
    "Conv2dSame": lambda: Conv2dSame(4, 6, 4, stride=2, dilation=1),
    "Conv2dSame_dilated": lambda: Conv2dSame(4, 6, 3, stride=1, dilation=2),
    "Conv2dSameExport": lambda: Conv2dSameExport(4, 6, 3, stride=2),
    "timm_Linear": lambda: TimmLinear(9, 5),
    "NonDynamicallyQuantizableLinear": lambda: nn.modules.linear.NonDynamicallyQuantizableLinear(9, 5),
}


def example(layer: nn.Module) -> torch.Tensor:
    # Odd sizes: SAME padding is asymmetric and different along the two axes.
    return torch.randn(2, 4, 9, 11) if isinstance(layer, nn.Conv2d) else torch.randn(2, 3, 9)


@pytest.mark.parametrize("kind", sorted(SUBCLASSES))
def test_subclass_twin_is_the_float_layer_bit_for_bit_when_off(kind):
    torch.manual_seed(0)
    layer = randomize(SUBCLASSES[kind]())
    float_keys = set(layer.state_dict())
    q = wrap(layer)
    assert is_quant_layer(q) and isinstance(q, type(layer))
    assert isinstance(q, QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear)
    for name, param in layer.named_parameters():  # shared, not copied (ScaledStdConv2d.gain included)
        assert q.get_parameter(name) is param
    keys = set(q.state_dict())
    assert float_keys <= keys and all(".observer." in key for key in keys - float_keys)
    for _ in range(2):  # Conv2dSameExport builds its padding on the first call: check a second one too
        x = example(layer)
        with torch.no_grad(), KernelCapture() as capture:
            expected = layer(x)
        assert torch.equal(q(x), expected)
        assert torch.equal(q.pad_input(x), capture.inputs[0])  # what conv2d / linear sees
        assert torch.equal(q.effective_weight(), capture.kernels[0])
    set_mode(q, weights="observe", activations="observe")
    assert torch.equal(q(x), layer(x))


@pytest.mark.parametrize("kind", sorted(SUBCLASSES))
@pytest.mark.parametrize(("w_bits", "a_bits"), [(8, 8), (4, 3)])
def test_subclass_twin_quantizes_the_input_and_the_kernel_its_forward_uses(kind, w_bits, a_bits):
    """Reference: the float layer's own forward on a torch.ao-quantized input, with the kernel it passes to
    conv2d/linear (the standardized weight for the StdConv layers) quantized by torch.ao on the way."""
    torch.manual_seed(1)
    layer = randomize(SUBCLASSES[kind]())
    q = wrap(layer)
    obs = AoMinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=2**a_bits - 1)
    q.input_quantizer.set_mode("observe")
    for _ in range(2):
        x = example(layer)
        q(x)
        obs(x)
    q.input_quantizer.set_mode("quant")
    q.weight_quantizer.set_mode("quant")
    q.input_quantizer.bits, q.weight_quantizer.bits = a_bits, w_bits
    x = example(layer) * 1.5
    capture = KernelCapture(replace=lambda w: ao_weight_fq(w, w_bits))
    with torch.no_grad():
        with capture:
            expected = layer(ao_act_fq(x, obs))
        assert len(capture.kernels) == 1
        assert torch.equal(q(x), expected)
        assert torch.equal(q.quantize_weight(w_bits), ao_weight_fq(capture.kernels[0], w_bits))


def test_standardized_convs_quantize_the_standardized_weight_not_the_raw_parameter():
    torch.manual_seed(2)
    layer = randomize(ScaledStdConv2d(4, 6, 3))
    q = wrap(layer)
    capture = KernelCapture()
    with torch.no_grad(), capture:
        layer(torch.randn(1, 4, 5, 5))
    assert torch.equal(q.effective_weight(), capture.kernels[0])
    assert not torch.allclose(q.effective_weight(), layer.weight)  # the test would not tell the two apart otherwise
    assert torch.equal(q.quantize_weight(4), ao_weight_fq(capture.kernels[0], 4))


def test_quantized_standardized_weight_follows_in_place_updates_of_weight_and_gain():
    """The standardized weight is a new tensor in every forward, so it cannot identify the cached quantized weight
    (a new tensor may reuse a freed one's storage with version 0): the layer's parameters identify it."""
    torch.manual_seed(3)
    layer = randomize(ScaledStdConv2d(4, 6, 3))
    q = wrap(layer)
    q.weight_quantizer.set_mode("quant")
    q.weight_quantizer.bits = 4
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for step in range(6):
            with KernelCapture(replace=lambda w: ao_weight_fq(w, 4)):
                expected = layer(x)
            assert torch.equal(q(x), expected), step
            if step % 2:
                layer.weight.add_(torch.randn_like(layer.weight))
            else:
                layer.gain.mul_(1.5)


@pytest.mark.parametrize("kind", ["StdConv2d", "Conv2dSame", "ScaledStdConv2dSame"])
def test_bias_correction_uses_the_kernel_and_the_padded_input_the_forward_uses(kind):
    """Nagel et al.: y_q + (K - K_q) E[patch], K the kernel handed to conv2d, patches of the input conv2d sees."""
    torch.manual_seed(12)
    layer = randomize(SUBCLASSES[kind]())
    q = wrap(layer)
    q.enable_bias_correction()
    calib = [example(layer) + 0.3 for _ in range(2)]
    capture = KernelCapture()
    q.input_quantizer.set_mode("observe")
    with torch.no_grad():
        for x in calib:
            q(x)
            with capture:
                layer(x)
    q.input_quantizer.set_mode("off")
    q.weight_quantizer.set_mode("quant")
    q.weight_quantizer.bits = 3
    kernel = capture.kernels[0]
    patches = torch.cat(
        [
            F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride).transpose(1, 2)
            for x in capture.inputs
        ]
    )
    shift = (kernel - ao_weight_fq(kernel, 3)).reshape(kernel.shape[0], -1).double() @ patches.double().mean((0, 1))
    x = example(layer)
    with torch.no_grad(), KernelCapture(replace=lambda w: ao_weight_fq(w, 3)):
        expected = layer(x) + shift.float().reshape(1, -1, 1, 1)
    assert torch.allclose(q(x), expected, atol=1e-5)


def test_twin_round_trips_to_float_and_through_pickle_and_deepcopy():
    torch.manual_seed(4)
    layer = randomize(ScaledStdConv2dSame(4, 6, 3, stride=2))
    x = example(layer)
    q = wrap(layer)
    q.input_quantizer.set_mode("observe")
    q(x)
    q.input_quantizer.set_mode("quant")
    q.weight_quantizer.set_mode("quant")
    for copied in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
        assert type(copied) is type(q) and copied.weight is not q.weight
        assert torch.equal(copied(x), q(x))
    back = q.to_float()
    assert type(back) is ScaledStdConv2dSame
    assert back.weight is layer.weight and back.gain is layer.gain
    assert set(back.state_dict()) == set(layer.state_dict())
    assert torch.equal(back(x), layer(x))


# ------------------------------------------------------------------------------------------------ whole models
def prepare(model: nn.Module, x: torch.Tensor, filter_fn=None) -> tuple[nn.Module, QuantPlan]:
    """Quantize ``model`` in place, measure it with one image of ``x``; returns the float copy and the plan."""
    model.eval()
    reference = copy.deepcopy(model)
    quantize_model(model, QuantSettings(), filter_fn)
    return reference, measure_model(model, x[:1])


def check_accounted_for(model: nn.Module, plan: QuantPlan) -> None:
    """Every weight layer is quantized and in the plan, or in float and listed in plan.float_layers."""
    quantized = list(quant_layers(model))
    assert plan.names == quantized
    weight_layers = [name for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]
    quantized_weights = [name for name in quantized if not is_quant_matmul(model.get_submodule(name))]
    float_weights = [name for name in plan.float_layers if isinstance(model.get_submodule(name), WEIGHT_LAYERS)]
    assert sorted(weight_layers) == sorted(quantized_weights + float_weights)
    assert not set(quantized) & set(plan.float_layers)
    # The rest are attention modules whose matmuls stay in float: listed, with the reason.
    for name in set(plan.float_layers) - set(float_weights):
        assert "Attention" in type(model.get_submodule(name)).__name__
        assert "attention matmuls" in plan.float_layers[name]


def check_off_equals_float(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


TIMM_MODELS = {
    # name: (create_model kwargs, input size, subclass that must be quantized, entry layers, exit layers)
    "mobilenetv3_small_050": ({}, 64, TimmLinear, ["conv_stem"], ["classifier"]),
    "test_nfnet": ({}, 64, ScaledStdConv2d, ["stem.conv1"], ["head.fc"]),
    "resnetv2_50x1_bit": ({}, 64, StdConv2d, ["stem.conv"], ["head.fc"]),
    "test_efficientnet": ({"pad_type": "same"}, 65, Conv2dSame, ["conv_stem"], ["classifier"]),
}


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_timm_models_with_layer_subclasses_are_fully_quantized(name):
    kwargs, size, subclass, entry, exit_ = TIMM_MODELS[name]
    torch.manual_seed(5)
    model = timm.create_model(name, pretrained=False, **kwargs)
    x = torch.randn(2, 3, size, size)
    reference, plan = prepare(model, x)
    check_accounted_for(model, plan)
    assert plan.float_layers == {}
    subclassed = [n for n, m in reference.named_modules() if type(m) is subclass]
    assert subclassed and all(isinstance(model.get_submodule(n), subclass) for n in subclassed)
    assert set(subclassed) <= set(plan.names)
    assert plan.entry_layers == entry and plan.exit_layers == exit_
    assert set(model.state_dict()) >= set(reference.state_dict())
    check_off_equals_float(model, reference, x)


def test_mobilenetv3_classifier_is_quantized_and_is_the_exit_layer():
    """timm's Linear classifier holds most of MobileNetV3-Small-0.5's weights; it used to be skipped."""
    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    reference, plan = prepare(model, torch.randn(1, 3, 64, 64))
    assert isinstance(model.classifier, QuantLinear) and isinstance(model.classifier, TimmLinear)
    total = sum(spec.params for spec, _ in plan.items())
    assert plan.specs["classifier"].params / total > 0.4
    assert reference.pretrained_cfg["classifier"] == "classifier"
    assert plan.exit_layers == ["classifier"] and plan.entry_layers == ["conv_stem"]


def test_levit_pins_both_heads_in_execution_order():
    torch.manual_seed(6)
    model = timm.create_model("levit_128s", pretrained=False)
    x = torch.randn(1, 3, 224, 224)  # LeViT's attention biases fix the resolution
    reference, plan = prepare(model, x)
    check_accounted_for(model, plan)
    assert reference.pretrained_cfg["classifier"] == ("head.linear", "head_dist.linear")
    assert plan.exit_layers == ["head.linear", "head_dist.linear"]
    assert plan.entry_layers == ["stem.conv1.linear"]
    check_off_equals_float(model, reference, x)


@pytest.mark.parametrize(
    ("build", "size", "aux_prefixes", "entry"),
    [
        (lambda: torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False), 64,
         ("aux1.", "aux2."), ["conv1.conv"]),
        (lambda: torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False), 75,
         ("AuxLogits.",), ["Conv2d_1a_3x3.conv"]),
    ],
    ids=["googlenet", "inception_v3"],
)  # fmt: skip
def test_training_only_auxiliary_heads_are_left_in_float_and_listed(build, size, aux_prefixes, entry):
    torch.manual_seed(7)
    model = build()
    x = torch.randn(2, 3, size, size)
    reference, plan = prepare(model, x)
    check_accounted_for(model, plan)
    aux = [n for n, m in reference.named_modules() if isinstance(m, WEIGHT_LAYERS) and n.startswith(aux_prefixes)]
    assert aux and plan.float_layers == dict.fromkeys(aux, NOT_CALLED)
    for name in aux:  # swapped back: the float class itself, no quantizers
        assert type(model.get_submodule(name)) is type(reference.get_submodule(name))
    assert plan.entry_layers == entry and plan.exit_layers == ["fc"]
    check_off_equals_float(model, reference, x)
    if isinstance(model, torchvision.models.GoogLeNet):  # Inception-v3's auxiliary head needs 299 px to train
        model.train()  # the training forward still runs its auxiliary heads (in float)
        with torch.no_grad():
            outputs = model(x)
        assert len(outputs) == 3 and all(torch.isfinite(t).all() for t in outputs)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.proj(x)
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_multihead_attention_out_proj_is_left_in_float_and_listed():
    torch.manual_seed(8)
    model = Attention()
    x = torch.randn(2, 5, 8)
    reference, plan = prepare(model, x)
    check_accounted_for(model, plan)
    assert plan.names == ["proj", "head"]
    assert plan.float_layers == {"attn": MULTIHEAD_ATTENTION, "attn.out_proj": NOT_CALLED}
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    check_off_equals_float(model, reference, x)


class OwnForwardConv(nn.Conv2d):
    """A subclass whose computation lit_mpq cannot know."""

    def forward(self, x):
        return super().forward(x).abs()


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.own = OwnForwardConv(4, 4, 1)
        self.seq = nn.Conv1d(4, 4, 1)
        self.vol = nn.Conv3d(1, 1, 1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.excluded = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.excluded(self.up(self.own(self.stem(x))))
        b, c, h, w = x.shape
        x = self.seq(x.flatten(2)).reshape(b, c, h, w)
        x = self.vol(x.unsqueeze(1)).squeeze(1)
        return self.fc(x.mean((2, 3)))


def test_unsupported_and_excluded_layers_are_listed_with_their_reason():
    torch.manual_seed(9)
    model = Mixed()
    x = torch.randn(2, 3, 6, 6)
    reference, plan = prepare(model, x, lambda m, fqn: fqn in ("stem", "fc"))
    check_accounted_for(model, plan)
    assert plan.names == ["stem", "fc"]
    reasons = plan.float_layers
    assert list(reasons) == ["own", "seq", "vol", "up", "excluded"]
    assert "OwnForwardConv" in reasons["own"] and "forward" in reasons["own"]
    assert "Conv1d" in reasons["seq"] and "Conv3d" in reasons["vol"] and "ConvTranspose2d" in reasons["up"]
    assert reasons["excluded"] == NOT_SELECTED
    check_off_equals_float(model, reference, x)
    # The default filter leaves out the same unsupported layers and says so in the same words.
    default = Mixed()
    _, default_plan = prepare(default, x)
    assert default_plan.names == ["stem", "excluded", "fc"]
    assert default_plan.float_layers == {k: v for k, v in reasons.items() if k != "excluded"}


def test_plan_with_float_layers_round_trips_through_yaml(tmp_path):
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    _, plan = prepare(model, torch.randn(1, 3, 64, 64))
    loaded = QuantPlan.from_yaml(plan.to_yaml(tmp_path / "plan.yaml"))
    assert loaded.float_layers == plan.float_layers
    assert loaded.entry_layers == plan.entry_layers and loaded.exit_layers == plan.exit_layers


def test_entry_and_exit_follow_execution_order_not_registration_order():
    """Registration order is not execution order: the 'last layer' is the classifier, whatever the order."""

    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, runs last
            self.stem = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.head(self.stem(x).mean((2, 3)))

    _, plan = prepare(HeadFirst(), torch.randn(1, 3, 5, 5))
    assert plan.names == ["head", "stem"]  # rows stay in model order
    assert plan.entry_layers == ["stem"] and plan.exit_layers == ["head"]


def test_quantized_model_keeps_float_state_dict_keys():
    model = timm.create_model("test_nfnet", pretrained=False)
    reference, _ = prepare(model, torch.randn(1, 3, 64, 64))
    state = model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key
    assert all(".input_quantizer." in key for key in set(state) - set(reference.state_dict()))


def test_full_model_quant_mode_runs_and_differs_from_float():
    """The twins work inside a real model end to end in quant mode (calibrated, then 4-bit weights)."""
    torch.manual_seed(10)
    model = nn.Sequential(
        OrderedDict(
            std=StdConv2d(3, 8, 3, bias=True),
            same=Conv2dSame(8, 8, 3, stride=2),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=TimmLinear(8, 4),
        )
    )
    x = torch.randn(4, 3, 11, 11)
    reference, plan = prepare(model, x)
    assert plan.names == ["std", "same", "fc"] and plan.float_layers == {}
    set_mode(model, weights="observe", activations="observe")
    model(x)
    plan.set_bits({name: (4, 8) for name in plan.names})
    apply_plan(model, plan)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and not torch.equal(out, reference(x))


def test_plan_refuses_a_layer_both_quantized_and_left_in_float():
    spec = LayerSpec(name="fc", kind="linear", params=4, macs=4, act_in=2, act_out=2, weight_shape=(2, 2))
    with pytest.raises(ValueError, match="fc"):
        QuantPlan([spec], float_layers={"fc": NOT_CALLED})
