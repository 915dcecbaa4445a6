"""Block-output search of the activation ranges: each block's clipping ranges chosen for its output, not its inputs.

An activation observer chooses a tensor's clipping range from that tensor alone (min/max, least squared error, a
percentile). At 4 bits what matters is what the rounding does to the block's output: a range that is best for a
tensor in isolation can be the wrong trade between clipping and rounding once a LayerNorm, a softmax, a GELU and a
residual connection have mixed it with the others. Block reconstruction (BRECQ, Li et al. ICLR 2021; QDrop, Wei et al.
ICLR 2022) learns the step sizes by gradient descent on the block's output error; lit_mpq searches the factor each
activation range is scaled by (the ``range_factors`` of :class:`~lit_mpq.quant.modules.ActivationQuantizer`, which
every activation quantizer honours: uniform, twin-uniform, logarithmic softmax levels, per-channel post-LayerNorm)
directly, derivative-free, so it works for every quantizer lit_mpq has, at the plan's widths:

.. code-block:: text

    for each block B, in execution order:
        X̃ = B's input in the quantized network (with the ranges of the blocks before B already chosen)
        Y = B with every quantizer off, applied to X̃        (target="float_block", the default)
          or B's output in the float network                (target="float_network")
        for round in 1..rounds, for each activation quantizer q inside B (at its plan width b_q):
            α_q = argmin over α in {α_q} ∪ grid of  ||B_α(X̃) - Y||²      (the others' factors fixed)

By default the target is the float block on the same quantized input: the block's own error. With the float
network's output as the target (the choice BRECQ makes) a block may also undo part of the error of the blocks before
it; on DeiT-Tiny with 4-bit activations that target lost 3.2 points where the block's own error gained 1.1 (32
images searched; docs/vit.md): the compensation fits the few images searched. The search never makes the block's
error worse:
the current factor is a candidate and ties keep it. It is per block, so its cost is a few hundred forward passes of
one block over ``max_images`` images, about as much as a dozen passes of the whole model.

Blocks are found by :func:`find_blocks` (the children of every ``Sequential`` / ``ModuleList`` whose children all hold
quantized layers, the innermost such: timm's transformer ``blocks.N``, a ResNet's residual blocks), or named.

Example:
    >>> import timm, torch
    >>> from lit_mpq.quant.apply import QuantSettings, quantize_model, measure_model, calibrate, apply_plan
    >>> model = timm.create_model("test_vit").eval()
    >>> _ = quantize_model(model, QuantSettings())
    >>> plan = measure_model(model, torch.zeros(1, 3, 32, 32))
    >>> _ = calibrate(model, [torch.randn(4, 3, 32, 32)])
    >>> plan.set_bits({name: (4, 4) for name in plan.names})
    >>> apply_plan(model, plan)
    >>> report = refine_block_ranges(model, [torch.randn(4, 3, 32, 32)], candidates=[0.8, 1.2], rounds=1)
    >>> [block.name for block in report.blocks][:1]
    ['blocks.0']
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_mpq.quant.apply import quantizers_mode
from lit_mpq.quant.modules import ActivationQuantizer, QuantLayerMixin, WeightQuantizer
from lit_mpq.quant.operations import QuantOperation

OBJECTIVES = ("mse", "channel_normalized")
TARGETS = ("float_network", "float_block")
DEFAULT_FACTORS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.05, 1.1, 1.2, 1.35, 1.5)
"""Range factors tried for every quantizer (times the observer's range), besides its current factor."""


@dataclasses.dataclass
class BlockSearch:
    """What the search did in one block.

    Attributes:
        name: The block's module name.
        factors: ``{quantizer name: factor}`` at its width, after the search (1 = the observer's range).
        error_before: Mean squared error of the block's output against the target, before the search.
        error_after: The same after (never above ``error_before``).
        seconds: Wall time of this block's search.
    """

    name: str
    factors: dict[str, float]
    error_before: float
    error_after: float
    seconds: float


@dataclasses.dataclass
class BlockRangeReport:
    """The search over every block: settings, images and per-block results."""

    blocks: list[BlockSearch]
    images: int
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the run record and the quantization card."""
        return {
            "settings": dict(self.settings),
            "images": self.images,
            "blocks": [dataclasses.asdict(block) for block in self.blocks],
        }


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the wanted block's input is stored."""


def _holds_quant_layers(module: nn.Module) -> bool:
    return any(isinstance(m, QuantLayerMixin | QuantOperation) for m in module.modules())


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's blocks: the children of each innermost container whose children all hold quantized layers.

    A container is an ``nn.Sequential`` or ``nn.ModuleList`` with at least two children; "innermost" drops a
    container whose blocks would contain another container's (so a ResNet stage's residual blocks are the blocks,
    not the stages). The order is the modules' registration order; :func:`refine_block_ranges` follows execution
    order.
    """
    containers = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Sequential | nn.ModuleList)
        and len(module) >= 2
        and all(_holds_quant_layers(child) for child in module)
    ]
    innermost = [c for c in containers if not any(o != c and o.startswith(f"{c}.") for o in containers)]
    modules = dict(model.named_modules())
    return [f"{c}.{child}" if c else child for c in innermost for child, _ in modules[c].named_children()]


def block_quantizers(block: nn.Module) -> dict[str, ActivationQuantizer]:
    """The activation quantizers inside ``block`` that quantize (mode ``quant``, a width set), by module name."""
    found: dict[str, ActivationQuantizer] = {}
    for name, module in block.named_modules():
        if isinstance(module, ActivationQuantizer) and module.mode == "quant" and module.bits is not None:
            found[name] = module
    return found


def _forward_chunks(module: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[Tensor]:
    return [module(*args, **kwargs) for args, kwargs in inputs]


def _squared_error(outputs: list[Tensor], targets: list[Tensor], channel_weights: Tensor | None) -> float:
    """Mean squared error over every element, each channel (last dimension) weighted by ``channel_weights``."""
    total = 0.0
    for output, target in zip(outputs, targets, strict=True):
        squared = (output.float() - target.float()).pow(2)
        total += float(squared.sum() if channel_weights is None else (squared * channel_weights).sum())
    count = sum(t.numel() for t in targets)
    return total / max(count, 1)


def _channel_weights(targets: list[Tensor], objective: str) -> Tensor | None:
    """``None`` for plain MSE; for ``"channel_normalized"`` the inverse of each output channel's float variance."""
    if objective == "mse":
        return None
    flat = torch.cat([t.float().reshape(-1, t.shape[-1]) for t in targets])
    return 1.0 / flat.var(dim=0, unbiased=False).clamp_min(1e-12)


