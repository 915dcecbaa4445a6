"""Output-error sensitivity: how far each layer's output moves when its weights or inputs are quantized.

The seed projects' metric, ``S_l(b) = ||y_l^full - y_l^quant(b)||_2``, summed over the calibration set. One
float forward pass of the network gives every layer's float input ``x`` and output ``y``; for each candidate
bit width the layer is recomputed once with quantized weights and once with a quantized input, so all layers x
all candidates cost one pass plus the layers' own work per candidate. The float output norm ``||y_l||_2`` is
kept too, for the normalized variant ``S_l(b) / ||y_l||``.

An attention matmul ``a @ b`` (:class:`~lit_mpq.quant.attention.QuantMatmul`) is linear in each operand, so its errors
are ``(Q(a) - a) @ b`` for its left operand (``"a"``) and ``a @ (Q(b) - b)`` for its right one (``"w"``).

Layers are recomputed through their own quantization API, so subclasses of the float layers get the numbers of
their real quantized forward: the weight perturbation is ``quantize_weight(b) - effective_weight()`` (the
standardized kernel of timm's ``StdConv2d``, say), and a convolution sees ``pad_input(x)`` (timm's dynamic SAME
padding) as its forward does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.quant.apply import quant_layers, quantizers_mode
from lit_mpq.quant.operations import QuantOperation, is_quant_operation

ForwardFn = Callable[[Tensor], Tensor]


def _apply(layer: nn.Module, x: Tensor, weight: Tensor, subsample: int) -> Tensor:
    """The layer's map of its input ``x`` with kernel ``weight``, no bias, at every ``subsample``-th output position.

    ``x`` is what the layer's ``forward`` receives; padding the layer adds itself (timm's SAME convolutions) is added
    here, so the convolution sees what it sees in the forward. A convolution with ``subsample`` times its stride
    computes exactly the outputs at positions ``0, k, 2k, ...`` of the full one; for a Linear over tokens
    (``[batch, tokens, features]``) every ``subsample``-th token is used.
    """
    if isinstance(layer, nn.Conv2d):
        x = layer.pad_input(x)
        if subsample == 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return layer._conv_forward(x, weight, None)
        stride = tuple(s * subsample for s in layer.stride)
        return F.conv2d(x, weight, None, stride, layer.padding, layer.dilation, layer.groups)
    if subsample > 1 and x.dim() > 2:
        x = x[:, ::subsample]
    return F.linear(x, weight)


def _positions(t: Tensor, layer: nn.Module) -> int:
    """Output positions per image: spatial size of a convolution output, tokens of a Linear over tokens."""
    if isinstance(layer, nn.Conv2d):
        return t.shape[-1] * t.shape[-2]
    return t[0].numel() // t.shape[-1] if t.dim() > 2 else 1


def _weight_perturbation_outputs(
    layer: nn.Module, x: Tensor, deltas: list[Tensor], subsample: int = 1
) -> Tensor | list[Tensor]:
    """``f(x, delta)`` for every delta without bias: one call with the deltas stacked as output channels."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:  # stacking would mix groups: one call per candidate
        return [_apply(layer, x, d, subsample) for d in deltas]
    return _apply(layer, x, torch.cat(deltas), subsample)


def _input_perturbation_outputs(layer: nn.Module, deltas: Tensor, weight: Tensor, subsample: int = 1) -> Tensor:
    """``f(delta, W)`` without bias for inputs stacked along the batch dimension.

    Padding a perturbation pads it with zeros, which is the perturbation of the padded input: the layer quantizes its
    input before padding, and zero is always a quantization level.
    """
    return _apply(layer, deltas, weight, subsample)


