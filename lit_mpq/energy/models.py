"""Analytic energy models: picojoules per image for one layer at given weight and activation bit widths.

The default, :class:`HorowitzEnergyModel`, uses the per-operation energies that M. Horowitz published for a
45 nm process at 0.9 V ("Computing's energy problem (and what we can do about it)", ISSCC 2014, the
"Energy per operation" table). Every constant is a named module-level value with its source, and every constant
can be overridden from a config file through the model's constructor.

The model, for a plan with layers ``l``::

    E = sum_l N_MAC,l * E_MAC(b_w, b_a)  +  sum_l N_mem,l * E_mem(b)

* ``E_MAC(b_w, b_a) = (E_mult8 + E_add8) * b_w * b_a / 64`` for an integer MAC (0.23 pJ at W8A8, proportional
  to ``b_w * b_a``); an FP32 MAC (``E_fp32_mult + E_fp32_add``, 4.6 pJ) when either operand is not quantized.
* Weights are fetched from DRAM once per image (batch-1 inference): ``params * b_w * E_dram_bit``.
* Input activations are read once per image at their bit width: ``act_in * b_a * E_dram_bit``. An attention
  matmul (``kind="matmul"``) stores no weights; both of its operands are activations read per image:
  ``(act_in * b_a + act_other * b_w) * E_dram_bit``, where ``b_w`` is the bit width of its right-hand operand.

``None`` as a bit width means "not quantized": the tensor is FP32 and is counted as 32 bits. See
``docs/energy_model.md`` for the assumptions and a worked example.

Two alternatives share the memory terms and change only the MAC energy:

* :class:`MaxBitWidthEnergyModel` (``"max_bit_width"``): the multiplier's energy follows the *wider* operand and
  the accumulator has a fixed width, after Spingarn-Eliezer et al., ICLR 2023; constants from Horowitz.
* :class:`TableEnergyModel` (``"table"``): per-MAC energies supplied by the user for each ``"W<bw>A<ba>"`` pair,
  e.g. measured on a target chip.

All three (and :class:`~lit_mpq.energy.hierarchy.MemoryHierarchyEnergyModel`) are selected in a config file with
``class_path`` / ``init_args``.

Example:
    >>> from lit_mpq.plan import LayerSpec
    >>> spec = LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10)
    >>> terms = HorowitzEnergyModel().layer(spec, 8, 8)
    >>> round(terms.mac_pj, 2), terms.weight_mem_pj, terms.act_mem_pj
    (147.2, 102400.0, 10240.0)
"""

from __future__ import annotations

import inspect
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lit_mpq.plan import FLOAT_BITS, LayerSpec

__all__ = [
    "ENERGY_MODELS",
    "EnergyModel",
    "EnergyTerms",
    "HorowitzEnergyModel",
    "PerMacEnergyModel",
    "MaxBitWidthEnergyModel",
    "TableEnergyModel",
    "build_energy_model",
    "parse_precision_key",
    "precision_key",
]

# ------------------------------------------------------------------------------------------------ constants
# All values: M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
# table "Energy per operation" (also the "Rough energy costs for various operations in 45nm 0.9V" figure), 45 nm,
# 0.9 V. Units: picojoules (pJ) per operation, or per bit for memory.

HOROWITZ_SOURCE = (
    'M. Horowitz, "Computing\'s energy problem (and what we can do about it)", ISSCC 2014, '
    'table "Energy per operation", 45 nm, 0.9 V'
)
"""Citation shown next to every number derived from the Horowitz constants."""

INT8_MULT_PJ = 0.2
"""8-bit integer multiply, pJ (Horowitz ISSCC 2014, "Energy per operation": 8b Mult 0.2 pJ)."""

INT8_ADD_PJ = 0.03
"""8-bit integer add, pJ (Horowitz ISSCC 2014, "Energy per operation": 8b Add 0.03 pJ)."""

INT32_ADD_PJ = 0.1
"""32-bit integer add, pJ (Horowitz ISSCC 2014, "Energy per operation": 32b Add 0.1 pJ). Reference only: the
model scales the 8-bit MAC instead (see ``docs/energy_model.md``)."""