def _gather_images(batches: Iterable[Any], max_images: int) -> Tensor:
    taken: list[Tensor] = []
    seen = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        x = x[: max_images - seen]
        taken.append(x)
        seen += int(x.shape[0])
        if seen >= max_images:
            break
    if not taken:
        raise ValueError("refine_block_ranges got no images: pass at least one calibration batch")
    return torch.cat(taken)


def _float_outputs(
    model: nn.Module, blocks: dict[str, nn.Module], chunks: list[Tensor], keep: bool
) -> tuple[list[str], dict]:
    """The blocks in the order they run and, when ``keep``, each block's output in the float network, per chunk."""
    outputs: dict[str, list[Tensor]] = {name: [] for name in blocks}
    order: list[str] = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if name not in order:
                order.append(name)
            if keep:
                outputs[name].append(output.detach())

        return hook

    handles = [block.register_forward_hook(make_hook(name)) for name, block in blocks.items()]
    try:
        with torch.no_grad(), quantizers_mode(model, "off"):
            for x in chunks if keep else chunks[:1]:  # the order alone needs one pass
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return order, outputs


def _quantized_inputs(model: nn.Module, block: nn.Module, chunks: list[Tensor]) -> list[tuple[tuple, dict]]:
    """The block's inputs in the quantized network as it stands, per chunk (each pass stops at the block)."""
    stored: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stored.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for x in chunks:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return stored


