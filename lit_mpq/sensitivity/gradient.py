"""Gradient-weighted sensitivity: the empirical-Fisher (second-order Taylor) estimate of the loss increase.

For a perturbation ``delta`` of a tensor ``t`` (its quantization error at ``b`` bits), the loss changes by about
``g . delta`` with ``g = dL/dt``; its expected square, with independent rounding errors, is
``sum_i g_i^2 delta_i^2`` (the diagonal empirical Fisher weighting of Kim et al., "Towards
Accurate Post-Training Quantization..." and of HAWQ's Fisher variants). One forward and one backward pass over the
calibration data give every layer and every candidate:

- activations: ``g`` is the exact per-image gradient of the layer's input, so the sum runs over images. It is the
  gradient through this layer's use of the input only: the input quantizer changes nothing else, even where the
  same tensor also feeds a residual shortcut or another layer;
- weights: ``g`` is the gradient of each batch's summed loss (per-image weight gradients would cost one backward
  per image), accumulated over batches. The tensor is the layer's effective weight, the kernel its forward
  multiplies the input with and its weight quantizer quantizes (the standardized weight of timm's ``StdConv2d``;
  the ``weight`` parameter itself for plain layers): ``g`` and ``delta`` must live in the same space.

An attention matmul's two operands are both activations, and both get the per-image input treatment (its ``"w"`` is
the right-hand operand, k or v).

The loss is the cross-entropy against the float model's own prediction, so no labels are needed and any image set
calibrates. The score is the sum divided by the number of images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.quant.apply import quant_layers, quantizers_mode
from lit_mpq.quant.operations import QuantOperation, is_quant_operation
from lit_mpq.sensitivity.output_error import SensitivityStats

ForwardFn = Callable[[Tensor], Tensor]


def probe_fisher(
    model: nn.Module,
    batches: Iterable[Tensor],
    candidates: list[int],
    forward: ForwardFn | None = None,
    kinds: tuple[str, ...] = ("w", "a"),
    subsample: int = 1,
) -> SensitivityStats:
    """Accumulate ``sum (g * delta_b)^2`` for every layer, candidate and tensor kind over ``batches``.

    Runs outside inference mode with gradients enabled whatever the caller's context; parameter gradients are
    cleared before and after, and ``requires_grad`` flags are restored.

    Args:
        model: Model prepared by :func:`~lit_mpq.quant.quantize_model`, activation quantizers calibrated.
        batches: Input tensors on the model's device.
        candidates: Bit widths to probe.
        forward: Callable running the model on a batch (default ``model``).
        kinds: ``"w"`` and/or ``"a"``.
        subsample: Use every ``subsample``-th image of each batch and scale the sums up: an unbiased estimate of
            the full sums at ``1 / subsample`` of the forward, backward and elementwise work; 1 is exact.
    """
    if subsample < 1:
        raise ValueError(f"subsample must be a positive integer (1 = exact), got {subsample}")
    layers = quant_layers(model)
    stats = SensitivityStats.empty(list(layers), candidates)
    run = forward or model
    kernels: dict[str, list[Tensor]] = {name: [] for name in layers}  # effective weights used in this batch
    scale = [1.0]  # images in the batch per image used, set per batch
    handles = []

    def make_input_hook(name: str):
        def pre_hook(layer: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
            x = args[0]
            if not x.requires_grad:
                return None
            # The layer's input quantizer changes only what this layer reads, so g must be the gradient that flows
            # back through this layer alone. x itself may feed other modules too (a residual block's input feeds
            # its shortcut; two layers may read one tensor), and its own gradient would sum all of them: the layer
            # is handed an alias of x, whose gradient comes from this one use (and this one call) only.
            alias = x.view_as(x)
            x_float = x.detach()

            def grad_hook(grad: Tensor) -> None:
                with torch.no_grad():
                    for bits in candidates:
                        delta = layer.input_quantizer.quantize(x_float, bits).sub_(x_float).mul_(grad)
                        stats.act_sq[name][bits] += float(torch.linalg.vector_norm(delta)) ** 2 * scale[0]

            alias.register_hook(grad_hook)
            return (alias, *args[1:])

        return pre_hook

    def make_operation_hook(name: str):
        def pre_hook(layer: QuantOperation, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
            # Every operand is an activation: each gets the per-image treatment of a layer input, through an alias
            # whose gradient is this operation's use of it only (k and v come out of one qkv tensor).
            operands = list(args)
            for position, kind in enumerate(layer.operands()):
                x = args[position]
                if kind not in kinds or not isinstance(x, Tensor) or not x.requires_grad:
                    continue
                alias = x.view_as(x)
                alias.register_hook(_grad_hook(layer.quantizer(kind), x.detach(), name, kind))
                operands[position] = alias
            return tuple(operands)

        return pre_hook

    def _grad_hook(quantizer, x_float: Tensor, name: str, kind: str):
        sums = (stats.weight_sq if kind == "w" else stats.act_sq)[name]

        def grad_hook(grad: Tensor) -> None:
            with torch.no_grad():
                for bits in candidates:
                    delta = quantizer.quantize(x_float, bits).sub_(x_float).mul_(grad)
                    sums[bits] += float(torch.linalg.vector_norm(delta)) ** 2 * scale[0]

        return grad_hook

    def make_kernel_hook(name: str):
        def hook(quantizer: nn.Module, inputs: tuple, output: Tensor) -> None:
            # With the quantizers off, the weight quantizer's output is the effective weight the layer hands to
            # conv2d/linear. A computed one (standardized) is a new tensor in every call: each call's gradient is
            # kept and summed. A plain layer's is its weight parameter, whose .grad already sums over calls, so a
            # tensor seen before is not added twice.
            if output.requires_grad and all(output is not seen for seen in kernels[name]):
                output.retain_grad()
                kernels[name].append(output)

        return hook

    requires_grad = {p: p.requires_grad for p in model.parameters()}
    with torch.inference_mode(False), torch.enable_grad(), quantizers_mode(model, "off"):
        for p in model.parameters():  # only the quantized weights need their gradients
            p.requires_grad_(False)
        operations = {name: layer for name, layer in layers.items() if is_quant_operation(layer)}
        weighted = {name: layer for name, layer in layers.items() if name not in operations}
        for layer in weighted.values():
            layer.weight.requires_grad_("w" in kinds)
        handles += [layer.register_forward_pre_hook(make_operation_hook(name)) for name, layer in operations.items()]
        if "a" in kinds:
            handles += [layer.register_forward_pre_hook(make_input_hook(name)) for name, layer in weighted.items()]
        if "w" in kinds:
            handles += [
                layer.weight_quantizer.register_forward_hook(make_kernel_hook(name)) for name, layer in weighted.items()
            ]
        try:
            for batch in batches:
                x = batch[::subsample].clone().requires_grad_(True)  # a normal tensor: autograd reaches layer 1
                scale[0] = batch.shape[0] / x.shape[0]
                logits = run(x)
                target = logits.detach().argmax(dim=-1)
                loss = F.cross_entropy(logits, target, reduction="sum")
                model.zero_grad(set_to_none=True)
                loss.backward()
                if "w" in kinds:
                    with torch.no_grad():
                        for name, layer in weighted.items():
                            # A layer the forward did not call, or whose output the loss does not depend on, has
                            # no gradient: its score does not change.
                            grads = [kernel.grad for kernel in kernels[name] if kernel.grad is not None]
                            if not grads:
                                continue
                            g = grads[0] if len(grads) == 1 else torch.stack(grads).sum(dim=0)
                            weight = kernels[name][0].detach()
                            for bits in candidates:
                                delta = layer.quantize_weight(bits) - weight
                                stats.weight_sq[name][bits] += float(((g * delta).double() ** 2).sum()) * scale[0]
                stats.num_samples += int(batch.shape[0])
                for captured in kernels.values():
                    captured.clear()
        finally:
            for handle in handles:
                handle.remove()
            model.zero_grad(set_to_none=True)
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
    return stats
