"""The integer-only targets: no float activation reaches a convolution, a Linear layer, a matmul, an add or the output.

The check is independent of how lit_mpq inserts its quantizers: a ``TorchFunctionMode`` watches every torch call of
a forward pass and follows each tensor's provenance. A tensor is *quantized* when an activation quantizer in
``quant`` mode with a width returned it, or when it came out of a quantized tensor through an operation that keeps
values on a grid (views, reshapes, indexing, ReLU, zero padding, max pooling, a multiplication by a constant). Every
activation argument of a convolution, Linear, matmul, fused attention or add, and the model's output, must be
quantized. An add with a parameter operand (a ViT's positional embedding) folds into the producing layer's
accumulator like a bias and is exempt. The same check on the lenient target must find the float adds and output,
which shows that it can fail.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.overrides import TorchFunctionMode

from lit_mpq.models.cifar_resnet import cifar_resnet20
from lit_mpq.quant.apply import QuantSettings, apply_plan, calibrate, measure_model, quantize_model, set_mode
from lit_mpq.quant.batchnorm import fold_batchnorm
from lit_mpq.quant.modules import ActivationQuantizer, WeightQuantizer

_CONSUMER_INPUTS = {F.conv2d: (0,), F.linear: (0,), F.scaled_dot_product_attention: (0, 1, 2)}
_BINARY = {"matmul", "__matmul__", "__rmatmul__", "bmm", "add", "__add__", "__radd__", "__iadd__", "add_"}
_ADDS = {"add", "__add__", "__radd__", "__iadd__", "add_"}
_KEEPS_GRID = {
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "contiguous", "expand", "__getitem__",
    "unbind", "split", "chunk", "squeeze", "unsqueeze", "relu", "relu_", "pad", "max_pool2d", "clone", "detach",
    "to", "float", "mT",
}  # fmt: skip


class ProvenanceCheck(TorchFunctionMode):
    """Records every float activation that reaches a consumer (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.quantized: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so ids are not reused)
        self.violations: list[str] = []
        self.depth = 0
        self.handles = []
        for module in model.modules():
            if isinstance(module, ActivationQuantizer | WeightQuantizer):
                self.handles.append(module.register_forward_pre_hook(self._enter))
                self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module, args):
        self.depth += 1

    def _leave(self, module, args, output):
        self.depth -= 1
        if isinstance(module, ActivationQuantizer) and module.mode == "quant" and module.bits is not None:
            self._mark(output)

    def _mark(self, value) -> None:
        if isinstance(value, torch.Tensor):
            self.quantized[id(value)] = value
        elif isinstance(value, tuple | list):
            for item in value:
                self._mark(item)

    def is_quantized(self, value) -> bool:
        return isinstance(value, torch.Tensor) and id(value) in self.quantized

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:  # inside a quantizer: its own arithmetic is not the network's
            return out
        name = getattr(func, "__name__", "")
        if func in _CONSUMER_INPUTS:
            for position in _CONSUMER_INPUTS[func]:
                if not self.is_quantized(args[position]):
                    self.violations.append(f"{name} argument {position}")
        elif name in _BINARY and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            constant = name in _ADDS and any(isinstance(a, nn.Parameter) for a in args[:2])
            if not constant:
                for position in (0, 1):
                    if not self.is_quantized(args[position]):
                        self.violations.append(f"{name} argument {position}")
        elif name in _KEEPS_GRID and args and self.is_quantized(args[0]):
            if name != "pad" or kwargs.get("value", args[3] if len(args) > 3 else 0.0) == 0.0:
                self._mark(out)
        elif name in ("mul", "__mul__", "__rmul__") and len(args) == 2:
            tensor, other = (args[0], args[1]) if isinstance(args[0], torch.Tensor) else (args[1], args[0])
            if self.is_quantized(tensor) and isinstance(other, int | float):  # a constant rescales the grid
                self._mark(out)
        return out

    def run(self, model: nn.Module, x: torch.Tensor) -> list[str]:
        try:
            with self, torch.no_grad():
                output = model(x)
            if not self.is_quantized(output):
                self.violations.append("the model's output")
        finally:
            for handle in self.handles:
                handle.remove()
        return self.violations


