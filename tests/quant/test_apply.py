"""Model surgery, layer measurement and plan application, against float models, torch.ao and FlopCounterMode."""

import copy
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver as AoMinMaxObserver
from torch.ao.quantization.observer import PerChannelMinMaxObserver as AoPerChannelMinMaxObserver
from torch.utils.flop_counter import FlopCounterMode

from lit_mpq.plan import QuantPlan
from lit_mpq.quant.apply import (
    NOT_CALLED,
    QuantSettings,
    apply_plan,
    calibrate,
    current_modes,
    measure_layers,
    measure_model,
    quant_layer_names,
    quant_layers,
    quantize_model,
    quantizers_mode,
    set_mode,
)
from lit_mpq.quant.modules import ActivationQuantizer, QuantConv2d, QuantLinear, WeightQuantizer
from lit_mpq.quant.observers import MinMaxObserver, MSEObserver, PercentileObserver

pytestmark = pytest.mark.usefixtures("single_thread")


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(3, 8, 3, padding=1),
            act1=nn.ReLU(),
            body=nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4), nn.ReLU()),
            flat=nn.Flatten(),
            head=nn.Linear(8 * 4 * 4, 10),
        )
    )


NAMES = ["stem", "body.0", "head"]


def calib_batches(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(n)]


def count_flops(fn, *args) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def capture_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Inputs of the named submodules of a float model, one entry per call."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen[name].append(i[0].detach()))
        for name in names
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


# -------------------------------------------------------------------------------------------- quantize_model
def test_quantize_model_swaps_layers_and_shares_parameters():
    model = make_model()
    params = {name: (model.get_submodule(name).weight, model.get_submodule(name).bias) for name in NAMES}
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    names = quantize_model(model, QuantSettings())
    assert names == NAMES == quant_layer_names(model) == list(quant_layers(model))
    assert isinstance(model.stem, QuantConv2d) and isinstance(model.body[0], QuantConv2d)
    assert isinstance(model.head, QuantLinear)
    for name, (weight, bias) in params.items():
        layer = model.get_submodule(name)
        assert layer.weight is weight and layer.bias is bias
    state = model.state_dict()
    for key, value in float_state.items():  # every float key is still there with the same tensor
        assert torch.equal(state[key], value), key
    extra = set(state) - set(float_state)
    assert extra and all(".input_quantizer.observer." in key for key in extra)
    # The parameters are not duplicated.
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in float_state.values())


def test_quantize_model_is_idempotent():
    model = make_model()
    quantize_model(model, QuantSettings())
    layers = dict(quant_layers(model))
    assert quantize_model(model, QuantSettings()) == NAMES
    for name, layer in quant_layers(model).items():
        assert layer is layers[name]
        assert type(layer.weight_quantizer) is WeightQuantizer  # no quantizer nested inside a quantizer


def test_quantize_model_is_idempotent_with_an_isinstance_filter():
    """torchao-style filters use isinstance; quantized layers (subclasses) must still be left alone."""

    def is_linear(module, fqn):
        return isinstance(module, nn.Linear)

    model = make_model()
    quantize_model(model, QuantSettings(), is_linear)
    head = model.head
    head.input_quantizer.set_mode("observe")
    model(torch.randn(2, 3, 8, 8))
    assert quantize_model(model, QuantSettings(), is_linear) == ["head"]
    assert model.head is head  # not re-wrapped: its calibration statistics survive
    assert head.input_quantizer.observer.has_data


def test_filter_fn_selects_layers_by_name():
    model = make_model()
    names = quantize_model(model, QuantSettings(), lambda m, fqn: type(m) is nn.Conv2d and fqn.startswith("body"))
    assert names == ["body.0"]
    assert type(model.stem) is nn.Conv2d and type(model.head) is nn.Linear


def test_default_filter_takes_subclasses_and_skips_unknown_forwards():
    class OwnForward(nn.Conv2d):  # a computation lit_mpq cannot know: must not be swapped for a plain conv
        def forward(self, x):
            return super().forward(x).abs()

    subclass = nn.modules.linear.NonDynamicallyQuantizableLinear
    model = nn.Sequential(OrderedDict(proj=nn.Linear(8, 8), sub=subclass(8, 8), own=OwnForward(1, 1, 1)))
    assert quantize_model(model, QuantSettings()) == ["proj", "sub"]
    assert isinstance(model.sub, QuantLinear) and isinstance(model.sub, subclass)
    assert type(model.own) is OwnForward


