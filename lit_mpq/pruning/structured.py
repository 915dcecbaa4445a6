"""Structured channel pruning with torch-pruning: remove whole output channels, and every input that reads them.

Removing an output channel of a convolution changes every layer that consumes it: the following BatchNorm, the next
convolution's input channels, a residual addition and every other branch feeding it. torch-pruning (G. Fang et al.,
"DepGraph: Towards Any Structural Pruning", CVPR 2023) traces the model once into a dependency graph and prunes such
coupled channels together as a *group*. :func:`prune_channels` ranks the channels of each group by the L1 norm of
their weights summed over the group (``MagnitudePruner``-style ``MagnitudeImportance(p=1)``) and removes the
``amount`` fraction with the smallest norm:

* ``scope="layer"``: the same fraction in every group (torch-pruning's default, ``global_pruning=False``);
* ``scope="global"``: channels ranked across all groups together, so some groups lose more than others.

The result is a smaller dense model; its MACs and parameters are measured like any model's
(:func:`lit_mpq.pruning.counting.measure_pruned`). The classifier's outputs are the classes and must never be pruned:
the caller passes it in ``ignored_layers`` (the :class:`~lit_mpq.callbacks.Pruning` callback does by default).

Layers whose output channels the graph cannot follow (a shortcut that zero-pads channels, as the CIFAR ResNets'
"option A" shortcut does) must be ignored too: the pruned model is run once on the example input, and a model that
no longer runs, or whose output changed shape, is an error that says so.

torch-pruning is an optional dependency (``pip install lit_mpq[prune]``); it is imported when first needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_mpq.pruning.layers import prunable_layers, select_layers
from lit_mpq.pruning.magnitude import SCOPES, check_amount

__all__ = ["ChannelChange", "prune_channels"]


@dataclass(frozen=True)
class ChannelChange:
    """One layer's channels before and after structured pruning.

    Attributes:
        name: Fully qualified module name.
        in_before: Input channels (features) before.
        in_after: Input channels after.
        out_before: Output channels (features) before.
        out_after: Output channels after.
    """

    name: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as err:  # an optional extra
        raise ImportError(
            "structured pruning needs torch-pruning: pip install 'torch-pruning>=1.5,<2' (or lit_mpq[prune])"
        ) from err
    return torch_pruning


def prune_channels(
    model: nn.Module,
    example_input: Tensor,
    amount: float,
    ignored_layers: Sequence[str] = (),
    scope: str = "layer",
) -> dict[str, ChannelChange]:
    """Remove the ``amount`` fraction of lowest-L1 channels of every prunable group of ``model``, in place.

    Args:
        model: The model (in eval mode for the trace; its mode is restored).
        example_input: A batch of one (or more) input of the model's size, on the model's device.
        amount: Fraction of the channels of each group (``scope="layer"``) or of all groups (``"global"``) to remove,
            in [0, 1).
        ignored_layers: Names or ``"re:<regex>"`` patterns of layers whose output channels are kept (the classifier
            always belongs here).
        scope: ``"layer"`` or ``"global"``.

    Returns:
        Every Conv2d/Linear layer's channels before and after, by name, in model order.

    Raises:
        ValueError: On an amount outside [0, 1), an unknown scope, or an ignored layer that does not exist.
        RuntimeError: If torch-pruning fails, or the pruned model no longer runs on ``example_input`` or its output
            changed shape: a layer whose channels the dependency graph cannot follow must be in ``ignored_layers``.
            The model may then be left partly pruned and unusable.
        ImportError: If torch-pruning is not installed.
    """
    amount = check_amount(amount)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is unknown: use one of {list(SCOPES)}.")
    before = {name: _channels(module) for name, module in prunable_layers(model).items()}
    kept = select_layers(model, ignored_layers)
    ignored = [module for name, module in prunable_layers(model).items() if name not in kept]
    if amount > 0:
        tp = _torch_pruning()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            reference = model(example_input)
        try:
            pruner = tp.pruner.MetaPruner(
                model,
                example_input,
                importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=amount,
                global_pruning=scope == "global",
                ignored_layers=ignored,
            )
            pruner.step()
            with torch.no_grad():
                output = model(example_input)
        except (RuntimeError, IndexError) as err:
            raise RuntimeError(
                f"channel pruning failed ({type(err).__name__}: {err}): a layer's output channels could not be "
                "followed through the graph (e.g. a shortcut that pads channels). Add the layers writing into it to "
                "ignored_layers"
            ) from err
        finally:
            model.train(was_training)
        if output.shape != reference.shape:
            raise RuntimeError(
                f"channel pruning changed the model's output shape from {tuple(reference.shape)} to "
                f"{tuple(output.shape)}: add the classifier to ignored_layers"
            )
    return {
        name: ChannelChange(name, *before[name][:1], _channels(module)[0], before[name][1], _channels(module)[1])
        for name, module in prunable_layers(model).items()
    }
