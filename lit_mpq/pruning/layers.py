"""Which layers pruning touches: every Conv2d and Linear (subclasses included) except the ignored ones.

A layer is named by its fully qualified module name, or selected with ``"re:<regex>"`` (``re.fullmatch``), as in a
plan's overrides. A name that is not such a layer, or a pattern that selects none, is an error that lists the layers
there are: a typo must not silently prune the layer it meant to protect.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

__all__ = ["is_prunable", "prunable_layers", "select_layers"]


def is_prunable(module: nn.Module) -> bool:
    """Whether pruning handles ``module``: a ``Conv2d`` or a ``Linear`` (their subclasses, quantized twins included)."""
    return isinstance(module, nn.Conv2d | nn.Linear)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable layer of ``model`` by fully qualified name, in model order."""
    return {name: module for name, module in model.named_modules() if name and is_prunable(module)}


def _shown(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def match_layers(names: Sequence[str], patterns: Sequence[str], what: str = "ignored_layers") -> set[str]:
    """The names among ``names`` selected by ``patterns`` (exact names or ``"re:<regex>"``).

    Args:
        names: The layer names to choose from.
        patterns: Exact names or ``"re:<regex>"`` patterns.
        what: The option's name, for the error message.

    Returns:
        The selected names.

    Raises:
        ValueError: If a pattern is not a string, a regex is invalid, a name is not among ``names`` or a regex selects
            none of them; the message lists the names there are.
    """
    selected: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{what}: {pattern!r} is not a layer name; give names or 're:<regex>' patterns.")
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"{what}: {pattern!r} is not a valid regex: {err}") from err
            hits = {name for name in names if regex.fullmatch(name)}
        else:
            hits = {pattern} if pattern in names else set()
        if not hits:
            raise ValueError(
                f"{what}: {pattern!r} matches no Conv2d/Linear layer of the model; its layers are: "
                f"{_shown(list(names))}"
            )
        selected |= hits
    return selected


def select_layers(model: nn.Module, ignored_layers: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The prunable layers of ``model`` minus ``ignored_layers``, by name, in model order.

    Args:
        model: The model.
        ignored_layers: Names or ``"re:<regex>"`` patterns of layers to leave alone.

    Returns:
        ``{name: module}``.

    Raises:
        ValueError: If an entry of ``ignored_layers`` selects no layer (the message lists the layers).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
        >>> list(select_layers(net, ["re:2"]))
        ['0']
    """
    layers = prunable_layers(model)
    ignored = match_layers(list(layers), ignored_layers)
    return {name: module for name, module in layers.items() if name not in ignored}