INT32_MULT_PJ = 3.1
"""32-bit integer multiply, pJ (Horowitz ISSCC 2014, "Energy per operation": 32b Mult 3.1 pJ). Reference only."""

FP32_MULT_PJ = 3.7
"""32-bit floating-point multiply, pJ (Horowitz ISSCC 2014, "Energy per operation": FP Mult 32b 3.7 pJ)."""

FP32_ADD_PJ = 0.9
"""32-bit floating-point add, pJ (Horowitz ISSCC 2014, "Energy per operation": FP Add 32b 0.9 pJ)."""

DRAM_PJ_PER_BIT = 20.0
"""DRAM access energy per bit, pJ (Horowitz ISSCC 2014, "Energy per operation": DRAM 1.3-2.6 nJ per 64-bit
access, i.e. about 20-40 pJ/bit; the low end, 1.3 nJ / 64 bit = 20.3 pJ/bit, rounded to 20)."""

REFERENCE_MAC_BITS = 8
"""Operand width of the measured integer MAC that :class:`HorowitzEnergyModel` scales from (8 x 8 bits)."""

REFERENCE_ACC_BITS = 32
"""Width of the integer add that :data:`INT32_ADD_PJ` prices; :class:`MaxBitWidthEnergyModel` scales the
accumulator linearly from it."""

MAX_ACC_BITS = 64
"""Widest accumulator :class:`MaxBitWidthEnergyModel` accepts."""

SPINGARN_SOURCE = (
    'N. Spingarn-Eliezer, R. Banner, E. Hoffer, H. Ben-Yaakov, T. Michaeli, "Energy awareness in low precision '
    'neural networks", ICLR 2023 (multiplier energy set by the wider operand, fixed-width accumulator); '
    'constants: M. Horowitz, ISSCC 2014, table "Energy per operation", 45 nm, 0.9 V'
)
"""Citation of :class:`MaxBitWidthEnergyModel`: the paper for the model's shape, Horowitz for its constants."""

TABLE_SOURCE = "user-supplied table"
"""Default citation of :class:`TableEnergyModel`; replace it with the origin of the numbers."""

FP_KEY = "FP"
"""Spelling of "not quantized (FP32)" in a precision key such as ``"W8AFP"``."""

REQUIRED_TABLE_KEYS: tuple[str, ...] = ("W8A8", "WFPAFP")
"""Keys every :class:`TableEnergyModel` needs: the uniform W8A8 and FP32 references of
:func:`~lit_mpq.energy.accounting.energy_report`."""


# ------------------------------------------------------------------------------------------------ terms
@dataclass(frozen=True)
class EnergyTerms:
    """Energy of one layer (or a sum of layers) per image, split by where it is spent.

    Attributes:
        mac_pj: Arithmetic energy of the multiply-accumulates, pJ per image.
        weight_mem_pj: Energy to fetch the weights from memory, pJ per image.
        act_mem_pj: Energy to read the input activations, pJ per image.
    """

    mac_pj: float
    weight_mem_pj: float
    act_mem_pj: float

    @classmethod
    def zero(cls) -> EnergyTerms:
        """Terms of zero energy, the neutral element of ``+``."""
        return cls(0.0, 0.0, 0.0)

    @property
    def total_pj(self) -> float:
        """Sum of the three terms, pJ per image."""
        return self.mac_pj + self.weight_mem_pj + self.act_mem_pj

    def __add__(self, other: EnergyTerms) -> EnergyTerms:
        if not isinstance(other, EnergyTerms):
            return NotImplemented
        return EnergyTerms(
            mac_pj=self.mac_pj + other.mac_pj,
            weight_mem_pj=self.weight_mem_pj + other.weight_mem_pj,
            act_mem_pj=self.act_mem_pj + other.act_mem_pj,
        )

    def __radd__(self, other: object) -> EnergyTerms:
        # Lets the built-in ``sum(terms)`` work: it starts from the integer 0.
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented

    def to_dict(self) -> dict[str, float]:
        """Plain-data form with the total: ``{"mac_pj", "weight_mem_pj", "act_mem_pj", "total_pj"}``."""
        return {
            "mac_pj": self.mac_pj,
            "weight_mem_pj": self.weight_mem_pj,
            "act_mem_pj": self.act_mem_pj,
            "total_pj": self.total_pj,
        }


