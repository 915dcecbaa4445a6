"""Counting a pruned model: nonzero weights per layer, and its plan with MACs, parameters and nonzero counts.

A structurally pruned model is just a smaller model: :func:`measure_pruned` measures it with the same code that builds
every run's plan (:func:`lit_mpq.quant.apply.measure_model`, on a fake-quantized copy), so its MACs and parameters are
counted exactly as a quantization run counts them. The unstructured zeros are recorded per row as
:attr:`~lit_mpq.plan.LayerSpec.nonzero_params`, which the sparsity-aware energy model
(:mod:`lit_mpq.energy.sparsity`) reads.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_mpq.plan import QuantPlan
from lit_mpq.pruning.layers import prunable_layers
from lit_mpq.quant.apply import QuantSettings, measure_model, quantize_model

__all__ = ["LayerSparsity", "annotate_nonzeros", "classifier_layers", "measure_pruned", "weight_sparsity"]


@dataclass(frozen=True)
class LayerSparsity:
    """Weights of one layer and how many of them are not zero.

    Attributes:
        name: Fully qualified module name.
        params: Weights (bias excluded).
        nonzero: Weights that are not exactly zero.
    """

    name: str
    params: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        """Fraction of the weights that are zero (0 for a layer without weights)."""
        return 1.0 - self.nonzero / self.params if self.params else 0.0


def _effective_weight(module: nn.Module) -> Tensor:
    # Under torch.nn.utils.prune (masks kept for fine-tuning) ``weight`` is recomputed from ``weight_orig * mask`` by a
    # forward pre-hook; compute it here so a count made before any forward pass is right.
    mask = getattr(module, "weight_mask", None)
    return module.weight_orig * mask if mask is not None else module.weight


@torch.no_grad()
def weight_sparsity(model: nn.Module) -> dict[str, LayerSparsity]:
    """Nonzero weights of every Conv2d/Linear layer of ``model``, by name, in model order.

    Example:
        >>> layer = nn.Linear(2, 2, bias=False)
        >>> _ = layer.weight.data.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
        >>> weight_sparsity(nn.Sequential(layer))["0"]
        LayerSparsity(name='0', params=4, nonzero=2)
    """
    counts = {}
    for name, module in prunable_layers(model).items():
        weight = _effective_weight(module)
        counts[name] = LayerSparsity(name, weight.numel(), int(torch.count_nonzero(weight)))
    return counts


def annotate_nonzeros(plan: QuantPlan, model: nn.Module) -> QuantPlan:
    """Record each row's nonzero weights, counted in ``model``, as its ``nonzero_params`` (in place).

    Args:
        plan: The model's plan (row names are module names of ``model``).
        model: The model, pruned or not.

    Returns:
        ``plan``. Rows without a Conv2d/Linear of that name (attention matmuls) are left as they are.

    Raises:
        ValueError: If a row's layer has another number of weights than the row says (the plan is of another model).
    """
    counts = weight_sparsity(model)
    for name, spec in list(plan.specs.items()):
        count = counts.get(name)
        if count is None:
            continue
        if count.params != spec.params:
            raise ValueError(
                f"layer {name!r} has {count.params} weights but its plan row says {spec.params}: the plan was measured "
                "on another model (measure it again after pruning)"
            )
        plan.specs[name] = dataclasses.replace(spec, nonzero_params=count.nonzero)
    return plan


def measure_pruned(model: nn.Module, example_input: Tensor) -> QuantPlan:
    """The plan of ``model`` (MACs, parameters, shapes per layer) with every row's nonzero weights recorded.

    The model is not changed: a fake-quantized copy is measured by :func:`lit_mpq.quant.apply.measure_model`.

    Args:
        model: The model, pruned or not.
        example_input: A batch of one (or more) input of the model's size, on the model's device.

    Returns:
        The plan, every row with ``nonzero_params`` set.
    """
    twin = copy.deepcopy(model).eval()
    quantize_model(twin, QuantSettings())
    return annotate_nonzeros(measure_model(twin, example_input), model)


def classifier_layers(model: nn.Module, example_input: Tensor) -> list[str]:
    """The classifier head(s) of ``model``: the plan's exit layers (see :func:`lit_mpq.quant.apply.measure_model`).

    Args:
        model: The model.
        example_input: A batch of one input of the model's size.

    Returns:
        Their fully qualified names, in execution order.
    """
    return measure_pruned(model, example_input).exit_layers
