"""Command-line shortcuts for the common knobs: ``--bits``, ``--budget`` and ``--policy``.

A config lists its callbacks, and LightningCLI cannot override one entry of that list from the command line, so
trying another budget would mean copying the YAML. These shortcuts rewrite the ``BitAllocator`` entry instead:

- ``--bits W4A8``: the ``Uniform`` policy at those widths (``FP`` for FP32, e.g. ``W8AFP``);
- ``--budget 0.8xW4A4`` (0.8 times that uniform setting's energy), ``--budget 40uJ`` (µJ per image),
  ``--budget 0.1MB`` (weight size) or ``--budget 1.2Gbitops`` (G bit-ops per image): the ``ExactAllocation``
  policy under that budget, keeping its other options when the config already uses it;
- ``--policy ExactAllocation`` (any class of :mod:`lit_mpq.allocation`): that policy, with its options from the
  config when the class is the same, else its defaults.

The rewritten config is what ``config.yaml`` records, so a run can be repeated from its folder.

Example:
    >>> parse_budget("0.8xW4A4")
    {'energy_relative_to': 'W4A4', 'energy_ratio': 0.8}
    >>> parse_budget("40uJ")
    {'energy_uj': 40.0}
"""

from __future__ import annotations

import re
from typing import Any

from jsonargparse import Namespace

__all__ = ["SHORTCUT_HELP", "apply_shortcuts", "parse_budget"]

SHORTCUT_HELP = (
    "Rewrite the BitAllocator callback of the config: --bits W4A8 (uniform), --budget 0.8xW4A4 | 40uJ | 0.1MB | "
    "1.2Gbitops (exact allocation under that budget), --policy <class of lit_mpq.allocation>."
)
ALLOCATION_MODULE = "lit_mpq.allocation"
BUDGET_KEYS = (
    "energy_uj",
    "energy_relative_to",
    "energy_ratio",
    "size_mb",
    "bit_ops_g",
    "avg_weight_bits",
    "avg_act_bits",
)
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_BUDGET_FORMS = (
    (re.compile(rf"{_NUMBER}\s*[x\*]\s*(W(?:\d+|FP)A(?:\d+|FP))", re.IGNORECASE), "ratio"),
    (re.compile(rf"{_NUMBER}\s*(?:uJ|µJ)", re.IGNORECASE), "energy_uj"),
    (re.compile(rf"{_NUMBER}\s*MB", re.IGNORECASE), "size_mb"),
    (re.compile(rf"{_NUMBER}\s*G\s*(?:bit-?ops)?", re.IGNORECASE), "bit_ops_g"),
)
_BITS = re.compile(r"W(\d+|FP)A(\d+|FP)", re.IGNORECASE)


def parse_budget(text: str) -> dict[str, Any]:
    """ExactAllocation options for a budget written as ``0.8xW4A4``, ``40uJ``, ``0.1MB`` or ``1.2Gbitops``.

    Raises:
        ValueError: If the text has none of these forms.
    """
    for pattern, kind in _BUDGET_FORMS:
        match = pattern.fullmatch(text.strip())
        if match is None:
            continue
        if kind == "ratio":
            return {"energy_relative_to": match.group(2).upper(), "energy_ratio": float(match.group(1))}
        return {kind: float(match.group(1))}
    raise ValueError(
        f"--budget {text!r} is not a budget: write 0.8xW4A4 (a multiple of a uniform setting's energy), 40uJ "
        "(energy per image), 0.1MB (weight size) or 1.2Gbitops (bit operations per image)"
    )


def _parse_bits(text: str) -> tuple[int | None, int | None]:
    match = _BITS.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"--bits {text!r} is not a setting: write W<weight bits>A<activation bits>, e.g. W4A8 or W8AFP"
        )
    return tuple(None if part.upper() == "FP" else int(part) for part in match.groups())  # type: ignore[return-value]


def _allocator(config: Namespace) -> Namespace:
    callbacks = config.get("trainer", Namespace()).get("callbacks") or []
    for callback in callbacks:
        if isinstance(callback, Namespace) and str(callback.get("class_path", "")).endswith("BitAllocator"):
            if callback.get("init_args") is None:
                callback["init_args"] = Namespace()
            return callback
    raise ValueError(
        "--bits, --budget and --policy set the policy of the BitAllocator callback, but this config lists none: "
        "add lit_mpq.callbacks.BitAllocator to trainer.callbacks"
    )


def _policy_name(policy: Any) -> str:
    if isinstance(policy, Namespace):
        return str(policy.get("class_path", "")).rpartition(".")[2]
    return type(policy).__name__ if policy is not None else ""


def apply_shortcuts(config: Namespace) -> None:
    """Rewrite ``config``'s BitAllocator policy in place from its ``bits``, ``budget`` and ``policy`` entries.

    Raises:
        ValueError: On a malformed value, an unknown policy, or a config without a BitAllocator.
    """
    bits, budget, policy = config.get("bits"), config.get("budget"), config.get("policy")
    if bits is None and budget is None and policy is None:
        return
    if bits is not None and (budget is not None or (policy not in (None, "Uniform"))):
        raise ValueError("--bits sets a uniform policy: it cannot be combined with --budget or another --policy")
    allocator = _allocator(config)
    current = allocator.init_args.get("policy")
    if bits is not None:
        w_bits, a_bits = _parse_bits(bits)
        allocator.init_args["policy"] = Namespace(
            class_path=f"{ALLOCATION_MODULE}.Uniform", init_args=Namespace(w_bits=w_bits, a_bits=a_bits)
        )
        return
    import lit_mpq.allocation as allocation

    name = policy or ("ExactAllocation" if budget is not None else _policy_name(current))
    if not hasattr(allocation, name) or name in ("Policy", "Allocation"):
        choices = [n for n in allocation.__all__ if n not in ("Policy", "Allocation")]
        raise ValueError(f"--policy {name!r} is not a policy of lit_mpq.allocation; choose one of {choices}")
    keep = current.get("init_args") if isinstance(current, Namespace) and _policy_name(current) == name else None
    init_args = Namespace(**dict(vars(keep))) if keep is not None else Namespace()
    if budget is not None:
        if name != "ExactAllocation":
            raise ValueError(f"--budget is a budget of ExactAllocation, not of {name}: drop --policy or set it so")
        for key in BUDGET_KEYS:
            if key in init_args:
                del init_args[key]
        for key, value in parse_budget(budget).items():
            init_args[key] = value
    allocator.init_args["policy"] = Namespace(class_path=f"{ALLOCATION_MODULE}.{name}", init_args=init_args)