# ------------------------------------------------------------------------------------------------ models
class EnergyModel(ABC):
    """Energy of one layer per image at given bit widths; subclass it to add a hardware model.

    Attributes:
        name: Short identifier (the key in :data:`ENERGY_MODELS`).
        source: Citation of the paper and table the constants come from.
    """

    name: str = ""
    source: str = ""

    @abstractmethod
    def layer(self, spec: LayerSpec, w_bits: int | None, a_bits: int | None) -> EnergyTerms:
        """Energy of ``spec`` per image with ``w_bits``-bit weights and ``a_bits``-bit input activations.

        Args:
            spec: The layer (parameters, MACs and input elements per image).
            w_bits: Weight bit width, or ``None`` for FP32 weights.
            a_bits: Input-activation bit width, or ``None`` for FP32 inputs.

        Returns:
            The energy terms in pJ per image.
        """

    def constants(self) -> dict[str, float]:
        """The model's constants by name (pJ), for reports; empty unless a subclass fills it."""
        return {}


def _check_bits(bits: int | None, what: str) -> int | None:
    """Return ``bits`` if it is ``None`` or a positive integer; raise a ``ValueError`` otherwise."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= FLOAT_BITS:
        raise ValueError(
            f"{what}={bits!r} is not a bit width the energy model can price: use an integer from 1 to {FLOAT_BITS}, "
            "or None for an FP32 (not quantized) tensor."
        )
    return bits


def integer_add_pj(w_bits: int | None, a_bits: int | None, add8_pj: float, fp32_add_pj: float) -> float:
    """Energy of one elementwise add of two operands at these widths, pJ.

    An FP32 add when either is FP32, else the 8-bit integer add scaled linearly to the wider operand (an adder's
    energy grows with its width).
    """
    if w_bits is None or a_bits is None:
        return fp32_add_pj
    return add8_pj * max(w_bits, a_bits) / REFERENCE_MAC_BITS


def _dram_layer_terms(
    spec: LayerSpec,
    mac_pj: float,
    w_bits: int | None,
    a_bits: int | None,
    dram_pj_per_bit: float,
    add_pj: float = 0.0,
) -> EnergyTerms:
    """Terms shared by every model: ``macs * mac_pj``, and weights and inputs moved once from DRAM.

    Args:
        spec: The layer.
        mac_pj: Energy of one MAC at the layer's bit widths, pJ.
        w_bits: Weight bit width (already validated), ``None`` counts as 32 bits.
        a_bits: Input-activation bit width (already validated), ``None`` counts as 32 bits.
        dram_pj_per_bit: Energy to move one bit from DRAM, pJ.
        add_pj: Energy of one of an add row's elementwise additions (``spec.additions``), pJ.

    Returns:
        ``EnergyTerms(macs * mac_pj + additions * add_pj, params * w_bits * E_bit,
        (act_in * a_bits + act_other * w_bits) * E_bit)``, pJ per image (``act_other`` is a matmul's or an add's
        right-hand operand; 0 for weight layers).
    """
    w_eff = FLOAT_BITS if w_bits is None else w_bits
    a_eff = FLOAT_BITS if a_bits is None else a_bits
    return EnergyTerms(
        mac_pj=spec.macs * mac_pj + spec.additions * add_pj,
        weight_mem_pj=spec.params * w_eff * dram_pj_per_bit,
        # A matmul's right-hand operand (k, v) is an activation too: read per image at its (w_bits) width.
        act_mem_pj=(spec.act_in * a_eff + spec.act_other * w_eff) * dram_pj_per_bit,
    )


def _check_constant(value: float, what: str) -> float:
    """Return ``value`` as a float if it is a finite, non-negative number; raise a ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what}={value!r} is not a valid energy: use a finite, non-negative number of picojoules.")
    return float(value)


