"""Cross-layer equalization: rescale the channels between two consecutive layers so both see the same weight range.

The method of Nagel et al., ICCV 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction".
A ReLU is positively homogeneous, ``relu(x / s) = relu(x) / s`` for ``s > 0``, so for a layer ``A`` whose output feeds
(through ReLUs, or directly) only a layer ``B``, dividing ``A``'s output channel ``i`` (its weights and bias) by
``s_i`` and multiplying ``B``'s input channel ``i`` by ``s_i`` leaves the network's function unchanged. With
``r1_i`` the range of ``A``'s output channel ``i`` and ``r2_i`` the range of ``B``'s input channel ``i``, the paper's
``s_i = sqrt(r1_i / r2_i)`` makes both ranges ``sqrt(r1_i · r2_i)``: a per-tensor weight grid then fits every
channel about equally; with per-channel weights only ``B`` (whose output rows mix the input channels) and the
activation between the two (whose channels are rescaled by ``1 / s_i``) change. Chains of three or more layers
(depthwise-separable blocks) share a layer between two pairs, so the pairs are equalized in turn for a few
iterations, as in the paper (Brevitas runs 20).

:func:`equalization_pairs` finds the pairs from one forward with hooks on the leaf modules (a layer whose output
tensor reaches the other's input through ReLU, pooling, dropout and flatten modules only, read by no other module), then
checks each candidate on the example input: random positive channel scales must leave every other layer's output
unchanged, which catches a reader the hooks cannot see (a residual add in a ``forward``, a functional ``F.relu6``).
BatchNorm must be folded first (:func:`~lit_mpq.quant.batchnorm.fold_batchnorm`): an inference BatchNorm subtracts a
running mean, which does not commute with the scales.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["equalization_pairs", "equalize_cross_layer", "input_channel_ranges", "output_channel_ranges"]

# Modules a pair may pass through: positively homogeneous and channel-wise (an Identity is a folded BatchNorm; a
# Flatten keeps channels apart only after a 1x1 pooling, which the width check and the function check enforce).
_PASS_THROUGH = (
    nn.ReLU,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
)
_LAYERS = (nn.Conv2d, nn.Linear)


def output_channel_ranges(layer: nn.Module) -> Tensor:
    """``max |W|`` of each output channel of a Conv2d or Linear (shape ``[out]``)."""
    return layer.weight.detach().abs().flatten(1).amax(dim=1)


def _input_channel_view(layer: nn.Module) -> tuple[Tensor, int]:
    """``layer.weight`` as ``[groups, out_per_group, in_per_group, k]`` and ``in_per_group``."""
    weight = layer.weight
    groups = getattr(layer, "groups", 1)
    in_per_group = weight.shape[1]
    return weight.reshape(groups, weight.shape[0] // groups, in_per_group, -1), in_per_group


def input_channel_ranges(layer: nn.Module) -> Tensor:
    """``max |W|`` over the weights that read each input channel of a Conv2d (grouped too) or Linear (``[in]``)."""
    view, _ = _input_channel_view(layer)
    # [groups, in_per_group]: the max over a group's output rows and kernel taps; input channel c = g·in_pg + j.
    return view.detach().abs().amax(dim=(1, 3)).reshape(-1)


def _scale_pair(first: nn.Module, second: nn.Module, scales: Tensor) -> None:
    """Divide ``first``'s output channels by ``scales`` and multiply ``second``'s input channels by them, in place."""
    with torch.no_grad():
        first.weight.div_(scales.reshape((-1,) + (1,) * (first.weight.dim() - 1)))
        if first.bias is not None:
            first.bias.div_(scales)
        view, in_per_group = _input_channel_view(second)
        view.mul_(scales.reshape(view.shape[0], 1, in_per_group, 1))


def _run_eval(model: nn.Module, example_input: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(example_input)
    finally:
        model.train(was_training)


def equalization_pairs(model: nn.Module, example_input: Tensor, rtol: float = 1e-4) -> list[tuple[str, str]]:
    """``(first, second)`` layer names that can be equalized, in execution order.

    ``first``'s output reaches ``second``'s input through ReLU, pooling, dropout, flatten or identity modules only and
    nothing else reads it; the widths match (``first``'s output channels are ``second``'s input channels). Every pair
    is checked on ``example_input``: random channel scales in ``[0.5, 2]`` must change no other Conv2d/Linear output
    and not the model's output by more than ``rtol`` of its largest magnitude, so a reader outside the modules (a
    residual add) drops the pair.

    Args:
        model: The float model, BatchNorm already folded.
        example_input: One input batch (its values matter for the check; a random one is fine).
        rtol: Largest change allowed by the check.

    Returns:
        The pairs, in the order their second layer runs.
    """
    produced_by: dict[int, str] = {}
    consumers: dict[int, list[str]] = {}
    inputs_of: dict[str, int] = {}
    blocked: set[int] = set()  # tensors changed in place by a module that does not commute with the scales
    order: list[str] = []
    leaves = {
        name: m for name, m in model.named_modules() if name and (isinstance(m, _LAYERS) or not list(m.children()))
    }
    keep_alive: list[Tensor] = []  # ids are only unique while the tensors live

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                return
            if output is args[0]:  # nn.Identity, or an in-place activation: the same tensor flows on
                if not isinstance(module, _PASS_THROUGH):
                    blocked.add(id(output))
                return
            consumers.setdefault(id(args[0]), []).append(name)
            inputs_of[name] = id(args[0])
            produced_by[id(output)] = name
            keep_alive.extend((args[0], output))
            order.append(name)

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in leaves.items()]
    try:
        _run_eval(model, example_input)
    finally:
        for handle in handles:
            handle.remove()

    def sole_reader(tensor_id: int) -> bool:
        return len(consumers.get(tensor_id, [])) == 1 and tensor_id not in blocked

    candidates: list[tuple[str, str]] = []
    for second in order:
        if not isinstance(leaves[second], _LAYERS) or any(second == s for _, s in candidates):
            continue
        tensor_id = inputs_of[second]
        source = produced_by.get(tensor_id)
        while source is not None and isinstance(leaves[source], _PASS_THROUGH) and sole_reader(tensor_id):
            tensor_id = inputs_of[source]
            source = produced_by.get(tensor_id)
        if source is None or not isinstance(leaves[source], _LAYERS) or not sole_reader(tensor_id):
            continue
        second_layer = leaves[second]
        if leaves[source].weight.shape[0] != second_layer.weight.shape[1] * getattr(second_layer, "groups", 1):
            continue
        candidates.append((source, second))
    return [pair for pair in candidates if _function_preserved(model, pair, example_input, rtol)]


def _function_preserved(model: nn.Module, pair: tuple[str, str], example_input: Tensor, rtol: float) -> bool:
    """Whether random channel scales on ``pair`` leave every other layer's output and the model's output unchanged.

    Every Conv2d/Linear output is compared, not only the model's: saturating activations (ReLU6, a sigmoid gate) can
    hide a changed tensor from the final output on one example, but not from the layer that reads it next.
    """
    first, second = model.get_submodule(pair[0]), model.get_submodule(pair[1])
    generator = torch.Generator().manual_seed(0)
    scales = (2.0 ** (torch.rand(first.weight.shape[0], generator=generator) * 2 - 1)).to(first.weight)
    params = [p for p in (first.weight, first.bias, second.weight) if p is not None]
    saved = [p.detach().clone() for p in params]
    runs: list[dict[str, Tensor]] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            runs[-1][name] = output.detach().clone()

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, _LAYERS) and name != pair[0]
    ]
    try:
        runs.append({})
        runs[-1]["<output>"] = _run_eval(model, example_input)
        _scale_pair(first, second, scales)
        runs.append({})
        runs[-1]["<output>"] = _run_eval(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for param, value in zip(params, saved, strict=True):
                param.copy_(value)
    before, after = runs
    for name, reference in before.items():
        changed = after.get(name)
        if changed is None or changed.shape != reference.shape:
            return False
        if not float((changed - reference).abs().max()) <= rtol * float(reference.abs().max()) + 1e-6:
            return False
    return True


def equalize_cross_layer(
    model: nn.Module, example_input: Tensor, iterations: int = 20, pairs: list[tuple[str, str]] | None = None
) -> list[tuple[str, str]]:
    """Equalize the weight ranges of every equalizable pair of consecutive layers, in place.

    Each iteration visits the pairs in order and sets ``s_i = sqrt(r1_i / r2_i)`` (channels where either range is
    zero keep ``s_i = 1``). Disjoint pairs are exact after one iteration; pairs that share a layer converge over the
    iterations.

    Args:
        model: The float model, BatchNorm already folded.
        example_input: One input batch, used to find and check the pairs.
        iterations: Passes over the pairs.
        pairs: The pairs, when already known (:func:`equalization_pairs`).

    Returns:
        The equalized pairs.

    Raises:
        ValueError: If ``iterations`` is below 1.
    """
    if iterations < 1:
        raise ValueError(f"cross-layer equalization needs at least one iteration, got {iterations}")
    if pairs is None:
        pairs = equalization_pairs(model, example_input)
    for _ in range(iterations):
        for first_name, second_name in pairs:
            first, second = model.get_submodule(first_name), model.get_submodule(second_name)
            r1, r2 = output_channel_ranges(first), input_channel_ranges(second)
            usable = (r1 > 0) & (r2 > 0)
            scales = torch.where(usable, torch.sqrt(r1 / torch.where(usable, r2, 1.0)), torch.ones_like(r1))
            _scale_pair(first, second, scales)
    return pairs
