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
* Input activations are read once per image at their bit width: ``act_in * b_a * E_dram_bit``.

``None`` as a bit width means "not quantized": the tensor is FP32 and is counted as 32 bits. See
``docs/energy_model.md`` for the assumptions and a worked example.

Example:
    >>> from lit_mpq.plan import LayerSpec
    >>> spec = LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10)
    >>> terms = HorowitzEnergyModel().layer(spec, 8, 8)
    >>> round(terms.mac_pj, 2), terms.weight_mem_pj, terms.act_mem_pj
    (147.2, 102400.0, 10240.0)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from lit_mpq.plan import FLOAT_BITS, LayerSpec

__all__ = [
    "ENERGY_MODELS",
    "EnergyModel",
    "EnergyTerms",
    "HorowitzEnergyModel",
    "build_energy_model",
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


def _check_constant(value: float, what: str) -> float:
    """Return ``value`` as a float if it is a finite, non-negative number; raise a ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what}={value!r} is not a valid energy: use a finite, non-negative number of picojoules.")
    return float(value)


class HorowitzEnergyModel(EnergyModel):
    """Energy per image from the 45 nm per-operation energies of Horowitz (ISSCC 2014).

    An integer MAC costs ``(mult8_pj + add8_pj) * w_bits * a_bits / 64`` (0.23 pJ at W8A8; the multiplier's
    area and energy grow with the product of the operand widths). A MAC with an FP32 operand costs
    ``fp32_mult_pj + fp32_add_pj``. Weights are fetched once per image (batch-1 inference) and input
    activations read once, both at ``dram_pj_per_bit`` per bit. Biases and operations that are not quantized
    (pooling, softmax, attention matmuls, normalisation) are not counted.

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

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.constants().items())
        return f"{type(self).__name__}({args})"

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

    def layer(self, spec: LayerSpec, w_bits: int | None, a_bits: int | None) -> EnergyTerms:
        """Energy of ``spec`` per image (pJ) with ``w_bits``-bit weights and ``a_bits``-bit inputs.

        Args:
            spec: The layer (``params``, ``macs`` and ``act_in`` per image are used).
            w_bits: Weight bit width, or ``None`` for FP32 weights (counted as 32 bits).
            a_bits: Input-activation bit width, or ``None`` for FP32 inputs (counted as 32 bits).

        Returns:
            ``EnergyTerms(mac_pj=macs * E_MAC, weight_mem_pj=params * w_bits * E_bit,
            act_mem_pj=act_in * a_bits * E_bit)``.

        Raises:
            ValueError: If a bit width is not ``None`` or an integer from 1 to 32.
        """
        mac = self.mac_pj(w_bits, a_bits)
        w_eff = FLOAT_BITS if w_bits is None else w_bits
        a_eff = FLOAT_BITS if a_bits is None else a_bits
        return EnergyTerms(
            mac_pj=spec.macs * mac,
            weight_mem_pj=spec.params * w_eff * self.dram_pj_per_bit,
            act_mem_pj=spec.act_in * a_eff * self.dram_pj_per_bit,
        )


ENERGY_MODELS: dict[str, type[EnergyModel]] = {
    HorowitzEnergyModel.name: HorowitzEnergyModel,
    "horowitz": HorowitzEnergyModel,
}
"""Energy models by name (aliases included), for ``build_energy_model`` and config files."""


def build_energy_model(name: str) -> EnergyModel:
    """Build an energy model with its default constants from its name.

    Args:
        name: A key of :data:`ENERGY_MODELS` (case-insensitive), e.g. ``"horowitz45nm"``.

    Returns:
        The model instance.

    Raises:
        ValueError: If no model has that name; the message lists the known names.
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in ENERGY_MODELS:
        raise ValueError(f"unknown energy model {name!r}: use one of {sorted(ENERGY_MODELS)}.")
    return ENERGY_MODELS[key]()
