"""The bit-width vocabulary: which widths exist, how a missing one is counted, and how settings are written.

Every option that takes a bit width goes through one of three checks, each with a message that fits it:

- :func:`validate_bits` for one tensor's width, where ``None`` (YAML ``null``) leaves the tensor in FP32;
- :func:`validate_width` for a width that must be an integer (no FP32 meaning);
- :func:`validate_candidates` for a list of widths to choose from (FP32 is never a candidate).

Uniform settings are written ``"W<weight bits>A<activation bits>"``, with ``FP`` for a tensor left in FP32:
:func:`parse_setting` reads them and :func:`format_setting` writes them.

Example:
    >>> parse_setting("w4a8")
    (4, 8)
    >>> format_setting(None, 8)
    'WFPA8'
    >>> validate_candidates([8, 4, 4], "candidate_bits")
    [4, 8]
    >>> effective_bits(None)
    32
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "FLOAT_BITS",
    "FP",
    "SUPPORTED_BITS",
    "effective_bits",
    "format_setting",
    "parse_setting",
    "validate_bits",
    "validate_candidates",
    "validate_width",
]

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 16)
"""Bit widths a layer's weights or input activations may take; ``None`` (off) is allowed too."""

FLOAT_BITS = 32
"""Width used for accounting (energy, size) when a tensor is not quantized."""

FP = "FP"
"""How a setting string writes a tensor left in FP32, e.g. ``"WFPA8"``."""

_SETTING = re.compile(r"W(\d+|FP)A(\d+|FP)", re.IGNORECASE)


def _is_supported(bits: object) -> bool:
    """True for an ``int`` (not a ``bool``) in :data:`SUPPORTED_BITS`."""
    return isinstance(bits, int) and not isinstance(bits, bool) and bits in SUPPORTED_BITS


def validate_width(bits: object, what: str = "bits", alternative: str = "") -> int:
    """Return ``bits`` if it is a supported integer bit width; raise a clear error otherwise.

    Args:
        bits: The value to check.
        what: Name of the option, used in the error message.
        alternative: What else the option accepts, appended to the advice (e.g. ``"or null for the lowest probed"``).

    Raises:
        ValueError: If ``bits`` is not one of :data:`SUPPORTED_BITS`.
    """
    if not _is_supported(bits):
        advice = f"use one of {list(SUPPORTED_BITS)}" + (f", {alternative}" if alternative else "")
        raise ValueError(f"{what}={bits!r} is not supported: {advice}.")
    return bits  # type: ignore[return-value]  # checked above


def validate_bits(bits: int | None, what: str = "bits") -> int | None:
    """Return ``bits`` unchanged if it is a supported bit width or ``None``; raise a clear error otherwise.

    Args:
        bits: Candidate bit width, or ``None`` for "not quantized".
        what: Name of the option, used in the error message.

    Raises:
        ValueError: If ``bits`` is not one of :data:`SUPPORTED_BITS` or ``None``.
    """
    if bits is None:
        return None
    return validate_width(bits, what, alternative="or null to leave the tensor in FP32")


def validate_candidates(values: Iterable[int], what: str) -> list[int]:
    """The sorted, de-duplicated bit widths of a candidate list; every entry a supported integer.

    FP32 is not a candidate (a policy cannot rank "not quantized" against the widths it was probed at), so the
    message for a ``null`` entry says so instead of advising it.

    Args:
        values: The candidate bit widths as configured.
        what: Name of the option, used in the error message.

    Raises:
        ValueError: If ``values`` is not a list, is empty, or holds ``null`` or an unsupported width.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{what}={values!r} must be a list of bit widths, e.g. [4, 6, 8]")
    values = list(values)
    if not values:
        raise ValueError(f"{what} must list at least one bit width, e.g. [4, 6, 8]")
    for bits in values:
        if bits is None:
            raise ValueError(
                f"{what}={values!r} lists null, but FP32 is not a candidate: list bit widths from "
                f"{list(SUPPORTED_BITS)}, e.g. [4, 6, 8]"
            )
        if not _is_supported(bits):
            raise ValueError(
                f"{what}={values!r} lists {bits!r}, which is not a supported bit width: use widths from "
                f"{list(SUPPORTED_BITS)}"
            )
    return sorted(set(values))


def effective_bits(bits: int | None) -> int:
    """Bits used for accounting: the bit width itself, or :data:`FLOAT_BITS` when the tensor is not quantized."""
    return FLOAT_BITS if bits is None else bits


def format_setting(w_bits: int | None, a_bits: int | None) -> str:
    """The setting name of a ``(weight bits, activation bits)`` pair, e.g. ``"W4A8"``, ``"WFPA8"``, ``"WFPAFP"``."""
    return f"W{FP if w_bits is None else w_bits}A{FP if a_bits is None else a_bits}"


def parse_setting(setting: str, what: str = "setting") -> tuple[int | None, int | None]:
    """Parse a setting name such as ``"W4A8"`` into ``(4, 8)``; ``"FP"`` stands for FP32 (``None``).

    Args:
        setting: ``"W<weight bits>A<activation bits>"``, case-insensitive, e.g. ``"W4A4"``, ``"W8A8"``, ``"WFPA8"``.
        what: Name of the option, used in the error message.

    Returns:
        ``(w_bits, a_bits)``.

    Raises:
        ValueError: If the string does not have that form or names an unsupported bit width.
    """
    match = _SETTING.fullmatch(setting.strip()) if isinstance(setting, str) else None
    if match is None:
        raise ValueError(
            f"{what}={setting!r} is not a uniform setting: write it as 'W<weight bits>A<activation bits>', "
            f"e.g. 'W4A4', 'W4A8' or 'W8A8' ('{FP}' for an FP32 tensor, e.g. 'W{FP}A8')"
        )
    pair = [None if group.upper() == FP else int(group) for group in match.groups()]
    for bits, tensor in zip(pair, ("weight", "activation"), strict=True):
        if bits is not None and bits not in SUPPORTED_BITS:
            raise ValueError(
                f"{what}={setting!r}: {bits} {tensor} bits are not supported: use one of {list(SUPPORTED_BITS)}, "
                f"or {FP} for FP32"
            )
    return pair[0], pair[1]