class PerMacEnergyModel(EnergyModel):
    """An energy model given by a per-MAC energy plus DRAM traffic for weights and input activations.

    Subclasses set ``dram_pj_per_bit`` and implement :meth:`mac_pj`; the per-layer split is shared.
    """

    dram_pj_per_bit: float

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.constants().items())
        return f"{type(self).__name__}({args})"

    @abstractmethod
    def mac_pj(self, w_bits: int | None, a_bits: int | None) -> float:
        """Energy of one multiply-accumulate at these operand widths, pJ."""

    def layer(self, spec: LayerSpec, w_bits: int | None, a_bits: int | None) -> EnergyTerms:
        """Energy of ``spec`` per image (pJ) with ``w_bits``-bit weights and ``a_bits``-bit inputs.

        Args:
            spec: The layer (``params``, ``macs``, ``act_in`` and ``act_other`` per image are used).
            w_bits: Weight bit width, or ``None`` for FP32 weights (counted as 32 bits).
            a_bits: Input-activation bit width, or ``None`` for FP32 inputs (counted as 32 bits).

        Returns:
            ``EnergyTerms(mac_pj=macs * E_MAC, weight_mem_pj=params * w_bits * E_bit,
            act_mem_pj=(act_in * a_bits + act_other * w_bits) * E_bit)``.

        Raises:
            ValueError: If a bit width is not ``None`` or an integer from 1 to 32.
        """
        _check_bits(w_bits, "w_bits")
        _check_bits(a_bits, "a_bits")
        # Rows without MACs (adds, the output) need no MAC price: a table of measured MACs may not list their pair.
        mac_pj = self.mac_pj(w_bits, a_bits) if spec.macs else 0.0
        add_pj = self.add_pj(w_bits, a_bits) if spec.additions else 0.0
        return _dram_layer_terms(spec, mac_pj, w_bits, a_bits, self.dram_pj_per_bit, add_pj)

    def add_pj(self, w_bits: int | None, a_bits: int | None) -> float:
        """Energy of one elementwise add of two activations (a residual add), pJ.

        :func:`integer_add_pj` with the model's ``add8_pj`` / ``fp32_add_pj`` where it has them, Horowitz's otherwise.
        """
        return integer_add_pj(
            w_bits, a_bits, getattr(self, "add8_pj", INT8_ADD_PJ), getattr(self, "fp32_add_pj", FP32_ADD_PJ)
        )


