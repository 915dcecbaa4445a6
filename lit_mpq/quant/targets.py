"""Target descriptions: what the hardware a plan is meant for quantizes, and how.

A mixed-precision result is only worth what the graph it was measured on is worth. A fixed-point accelerator
quantizes every activation tensor it sees (the network input, each residual add's operands, the logits), runs no
inference-mode BatchNorm and may only rescale by shifts; a lenient simulation quantizes the inputs of convolutions and
Linear layers and keeps everything else in float. Sony MCT describes the hardware with its *target platform
capabilities*, AIMET with its *quantsim config*; lit_mpq with a :class:`QuantTarget`, selected by name in YAML
(``Calibration.settings.target``) and recorded in the quantization card:

============================ ================== ============== ============== =====================================
target                       quantized tensors  BatchNorm      scales         operands
============================ ================== ============== ============== =====================================
``lenient`` (the default)    layer inputs       as configured  float          as ``QuantSettings`` says
``integer_only``             every activation   folded         float          weights symmetric, activations
                                                                              asymmetric (unsigned when >= 0)
``integer_only_pow2``        every activation   folded         power of two   as ``integer_only``
============================ ================== ============== ============== =====================================

"Every activation" means, besides each convolution's and Linear layer's input (the network input among them), both
operands of every add between two activations (the residual adds of a ResNet or a transformer block,
:class:`~lit_mpq.quant.operations.QuantAdd`) and the network's output (:class:`~lit_mpq.quant.operations.QuantOutput`);
each is a row of the plan (:mod:`lit_mpq.quant.strict_graph`). A power-of-two scale is the float scale rounded up to
the next power of two, so nothing is clipped that the float scale kept.

Example:
    >>> target = resolve_target("integer_only_pow2")
    >>> target.quantized_tensors, target.fold_batchnorm, target.scale
    ('all', True, 'power_of_two')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "QUANTIZED_TENSORS",
    "SCALES",
    "TARGETS",
    "QuantTarget",
    "pair_allowed",
    "pair_violations",
    "resolve_target",
]

QUANTIZED_TENSORS = ("layer_inputs", "all")
"""``layer_inputs``: the inputs of convolutions, Linear layers and attention matmuls; ``all``: every activation."""

SCALES = ("float", "power_of_two")
"""Scale types: any float, or a power of two (a shift on integer hardware)."""

OPERAND_RANGES = ("symmetric", "asymmetric")
"""``symmetric``: signed, zero point 0; ``asymmetric``: a zero point (unsigned codes for non-negative tensors)."""


@dataclasses.dataclass(frozen=True)
class QuantTarget:
    """What a target quantizes and how; see the module docstring for the shipped ones.

    Attributes:
        name: The target's name (recorded in the card).
        quantized_tensors: ``"layer_inputs"`` or ``"all"`` (see :data:`QUANTIZED_TENSORS`).
        fold_batchnorm: Fold BatchNorm into the layer before it (True), never (False), or only when an ``Export``
            callback is present (None: the lenient default).
        scale: ``"float"`` or ``"power_of_two"``.
        weights: ``"symmetric"``/``"asymmetric"`` weight ranges, or None to keep ``QuantSettings.weight_symmetric``.
        activations: The same for activations, or None to keep ``QuantSettings.act_symmetric``.
        output_bits: Width of the network output's quantizer (a pinned row: the logits are a few elements per
            image, and an accelerator hands them out at its widest activation width).
        bit_pairs: The ``(w_bits, a_bits)`` pairs a layer with weights may run at (an NPU's kernels: e.g. W8A8,
            W4A8, W4A4), or None for any pair. A row whose operands are all activations (an attention matmul, an
            add, the output) may use any activation width of these pairs for each operand.
    """

    name: str
    quantized_tensors: str = "layer_inputs"
    fold_batchnorm: bool | None = None
    scale: str = "float"
    weights: str | None = None
    activations: str | None = None
    output_bits: int = 8
    bit_pairs: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.quantized_tensors not in QUANTIZED_TENSORS:
            raise ValueError(
                f"target {self.name!r}: quantized_tensors must be one of {QUANTIZED_TENSORS}, "
                f"got {self.quantized_tensors!r}"
            )
        if self.scale not in SCALES:
            raise ValueError(f"target {self.name!r}: scale must be one of {SCALES}, got {self.scale!r}")
        for label, value in (("weights", self.weights), ("activations", self.activations)):
            if value is not None and value not in OPERAND_RANGES:
                raise ValueError(
                    f"target {self.name!r}: {label} must be one of {OPERAND_RANGES} or null, got {value!r}"
                )
        bits = self.output_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"target {self.name!r}: output_bits must be an integer from 2 to 16, got {bits!r}")
        if self.bit_pairs is not None:
            pairs = tuple(tuple(int(b) for b in pair) for pair in self.bit_pairs)
            if not pairs or any(len(pair) != 2 or not all(1 <= b <= 16 for b in pair) for pair in pairs):
                raise ValueError(
                    f"target {self.name!r}: bit_pairs must be a non-empty list of [w_bits, a_bits] pairs of integers "
                    f"from 1 to 16, got {self.bit_pairs!r}"
                )
            object.__setattr__(self, "bit_pairs", pairs)

    @property
    def quantizes_everything(self) -> bool:
        """Whether every activation tensor is quantized (adds and the output too)."""
        return self.quantized_tensors == "all"

    @property
    def power_of_two(self) -> bool:
        """Whether every scale is a power of two."""
        return self.scale == "power_of_two"

    def activation_widths(self) -> set[int] | None:
        """The activation widths of :attr:`bit_pairs` (None when any pair is allowed)."""
        return None if self.bit_pairs is None else {a for _, a in self.bit_pairs}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the quantization card and the run record."""
        data = dataclasses.asdict(self)
        data["bit_pairs"] = None if self.bit_pairs is None else [list(pair) for pair in self.bit_pairs]
        return data