def test_filter_fn_selecting_an_unquantizable_layer_is_refused_with_the_reason():
    model = nn.Sequential(OrderedDict(seq=nn.Conv1d(3, 3, 1), fc=nn.Linear(3, 3)))
    with pytest.raises(ValueError, match=r"seq: Conv1d is not supported"):
        quantize_model(model, QuantSettings(), lambda m, fqn: True)
    assert type(model.fc) is nn.Linear  # nothing swapped by the refused call


@pytest.mark.parametrize(
    ("settings", "observer_type"),
    [
        (QuantSettings(), MinMaxObserver),
        (QuantSettings(act_observer="mse", act_symmetric=True), MSEObserver),
        (QuantSettings(act_observer="percentile", percentile=99.9), PercentileObserver),
    ],
)
def test_settings_reach_every_quantizer(settings, observer_type):
    model = make_model()
    quantize_model(model, settings)
    for layer in quant_layers(model).values():
        observer = layer.input_quantizer.observer
        assert type(observer) is observer_type
        assert observer.symmetric == settings.act_symmetric
        assert layer.weight_quantizer.per_channel == (settings.weight_granularity == "per_channel")
        assert layer.weight_quantizer.symmetric == settings.weight_symmetric
        assert layer.weight_quantizer.method == settings.weight_observer
    first, second = (quant_layers(model)[n].input_quantizer.observer for n in NAMES[:2])
    assert first is not second  # one observer per layer
    if observer_type is PercentileObserver:
        assert first.percentile == 99.9


def test_observer_overrides_pick_the_first_full_match_and_leave_the_rest_alone():
    settings = QuantSettings(
        act_observer="mse",
        percentile=99.9,
        act_observer_overrides=(("body\\..*", "percentile"), ("b.*", "minmax"), ("hea", "minmax")),
    )
    model = make_model()
    quantize_model(model, settings)
    observers = {name: type(layer.input_quantizer.observer) for name, layer in quant_layers(model).items()}
    # "body.0": the first pattern wins over the second; "hea" is not a full match of "head".
    assert observers == {"stem": MSEObserver, "body.0": PercentileObserver, "head": MSEObserver}
    assert quant_layers(model)["body.0"].input_quantizer.observer.percentile == 99.9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [((("fc2(", "percentile"),), "not a regular expression"), ((("fc2", "kl"),), "unknown observer 'kl'")],
)
def test_bad_observer_overrides_are_refused_naming_the_pattern(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantSettings(act_observer_overrides=overrides)


# ---------------------------------------------------------------------------------------------------- modes
def test_off_and_observe_modes_equal_the_float_model_exactly():
    model = make_model()
    reference = copy.deepcopy(model)
    quantize_model(model, QuantSettings())
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(model(x), reference(x))
    set_mode(model, weights="observe", activations="observe")
    for batch in calib_batches():
        assert torch.equal(model(batch), reference(batch))
    set_mode(model, weights="off", activations="off")
    assert torch.equal(model(x), reference(x))


def test_quant_mode_equals_manual_layer_by_layer_computation():
    """Observers see the float network; the quantized network then fake-quantizes every weight and input."""
    w_bits = {"stem": 4, "body.0": 6, "head": 8}
    a_bits = {"stem": 8, "body.0": 5, "head": 4}
    model = make_model()
    reference = copy.deepcopy(model)
    quantize_model(model, QuantSettings())
    specs = measure_layers(model, torch.randn(1, 3, 8, 8))
    set_mode(model, weights="observe", activations="observe")
    ao_obs = {n: AoMinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=2 ** a_bits[n] - 1) for n in NAMES}
    for batch in calib_batches():
        model(batch)
        for name, inputs in capture_inputs(reference, NAMES, batch).items():
            for x in inputs:
                ao_obs[name](x)
    plan = QuantPlan(specs)
    plan.set_bits({n: (w_bits[n], a_bits[n]) for n in NAMES})
    apply_plan(model, plan)

    def manual(x: torch.Tensor) -> torch.Tensor:
        for name, module in reference.named_modules():
            if name in ("", "body"):
                continue
            if name not in NAMES:
                x = module(x)
                continue
            obs = ao_obs[name]
            scale, zp = obs.calculate_qparams()
            xq = torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), obs.quant_min, obs.quant_max)
            b = w_bits[name]
            wobs = AoPerChannelMinMaxObserver(
                ch_axis=0,
                dtype=torch.qint8,
                qscheme=torch.per_channel_symmetric,
                quant_min=-(2 ** (b - 1)),
                quant_max=2 ** (b - 1) - 1,
            )
            wobs(module.weight.detach())
            ws, wz = wobs.calculate_qparams()
            wq = torch.fake_quantize_per_channel_affine(
                module.weight, ws, wz.to(torch.int32), 0, wobs.quant_min, wobs.quant_max
            )
            if isinstance(module, nn.Conv2d):
                x = F.conv2d(xq, wq, module.bias, module.stride, module.padding, module.dilation, module.groups)
            else:
                x = F.linear(xq, wq, module.bias)
        return x

    with torch.no_grad():
        for x in [torch.randn(3, 3, 8, 8), calib_batches(1)[0]]:
            out = model(x)
            assert torch.equal(out, manual(x))
            assert not torch.equal(out, reference(x))
        with quantizers_mode(model, "off"):  # the FP32 reference pass
            assert torch.equal(model(x), reference(x))
        assert torch.equal(model(x), manual(x))