@dataclass
class SensitivityStats:
    """Per-layer, per-candidate sums from a probe, mergeable across ranks by summation.

    Every metric accumulates a sum over the calibration images: squared output errors (output metrics), squared
    gradient-weighted perturbations (Fisher), or KL divergences (end to end).

    Attributes:
        weight_sq: ``{layer: {bits: sum for quantized weights}}``.
        act_sq: ``{layer: {bits: sum for a quantized input}}``.
        output_sq: ``{layer: sum of squared float outputs}`` (for normalisation; zeros when unused).
        num_samples: Images seen.
    """

    weight_sq: dict[str, dict[int, float]] = field(default_factory=dict)
    act_sq: dict[str, dict[int, float]] = field(default_factory=dict)
    output_sq: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0

    def scores(self, transform: str = "sqrt") -> dict[str, dict[str, dict[int, float]]]:
        """``{layer: {"w": {bits: S}, "a": {bits: S}}}`` from the sums.

        Args:
            transform: ``"sqrt"`` (an L2 norm: ``sqrt(sum)``), ``"normalized"`` (``sqrt(sum) / ||y||``) or
                ``"mean"`` (``sum / num_samples``, a per-image expectation).
        """
        result = {}
        for name in self.weight_sq:
            if transform == "mean":
                convert = lambda v: v / max(self.num_samples, 1)  # noqa: E731
            else:
                denom = (self.output_sq[name] ** 0.5 or 1.0) if transform == "normalized" else 1.0
                convert = lambda v, d=denom: (max(v, 0.0) ** 0.5) / d  # noqa: E731
            result[name] = {
                "w": {b: convert(v) for b, v in self.weight_sq[name].items()},
                "a": {b: convert(v) for b, v in self.act_sq[name].items()},
            }
        return result

    @classmethod
    def empty(cls, names: list[str], candidates: list[int]) -> SensitivityStats:
        """Zero sums for ``names`` x ``candidates``."""
        return cls(
            weight_sq={n: dict.fromkeys(candidates, 0.0) for n in names},
            act_sq={n: dict.fromkeys(candidates, 0.0) for n in names},
            output_sq=dict.fromkeys(names, 0.0),
        )

    def as_tensor(self, names: list[str], candidates: list[int]) -> Tensor:
        """Pack into one float64 tensor (for an all-reduce)."""
        rows = [
            [*(self.weight_sq[n][b] for b in candidates), *(self.act_sq[n][b] for b in candidates), self.output_sq[n]]
            for n in names
        ]
        flat = torch.tensor(rows, dtype=torch.float64).flatten()
        return torch.cat([flat, torch.tensor([float(self.num_samples)], dtype=torch.float64)])

    @classmethod
    def from_tensor(cls, packed: Tensor, names: list[str], candidates: list[int]) -> SensitivityStats:
        """Inverse of :meth:`as_tensor`."""
        k = len(candidates)
        table = packed[:-1].reshape(len(names), 2 * k + 1).tolist()
        stats = cls(num_samples=int(round(float(packed[-1]))))
        for name, row in zip(names, table, strict=True):
            stats.weight_sq[name] = dict(zip(candidates, row[:k], strict=True))
            stats.act_sq[name] = dict(zip(candidates, row[k : 2 * k], strict=True))
            stats.output_sq[name] = row[2 * k]
        return stats