TARGETS: Mapping[str, QuantTarget] = {
    "lenient": QuantTarget("lenient"),
    "integer_only": QuantTarget(
        "integer_only", quantized_tensors="all", fold_batchnorm=True, weights="symmetric", activations="asymmetric"
    ),
    "integer_only_pow2": QuantTarget(
        "integer_only_pow2",
        quantized_tensors="all",
        fold_batchnorm=True,
        scale="power_of_two",
        weights="symmetric",
        activations="asymmetric",
    ),
}
"""The shipped targets by name."""


def resolve_target(target: str | QuantTarget | Mapping[str, Any]) -> QuantTarget:
    """The :class:`QuantTarget` named ``target``, or built from a mapping of its fields, or ``target`` itself.

    Raises:
        ValueError: On an unknown name (the message lists the shipped ones) or an invalid field.
    """
    if isinstance(target, QuantTarget):
        return target
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(f"unknown quantization target {target!r}; choose one of {sorted(TARGETS)}")
        return TARGETS[target]
    if isinstance(target, Mapping):
        fields = {f.name for f in dataclasses.fields(QuantTarget)}
        unknown = sorted(set(target) - fields)
        if unknown:
            raise ValueError(f"quantization target: unknown fields {unknown}; known: {sorted(fields)}")
        data = dict(target)
        if isinstance(data.get("bit_pairs"), Sequence):
            data["bit_pairs"] = tuple(tuple(pair) for pair in data["bit_pairs"])
        return QuantTarget(**{"name": "custom", **data})
    raise ValueError(f"a quantization target is a name or a mapping of its fields, got {type(target).__name__}")


def pair_allowed(target: QuantTarget, kind: str, w_bits: int | None, a_bits: int | None) -> bool:
    """Whether a row of ``kind`` may run at ``(w_bits, a_bits)`` on ``target`` (see :attr:`QuantTarget.bit_pairs`).

    Example:
        >>> npu = QuantTarget("npu", bit_pairs=((8, 8), (4, 8)))
        >>> pair_allowed(npu, "conv2d", 4, 8), pair_allowed(npu, "conv2d", 4, 4), pair_allowed(npu, "add", 8, 8)
        (True, False, True)
    """
    if target.bit_pairs is None:
        return True
    if kind in ("matmul", "add", "output"):  # every operand an activation; the output has no right-hand one
        operands = (a_bits,) if kind == "output" else (w_bits, a_bits)
        return all(bits in target.activation_widths() for bits in operands)
    return (w_bits, a_bits) in target.bit_pairs


def pair_violations(target: QuantTarget, rows: Mapping[str, tuple[str, int | None, int | None]]) -> list[str]:
    """``"name (W<w>A<a>)"`` for every row ``{name: (kind, w_bits, a_bits)}`` the target does not allow."""
    return [
        f"{name} ({kind} at W{w_bits}A{a_bits})"
        for name, (kind, w_bits, a_bits) in rows.items()
        if not pair_allowed(target, kind, w_bits, a_bits)
    ]