def _prepared(model: nn.Module, target: str, size: tuple[int, ...], bits: int = 4, **settings) -> nn.Module:
    model.eval()
    example = torch.zeros(1, *size)
    if QuantSettings(target=target).quant_target.fold_batchnorm:
        fold_batchnorm(model, example)
    quantize_model(model, QuantSettings(target=target, **settings))
    plan = measure_model(model, example)
    torch.manual_seed(0)
    calibrate(model, [torch.randn(4, *size)])
    plan.set_bits({name: (bits, bits) for name in plan})
    apply_plan(model, plan)
    model.plan = plan
    return model


@pytest.mark.parametrize("target", ["integer_only", "integer_only_pow2"])
def test_integer_only_resnet_feeds_no_float_activation_to_any_consumer(target):
    model = _prepared(cifar_resnet20(), target, (3, 32, 32))
    assert ProvenanceCheck(model).run(model, torch.randn(2, 3, 32, 32)) == []
    kinds = [model.plan.specs[name].kind for name in model.plan]
    assert kinds.count("add") == 9 and kinds.count("output") == 1  # 9 residual blocks, one output


def test_the_check_finds_the_float_adds_and_output_of_the_lenient_target():
    model = _prepared(cifar_resnet20(), "lenient", (3, 32, 32))
    violations = ProvenanceCheck(model).run(model, torch.randn(2, 3, 32, 32))
    assert violations.count("add argument 0") == 9  # bn2(conv2(.)) of every block
    assert "the model's output" in violations
    assert not any(v.startswith("conv2d") or v.startswith("linear") for v in violations)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_integer_only_deit_tiny_feeds_no_float_activation_to_any_consumer(fused):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    for block in model.blocks:
        block.attn.fused_attn = fused
    model = _prepared(model, "integer_only", (3, 224, 224), bits=8)
    assert ProvenanceCheck(model).run(model, torch.randn(1, 3, 224, 224)) == []
    adds = [name for name in model.plan if model.plan.specs[name].kind == "add"]
    assert adds == [f"blocks.{i}.add_{j}" for i in range(12) for j in range(2)]  # both residual adds of each block
    lenient = _prepared(timm.create_model("deit_tiny_patch16_224", pretrained=False), "lenient", (3, 224, 224), bits=8)
    violations = ProvenanceCheck(lenient).run(lenient, torch.randn(1, 3, 224, 224))
    assert len([v for v in violations if "add" in v]) >= 24 and "the model's output" in violations


def test_integer_only_model_computes_the_float_model_with_quantizers_off():
    torch.manual_seed(0)
    reference = cifar_resnet20().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding has something to do
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    strict = _prepared(copy.deepcopy(reference), "integer_only", (3, 32, 32))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in strict.modules())  # folded
    x = torch.randn(4, 3, 32, 32)
    set_mode(strict, weights="off", activations="off")
    with torch.no_grad():
        torch.testing.assert_close(strict(x), reference(x), rtol=1e-4, atol=1e-4)


def test_power_of_two_target_gives_exact_powers_of_two_for_every_scale():
    model = _prepared(cifar_resnet20(), "integer_only_pow2", (3, 32, 32))
    scales = []
    for module in model.modules():
        if hasattr(module, "weight_quantizer"):
            scales.append(module.weight_quantizer.qparams(module.effective_weight(), 4)[0])
        if isinstance(module, ActivationQuantizer):
            scales.append(module.qparams(module.bits)[0])
    assert len(scales) > 40
    for scale in scales:
        mantissa, _ = torch.frexp(scale)
        assert torch.all(mantissa == 0.5)  # x = 0.5 * 2^e exactly: a power of two


def test_power_of_two_target_refuses_non_uniform_quantizers():
    with pytest.raises(ValueError, match="softmax_quantizer 'log2'"):
        QuantSettings(target="integer_only_pow2", softmax_quantizer="log2")


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown quantization target 'integer'.*integer_only"):
        QuantSettings(target="integer")


def test_an_add_in_the_models_own_forward_is_a_clear_error():
    class TopLevelAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.raises(ValueError, match="model's own forward .* adds two activations"):
        quantize_model(TopLevelAdd(), QuantSettings(target="integer_only"))


def _one_quantizer_on(model: nn.Module, quantizer: ActivationQuantizer, bits: int) -> None:
    set_mode(model, weights="off", activations="off")
    quantizer.bits = bits
    quantizer.set_mode("quant")