class HorowitzEnergyModel(PerMacEnergyModel):
    """Energy per image from the 45 nm per-operation energies of Horowitz (ISSCC 2014).

    An integer MAC costs ``(mult8_pj + add8_pj) * w_bits * a_bits / 64`` (0.23 pJ at W8A8; the multiplier's
    area and energy grow with the product of the operand widths). A MAC with an FP32 operand costs
    ``fp32_mult_pj + fp32_add_pj``. Weights are fetched once per image (batch-1 inference) and input
    activations read once, both at ``dram_pj_per_bit`` per bit. Attention matmuls are rows of the plan like any
    layer (MACs at their operands' widths, both operands read per image); biases and operations that are not
    quantized (pooling, softmax, normalisation) are not counted.

    Args:
        mult8_pj: Energy of an 8-bit integer multiply, pJ.
        add8_pj: Energy of an 8-bit integer add, pJ.
        fp32_mult_pj: Energy of a 32-bit floating-point multiply, pJ.
        fp32_add_pj: Energy of a 32-bit floating-point add, pJ.
        dram_pj_per_bit: Energy to move one bit from DRAM, pJ.

    Raises:
        ValueError: If a constant is negative, infinite or not a number.
    """

    name = "horowitz45nm"
    source = HOROWITZ_SOURCE

    def __init__(
        self,
        mult8_pj: float = INT8_MULT_PJ,
        add8_pj: float = INT8_ADD_PJ,
        fp32_mult_pj: float = FP32_MULT_PJ,
        fp32_add_pj: float = FP32_ADD_PJ,
        dram_pj_per_bit: float = DRAM_PJ_PER_BIT,
    ) -> None:
        self.mult8_pj = _check_constant(mult8_pj, "mult8_pj")
        self.add8_pj = _check_constant(add8_pj, "add8_pj")
        self.fp32_mult_pj = _check_constant(fp32_mult_pj, "fp32_mult_pj")
        self.fp32_add_pj = _check_constant(fp32_add_pj, "fp32_add_pj")
        self.dram_pj_per_bit = _check_constant(dram_pj_per_bit, "dram_pj_per_bit")

    def constants(self) -> dict[str, float]:
        """The constructor arguments by name, in pJ (per operation, or per bit for DRAM)."""
        return {
            "mult8_pj": self.mult8_pj,
            "add8_pj": self.add8_pj,
            "fp32_mult_pj": self.fp32_mult_pj,
            "fp32_add_pj": self.fp32_add_pj,
            "dram_pj_per_bit": self.dram_pj_per_bit,
        }

    def mac_pj(self, w_bits: int | None, a_bits: int | None) -> float:
        """Energy of one multiply-accumulate, pJ.

        Args:
            w_bits: Weight bit width, or ``None`` for FP32.
            a_bits: Activation bit width, or ``None`` for FP32.

        Returns:
            ``fp32_mult_pj + fp32_add_pj`` if either operand is FP32, else
            ``(mult8_pj + add8_pj) * w_bits * a_bits / 64``.

        Raises:
            ValueError: If a bit width is not ``None`` or an integer from 1 to 32.
        """
        w_bits = _check_bits(w_bits, "w_bits")
        a_bits = _check_bits(a_bits, "a_bits")
        if w_bits is None or a_bits is None:
            return self.fp32_mult_pj + self.fp32_add_pj
        return (self.mult8_pj + self.add8_pj) * (w_bits * a_bits) / (REFERENCE_MAC_BITS * REFERENCE_MAC_BITS)


