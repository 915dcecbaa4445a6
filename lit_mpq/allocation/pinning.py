"""Pinning: the layers whose bit widths the configuration fixes, so that allocation policies leave them alone.

Two sources, applied in this order (a later one wins for a layer named twice):

1. ``first_last_bits``: every entry layer (``plan.entry_layers``, the layers that see the network input) and every
   exit layer (``plan.exit_layers``, the classifier heads; several for models such as LeViT) at that many bits,
   weights and activations, and the quantized network output (a row of kind ``"output"``, under a target that
   quantizes every activation) at that many bits;
2. ``overrides``: ``{pattern: BitOverride}``, where a pattern is an exact layer name or ``"re:<regex>"`` (matched
   with ``re.fullmatch``, see :meth:`QuantPlan.match`), in the order given.

A pattern that matches no layer is an error, since a typo would otherwise leave the layer to the policy silently.

Example:
    >>> from lit_mpq.plan import LayerSpec, QuantPlan
    >>> plan = QuantPlan([LayerSpec(n, "conv2d", 10, 100, 10, 10) for n in ["stem", "block.conv", "fc"]])
    >>> pin_layers(plan, first_last_bits=8, overrides={"re:block.*": BitOverride(w_bits=6, a_bits=None)})
    ['stem', 'block.conv', 'fc']
    >>> plan.bits()["block.conv"]
    (6, None)
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

from lit_mpq.bits import validate_bits
from lit_mpq.plan import QuantPlan

__all__ = ["BitOverride", "match_overrides", "pin_layers"]

Bits = tuple[int | None, int | None]
"""``(weight bits, activation bits)``; ``None`` keeps a tensor in FP32."""


@dataclass
class BitOverride:
    """Bits for the layers an override pattern selects.

    Attributes:
        w_bits: Weight bits (null: FP32).
        a_bits: Input-activation bits (null: FP32).
    """

    w_bits: int | None = 8
    a_bits: int | None = 8

    def __post_init__(self) -> None:
        validate_bits(self.w_bits, "override w_bits")
        validate_bits(self.a_bits, "override a_bits")


def _bits(value: BitOverride | Bits) -> Bits:
    """An override's ``(w_bits, a_bits)``, from a :class:`BitOverride` or a validated pair."""
    if isinstance(value, BitOverride):
        return value.w_bits, value.a_bits
    w_bits, a_bits = value
    return validate_bits(w_bits, "override w_bits"), validate_bits(a_bits, "override a_bits")


def _no_match(plan: QuantPlan, pattern: str) -> ValueError:
    """The error for an override pattern that selects no quantized layer, with what the user may have meant."""
    if pattern in plan.float_layers:
        return ValueError(
            f"override {pattern!r} names a layer left in floating point ({plan.float_layers[pattern]}): it has no "
            "quantizer to set; remove the override"
        )
    names = plan.names
    hint = ""
    if not pattern.startswith("re:"):  # a near miss of an exact name is most likely a typo
        close = sorted(difflib.get_close_matches(pattern, names, n=3), key=names.index)
        if close:
            hint = f"did you mean {close[0]!r}? " if len(close) == 1 else f"did you mean one of {close}? "
    return ValueError(
        f"override {pattern!r} matches no quantized layer: {hint}layer names look like {names[:3]} "
        "(use an exact name or 're:<regex>')"
    )


def match_overrides(plan: QuantPlan, overrides: Mapping[str, BitOverride | Bits] | None) -> dict[str, Bits]:
    """The bits every override pattern assigns, by layer name; later patterns win. The plan is not changed.

    Args:
        plan: The model's plan (only its layer names are read).
        overrides: ``{exact name or "re:<regex>": BitOverride or (w_bits, a_bits)}``.

    Returns:
        ``{layer name: (w_bits, a_bits)}`` in the order the patterns matched them.

    Raises:
        ValueError: If a pattern matches no quantized layer (the message suggests the closest name) or is an
            invalid regex.
    """
    chosen: dict[str, Bits] = {}
    for pattern, value in (overrides or {}).items():
        try:
            matched = plan.match(pattern)
        except ValueError as err:
            raise ValueError(f"override {pattern!r}: {err}") from None
        if not matched:
            raise _no_match(plan, pattern)
        bits = _bits(value)
        chosen.update(dict.fromkeys(matched, bits))
    return chosen


def pin_layers(
    plan: QuantPlan,
    first_last_bits: int | None = None,
    overrides: Mapping[str, BitOverride | Bits] | None = None,
) -> list[str]:
    """Set and mark the pinned layers of ``plan``; every other layer is marked not pinned.

    The pinned set is exactly what the configuration says, so pinning again with another configuration (as the sweep
    does between points) leaves no stale pin behind.

    Args:
        plan: The model's plan; changed in place (``w_bits``, ``a_bits``, ``pinned`` of each layer).
        first_last_bits: Bits (weights and activations) of ``plan.entry_layers`` and ``plan.exit_layers``; ``None``
            leaves them to the policy.
        overrides: ``{exact name or "re:<regex>": BitOverride or (w_bits, a_bits)}``, applied after
            ``first_last_bits``; later patterns win.

    Returns:
        The pinned layer names, in model order.

    Raises:
        ValueError: If ``first_last_bits`` is unsupported, or an override pattern matches no layer or is invalid
            (checked before the plan is changed).
    """
    first_last_bits = validate_bits(first_last_bits, "first_last_bits")
    chosen: dict[str, Bits] = {}
    if first_last_bits is not None:
        chosen.update(dict.fromkeys([*plan.entry_layers, *plan.exit_layers], (first_last_bits, first_last_bits)))
        # A strict target's quantized network output (kind "output") is the last tensor of all: pinned with the heads.
        chosen.update({name: (None, first_last_bits) for name, spec in plan.specs.items() if spec.kind == "output"})
    chosen.update(match_overrides(plan, overrides))
    for name in plan:
        decision = plan[name]
        decision.pinned = name in chosen
        if decision.pinned:
            decision.w_bits, decision.a_bits = chosen[name]
    return [name for name in plan if name in chosen]
