"""Quantized operations on activations alone: rows of the plan that hold no weights.

A convolution or a Linear layer quantizes its weight and its input. An integer accelerator also feeds quantized
tensors to operations that have no weights: the two matmuls of attention (:mod:`lit_mpq.quant.attention`), the
residual adds of a ResNet or a transformer block, and it hands out quantized logits. Each such operation is a
:class:`QuantOperation`, a row of the plan whose ``a_bits`` is its left operand's width and whose ``w_bits`` is its
right operand's (the second activation; ``None`` for the one-operand :class:`QuantOutput`):

- :class:`QuantAdd` (``kind="add"``): ``a + b`` with both operands quantized, e.g. ``bn2(conv2(x)) + shortcut(x)``;
  its energy is the two operands read per image and one integer add per output element.
- :class:`QuantOutput` (``kind="output"``): the network's output (the logits) quantized before it leaves the chip.

Every operation exposes :meth:`QuantOperation.operand_error`, the change of its output when one operand changes by a
given amount: the sensitivity probes use it for every kind alike (a product scales the change by the other operand,
an add passes it through).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lit_mpq.quant.modules import ActivationQuantizer

__all__ = ["QuantAdd", "QuantOperation", "QuantOutput", "is_quant_operation"]


class QuantOperation(nn.Module):
    """An operation whose operands are all activations, each with its quantizer: one row of the plan.

    Attributes:
        kind: The plan's row kind (``"matmul"``, ``"add"``, ``"output"``).
        input_quantizer: Quantizer of the left (or only) operand: the plan's ``a_bits``.
        other_quantizer: Quantizer of the right operand (the plan's ``w_bits``), or ``None`` for one operand.
    """

    kind: ClassVar[str] = ""
    input_quantizer: ActivationQuantizer
    other_quantizer: ActivationQuantizer | None

    def quantizer(self, kind: str) -> ActivationQuantizer | None:
        """The quantizer of the plan's tensor ``kind``: ``"a"`` the left operand, ``"w"`` the right one (or None)."""
        return self.other_quantizer if kind == "w" else self.input_quantizer

    def operands(self) -> tuple[str, ...]:
        """The plan's tensor kinds this operation quantizes: ``("a", "w")``, or ``("a",)`` for one operand."""
        return ("a",) if self.other_quantizer is None else ("a", "w")

    def operand_error(self, kind: str, delta: Tensor, operands: tuple[Tensor, ...]) -> Tensor:  # pragma: no cover
        """The change of the output when operand ``kind`` changes by ``delta`` (the others as in ``operands``)."""
        raise NotImplementedError


class QuantAdd(QuantOperation):
    """``a + b`` with both operands fake-quantized (a residual add), one row of the plan (``kind="add"``).

    Args:
        input_quantizer: Quantizer of ``a`` (the plan's ``a_bits``).
        other_quantizer: Quantizer of ``b`` (the plan's ``w_bits``).
    """

    kind = "add"

    def __init__(self, input_quantizer: ActivationQuantizer, other_quantizer: ActivationQuantizer) -> None:
        super().__init__()
        self.input_quantizer = input_quantizer
        self.other_quantizer = other_quantizer

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Quantize both operands as the quantizers' modes say, then add."""
        return self.input_quantizer(a) + self.other_quantizer(b)

    def operand_error(self, kind: str, delta: Tensor, operands: tuple[Tensor, ...]) -> Tensor:
        """An add passes an operand's change through unchanged (broadcast to the output's shape)."""
        a, b = operands
        return torch.broadcast_to(delta, torch.broadcast_shapes(a.shape, b.shape))


class QuantOutput(QuantOperation):
    """The network's output fake-quantized (``kind="output"``): the logits an integer accelerator hands out.

    Args:
        input_quantizer: Quantizer of the output (the plan's ``a_bits``; the row has no ``w_bits``).
    """

    kind = "output"

    def __init__(self, input_quantizer: ActivationQuantizer) -> None:
        super().__init__()
        self.input_quantizer = input_quantizer
        self.other_quantizer = None

    def forward(self, x: Tensor) -> Tensor:
        """Quantize ``x`` as the quantizer's mode says."""
        return self.input_quantizer(x)

    def operand_error(self, kind: str, delta: Tensor, operands: tuple[Tensor, ...]) -> Tensor:
        """The output is the operand: its change is the change."""
        return delta


def is_quant_operation(module: nn.Module) -> bool:
    """Whether ``module`` is a :class:`QuantOperation` (an attention matmul, an add or the output)."""
    return isinstance(module, QuantOperation)