class MaxBitWidthEnergyModel(PerMacEnergyModel):
    """MAC energy set by the wider operand plus a fixed-width accumulator; memory terms as Horowitz.

    After N. Spingarn-Eliezer et al., "Energy awareness in low precision neural networks", ICLR 2023. An integer
    MAC costs::

        E_MAC(b_w, b_a) = mult8_pj * (max(b_w, b_a) / 8) ** 2  +  acc32_add_pj * acc_bits / 32

    (0.3 pJ at W8A8, 0.15 pJ at W4A4 and at W4A8 alike with the defaults). A MAC with an FP32 operand costs
    ``fp32_mult_pj + fp32_add_pj``; weights and input activations are moved once per image from DRAM at
    ``dram_pj_per_bit``, exactly as in :class:`HorowitzEnergyModel`.

    What comes from the paper, and what is ours:

    * **The paper's modelling assumptions** (as we read them): a multiplier is built for, and its energy follows,
      the *larger* of its two operand widths, so lowering only the weights (W4A8) saves no multiplier energy over
      W8A8; and the accumulator keeps a fixed width (typically 32 bits) whatever the operand widths, so its
      energy does not shrink with quantization and dominates at low bit widths. This model follows those
      observations; it does not reproduce the paper's own power model (which counts bit toggles per operation
      and depends on the data), and the exact functional form above is our simplification.
    * **Our calibration:** the quadratic growth of the multiplier with its width (an array multiplier of
      ``b x b`` bits), anchored at Horowitz's 8-bit multiply (0.2 pJ); the accumulator priced as Horowitz's
      32-bit integer add (0.1 pJ) scaled linearly with ``acc_bits``; the FP32 and DRAM constants. All constants
      are Horowitz, ISSCC 2014, 45 nm, 0.9 V.

    Args:
        mult8_pj: Energy of an 8 x 8-bit integer multiply, pJ.
        acc32_add_pj: Energy of a 32-bit integer add, pJ (the accumulator is priced as ``acc_bits / 32`` of it).
        acc_bits: Width of the accumulator, bits (an integer from 1 to 64).
        fp32_mult_pj: Energy of a 32-bit floating-point multiply, pJ.
        fp32_add_pj: Energy of a 32-bit floating-point add, pJ.
        dram_pj_per_bit: Energy to move one bit from DRAM, pJ.

    Raises:
        ValueError: If a constant is negative, infinite or not a number, or ``acc_bits`` is not an integer from 1
            to 64.

    Example:
        >>> model = MaxBitWidthEnergyModel()
        >>> round(model.mac_pj(4, 8), 4) == round(model.mac_pj(8, 8), 4) == 0.3
        True
    """

    name = "max_bit_width"
    source = SPINGARN_SOURCE

    def __init__(
        self,
        mult8_pj: float = INT8_MULT_PJ,
        acc32_add_pj: float = INT32_ADD_PJ,
        acc_bits: int = REFERENCE_ACC_BITS,
        fp32_mult_pj: float = FP32_MULT_PJ,
        fp32_add_pj: float = FP32_ADD_PJ,
        dram_pj_per_bit: float = DRAM_PJ_PER_BIT,
    ) -> None:
        self.mult8_pj = _check_constant(mult8_pj, "mult8_pj")
        self.acc32_add_pj = _check_constant(acc32_add_pj, "acc32_add_pj")
        if isinstance(acc_bits, bool) or not isinstance(acc_bits, int) or not 1 <= acc_bits <= MAX_ACC_BITS:
            raise ValueError(
                f"acc_bits={acc_bits!r} is not a valid accumulator width: use an integer from 1 to {MAX_ACC_BITS} "
                f"(default {REFERENCE_ACC_BITS})."
            )
        self.acc_bits = acc_bits
        self.fp32_mult_pj = _check_constant(fp32_mult_pj, "fp32_mult_pj")
        self.fp32_add_pj = _check_constant(fp32_add_pj, "fp32_add_pj")
        self.dram_pj_per_bit = _check_constant(dram_pj_per_bit, "dram_pj_per_bit")

    def constants(self) -> dict[str, float]:
        """The constructor arguments by name: energies in pJ (per operation, or per bit), ``acc_bits`` in bits."""
        return {
            "mult8_pj": self.mult8_pj,
            "acc32_add_pj": self.acc32_add_pj,
            "acc_bits": self.acc_bits,
            "fp32_mult_pj": self.fp32_mult_pj,
            "fp32_add_pj": self.fp32_add_pj,
            "dram_pj_per_bit": self.dram_pj_per_bit,
        }

    def accumulate_pj(self) -> float:
        """Energy of one accumulation, pJ: ``acc32_add_pj * acc_bits / 32`` (0.1 pJ by default)."""
        return self.acc32_add_pj * self.acc_bits / REFERENCE_ACC_BITS

    def mac_pj(self, w_bits: int | None, a_bits: int | None) -> float:
        """Energy of one multiply-accumulate, pJ.

        Args:
            w_bits: Weight bit width, or ``None`` for FP32.
            a_bits: Activation bit width, or ``None`` for FP32.

        Returns:
            ``fp32_mult_pj + fp32_add_pj`` if either operand is FP32, else
            ``mult8_pj * (max(w_bits, a_bits) / 8) ** 2 + acc32_add_pj * acc_bits / 32``.

        Raises:
            ValueError: If a bit width is not ``None`` or an integer from 1 to 32.
        """
        w_bits = _check_bits(w_bits, "w_bits")
        a_bits = _check_bits(a_bits, "a_bits")
        if w_bits is None or a_bits is None:
            return self.fp32_mult_pj + self.fp32_add_pj
        width = max(w_bits, a_bits)
        return self.mult8_pj * (width / REFERENCE_MAC_BITS) ** 2 + self.accumulate_pj()


_KEY_PATTERN = re.compile(r"W(\d+|FP)A(\d+|FP)")


def precision_key(w_bits: int | None, a_bits: int | None) -> str:
    """The ``"W<bw>A<ba>"`` name of a precision pair, ``"FP"`` for a tensor that is not quantized.

    Args:
        w_bits: Weight bit width, or ``None`` for FP32.
        a_bits: Activation bit width, or ``None`` for FP32.

    Returns:
        For example ``"W4A8"``, ``"W8AFP"`` or ``"WFPAFP"``.

    Example:
        >>> precision_key(4, None)
        'W4AFP'
    """
    return f"W{FP_KEY if w_bits is None else w_bits}A{FP_KEY if a_bits is None else a_bits}"


