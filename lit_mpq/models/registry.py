"""Registry of backbones that ``lit_mpq`` defines itself (timm-style, by name).

Models that timm or torchvision already provide are not registered here; :func:`lit_mpq.models.create_backbone`
looks in this registry first and falls back to those libraries. An entry point takes ``num_classes`` as a keyword
argument and returns an ``nn.Module``. A backbone may also declare the evaluation preprocessing its weights were
trained with (``data_config``, the keys of timm's data config), which the image-folder data module reads.

Example:
    >>> from torch import nn
    >>> @register_backbone("tiny_linear_example")
    ... def tiny_linear_example(num_classes: int = 10) -> nn.Module:
    ...     return nn.Linear(4, num_classes)
    >>> "tiny_linear_example" in list_backbones()
    True
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "DATA_CONFIG_KEYS",
    "get_backbone_data_config",
    "get_backbone_fn",
    "is_backbone",
    "list_backbones",
    "register_backbone",
]

BackboneFn = Callable[..., nn.Module]
_F = TypeVar("_F", bound=BackboneFn)

DATA_CONFIG_KEYS: tuple[str, ...] = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
"""Keys a backbone's ``data_config`` may set (the evaluation arguments of ``timm.data.create_transform``)."""

_BACKBONES: dict[str, BackboneFn] = {}
_DATA_CONFIGS: dict[str, dict[str, Any]] = {}


def register_backbone(name: str, data_config: Mapping[str, Any] | None = None) -> Callable[[_F], _F]:
    """Register a backbone entry point under ``name``; use as a decorator.

    Registering a name twice replaces the earlier entry and warns, as ``timm.models.register_model`` does.

    Args:
        name: The name users pass to ``create_backbone`` (and write in YAML configs).
        data_config: Evaluation preprocessing the weights expect, with keys from :data:`DATA_CONFIG_KEYS`, e.g.
            ``{"input_size": (3, 32, 32), "mean": ..., "std": ..., "crop_pct": 1.0}``; ``None`` leaves it to the
            defaults (the model's ``default_input_size`` and ImageNet statistics).

    Returns:
        A decorator that registers the function and returns it unchanged.

    Raises:
        ValueError: If ``name`` is empty or contains a ``:`` (reserved for source prefixes like ``torchvision:``),
            or ``data_config`` has a key outside :data:`DATA_CONFIG_KEYS`.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"A backbone name must be a non-empty string, got {name!r}.")
    if ":" in name:
        raise ValueError(f"Backbone name {name!r} must not contain ':' (reserved for prefixes such as 'torchvision:').")
    unknown = sorted(set(data_config or {}) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"data_config of backbone {name!r} has unknown keys {unknown}; allowed: {DATA_CONFIG_KEYS}.")

    def decorator(fn: _F) -> _F:
        if name in _BACKBONES and _BACKBONES[name] is not fn:
            warnings.warn(
                f"Overwriting backbone {name!r} registered by {_describe(_BACKBONES[name])} with {_describe(fn)}.",
                UserWarning,
                stacklevel=2,
            )
        _BACKBONES[name] = fn
        if data_config is None:
            _DATA_CONFIGS.pop(name, None)
        else:
            _DATA_CONFIGS[name] = dict(data_config)
        return fn

    return decorator


def list_backbones(pattern: str = "*") -> list[str]:
    """Return the sorted names of the registered backbones.

    Args:
        pattern: Optional shell-style wildcard (``fnmatch``) that names must match, e.g. ``"cifar_*"``.

    Returns:
        The matching names, sorted.
    """
    return sorted(n for n in _BACKBONES if fnmatch.fnmatchcase(n, pattern))


def is_backbone(name: str) -> bool:
    """Return whether ``name`` is in this registry (timm and torchvision names are not)."""
    return name in _BACKBONES


def get_backbone_data_config(name: str) -> dict[str, Any] | None:
    """Return a copy of the preprocessing registered with backbone ``name``, or ``None`` if it declared none.

    Args:
        name: A registered backbone name.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    get_backbone_fn(name)  # same error for an unknown name
    config = _DATA_CONFIGS.get(name)
    return None if config is None else dict(config)


def get_backbone_fn(name: str) -> BackboneFn:
    """Return the entry point registered under ``name``.

    Args:
        name: A registered backbone name.

    Returns:
        The function that builds the backbone.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the registered names.
    """
    try:
        return _BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"Unknown backbone {name!r}. Registered lit_mpq backbones: {', '.join(list_backbones()) or '(none)'}."
        ) from None


def _describe(fn: BackboneFn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