@torch.no_grad()
def probe_output_error(
    model: nn.Module,
    batches: Iterable[Tensor],
    candidates: list[int],
    forward: ForwardFn | None = None,
    kinds: tuple[str, ...] = ("w", "a"),
    subsample: int = 1,
) -> SensitivityStats:
    """Accumulate every layer's output error for every candidate bit width over ``batches``.

    Activation quantizers must be calibrated already (their observers hold statistics). All quantizers are off
    during the probe, so each layer sees the float network's input.

    Args:
        model: Model prepared by :func:`~lit_mpq.quant.quantize_model`.
        batches: Input tensors (already on the model's device).
        candidates: Bit widths to probe.
        forward: Callable running the model on a batch (default ``model``).
        kinds: Which tensors to probe: ``"w"`` (weights) and/or ``"a"`` (input activations).
        subsample: Measure the perturbed outputs on every ``subsample``-th image of each batch and at every
            ``subsample``-th output row and column of a convolution (every ``subsample``-th token of a Linear over
            tokens), and scale the sums by the inverse fraction: an unbiased estimate of the full sums at about
            ``1 / subsample^3`` of the extra convolution work and ``1 / subsample`` of the elementwise work. 1 is
            exact.
    """
    if subsample < 1:
        raise ValueError(f"subsample must be a positive integer (1 = exact), got {subsample}")
    layers = quant_layers(model)
    stats = SensitivityStats.empty(list(layers), candidates)

    k = len(candidates)

    def operation_hook(name: str):
        def hook(layer: QuantOperation, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            # A matmul is linear in each operand, an add passes a change through: the output error of quantizing one
            # operand is the operation's response to that operand's error alone (operand_error).
            if not all(isinstance(x, Tensor) for x in inputs):
                return
            stats.output_sq[name] += float(torch.linalg.vector_norm(output.float())) ** 2
            images = inputs[0].shape[0] / inputs[0][::subsample].shape[0]
            operands = tuple(x[::subsample] for x in inputs)
            for kind, sums in (("w", stats.weight_sq[name]), ("a", stats.act_sq[name])):
                if kind not in kinds:
                    continue
                if kind not in layer.operands():  # the output row has no right-hand operand: its score stays 0
                    continue
                x = operands[0 if kind == "a" else 1]
                quantizer = layer.quantizer(kind)
                for bits in candidates:
                    error = layer.operand_error(kind, quantizer.quantize(x, bits) - x, operands)
                    sums[bits] += float(torch.linalg.vector_norm(error)) ** 2 * images

        return hook

    def make_hook(name: str):
        def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x, y = inputs[0], output
            stats.output_sq[name] += float(torch.linalg.vector_norm(y.float())) ** 2
            # With subsampling, every k-th image (and below, every k-th output row/column or token) stands for all.
            images = x.shape[0] / x[::subsample].shape[0]
            x = x[::subsample]
            # The kernel the layer's forward multiplies with (standardized for timm's StdConv2d): the weight
            # quantizer perturbs it, not the raw parameter.
            weight = layer.effective_weight()
            # The layer is linear in its weight and in its input, so the output error of a perturbation is the
            # layer applied to the perturbation alone (bias excluded); all candidates go through one batched call,
            # and the squared errors of all candidates are reduced in one pass.
            if "w" in kinds:
                deltas = [layer.quantize_weight(b) - weight for b in candidates]
                errors = _weight_perturbation_outputs(layer, x, deltas, subsample)  # [batch, k * out, ...] or a list
                if isinstance(errors, list):
                    sums = [float(torch.linalg.vector_norm(e)) ** 2 for e in errors]
                else:
                    channel_dim = 1 if isinstance(layer, nn.Conv2d) else errors.dim() - 1
                    per_candidate = errors.unflatten(channel_dim, (k, -1)).movedim(channel_dim, 0).reshape(k, -1)
                    sums = (torch.linalg.vector_norm(per_candidate, dim=1) ** 2).tolist()
                sampled = errors[0] if isinstance(errors, list) else errors
                scale = images * _positions(y, layer) / _positions(sampled, layer)
                for bits, value in zip(candidates, sums, strict=True):
                    stats.weight_sq[name][bits] += value * scale
            if "a" in kinds:
                deltas = torch.empty((k, *x.shape), dtype=x.dtype, device=x.device)
                for i, bits in enumerate(candidates):
                    torch.sub(layer.input_quantizer.quantize(x, bits), x, out=deltas[i])
                errors = _input_perturbation_outputs(layer, deltas.flatten(0, 1), weight, subsample)
                scale = images * _positions(y, layer) / _positions(errors, layer)
                sums = (torch.linalg.vector_norm(errors.reshape(k, -1), dim=1) ** 2).tolist()
                for bits, value in zip(candidates, sums, strict=True):
                    stats.act_sq[name][bits] += value * scale

        return hook

    run = forward or model
    handles = [
        layer.register_forward_hook((operation_hook if is_quant_operation(layer) else make_hook)(name))
        for name, layer in layers.items()
    ]
    try:
        with quantizers_mode(model, "off"):
            for batch in batches:
                run(batch)
                stats.num_samples += int(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return stats


OutputErrorStats = SensitivityStats
"""Former name of :class:`SensitivityStats`."""
