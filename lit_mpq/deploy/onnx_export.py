"""ONNX export of a quantized model with QuantizeLinear/DequantizeLinear pairs, and its evaluation in ONNX Runtime.

The exported graph is the QDQ ("quantize-dequantize") form ONNX Runtime's quantizer and TensorRT consume:

- each quantized weight is an **int8 initializer** holding the integer codes at their allocated width (a 2..8-bit
  code is an int8 value in ``[-2^(b-1), 2^(b-1) - 1]``), followed by ``DequantizeLinear`` with its per-channel
  (``axis=0``) or per-tensor scales; int8 is the container for every width because it is the one ONNX Runtime's
  integer kernels take on CPU (int4/uint4 tensors need opset 21 and run only in its weight-only ``MatMulNBits`` path);
- each quantized input is ``QuantizeLinear``/``DequantizeLinear`` in uint8 (asymmetric, zero point in
  ``[0, 2^b - 1]``) or int8 (symmetric), then, below 8 bits, ``Clip`` to the ``b``-bit grid's end levels: the 8-bit
  container then holds exactly the ``b``-bit grid's values;
- BatchNorm is folded when the run folded it (:mod:`lit_mpq.quant.batchnorm`), and the bias-correction shift is folded
  into the bias, as a deployment does;
- attention matmuls with plain affine quantizers get the same QDQ pair on both operands.

Quantizers whose levels are not one affine grid (logarithmic softmax levels, twin-uniform grids) are exported as
the float operations of their own fake-quantizer (:class:`SimulatedInput`); per-channel inputs (RepQ-ViT's
post-LayerNorm inputs, power-of-two channel factors) as torch's per-channel arithmetic (:class:`PerChannelInput`);
a RepQ-ViT-folded Linear as the int8 codes of ``W diag(r1)`` divided by ``r1``, with the bias the simulation uses.

:func:`onnx_model_for_export` builds the float module that torch's ONNX exporter (``torch.onnx.export``, the
``torch.export``-based one) turns into that graph: ``quantized_decomposed`` ops become ``QuantizeLinear`` and
``DequantizeLinear``. :func:`evaluate_onnx` runs the file in ONNX Runtime on CPU.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.deploy.checkpoint import QuantizedExportError, quantized_weight
from lit_mpq.quant.apply import quant_layers
from lit_mpq.quant.functional import quant_range
from lit_mpq.quant.layernorm import ChannelwiseActivationQuantizer
from lit_mpq.quant.modules import ActivationQuantizer, QuantConv2d, QuantLayerMixin
from lit_mpq.quant.operations import QuantOperation
from lit_mpq.quant.power_of_two import PowerOfTwoFactorQuantizer
from lit_mpq.quant.softmax import LogQuantizer

__all__ = [
    "QDQInput",
    "QDQWeight",
    "evaluate_onnx",
    "export_onnx",
    "missing_packages",
    "module_to_onnx",
    "onnx_model_for_export",
]

DEFAULT_OPSET = 18


def missing_packages(evaluate: bool = True) -> list[str]:
    """The packages ONNX export (and, with ``evaluate``, its evaluation) needs that are not installed."""
    import importlib.util

    needed = ["onnx", "onnxscript"] + (["onnxruntime"] if evaluate else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


def _decomposed_ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

    return torch.ops.quantized_decomposed


class QDQInput(nn.Module):
    """An input quantizer as ONNX has it: clip to the ``b``-bit range, QuantizeLinear, DequantizeLinear (8-bit).

    Args:
        scale: The per-tensor scale.
        zero_point: The zero point (0 for symmetric quantizers).
        bits: The width; the clip keeps values on its grid.
        symmetric: Signed (int8 container) or unsigned (uint8 container).
    """

    def __init__(self, scale: float, zero_point: int, bits: int, symmetric: bool) -> None:
        super().__init__()
        self.scale, self.zero_point, self.bits = float(scale), int(zero_point), bits
        self.qmin, self.qmax = quant_range(bits, symmetric)
        self.container = (-128, 127, torch.int8) if symmetric else (0, 255, torch.uint8)
        self.mode = "quant"  # read by the attention twin to choose its path

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        ops = _decomposed_ops()
        q = ops.quantize_per_tensor(x, self.scale, self.zero_point, *self.container)
        x = ops.dequantize_per_tensor(q, self.scale, self.zero_point, *self.container)
        if (self.qmin, self.qmax) != self.container[:2]:
            # After DequantizeLinear, not before QuantizeLinear: ONNX Runtime's QDQ fusions drop a Clip in front of a
            # QuantizeLinear (they take the container's saturation for it), which a b-bit grid is not. The bounds are
            # float32 products, as DequantizeLinear computes them, so the clip lands exactly on the end levels.
            scale = torch.tensor(self.scale, dtype=torch.float32)
            low = float(torch.tensor(float(self.qmin - self.zero_point), dtype=torch.float32) * scale)
            high = float(torch.tensor(float(self.qmax - self.zero_point), dtype=torch.float32) * scale)
            x = torch.clamp(x, low, high)
        return x

    def extra_repr(self) -> str:  # noqa: D102
        return f"bits={self.bits}, scale={self.scale:.4g}, zero_point={self.zero_point}"


class QDQWeight(nn.Module):
    """Integer weight codes (int8; uint8 for asymmetric weights) and the DequantizeLinear giving the kernel back."""

    def __init__(self, codes: Tensor, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool = True) -> None:
        super().__init__()
        self.container = (-128, 127, torch.int8) if symmetric else (0, 255, torch.uint8)
        dtype = self.container[2]
        self.register_buffer("codes", codes.to(dtype))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point.to(dtype))
        self.bits = bits

    def forward(self) -> Tensor:  # noqa: D102
        ops = _decomposed_ops()
        if self.scale.dim() == 1:
            return ops.dequantize_per_channel(self.codes, self.scale, self.zero_point, 0, *self.container)
        return ops.dequantize_per_tensor(self.codes, float(self.scale), int(self.zero_point), *self.container)


# torch's exporter does not always find onnxscript's own translations of these ops (onnxscript 0.7 dispatches on the
# input's dtype and misses them): these three map them onto the ONNX ops directly, with the buffers as they are
# (float32 scales, zero points in the codes' dtype), so nothing is cast in the graph.


def _zero_point(value: int, dtype: int):  # noqa: ANN202
    import onnx
    from onnxscript import opset18 as op

    if isinstance(dtype, torch.dtype):
        onnx_dtype = {torch.int8: onnx.TensorProto.INT8, torch.uint8: onnx.TensorProto.UINT8}[dtype]
    else:  # the exporter hands an onnx_ir DataType, whose values are TensorProto's
        onnx_dtype = int(dtype)
    return op.Constant(value=onnx.helper.make_tensor("zero_point", onnx_dtype, [], [int(value)]))


def _scale(value: float):  # noqa: ANN202
    import onnx
    from onnxscript import opset18 as op

    return op.Constant(value=onnx.helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [float(value)]))


def _quantize_per_tensor(input, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype):  # noqa: A002, ANN001, ANN202
    from onnxscript import opset18 as op

    return op.QuantizeLinear(input, _scale(scale), _zero_point(zero_point, dtype))


def _dequantize_per_tensor(input, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype, out_dtype=None):  # noqa: A002, ANN001, ANN202
    from onnxscript import opset18 as op

    return op.DequantizeLinear(input, _scale(scale), _zero_point(zero_point, dtype))


def _dequantize_per_channel(
    input, scales, zero_points, axis: int, quant_min: int, quant_max: int, dtype, out_dtype=None
):  # noqa: A002, ANN001, ANN202
    from onnxscript import opset18 as op

    return op.DequantizeLinear(input, scales, zero_points, axis=axis)


def _translations() -> dict:
    ops = _decomposed_ops()
    return {
        ops.quantize_per_tensor.default: _quantize_per_tensor,
        ops.dequantize_per_tensor.default: _dequantize_per_tensor,
        ops.dequantize_per_channel.default: _dequantize_per_channel,
    }


def module_to_onnx(module: nn.Module, example: Tensor, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``module`` (QDQ modules included) with a dynamic batch: input ``images``, output ``logits``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():  # the exporter narrates its steps as warnings and prints
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
            custom_translation_table=_translations(),
        )
    program.save(str(path))
    return path


class _QDQLayer(nn.Module):
    """A Conv2d or Linear with QDQ input and weight: what one quantized layer becomes in the ONNX graph."""

    def __init__(self, layer: QuantLayerMixin, weight: nn.Module | Tensor, input_qdq: nn.Module, bias: Tensor | None):
        super().__init__()
        self.float_layer = layer.to_float()
        del self.float_layer.weight  # the kernel comes from the codes
        self.float_layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.is_conv = isinstance(layer, QuantConv2d)
        self.pad = layer.pad_input
        self.input_qdq = input_qdq
        if isinstance(weight, nn.Module):
            self.weight_qdq = weight
        else:
            self.register_buffer("float_weight", weight.detach().clone())
            self.weight_qdq = None

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        weight = self.weight_qdq() if self.weight_qdq is not None else self.float_weight
        x = self.input_qdq(x)
        if self.is_conv:
            return self.float_layer._conv_forward(self.pad(x), weight, self.float_layer.bias)
        return F.linear(x, weight, self.float_layer.bias)


class SimulatedInput(nn.Module):
    """A quantizer without a QuantizeLinear form, exported as the float operations of its own fake-quantizer.

    Logarithmic softmax levels (``Log``/``Exp`` of the ratio to the scale, ``Round``, ``Where`` for the zero code) and
    twin-uniform grids (two ``Round``/``Clip`` branches and a ``Where``) become those ONNX ops: ONNX Runtime computes
    the levels the run used, in float, with no integer kernel behind them.
    """

    def __init__(self, quantizer: ActivationQuantizer) -> None:
        super().__init__()
        self.quantizer, self.bits, self.mode = quantizer, quantizer.bits, "quant"

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.quantizer.quantize(x, self.bits)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{type(self.quantizer).__name__}, bits={self.bits}, simulated in float"


class PerChannelInput(nn.Module):
    """Per-channel (last dimension) affine fake-quantization spelled out in float ops, as torch computes it.

    ``Mul`` by the reciprocal scale, ``Round``, ``Add``, ``Clip``, ``Sub``, ``Mul``.

    torch's exporter has no translation of ``fake_quantize_per_channel_affine`` below 8 bits, and a channel-wise
    QuantizeLinear along the last axis would divide where torch multiplies: these ops reproduce torch's rounding.
    """

    def __init__(self, scale: Tensor, zero_point: Tensor, bits: int, symmetric: bool) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("inverse", (1.0 / scale.detach().float()).clone())
        self.register_buffer("zero_point", zero_point.detach().float().clone())
        self.qmin, self.qmax = quant_range(bits, symmetric)
        self.bits, self.mode = bits, "quant"

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        q = torch.clamp(torch.round(x * self.inverse) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


def _input_qdq(name: str, quantizer: ActivationQuantizer) -> nn.Module:
    if quantizer.mode != "quant" or quantizer.bits is None:
        return nn.Identity()
    if quantizer.bits > 8:
        raise QuantizedExportError(f"{name}: {quantizer.bits}-bit inputs do not fit ONNX Runtime's 8-bit containers")
    if isinstance(quantizer, ChannelwiseActivationQuantizer | PowerOfTwoFactorQuantizer):
        scale, zero_point = quantizer.qparams(quantizer.bits)
        return PerChannelInput(scale, zero_point, quantizer.bits, quantizer.symmetric)
    uniform_softmax = isinstance(quantizer, LogQuantizer) and quantizer.is_uniform(quantizer.bits)
    if type(quantizer) is not ActivationQuantizer and not uniform_softmax:  # no single affine grid
        return SimulatedInput(quantizer)
    scale, zero_point = quantizer.qparams(quantizer.bits)
    return QDQInput(float(scale), int(zero_point), quantizer.bits, quantizer.symmetric)


class _ReparameterizedWeight(nn.Module):
    """A RepQ-ViT-folded Linear's kernel: the int8 codes of ``W diag(r1)``, dequantized, divided by ``r1``."""

    def __init__(self, weight: QDQWeight, r1: Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.register_buffer("r1", r1.detach().clone())

    def forward(self) -> Tensor:  # noqa: D102
        return self.weight() / self.r1


def onnx_model_for_export(model: nn.Module) -> nn.Module:
    """A copy of the quantized ``model`` in which every quantized layer is a QDQ layer (see the module docstring).

    Raises:
        QuantizedExportError: If a width is above 8 bits, or a weight cannot be represented exactly.
    """
    exported = copy.deepcopy(model).eval()
    for name, layer in quant_layers(exported).items():
        if isinstance(layer, QuantOperation):  # an attention matmul, a residual add, the network output
            if layer.other_quantizer is None:
                layer.input_quantizer = _input_qdq(name, layer.input_quantizer)
                continue
            layer.input_quantizer = _input_qdq(f"{name} (left operand)", layer.input_quantizer)
            layer.other_quantizer = _input_qdq(f"{name} (right operand)", layer.other_quantizer)
            continue
        quantizer = layer.weight_quantizer
        input_qdq = _input_qdq(name, layer.input_quantizer)
        bias = layer.bias.detach() if layer.bias is not None else None
        if quantizer.mode == "quant" and quantizer.bits is not None:
            if quantizer.bits > 8:
                raise QuantizedExportError(f"{name}: {quantizer.bits}-bit weights do not fit ONNX's int8 container")
            codes, scale, zero_point, shift, reparam_bias = quantized_weight(name, layer, quantizer.bits)
            weight = QDQWeight(codes, scale, zero_point, quantizer.bits, quantizer.symmetric)
            if reparam_bias is not None:  # the unfolded layer of the simulation: Q(W')/r1 and its bias, as computed
                weight = _ReparameterizedWeight(weight, layer._reparameterization(active=True).r1.to(layer.weight))
                bias = reparam_bias
            if shift is not None:
                bias = shift if bias is None else bias + shift
        else:
            weight = layer.effective_weight().detach()
        parent_name, _, child = name.rpartition(".")
        parent = exported.get_submodule(parent_name) if parent_name else exported
        setattr(parent, child, _QDQLayer(layer, weight, input_qdq, bias))
    return exported


def export_onnx(
    model: nn.Module, path: str | os.PathLike, input_size: tuple[int, ...], opset: int = DEFAULT_OPSET
) -> Path:
    """Export the quantized ``model`` to ``path`` as a QDQ ONNX graph with a dynamic batch dimension.

    Args:
        model: The fake-quantized model at its plan's widths (a run's, or one from a packed checkpoint).
        path: The ``.onnx`` file to write (parent folders are created).
        input_size: ``(C, H, W)`` of one image.
        opset: The ONNX opset (18: QuantizeLinear with per-axis scales, and every op torch emits for ViTs).

    Raises:
        QuantizedExportError: If a width is above 8 bits, or a weight cannot be represented exactly.
    """
    # Lightning runs its end-of-validation hooks under inference mode, whose tensors carry no version counter (the
    # weight caches key on it) and cannot be traced: the copy and the trace are made outside it.
    with torch.inference_mode(False), torch.no_grad():
        return _export(model, Path(path), input_size, opset)


def _export(model: nn.Module, path: Path, input_size: tuple[int, ...], opset: int) -> Path:
    exportable = onnx_model_for_export(model)
    device = next(exportable.parameters(), torch.empty(0)).device
    return module_to_onnx(exportable, torch.zeros(2, *input_size, device=device), path, opset)


EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
"""ONNX Runtime session entries under which it computes the exported graph as exported.

ORT fuses a 4-bit ``DequantizeLinear`` weight and its ``MatMul`` into ``MatMulNBits``, and at its default accuracy
level (4, ONNX Runtime 1.32) that kernel quantizes the *activations* to int8 on the fly: a DeiT-recipe test ViT then
moves its logits by 25 % of their size. Level 1 keeps the fused kernel and computes in float32: the logits are the
fake-quantized model's, bit for bit, on that test."""


def onnx_session(path: str | os.PathLike, threads: int | None = None, exact: bool = True):  # noqa: ANN201
    """An ONNX Runtime CPU session for ``path``; ``exact`` applies :data:`EXACT_SESSION_CONFIG`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (EXACT_SESSION_CONFIG if exact else {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def evaluate_onnx(
    path: str | os.PathLike, batches: Iterable[tuple[Tensor, Tensor]], threads: int | None = None, exact: bool = True
) -> dict:
    """Top-1 of the ONNX file in ONNX Runtime (CPU) over labelled ``(images, labels)`` batches.

    Args:
        path: The ``.onnx`` file (input ``images``, output ``logits``).
        batches: ``(images, labels)`` pairs.
        threads: Intra-op threads (default: ONNX Runtime's choice).
        exact: Run with :data:`EXACT_SESSION_CONFIG` (ORT's default otherwise).

    Returns:
        ``{"top1": percent, "images": count, "providers": [...], "session_config": {...}}``.
    """
    session = onnx_session(path, threads, exact)
    correct = total = 0
    for images, labels in batches:
        logits = session.run(["logits"], {"images": images.detach().cpu().float().numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(dim=1) == labels.cpu()).sum())
        total += int(labels.numel())
    return {
        "top1": 100.0 * correct / max(total, 1),
        "images": total,
        "providers": session.get_providers(),
        "session_config": dict(EXACT_SESSION_CONFIG if exact else {}),
    }