def test_set_mode_maps_weight_observe_to_off():
    model = make_model()
    quantize_model(model, QuantSettings())
    set_mode(model, weights="observe", activations="observe")
    for layer in quant_layers(model).values():
        assert layer.weight_quantizer.mode == "off" and layer.input_quantizer.mode == "observe"
    set_mode(model, activations="off")  # weights untouched
    for layer in quant_layers(model).values():
        assert layer.weight_quantizer.mode == "off" and layer.input_quantizer.mode == "off"
    set_mode(model, weights="quant")
    for layer in quant_layers(model).values():
        assert layer.weight_quantizer.mode == "quant" and layer.input_quantizer.mode == "off"


def test_quantizers_mode_restores_previous_modes_even_on_error():
    model = make_model()
    quantize_model(model, QuantSettings())
    model.stem.weight_quantizer.set_mode("quant")
    model.stem.input_quantizer.set_mode("observe")
    model.head.input_quantizer.set_mode("quant")
    before = [(q, mode) for q, mode in current_modes(model)]
    assert len(before) == 6
    assert [mode for _, mode in before] == ["quant", "observe", "off", "off", "off", "quant"]
    with quantizers_mode(model, "off"):
        assert all(q.mode == "off" for q, _ in current_modes(model))
    assert [(q, q.mode) for q, _ in before] == before
    with pytest.raises(KeyError), quantizers_mode(model, "observe"):
        assert model.stem.input_quantizer.mode == "observe" and model.stem.weight_quantizer.mode == "off"
        raise KeyError("boom")
    assert [(q, q.mode) for q, _ in before] == before


# ----------------------------------------------------------------------------------------------- measurement
def reference_specs(float_model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, dict]:
    """MACs per image from FlopCounterMode (FLOPs / 2) on each layer's captured input(s)."""
    batch = x.shape[0]
    result = {}
    for name, inputs in capture_inputs(float_model, names, x).items():
        layer = float_model.get_submodule(name)
        flops = sum(count_flops(layer, inp) for inp in inputs)
        with torch.no_grad():
            out_elems = sum(layer(inp).numel() for inp in inputs)
        assert flops % (2 * batch) == 0
        result[name] = {
            "macs": flops // 2 // batch,
            "act_in": sum(inp.numel() for inp in inputs) // batch,
            "act_out": out_elems // batch,
            "params": layer.weight.numel(),
            "weight_shape": tuple(layer.weight.shape),
            "kind": "conv2d" if isinstance(layer, nn.Conv2d) else "linear",
        }
    return result


def check_specs(specs, ref):
    assert [s.name for s in specs] == list(ref)
    for spec in specs:
        expected = ref[spec.name]
        got = {k: getattr(spec, k) for k in expected}
        assert got == expected, spec.name


@pytest.mark.parametrize("batch", [1, 3])
def test_measure_layers_macs_equal_flop_counter(batch):
    model = make_model()
    reference = copy.deepcopy(model)
    quantize_model(model, QuantSettings())
    x = torch.randn(batch, 3, 8, 8)
    specs = measure_layers(model, x)
    check_specs(specs, reference_specs(reference, NAMES, x))
    # Hand-computed: stem 8*8*8 outputs * 3*3*3; body 8*4*4 outputs * (8/4)*3*3; head 10 * 128.
    assert [s.macs for s in specs] == [512 * 27, 128 * 18, 1280]
    # The whole model's FLOPs are exactly twice the sum of the layers' MACs (no other matmuls/convs).
    assert count_flops(reference, x) == 2 * batch * sum(s.macs for s in specs)


def test_measure_layers_restores_modes_and_training_flag():
    model = make_model()
    quantize_model(model, QuantSettings())
    model.train()
    model.stem.input_quantizer.set_mode("observe")
    measure_layers(model, torch.randn(1, 3, 8, 8))
    assert model.training and model.stem.training
    assert model.stem.input_quantizer.mode == "observe"
    assert not model.stem.input_quantizer.observer.has_data  # quantizers were off during the measurement


class SharedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.fc(x)))))


def test_measure_layers_adds_up_a_layer_called_twice():
    model = SharedLayer()
    reference = copy.deepcopy(model)
    quantize_model(model, QuantSettings())
    x = torch.randn(2, 5, 6)
    specs = measure_layers(model, x)
    check_specs(specs, reference_specs(reference, ["fc", "head"], x))
    assert [s.macs for s in specs] == [2 * 5 * 36, 5 * 12]
    assert count_flops(reference, x) == 2 * 2 * sum(s.macs for s in specs)


def test_measure_layers_rejects_unused_layers():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.spare = nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    quantize_model(model, QuantSettings())
    with pytest.raises(RuntimeError, match="spare"):
        measure_layers(model, torch.randn(1, 3))


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 3)
        self.spare = nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


def test_measure_model_restores_uncalled_layers_to_float_and_lists_them():
    model = Unused()
    spare = model.spare
    reference = copy.deepcopy(model)
    quantize_model(model, QuantSettings())
    plan = measure_model(model, torch.randn(1, 3))
    assert plan.names == ["used"] == quant_layer_names(model)
    assert plan.float_layers == {"spare": NOT_CALLED}
    assert type(model.spare) is nn.Linear and model.spare.weight is spare.weight
    assert set(model.spare.state_dict()) == {"weight", "bias"}
    x = torch.randn(4, 3)
    assert torch.equal(model(x), reference(x))
    # Idempotent: quantizing again swaps the spare layer in, measuring again swaps it back out.
    quantize_model(model, QuantSettings())
    again = measure_model(model, torch.randn(1, 3))
    assert again.to_dict() == plan.to_dict()


def test_measure_model_specs_are_those_of_measure_layers():
    model = make_model()
    quantize_model(model, QuantSettings())
    x = torch.randn(2, 3, 8, 8)
    plan = measure_model(model, x)
    assert list(plan.specs.values()) == measure_layers(model, x)
    assert plan.entry_layers == ["stem"] and plan.exit_layers == ["head"] and plan.float_layers == {}


