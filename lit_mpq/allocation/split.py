"""Weight splits: the first half of the weights at one bit width, the second half at another ("Asc" / "Desc").

One of the projects lit_mpq grew from quantized networks with mixed 3/5-bit layer splits: "Asc" puts the first half
of the weights, by cumulative weight count in the network's layer order, at 3 bits and the second half at 5;
"Desc" the reverse. :class:`Ascending` and :class:`Descending` are those policies, at any two widths;
:class:`WeightSplit` is the one policy behind both, with the order as an argument.

The split, precisely:

* Only the layers the policy decides count: pinned rows (first/last layer, overrides) are left to the pins, and an
  attention matmul (kind ``"matmul"``) stores no weights. ``total`` is the sum of ``params`` over the other rows.
* A weight layer belongs to the first half when the midpoint of its weights lies at or before half the total:
  ``2 * before + params <= total``, where ``before`` is the weight count of the counted layers ahead of it. A layer
  wholly before (after) the half-way point is in the first (second) half; the one layer that straddles it goes to
  the side that holds most of its weights, and to the first half on an exact tie.
* Every decided layer's input activations get ``a_bits``. A matmul's two operands are both activations, so a matmul
  row gets ``(a_bits, a_bits)``, as under :class:`~lit_mpq.allocation.Uniform`.

Example:
    >>> from lit_mpq.plan import LayerSpec, QuantPlan
    >>> plan = QuantPlan([LayerSpec(n, "conv2d", p, 1, 1, 1) for n, p in [("a", 20), ("b", 30), ("c", 10)]])
    >>> Ascending().allocate(plan)  # 60 weights: "b" (weights 20..50) holds 20 of its 30 past the half-way point 30
    {'a': (3, 8), 'b': (5, 8), 'c': (5, 8)}
    >>> Descending(low_bits=4, high_bits=8).describe()
    'Descending(W8->W4 by weight count, A8)'
"""

from __future__ import annotations

from lit_mpq.allocation.base import Allocation, Policy
from lit_mpq.bits import FP, validate_bits, validate_width
from lit_mpq.energy.models import EnergyModel
from lit_mpq.plan import OPERATION_KINDS, QuantPlan

__all__ = ["ORDERS", "Ascending", "Descending", "WeightSplit", "first_half"]

ORDERS = ("asc", "desc")
"""``"asc"``: the first half of the weights at the low width; ``"desc"``: the first half at the high width."""


def first_half(plan: QuantPlan) -> dict[str, bool]:
    """Which weight layers of ``plan`` lie in the first half of its weights (see the module docstring).

    Args:
        plan: The plan; only its specs and pins are read.

    Returns:
        ``{name: True for the first half, False for the second}`` for every non-pinned row but matmuls, in model
        order.

    Example:
        >>> from lit_mpq.plan import LayerSpec, QuantPlan
        >>> plan = QuantPlan([LayerSpec(n, "linear", p, 1, 1, 1) for n, p in [("a", 1), ("b", 2), ("c", 1)]])
        >>> first_half(plan)  # "b" holds weights 1..3 of 4: one on each side of 2, a tie, so the first half
        {'a': True, 'b': True, 'c': False}
    """
    names = [name for name in plan if not plan[name].pinned and plan.specs[name].kind not in OPERATION_KINDS]
    total = sum(plan.specs[name].params for name in names)
    halves, before = {}, 0
    for name in names:
        params = plan.specs[name].params
        halves[name] = 2 * before + params <= total
        before += params
    return halves


class WeightSplit(Policy):
    """The first half of the weights (by cumulative weight count, in layer order) at one width, the rest at another.

    Pinned rows are left to the pins; a matmul row gets ``a_bits`` for both operands. The exact rule for the layer
    that straddles the half-way point is in :mod:`lit_mpq.allocation.split`.

    Args:
        order: ``"asc"`` (first half at ``low_bits``, second at ``high_bits``) or ``"desc"`` (the reverse).
        low_bits: The lower weight bit width.
        high_bits: The higher weight bit width, above ``low_bits``.
        a_bits: Input-activation bit width of every decided layer, or null for FP32 activations.

    Raises:
        ValueError: On an unknown order, an unsupported width, or ``low_bits >= high_bits``.
    """

    def __init__(self, order: str = "asc", low_bits: int = 3, high_bits: int = 5, a_bits: int | None = 8) -> None:
        name = type(self).__name__
        if order not in ORDERS:
            raise ValueError(f"{name}.order={order!r} is unknown: choose one of {list(ORDERS)}")
        low = validate_width(low_bits, f"{name}.low_bits")
        high = validate_width(high_bits, f"{name}.high_bits")
        if low >= high:
            raise ValueError(
                f"{name}.low_bits={low} must be below high_bits={high}: the order ('asc' or 'desc', or the class "
                "Ascending/Descending) says which half of the weights gets the lower width"
            )
        self.order = order
        self.low_bits = low
        self.high_bits = high
        self.a_bits = validate_bits(a_bits, f"{name}.a_bits")

    @property
    def first_bits(self) -> int:
        """Weight bits of the first half of the weights."""
        return self.low_bits if self.order == "asc" else self.high_bits

    @property
    def second_bits(self) -> int:
        """Weight bits of the second half of the weights."""
        return self.high_bits if self.order == "asc" else self.low_bits

    def allocate(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> Allocation:
        """Bits for every non-pinned row: weight layers by half, matmuls at ``a_bits`` for both operands."""
        halves = first_half(plan)
        allocation: Allocation = {}
        for name in plan:
            if plan[name].pinned:
                continue
            if name in halves:
                allocation[name] = (self.first_bits if halves[name] else self.second_bits, self.a_bits)
            else:  # a matmul: both operands are activations
                allocation[name] = (self.a_bits, self.a_bits)
        return allocation

    def describe(self) -> str:
        """E.g. ``Ascending(W3->W5 by weight count, A8)``: first half's width, then the second's."""
        label = "Ascending" if self.order == "asc" else "Descending"
        a_bits = FP if self.a_bits is None else self.a_bits
        return f"{label}(W{self.first_bits}->W{self.second_bits} by weight count, A{a_bits})"


class Ascending(WeightSplit):
    """The "Asc" split: the first half of the weights at ``low_bits``, the second half at ``high_bits``.

    Args:
        low_bits: Weight bits of the first half.
        high_bits: Weight bits of the second half, above ``low_bits``.
        a_bits: Input-activation bits of every decided layer, or null for FP32 activations.

    Example:
        In YAML, as ``BitAllocator``'s policy::

            policy:
              class_path: lit_mpq.allocation.Ascending
              init_args: {low_bits: 3, high_bits: 5, a_bits: 8}
    """

    def __init__(self, low_bits: int = 3, high_bits: int = 5, a_bits: int | None = 8) -> None:
        super().__init__("asc", low_bits, high_bits, a_bits)


class Descending(WeightSplit):
    """The "Desc" split: the first half of the weights at ``high_bits``, the second half at ``low_bits``.

    Args:
        low_bits: Weight bits of the second half.
        high_bits: Weight bits of the first half, above ``low_bits``.
        a_bits: Input-activation bits of every decided layer, or null for FP32 activations.

    Example:
        In YAML, as ``BitAllocator``'s policy::

            policy:
              class_path: lit_mpq.allocation.Descending
              init_args: {low_bits: 3, high_bits: 5, a_bits: 8}
    """

    def __init__(self, low_bits: int = 3, high_bits: int = 5, a_bits: int | None = 8) -> None:
        super().__init__("desc", low_bits, high_bits, a_bits)