def refine_block_ranges(
    model: nn.Module,
    batches: Iterable[Any],
    blocks: Sequence[str] | None = None,
    candidates: Sequence[float] = DEFAULT_FACTORS,
    rounds: int = 2,
    max_images: int = 32,
    chunk_size: int = 16,
    objective: str = "mse",
    float_weights: bool = False,
    target: str = "float_block",
) -> BlockRangeReport:
    """Search every block's activation range factors for the least error of the block's output against its target.

    The model must be calibrated and carry its plan (quantizers in ``quant`` mode at their widths), with its weights
    as they will be evaluated (rounded, if a rounding method ran). Factors are stored at each quantizer's current
    width with :meth:`~lit_mpq.quant.modules.ActivationQuantizer.set_range_factor`, replacing any factor set there
    before (the search starts from it).

    Args:
        model: The quantized model, in eval mode.
        batches: Calibration batches (tensors, or tuples whose first item is the images); the first ``max_images``
            images are used.
        blocks: Module names of the blocks, in any order; default :func:`find_blocks`.
        candidates: Range factors tried for every quantizer besides its current one.
        rounds: Passes over a block's quantizers (the search stops early when a pass changes nothing).
        max_images: Images the errors are measured on.
        chunk_size: Images per forward pass (memory).
        objective: ``"mse"``, the mean squared error of the block's output, or ``"channel_normalized"``, each output
            channel's squared error divided by that channel's float variance (a transformer's residual stream has a
            few channels hundreds of times larger than the rest, which would otherwise decide alone).
        float_weights: Search with every weight quantizer off (the activations' error alone), e.g. before a
            data-driven rounding that will compensate the weights' error for the ranges chosen.
        target: ``"float_block"``, the float block applied to the same quantized input (the block's own error), or
            ``"float_network"``, the float network's output of the block (the block may then undo upstream error, as
            in BRECQ; on DeiT-Tiny at 4 bits that overfits the few images searched and loses accuracy: docs/vit.md).

    Returns:
        The per-block factors and errors.

    Raises:
        ValueError: On no images, a non-positive setting, a name that is not a module, or no blocks found.
    """
    if target not in TARGETS:
        raise ValueError(f"refine_block_ranges: target must be one of {TARGETS}, got {target!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"refine_block_ranges: objective must be one of {OBJECTIVES}, got {objective!r}")
    for label, value in (("rounds", rounds), ("max_images", max_images), ("chunk_size", chunk_size)):
        if value <= 0:
            raise ValueError(f"refine_block_ranges: {label} must be a positive integer, got {value}")
    if not candidates or any(not f > 0 for f in candidates):
        raise ValueError(f"refine_block_ranges: candidates must be positive factors, got {list(candidates)}")
    modules = dict(model.named_modules())
    names = list(blocks) if blocks is not None else find_blocks(model)
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(f"refine_block_ranges: no module named {unknown[:3]} in the model; blocks are module names")
    if not names:
        raise ValueError(
            "refine_block_ranges found no blocks (a Sequential or ModuleList whose children all hold quantized "
            "layers): name them with blocks=[...]"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    images = _gather_images(batches, max_images).to(device)
    chunks = list(images.split(chunk_size))
    was_training = model.training
    model.eval()
    results: list[BlockSearch] = []
    weight_modes = [(q, q.mode) for q in model.modules() if isinstance(q, WeightQuantizer)] if float_weights else []
    for quantizer, _ in weight_modes:
        quantizer.set_mode("off")
    try:
        keep = target == "float_network"  # the default target is computed per block, from the quantized inputs
        order, targets = _float_outputs(model, {name: modules[name] for name in names}, chunks, keep)
        for name in order:
            start = time.perf_counter()
            block = modules[name]
            quantizers = block_quantizers(block)
            inputs = _quantized_inputs(model, block, chunks)
            if target == "float_block":  # the block's own error only: its float output on the same quantized inputs
                with torch.no_grad(), quantizers_mode(block, "off"):
                    targets[name] = _forward_chunks(block, inputs)
            weights = _channel_weights(targets[name], objective)
            with torch.no_grad():

                def error() -> float:
                    return _squared_error(_forward_chunks(block, inputs), targets[name], weights)  # noqa: B023

                best = before = error()
                for _ in range(rounds):
                    changed = False
                    for quantizer in quantizers.values():
                        bits = quantizer.bits
                        current = quantizer.range_factors.get(bits, 1.0)
                        for factor in (f for f in candidates if f != current):
                            quantizer.set_range_factor(bits, factor)
                            trial = error()
                            if trial < best:
                                best, current, changed = trial, factor, True
                        quantizer.set_range_factor(bits, current)
                    if not changed:
                        break
            results.append(
                BlockSearch(
                    name=name,
                    factors={q_name: q.range_factors.get(q.bits, 1.0) for q_name, q in quantizers.items()},
                    error_before=before,
                    error_after=best,
                    seconds=time.perf_counter() - start,
                )
            )
    finally:
        for quantizer, mode in weight_modes:
            quantizer.set_mode(mode)
        model.train(was_training)
    settings = {
        "candidates": list(candidates),
        "rounds": rounds,
        "max_images": max_images,
        "objective": objective,
        "float_weights": float_weights,
        "target": target,
        "blocks": list(order),
    }
    return BlockRangeReport(blocks=results, images=int(images.shape[0]), settings=settings)