def parse_precision_key(key: str) -> tuple[int | None, int | None]:
    """Inverse of :func:`precision_key`; case and surrounding spaces are ignored.

    Args:
        key: A key such as ``"W4A8"``, ``"w8afp"`` or ``"WFPAFP"``.

    Returns:
        ``(w_bits, a_bits)`` with ``None`` for ``"FP"``.

    Raises:
        ValueError: If ``key`` does not have the form ``W<bits|FP>A<bits|FP>`` with bits from 1 to 32.
    """
    match = _KEY_PATTERN.fullmatch(key.strip().upper()) if isinstance(key, str) else None
    if match is None:
        raise ValueError(
            f"precision key {key!r} is not valid: write 'W<bits>A<bits>' with integer bits from 1 to {FLOAT_BITS} "
            f"or '{FP_KEY}' for a tensor that is not quantized, e.g. 'W8A8', 'W4A8', 'W{FP_KEY}A{FP_KEY}'."
        )
    pair = tuple(None if group == FP_KEY else int(group) for group in match.groups())
    for bits in pair:
        if bits is not None and not 1 <= bits <= FLOAT_BITS:
            raise ValueError(f"precision key {key!r} has a bit width outside 1..{FLOAT_BITS}.")
    return pair[0], pair[1]


class TableEnergyModel(PerMacEnergyModel):
    """MAC energies from a user-supplied table, one entry per (weight, activation) precision pair.

    Use it for numbers measured or simulated on a target chip, or taken from a paper. The MAC energy of a layer
    is looked up as ``mac_pj["W<w_bits>A<a_bits>"]`` (``"FP"`` for a tensor that is not quantized); the memory
    terms are those of :class:`HorowitzEnergyModel` (each bit moved once from DRAM at ``dram_pj_per_bit``).
    Keys are case-insensitive and stored in the canonical form of :func:`precision_key`.

    The table must contain ``"W8A8"`` and ``"WFPAFP"``: every energy report compares the plan with uniform W8A8
    and with FP32. Pricing a pair that the table lacks raises a ``ValueError`` that lists the keys it has.

    Args:
        mac_pj: Energy of one MAC in pJ per precision key, e.g. ``{"W8A8": 0.23, "W4A4": 0.06, "WFPAFP": 4.6}``.
        dram_pj_per_bit: Energy to move one bit from DRAM, pJ.
        source: Where the numbers come from (paper and table, or measurement); shown in every report.

    Raises:
        ValueError: If a key is malformed or repeated, a value is not a finite non-negative number, a required key
            is missing, or ``source`` is empty.

    Example:
        >>> model = TableEnergyModel({"W8A8": 0.23, "w4a4": 0.06, "WFPAFP": 4.6}, source="my chip, 7 nm")
        >>> model.mac_pj(4, 4)
        0.06
    """

    name = "table"

    def __init__(
        self,
        mac_pj: dict[str, float],
        dram_pj_per_bit: float = DRAM_PJ_PER_BIT,
        source: str = TABLE_SOURCE,
    ) -> None:
        if not isinstance(mac_pj, Mapping) or not mac_pj:
            raise ValueError(
                f"mac_pj={mac_pj!r} is not a valid table: give a non-empty mapping from precision keys to pJ per MAC, "
                'e.g. {"W8A8": 0.23, "W4A4": 0.06, "WFPAFP": 4.6}.'
            )
        table: dict[str, float] = {}
        for key, value in mac_pj.items():
            canonical = precision_key(*parse_precision_key(key))
            if canonical in table:
                raise ValueError(f"mac_pj lists {canonical!r} twice (keys are case-insensitive): keep one entry.")
            table[canonical] = _check_constant(value, f"mac_pj[{key!r}]")
        missing = [key for key in REQUIRED_TABLE_KEYS if key not in table]
        if missing:
            raise ValueError(
                f"mac_pj lacks {missing}: the table must price uniform W8A8 and FP32 ('WFPAFP'), which every energy "
                f"report uses as references. It has {sorted(table)}."
            )
        if not isinstance(source, str) or not source.strip():
            raise ValueError("source must name where the table's numbers come from (a paper and table, or a chip).")
        self.mac_table = table
        self.dram_pj_per_bit = _check_constant(dram_pj_per_bit, "dram_pj_per_bit")
        self.source = source

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mac_pj={self.mac_table!r}, dram_pj_per_bit={self.dram_pj_per_bit!r}, "
            f"source={self.source!r})"
        )

    def constants(self) -> dict[str, float]:
        """The table as ``{"mac_pj[W8A8]": ..., ...}`` plus ``dram_pj_per_bit``, all in pJ."""
        constants = {f"mac_pj[{key}]": value for key, value in self.mac_table.items()}
        constants["dram_pj_per_bit"] = self.dram_pj_per_bit
        return constants

    def mac_pj(self, w_bits: int | None, a_bits: int | None) -> float:
        """Energy of one multiply-accumulate, pJ, looked up in the table.

        Args:
            w_bits: Weight bit width, or ``None`` for FP32.
            a_bits: Activation bit width, or ``None`` for FP32.

        Returns:
            ``mac_pj[precision_key(w_bits, a_bits)]``.

        Raises:
            ValueError: If a bit width is not ``None`` or an integer from 1 to 32, or the table has no entry for
                the pair (the message lists the entries it has).
        """
        key = precision_key(_check_bits(w_bits, "w_bits"), _check_bits(a_bits, "a_bits"))
        if key not in self.mac_table:
            raise ValueError(
                f"the energy table has no entry for {key}: add it to mac_pj, or restrict the candidate bit widths to "
                f"the pairs it has: {sorted(self.mac_table)}."
            )
        return self.mac_table[key]