@pytest.mark.parametrize("kind", ["a", "w"])
def test_output_error_of_an_add_operand_is_the_measured_change_of_the_adds_output(kind):
    from lit_mpq.sensitivity.output_error import probe_output_error

    model = _prepared(cifar_resnet20(), "integer_only", (3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    stats = probe_output_error(model, [x], [3, 4, 8], kinds=("w", "a"))
    name = "layer2.0.add_0"  # the down-sampling block: its shortcut operand is sliced and zero-padded
    add = model.get_submodule(name)
    outputs = {}
    add.register_forward_hook(lambda module, args, out: outputs.__setitem__("y", out))
    for bits in (3, 4, 8):
        set_mode(model, weights="off", activations="off")
        with torch.no_grad():
            model(x)
        float_out = outputs["y"]
        _one_quantizer_on(model, add.quantizer(kind), bits)  # brute force: quantize that operand alone, measure
        with torch.no_grad():
            model(x)
        measured = float(((outputs["y"] - float_out) ** 2).sum())
        probed = (stats.act_sq if kind == "a" else stats.weight_sq)[name][bits]
        assert probed == pytest.approx(measured, rel=1e-4)
    assert stats.weight_sq["output_quantizer"] == {3: 0.0, 4: 0.0, 8: 0.0}  # the output row has no second operand
    assert stats.act_sq["output_quantizer"][3] > stats.act_sq["output_quantizer"][8] > 0


def test_fisher_probe_scores_every_add_operand_and_the_output():
    from lit_mpq.sensitivity.gradient import probe_fisher

    model = _prepared(cifar_resnet20(), "integer_only", (3, 32, 32))
    stats = probe_fisher(model, [torch.randn(4, 3, 32, 32)], [2, 8])
    for name in model.plan:
        kind = model.plan.specs[name].kind
        if kind == "add":
            assert stats.act_sq[name][2] > stats.act_sq[name][8] > 0
            assert stats.weight_sq[name][2] > stats.weight_sq[name][8] > 0
        if kind == "output":
            assert stats.act_sq[name][2] > stats.act_sq[name][8] > 0
            assert stats.weight_sq[name] == {2: 0.0, 8: 0.0}


def test_add_and_output_rows_are_priced_by_hand():
    from lit_mpq.energy.models import DRAM_PJ_PER_BIT, FP32_ADD_PJ, INT8_ADD_PJ, HorowitzEnergyModel

    model = _prepared(cifar_resnet20(), "integer_only", (3, 32, 32))
    add = model.plan.specs["layer1.0.add_0"]
    assert (add.act_in, add.act_other, add.act_out, add.macs, add.params) == (16384, 16384, 16384, 0, 0)  # 16x32x32
    energy = HorowitzEnergyModel()
    terms = energy.layer(add, 4, 6)  # left operand at 6 bits, right (shortcut) at 4
    assert terms.act_mem_pj == pytest.approx((16384 * 6 + 16384 * 4) * DRAM_PJ_PER_BIT)
    assert terms.mac_pj == pytest.approx(16384 * INT8_ADD_PJ * 6 / 8)  # one add per element, as wide as the wider
    assert terms.weight_mem_pj == 0
    assert energy.layer(add, None, 8).mac_pj == pytest.approx(16384 * FP32_ADD_PJ)
    output = model.plan.specs["output_quantizer"]
    assert (output.act_in, output.macs) == (10, 0)
    assert energy.layer(output, None, 8).total_pj == pytest.approx(10 * 8 * DRAM_PJ_PER_BIT)


def test_first_last_pinning_pins_the_output_row_and_uniform_settings_skip_its_w_bits():
    from lit_mpq.allocation.pinning import pin_layers
    from lit_mpq.allocation.uniform import Uniform

    model = _prepared(cifar_resnet20(), "integer_only", (3, 32, 32))
    plan = model.plan
    assert pin_layers(plan, first_last_bits=8) == ["conv1", "linear", "output_quantizer"]
    assert plan.bits()["output_quantizer"] == (None, 8)
    allocation = Uniform(4, 4).allocate(plan)
    assert allocation["output_quantizer"] == (None, 4) and allocation["layer1.0.add_0"] == (4, 4)
    plan.set_bits({"output_quantizer": (6, 6)})  # an output row has no w_bits, whatever a policy says
    assert plan.bits()["output_quantizer"] == (None, 6)
