"""BatchNorm folding: merge each BatchNorm that directly follows a Conv2d or Linear into that layer's weight and bias.

Integer hardware never runs an inference-mode BatchNorm: ``γ (Wx + b - μ) / √(σ² + ε) + β`` is an affine map per
output channel, so deployments fold it into the layer before quantizing (``W' = W γ/√(σ²+ε)``, TensorRT, ONNX Runtime's
quantizer, AIMET and Brevitas all do). Quantizing the folded weight is what the hardware sees: the BatchNorm scale
widens or narrows each output channel's weight range, which per-tensor weight scales feel most.

:func:`fold_batchnorm` finds the pairs from one traced forward (a BatchNorm whose input tensor *is* the output
tensor of a Conv2d or Linear), folds them with PyTorch's own ``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``, puts
an ``nn.Identity`` where each BatchNorm was, and checks on a random input that the model still computes what it
computed: a convolution whose output also feeds something besides its BatchNorm cannot be folded, and the check
undoes the folding and names the pair instead of leaving a silently different model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

__all__ = ["BatchNormFoldError", "batchnorm_pairs", "fold_batchnorm"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class BatchNormFoldError(RuntimeError):
    """Folding changed the model's output: some folded layer's output was used elsewhere too."""


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _after_fold(norm: nn.Module) -> nn.Module:
    """What is left of ``norm`` once its affine map is folded: nothing, or timm's fused dropout and activation."""
    # timm's BatchNormAct2d (EfficientNet, RegNet, ...) runs `act(drop(bn(x)))` in one module.
    tail = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if isinstance(m, nn.Module)]
    return nn.Sequential(*tail) if tail else nn.Identity()


def batchnorm_pairs(model: nn.Module, example_input: Tensor) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` names where the BatchNorm's input is the layer's output, in execution order.

    Only inference-mode BatchNorms with running statistics and a Conv2d (``groups`` and ``dilation`` included) or
    Linear of matching width count. One forward of ``example_input`` in eval mode finds them.
    """
    outputs: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    modules = dict(model.named_modules())
    handles = []

    def layer_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if isinstance(output, Tensor):
                outputs[id(output)] = name

        return hook

    def norm_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            source = outputs.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
            if source is None or module.running_mean is None or any(name == bn for _, bn in pairs):
                return
            layer = modules[source]
            width = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            if width == module.num_features and not any(source == lay for lay, _ in pairs):
                pairs.append((source, name))

        return hook

    for name, module in modules.items():
        if isinstance(module, nn.Conv2d | nn.Linear):
            handles.append(module.register_forward_hook(layer_hook(name)))
        elif isinstance(module, _BATCHNORMS):
            handles.append(module.register_forward_pre_hook(norm_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return pairs


def fold_batchnorm(model: nn.Module, example_input: Tensor, rtol: float = 1e-4) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a Conv2d or Linear into it, in place.

    The folded layer keeps its class (it is a copy with the folded ``weight`` and a ``bias``); each BatchNorm becomes
    ``nn.Identity`` (timm's ``BatchNormAct2d``: its dropout and activation). A folded model computes what the
    original computes in eval mode only: it must not be trained with batch statistics any more.

    Args:
        model: The float model (before quantizers are inserted).
        example_input: One input batch of the model's shape (its values do not matter).
        rtol: Largest change of the output allowed, relative to the output's largest magnitude.

    Returns:
        The folded ``(layer, batchnorm)`` name pairs, in execution order.

    Raises:
        BatchNormFoldError: If the folded model's output differs from the original's by more than ``rtol``; the
            model is restored first.
    """
    pairs = batchnorm_pairs(model, example_input)
    if not pairs:
        return []
    was_training = model.training
    model.eval()
    probe = torch.randn_like(example_input)
    with torch.no_grad():
        before = model(probe)
    originals = []
    for layer_name, norm_name in pairs:
        layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
        fused = fuse_conv_bn_eval(layer, norm) if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval(layer, norm)
        originals.append((layer_name, layer, norm_name, norm))
        parent, child = _parent(model, layer_name)
        setattr(parent, child, fused)
        parent, child = _parent(model, norm_name)
        setattr(parent, child, _after_fold(norm))
    with torch.no_grad():
        after = model(probe)
    model.train(was_training)
    error = float((after - before).abs().max())
    bound = rtol * float(before.abs().max()) + 1e-6
    if not error <= bound:  # also catches NaN
        for layer_name, layer, norm_name, norm in reversed(originals):
            for name, module in ((layer_name, layer), (norm_name, norm)):
                parent, child = _parent(model, name)
                setattr(parent, child, module)
        raise BatchNormFoldError(
            f"folding {len(pairs)} BatchNorm layers changed the output by {error:.3g} (allowed {bound:.3g}): a layer "
            f"followed by a BatchNorm also feeds something else (pairs: {pairs[:3]}...); nothing was folded. Set "
            "fold_batchnorm: false for this model."
        )
    return pairs