ENERGY_MODELS: dict[str, type[EnergyModel]] = {
    HorowitzEnergyModel.name: HorowitzEnergyModel,
    "horowitz": HorowitzEnergyModel,
    MaxBitWidthEnergyModel.name: MaxBitWidthEnergyModel,
    TableEnergyModel.name: TableEnergyModel,
    # "memory_hierarchy" (MemoryHierarchyEnergyModel) is added by lit_mpq.energy.hierarchy, which imports this module;
    # the package __init__ imports it, so the entry is there whenever lit_mpq.energy is imported.
}
"""Energy models by name (aliases included), for ``build_energy_model`` and config files."""


def build_energy_model(name: str, init_args: Mapping[str, Any] | None = None) -> EnergyModel:
    """Build an energy model from its name, with its default constants unless ``init_args`` overrides them.

    Args:
        name: A key of :data:`ENERGY_MODELS` (case-insensitive), e.g. ``"horowitz45nm"``, ``"max_bit_width"``,
            ``"table"`` or ``"memory_hierarchy"``.
        init_args: Constructor arguments, as in a config file's ``init_args``; ``"table"`` needs ``mac_pj``.

    Returns:
        The model instance.

    Raises:
        ValueError: If no model has that name (the message lists the known names), or the arguments do not fit
            the model's constructor (the message lists its arguments).

    Example:
        >>> build_energy_model("table", {"mac_pj": {"W8A8": 0.2, "WFPAFP": 4.0}}).mac_pj(8, 8)
        0.2
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in ENERGY_MODELS:
        raise ValueError(f"unknown energy model {name!r}: use one of {sorted(ENERGY_MODELS)}.")
    cls = ENERGY_MODELS[key]
    args = dict(init_args or {})
    try:
        signature = inspect.signature(cls).bind(**args)
    except TypeError as err:
        allowed = list(inspect.signature(cls).parameters)
        raise ValueError(
            f"energy model {name!r} ({cls.__name__}) cannot be built with {sorted(args)}: {err}. "
            f"Its arguments are {allowed}."
        ) from err
    return cls(*signature.args, **signature.kwargs)
