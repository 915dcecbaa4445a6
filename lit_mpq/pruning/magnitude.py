"""Unstructured magnitude pruning with ``torch.nn.utils.prune``: zero the weights of smallest absolute value.

Two scopes:

* ``"global"``: the ``amount`` fraction of smallest ``|w|`` over all the selected layers' weights together
  (``prune.global_unstructured`` with ``L1Unstructured``), so layers with many small weights lose more;
* ``"layer"``: the ``amount`` fraction of smallest ``|w|`` in each selected layer separately
  (``prune.l1_unstructured``).

The number of weights zeroed is ``round(amount * n)`` (torch's rule), over ``n`` weights of all layers (global) or of
each layer. Biases are not pruned. By default the pruning is made permanent (``prune.remove``): the zeros are real
zeros in ``weight``, with no mask or hook left behind, so the model saves, copies and quantizes as a plain model (a
symmetric weight quantizer maps them to the zero code). With ``permanent=False`` the masks stay, and training keeps
the pruned weights at zero (fine-tuning); :func:`make_permanent` removes them afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.utils import prune

from lit_mpq.pruning.counting import LayerSparsity, weight_sparsity
from lit_mpq.pruning.layers import prunable_layers, select_layers

__all__ = ["SCOPES", "check_amount", "magnitude_prune", "make_permanent"]

SCOPES = ("global", "layer")
"""Where the smallest weights are ranked: over all selected layers together, or in each layer."""


def check_amount(amount: float, what: str = "amount") -> float:
    """Return ``amount`` as a float if it is a fraction in [0, 1); raise a ``ValueError`` naming the range otherwise."""
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0.0 <= float(amount) < 1.0:
        raise ValueError(
            f"{what}={amount!r} is not a pruning ratio: use a fraction in [0, 1), e.g. 0.5 to remove half "
            "(0 prunes nothing)."
        )
    return float(amount)


def magnitude_prune(
    model: nn.Module,
    amount: float,
    scope: str = "global",
    ignored_layers: Sequence[str] = (),
    permanent: bool = True,
) -> dict[str, LayerSparsity]:
    """Zero the ``amount`` fraction of smallest-magnitude weights of ``model``'s Conv2d/Linear layers, in place.

    Args:
        model: The model.
        amount: Fraction of the weights to zero, in [0, 1).
        scope: ``"global"`` (rank all selected weights together) or ``"layer"`` (each layer on its own).
        ignored_layers: Names or ``"re:<regex>"`` patterns of layers left dense.
        permanent: Remove the masks (``prune.remove``) so the zeros are plain zeros in ``weight``; ``False`` keeps
            the masks for fine-tuning.

    Returns:
        Nonzero weights per Conv2d/Linear layer after pruning (ignored layers included), by name.

    Raises:
        ValueError: On an amount outside [0, 1), an unknown scope, or an ignored layer that does not exist.

    Example:
        >>> import torch
        >>> layer = nn.Linear(4, 1, bias=False)
        >>> _ = layer.weight.data.copy_(torch.tensor([[0.1, -0.4, 0.3, -0.2]]))
        >>> _ = magnitude_prune(nn.Sequential(layer), 0.5)
        >>> (layer.weight != 0).int().tolist()
        [[0, 1, 1, 0]]
    """
    amount = check_amount(amount)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is unknown: use one of {list(SCOPES)}.")
    layers = select_layers(model, ignored_layers)
    if amount > 0 and layers:
        if scope == "global":
            parameters = [(module, "weight") for module in layers.values()]
            prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=amount)
        else:
            for module in layers.values():
                prune.l1_unstructured(module, "weight", amount=amount)
        if permanent:
            make_permanent(model)
    return weight_sparsity(model)


def make_permanent(model: nn.Module) -> list[str]:
    """Fold every pruning mask of ``model``'s Conv2d/Linear weights into the weight (``prune.remove``).

    Returns:
        The names of the layers that had a mask.
    """
    done = []
    for name, module in prunable_layers(model).items():
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
            done.append(name)
    return done