class TwoStems(nn.Module):
    """Two layers read the input, registered after the head; a third reads it again at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.left = nn.Conv2d(3, 2, 1)
        self.right = nn.Conv2d(3, 2, 1)
        self.late = nn.Conv2d(3, 4, 1)
        self.mid = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.mid(torch.cat([self.left(x), self.right(x)], 1))
        return self.head((y + self.late(x)).mean((2, 3)))


def test_entry_layers_are_the_layers_fed_the_input_in_execution_order():
    model = TwoStems()
    quantize_model(model, QuantSettings())
    plan = measure_model(model, torch.randn(1, 3, 4, 4))
    assert plan.names == ["head", "left", "right", "late", "mid"]  # model order
    assert plan.entry_layers == ["left", "right", "late"]
    assert plan.exit_layers == ["head"]


def test_entry_layer_behind_input_preprocessing_is_the_first_to_run():
    model = nn.Sequential(OrderedDict(scale=nn.Identity(), norm=nn.BatchNorm2d(3), stem=nn.Conv2d(3, 4, 1)))
    quantize_model(model, QuantSettings())
    assert measure_model(model, torch.randn(1, 3, 4, 4)).entry_layers == ["stem"]


class TimmLike(nn.Module):
    """A timm-style model with a ``pretrained_cfg`` naming its classifier(s)."""

    def __init__(self, classifier) -> None:
        super().__init__()
        self.pretrained_cfg = {"classifier": classifier}
        self.stem = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
        self.aux = nn.Linear(4, 3)
        self.tail = nn.Linear(3, 3)  # runs last, but is not a classifier

    def forward(self, x):
        x = self.stem(x)
        return self.tail(self.head(x) + self.aux(x))


@pytest.mark.parametrize(
    ("classifier", "expected"),
    [
        ("aux", ["aux"]),
        (("aux", "head.2"), ["head.2", "aux"]),  # execution order, not the config's
        ("head", ["head.2"]),  # a module holding several layers: the last of them to run
        ("missing", ["tail"]),  # nothing quantized there: the last layer to run
    ],
)
def test_exit_layers_follow_the_timm_classifier_config(classifier, expected):
    model = TimmLike(classifier)
    quantize_model(model, QuantSettings())
    assert measure_model(model, torch.randn(1, 4)).exit_layers == expected


def test_exit_layers_of_a_wrapped_timm_model_carry_the_prefix():
    wrapper = nn.Sequential(OrderedDict(net=TimmLike(("aux",)), out=nn.Identity()))
    quantize_model(wrapper, QuantSettings())
    assert measure_model(wrapper, torch.randn(1, 4)).exit_layers == ["net.aux"]


def test_measure_layers_on_a_timm_vit_counts_every_token():
    timm = pytest.importorskip("timm")
    assert "test_vit" in timm.list_models("test_*")
    model = timm.create_model("test_vit", pretrained=False).eval()
    reference = copy.deepcopy(model)
    names = quantize_model(model, QuantSettings(attention=False))  # the weight layers alone (matmuls: test_attention)
    float_names = [n for n, m in reference.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert names == float_names
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    specs = measure_layers(model, x)
    check_specs(specs, reference_specs(reference, names, x))
    by_name = {s.name: s for s in specs}
    tokens = (x.shape[-1] // 16) * (x.shape[-2] // 16) + 1  # patches + class token
    dim = reference.embed_dim
    qkv = by_name["blocks.0.attn.qkv"]
    assert qkv.macs == tokens * dim * 3 * dim
    assert qkv.act_in == tokens * dim
    fc1 = reference.blocks[0].mlp.fc1
    assert by_name["blocks.0.mlp.fc1"].macs == tokens * fc1.in_features * fc1.out_features
    assert by_name["head"].macs == reference.head.in_features * reference.head.out_features  # pooled: one token


# ------------------------------------------------------------------------------------------------ apply_plan
def test_apply_plan_sets_bits_and_modes():
    model = make_model()
    quantize_model(model, QuantSettings())
    plan = QuantPlan(measure_layers(model, torch.randn(1, 3, 8, 8)))
    plan.set_bits({"stem": (None, 8), "body.0": (4, None), "head": (2, 3)})
    apply_plan(model, plan)
    got = {n: (q.weight_quantizer.bits, q.input_quantizer.bits) for n, q in quant_layers(model).items()}
    assert got == {"stem": (None, 8), "body.0": (4, None), "head": (2, 3)}
    for layer in quant_layers(model).values():
        assert layer.weight_quantizer.mode == "quant" and layer.input_quantizer.mode == "quant"


def test_apply_plan_rejects_a_plan_for_other_layers():
    model = make_model()
    quantize_model(model, QuantSettings())
    specs = measure_layers(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="head"):
        apply_plan(model, QuantPlan(specs[:-1]))  # missing a layer
    other = make_model()
    quantize_model(other, QuantSettings(), lambda m, fqn: type(m) is nn.Conv2d)
    with pytest.raises(ValueError, match="head"):
        apply_plan(other, QuantPlan(specs))  # a layer the model does not have
    # Nothing was switched on by the failed calls.
    assert all(mode == "off" for _, mode in current_modes(model))


# --------------------------------------------------------------------------------------------- QuantSettings
@pytest.mark.parametrize(
    ("kwargs", "allowed"),
    [
        ({"weight_granularity": "per_group"}, ["per_channel", "per_tensor"]),
        ({"weight_observer": "percentile"}, ["minmax", "mse"]),
        ({"act_observer": "kl"}, ["minmax", "mse", "percentile"]),
        ({"act_observer": "percentile", "percentile": 20.0}, ["99.9"]),
    ],
)
def test_quant_settings_reject_bad_values_listing_allowed_ones(kwargs, allowed):
    with pytest.raises(ValueError) as err:
        QuantSettings(**kwargs)
    message = str(err.value)
    for word in allowed:
        assert word in message
    assert str(next(iter(kwargs.values()))) in message


def test_quant_settings_defaults_are_valid_and_frozen():
    settings = QuantSettings()
    assert settings.weight_granularity == "per_channel" and settings.act_observer == "minmax"
    with pytest.raises(AttributeError):
        settings.act_observer = "mse"


def test_quantizer_types_exported():
    model = make_model()
    quantize_model(model, QuantSettings())
    assert isinstance(model.stem.weight_quantizer, WeightQuantizer)
    assert isinstance(model.stem.input_quantizer, ActivationQuantizer)


def test_calibrate_records_the_input_range_and_leaves_every_quantizer_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    quantize_model(model, QuantSettings(act_observer="minmax"))
    batches = [torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8) * 2]
    assert calibrate(model, batches) == 5
    observer = model[0].input_quantizer.observer
    every = torch.cat(batches)
    assert float(observer.min_val) == float(every.min()) and float(observer.max_val) == float(every.max())
    assert {mode for _, mode in current_modes(model)} == {"off"}
