"""A memory-hierarchy energy model: DRAM, an on-chip SRAM buffer and PE register files, weights reused across a batch.

The default model (:class:`~lit_mpq.energy.models.HorowitzEnergyModel`) moves every weight and every input
activation from DRAM once per image. An accelerator does better: it reuses each weight fetched from DRAM for every
image of a batch, keeps activations in an on-chip SRAM buffer when they fit, and feeds its multipliers from small
register files. :class:`MemoryHierarchyEnergyModel` (``"memory_hierarchy"``) prices a layer on such a machine, per
image, with ``B`` = ``batch_size``, ``b_w`` / ``b_a`` the weight / input-activation bits and ``b_o`` the output
bits (``output_bits``, or ``b_a`` when not set)::

    MAC          macs * E_MAC(b_w, b_a)                            (Horowitz's MAC, as HorowitzEnergyModel)
    RF           macs * (b_w + b_a) * E_rf                         (both operands read from a register file per MAC)
    DRAM weights params * b_w * E_dram / B                         (fetched once per batch)
    activations  2 * act_in * b_a * E_level                        (written once by the producer, read once here)
    E_level      E_sram if B * (act_in * b_a + act_out * b_o) <= 8 * sram_bytes, else E_dram

The working set that must fit is the input and output activations of the *whole batch* at that layer: a weight is
reused across the batch only if the layer runs on all ``B`` images while the weight is held, so their activations
are live together. Weights are not part of it: they stream from DRAM into the PE array and stay in its register
files (Eyeriss' row-stationary dataflow keeps filter rows in the PE register files), so they never take SRAM space
and never cost an SRAM access. A matmul's right-hand operand (``act_other``, at ``b_w`` bits) is an activation:
it is in the working set and is moved like the input. ``None`` as a bit width means FP32 (32 bits, FP32 MAC).

Constants and their sources (each a module-level value, each overridable from the constructor):

* MAC and DRAM: M. Horowitz, ISSCC 2014 (the constants of :mod:`lit_mpq.energy.models`; DRAM 20 pJ/bit).
* SRAM: Horowitz's 64-bit cache accesses, 10 pJ (8 KB), 20 pJ (32 KB), 100 pJ (1 MB), interpolated linearly in
  log(size)-log(energy) for the configured size (:func:`horowitz_sram_pj_per_bit`); outside 8 KB-1 MB give
  ``sram_pj_per_bit`` yourself.
* RF: Eyeriss (Chen, Emer, Sze, ISCA 2016) normalises a register-file access of a 16-bit word to 1x a 16-bit MAC;
  anchored at Horowitz's MAC scaled to 16 x 16 bits (0.92 pJ), that is 0.92 / 16 = 0.0575 pJ/bit.

The per-level energies are in :meth:`MemoryHierarchyEnergyModel.levels` (a :class:`HierarchyEnergy`) and, summed
over a plan, in :func:`hierarchy_report`; :meth:`MemoryHierarchyEnergyModel.layer` folds them into the three
``EnergyTerms`` every report uses: ``weight_mem_pj`` = DRAM weight fetches + weight RF reads, ``act_mem_pj`` =
activation SRAM or DRAM traffic + activation RF reads. See ``docs/energy_model.md``, "Memory-hierarchy model".

Example:
    >>> from lit_mpq.plan import LayerSpec
    >>> spec = LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10)
    >>> model = MemoryHierarchyEnergyModel(sram_bytes=32 * 1024, batch_size=4)
    >>> levels = model.levels(spec, 8, 8)
    >>> levels.dram_weight_pj, round(levels.rf_pj, 2), levels.sram_act_pj   # 640*8*20/4, 640*16*0.0575, 2*64*8*20/64
    (25600.0, 588.8, 320.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from lit_mpq.energy.accounting import PJ_PER_UJ
from lit_mpq.energy.models import (
    DRAM_PJ_PER_BIT,
    ENERGY_MODELS,
    FP32_ADD_PJ,
    FP32_MULT_PJ,
    HOROWITZ_SOURCE,
    INT8_ADD_PJ,
    INT8_MULT_PJ,
    REFERENCE_MAC_BITS,
    EnergyModel,
    EnergyTerms,
    HorowitzEnergyModel,
    _check_bits,
    _check_constant,
)
from lit_mpq.plan import FLOAT_BITS, OPERATION_KINDS, LayerSpec, QuantPlan

__all__ = [
    "DEFAULT_SRAM_BYTES",
    "EYERISS_SOURCE",
    "HOROWITZ_SRAM_PJ_PER_ACCESS",
    "RF_PJ_PER_BIT",
    "HierarchyEnergy",
    "MemoryHierarchyEnergyModel",
    "hierarchy_report",
    "horowitz_sram_pj_per_bit",
]

# ------------------------------------------------------------------------------------------------ constants
EYERISS_SOURCE = (
    'Y.-H. Chen, J. Emer, V. Sze, "Eyeriss: A Spatial Architecture for Energy-Efficient Dataflow for Convolutional '
    'Neural Networks", ISCA 2016, table "Normalized energy cost relative to a MAC operation extracted from a '
    'commercial 65nm process" (16-bit data)'
)
"""Citation of the register-file / buffer / DRAM energy ratios."""

EYERISS_WORD_BITS = 16
"""Width of the data (and of the MAC) that Eyeriss' normalised energies refer to, bits."""

EYERISS_RF_RATIO = 1.0
"""Register-file access (0.5 KB RF in a PE) / 16-bit MAC energy (Eyeriss, ISCA 2016: RF 1x)."""

EYERISS_ARRAY_RATIO = 2.0
"""Inter-PE (array) transfer / MAC energy (Eyeriss: 2x). Reference only: the model has no array level."""

EYERISS_BUFFER_RATIO = 6.0
"""Global-buffer (100-300 KB SRAM) access / MAC energy (Eyeriss: 6x). Reference only: the SRAM is priced from
Horowitz's cache figures; ``docs/energy_model.md`` compares the two."""

EYERISS_DRAM_RATIO = 200.0
"""DRAM access / MAC energy (Eyeriss: 200x). Reference only: DRAM is priced from Horowitz (20 pJ/bit)."""

SRAM_ACCESS_BITS = 64
"""Width of the SRAM accesses Horowitz priced, bits."""

HOROWITZ_SRAM_PJ_PER_ACCESS: tuple[tuple[int, float], ...] = ((8 * 1024, 10.0), (32 * 1024, 20.0), (1024 * 1024, 100.0))
"""``(size in bytes, pJ per 64-bit access)`` of an on-chip cache/SRAM (Horowitz ISSCC 2014, "Energy per operation",
memory rows "Cache (64bit)": 8 KB 10 pJ, 32 KB 20 pJ, 1 MB 100 pJ; KB read as 1,024 bytes)."""

RF_PJ_PER_BIT = (
    EYERISS_RF_RATIO
    * (INT8_MULT_PJ + INT8_ADD_PJ)
    * (EYERISS_WORD_BITS * EYERISS_WORD_BITS)
    / (REFERENCE_MAC_BITS * REFERENCE_MAC_BITS)
    / EYERISS_WORD_BITS
)
"""Register-file access energy per bit, pJ: Eyeriss' RF = 1 x MAC for 16-bit words, with the MAC priced as Horowitz's
8-bit MAC (0.23 pJ) scaled by ``b_w * b_a`` to 16 x 16 bits (0.92 pJ); 0.92 pJ / 16 bits = 0.0575 pJ/bit."""

DEFAULT_SRAM_BYTES = 108 * 1024
"""On-chip SRAM for activations, bytes: the 108 KB global buffer of the Eyeriss chip (Chen, Krishna, Emer, Sze,
"Eyeriss: An Energy-Efficient Reconfigurable Accelerator for Deep Convolutional Neural Networks", JSSC 2017)."""

ACT_LEVEL_ACCESSES = 2
"""Accesses of each activation at its level (SRAM or DRAM): written once by the layer that produces it, read once by
the layer that consumes it (both charged to the consumer, at the consumer's input bit width)."""


def horowitz_sram_pj_per_bit(sram_bytes: int) -> float:
    """SRAM access energy per bit for a buffer of ``sram_bytes``, from Horowitz's three cache sizes.

    Linear interpolation of log(energy) against log(size) between the points of
    :data:`HOROWITZ_SRAM_PJ_PER_ACCESS`, divided by the 64-bit access width: 8 KB gives 10/64 = 0.156 pJ/bit, 32 KB
    0.3125 pJ/bit, 1 MB 1.5625 pJ/bit, and 108 KB (Eyeriss' buffer) 0.55 pJ/bit. Horowitz's numbers grow about as
    the square root of the size (the slope is 0.50 from 8 to 32 KB and 0.46 from 32 KB to 1 MB).

    Args:
        sram_bytes: Size of the SRAM, bytes (8 KiB to 1 MiB).

    Returns:
        Energy per bit accessed, pJ.

    Raises:
        ValueError: If ``sram_bytes`` is not an integer within Horowitz's 8 KB-1 MB (no published figure to
            interpolate from: pass ``sram_pj_per_bit`` to the model instead).

    Example:
        >>> horowitz_sram_pj_per_bit(32 * 1024)
        0.3125
    """
    table = HOROWITZ_SRAM_PJ_PER_ACCESS
    low, high = table[0][0], table[-1][0]
    if isinstance(sram_bytes, bool) or not isinstance(sram_bytes, int) or not low <= sram_bytes <= high:
        raise ValueError(
            f"sram_bytes={sram_bytes!r} is outside the 8 KB-1 MB SRAM sizes Horowitz (ISSCC 2014) priced, so there is "
            f"no figure to interpolate from: use an integer from {low} to {high}, or give sram_pj_per_bit explicitly."
        )
    for (size_a, pj_a), (size_b, pj_b) in zip(table, table[1:], strict=False):
        if sram_bytes <= size_b:
            slope = math.log(pj_b / pj_a) / math.log(size_b / size_a)
            return pj_a * (sram_bytes / size_a) ** slope / SRAM_ACCESS_BITS
    raise AssertionError("unreachable: sram_bytes was checked against the table's range")


# ------------------------------------------------------------------------------------------------ levels
@dataclass(frozen=True)
class HierarchyEnergy:
    """Energy of one layer (or a sum of layers) per image, split by memory level and operand, pJ.

    Attributes:
        mac_pj: Multiply-accumulates.
        rf_weight_pj: Register-file reads of the weight operand (a matmul's second operand is an activation and is
            in ``rf_act_pj``).
        rf_act_pj: Register-file reads of the activation operand(s).
        sram_act_pj: Activation writes and reads in the on-chip SRAM (layers whose working set fits).
        dram_weight_pj: Weight fetches from DRAM, once per batch, divided by the batch size.
        dram_act_pj: Activation writes and reads in DRAM (layers whose working set does not fit).
    """

    mac_pj: float
    rf_weight_pj: float
    rf_act_pj: float
    sram_act_pj: float
    dram_weight_pj: float
    dram_act_pj: float

    @classmethod
    def zero(cls) -> HierarchyEnergy:
        """Zero energy at every level, the neutral element of ``+``."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def __add__(self, other: HierarchyEnergy) -> HierarchyEnergy:
        if not isinstance(other, HierarchyEnergy):
            return NotImplemented
        return HierarchyEnergy(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def rf_pj(self) -> float:
        """Register-file level, pJ."""
        return self.rf_weight_pj + self.rf_act_pj

    @property
    def sram_pj(self) -> float:
        """SRAM level, pJ."""
        return self.sram_act_pj

    @property
    def dram_pj(self) -> float:
        """DRAM level, pJ."""
        return self.dram_weight_pj + self.dram_act_pj

    @property
    def total_pj(self) -> float:
        """All levels and the MACs, pJ."""
        return self.mac_pj + self.rf_pj + self.sram_pj + self.dram_pj

    def terms(self) -> EnergyTerms:
        """The three report terms.

        Returns:
            ``EnergyTerms(mac_pj, weight_mem_pj = DRAM + RF weight energy, act_mem_pj = SRAM + DRAM + RF activation
            energy)``.
        """
        return EnergyTerms(
            mac_pj=self.mac_pj,
            weight_mem_pj=self.dram_weight_pj + self.rf_weight_pj,
            act_mem_pj=self.sram_act_pj + self.dram_act_pj + self.rf_act_pj,
        )

    def to_dict(self) -> dict[str, float]:
        """Every field plus ``rf_pj``, ``sram_pj``, ``dram_pj`` and ``total_pj``, pJ."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return data | {"rf_pj": self.rf_pj, "sram_pj": self.sram_pj, "dram_pj": self.dram_pj, "total_pj": self.total_pj}


def _check_count(value: int, what: str, example: str) -> int:
    """Return ``value`` if it is a positive integer; raise a ``ValueError`` naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}={value!r} is not valid: use a positive integer, e.g. {example}.")
    return value


class MemoryHierarchyEnergyModel(EnergyModel):
    """Energy per image on an accelerator with DRAM, an on-chip SRAM buffer and PE register files.

    See the module docstring for the formula and the sources of the constants, and ``docs/energy_model.md``
    ("Memory-hierarchy model") for a worked example and a check against published figures.

    Args:
        sram_bytes: On-chip SRAM available for activations, bytes (default 108 KB, the Eyeriss chip's buffer).
        batch_size: Images that share one fetch of the weights from DRAM (1: batch-1 inference).
        sram_pj_per_bit: SRAM access energy per bit, pJ; ``None`` interpolates Horowitz's cache figures at
            ``sram_bytes`` (:func:`horowitz_sram_pj_per_bit`, 8 KB to 1 MB).
        rf_pj_per_bit: Register-file access energy per bit, pJ (Eyeriss' ratio on Horowitz's MAC, 0.0575).
        dram_pj_per_bit: DRAM access energy per bit, pJ (Horowitz, 20).
        mult8_pj: 8-bit integer multiply, pJ (the MAC is :class:`~lit_mpq.energy.models.HorowitzEnergyModel`'s).
        add8_pj: 8-bit integer add, pJ.
        fp32_mult_pj: 32-bit floating-point multiply, pJ.
        fp32_add_pj: 32-bit floating-point add, pJ.
        output_bits: Bit width the working set counts the layer's output activations at; ``None``: the layer's own
            input-activation width (the output's true width is the next layer's input width, which a per-layer model
            cannot see).

    Raises:
        ValueError: If a size or count is not a positive integer, an energy is negative or not finite,
            ``output_bits`` is not 1-32, or ``sram_pj_per_bit`` is ``None`` and ``sram_bytes`` is outside 8 KB-1 MB.

    Example:
        >>> model = MemoryHierarchyEnergyModel()
        >>> round(model.sram_pj_per_bit, 3), model.rf_pj_per_bit, model.batch_size
        (0.55, 0.0575, 1)
    """

    name = "memory_hierarchy"
    source = (
        f"{HOROWITZ_SOURCE} (MAC, DRAM, SRAM 8 KB/32 KB/1 MB cache accesses); register file: {EYERISS_SOURCE}, "
        "RF = 1x a 16-bit MAC"
    )

    def __init__(
        self,
        sram_bytes: int = DEFAULT_SRAM_BYTES,
        batch_size: int = 1,
        sram_pj_per_bit: float | None = None,
        rf_pj_per_bit: float = RF_PJ_PER_BIT,
        dram_pj_per_bit: float = DRAM_PJ_PER_BIT,
        mult8_pj: float = INT8_MULT_PJ,
        add8_pj: float = INT8_ADD_PJ,
        fp32_mult_pj: float = FP32_MULT_PJ,
        fp32_add_pj: float = FP32_ADD_PJ,
        output_bits: int | None = None,
    ) -> None:
        self.sram_bytes = _check_count(sram_bytes, "sram_bytes", "110592 (108 KB)")
        self.batch_size = _check_count(batch_size, "batch_size", "1 or 4")
        self.sram_pj_per_bit = (
            horowitz_sram_pj_per_bit(sram_bytes)
            if sram_pj_per_bit is None
            else _check_constant(sram_pj_per_bit, "sram_pj_per_bit")
        )
        self.rf_pj_per_bit = _check_constant(rf_pj_per_bit, "rf_pj_per_bit")
        self.dram_pj_per_bit = _check_constant(dram_pj_per_bit, "dram_pj_per_bit")
        if output_bits is not None and (
            isinstance(output_bits, bool) or not isinstance(output_bits, int) or not 1 <= output_bits <= FLOAT_BITS
        ):
            raise ValueError(
                f"output_bits={output_bits!r} is not valid: use an integer from 1 to {FLOAT_BITS}, or None to count "
                "each layer's outputs at its own input-activation width."
            )
        self.output_bits = output_bits
        # The MAC is Horowitz's, constants and all; its own memory terms are not used.
        self._mac = HorowitzEnergyModel(mult8_pj, add8_pj, fp32_mult_pj, fp32_add_pj, dram_pj_per_bit)

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.constants().items())
        return f"{type(self).__name__}({args})"

    def constants(self) -> dict[str, float]:
        """The constructor arguments by name: energies in pJ (per operation or per bit), sizes in bytes or images.

        ``sram_pj_per_bit`` is the value used (interpolated when not given); ``output_bits`` is listed only when set.
        """
        constants: dict[str, float] = {
            "sram_bytes": self.sram_bytes,
            "batch_size": self.batch_size,
            "sram_pj_per_bit": self.sram_pj_per_bit,
            "rf_pj_per_bit": self.rf_pj_per_bit,
            "dram_pj_per_bit": self.dram_pj_per_bit,
            **{key: value for key, value in self._mac.constants().items() if key != "dram_pj_per_bit"},
        }
        if self.output_bits is not None:
            constants["output_bits"] = self.output_bits
        return constants

    def mac_pj(self, w_bits: int | None, a_bits: int | None) -> float:
        """Energy of one multiply-accumulate, pJ: :meth:`HorowitzEnergyModel.mac_pj` with this model's constants.

        Raises:
            ValueError: If a bit width is not ``None`` or an integer from 1 to 32.
        """
        return self._mac.mac_pj(w_bits, a_bits)

    def add_pj(self, w_bits: int | None, a_bits: int | None) -> float:
        """Energy of one elementwise add of two activations, pJ (Horowitz's, with this model's constants)."""
        return self._mac.add_pj(w_bits, a_bits)

    def working_set_bytes(self, spec: LayerSpec, w_bits: int | None, a_bits: int | None) -> float:
        """Activations of the whole batch that the layer needs on chip at once, bytes.

        ``batch_size * (act_in * b_a + act_other * b_w + act_out * b_o) / 8``, with ``b_o`` = ``output_bits`` or
        ``b_a``; FP32 (``None``) counts 32 bits. Weights are not included (module docstring).

        Raises:
            ValueError: If a bit width is not ``None`` or an integer from 1 to 32.
        """
        w_eff, a_eff = _width(_check_bits(w_bits, "w_bits")), _width(_check_bits(a_bits, "a_bits"))
        o_eff = a_eff if self.output_bits is None else self.output_bits
        per_image_bits = spec.act_in * a_eff + spec.act_other * w_eff + spec.act_out * o_eff
        return self.batch_size * per_image_bits / 8

    def activations_on_chip(self, spec: LayerSpec, w_bits: int | None, a_bits: int | None) -> bool:
        """Whether the layer's working set (:meth:`working_set_bytes`) fits the SRAM, so its activations stay there."""
        return self.working_set_bytes(spec, w_bits, a_bits) <= self.sram_bytes

    def levels(self, spec: LayerSpec, w_bits: int | None, a_bits: int | None) -> HierarchyEnergy:
        """Energy of ``spec`` per image at each level of the hierarchy.

        Args:
            spec: The layer (``params``, ``macs``, ``act_in``, ``act_out``, ``act_other``, ``kind`` are used).
            w_bits: Weight bit width (a matmul's right-hand operand), or ``None`` for FP32.
            a_bits: Input-activation bit width, or ``None`` for FP32.

        Returns:
            The per-level energies, pJ per image (module docstring for the formulas).

        Raises:
            ValueError: If a bit width is not ``None`` or an integer from 1 to 32.
        """
        mac = self.mac_pj(w_bits, a_bits)  # validates both widths
        add = self.add_pj(w_bits, a_bits) if spec.additions else 0.0
        w_eff, a_eff = _width(w_bits), _width(a_bits)
        moved_bits = ACT_LEVEL_ACCESSES * (spec.act_in * a_eff + spec.act_other * w_eff)
        on_chip = self.activations_on_chip(spec, w_bits, a_bits)
        rf_second = spec.macs * w_eff * self.rf_pj_per_bit
        matmul = spec.kind in OPERATION_KINDS  # its second operand (if any) is an activation, not a weight
        return HierarchyEnergy(
            mac_pj=spec.macs * mac + spec.additions * add,
            rf_weight_pj=0.0 if matmul else rf_second,
            rf_act_pj=spec.macs * a_eff * self.rf_pj_per_bit + (rf_second if matmul else 0.0),
            sram_act_pj=moved_bits * self.sram_pj_per_bit if on_chip else 0.0,
            dram_weight_pj=spec.params * w_eff * self.dram_pj_per_bit / self.batch_size,
            dram_act_pj=0.0 if on_chip else moved_bits * self.dram_pj_per_bit,
        )

    def layer(self, spec: LayerSpec, w_bits: int | None, a_bits: int | None) -> EnergyTerms:
        """Energy of ``spec`` per image as the three report terms (:meth:`HierarchyEnergy.terms` of :meth:`levels`).

        Args:
            spec: The layer.
            w_bits: Weight bit width, or ``None`` for FP32.
            a_bits: Input-activation bit width, or ``None`` for FP32.

        Returns:
            ``EnergyTerms(mac, DRAM + RF weight energy, SRAM/DRAM + RF activation energy)``, pJ per image.

        Raises:
            ValueError: If a bit width is not ``None`` or an integer from 1 to 32.
        """
        return self.levels(spec, w_bits, a_bits).terms()


def _width(bits: int | None) -> int:
    """Bits a tensor occupies: ``bits``, or 32 for FP32 (``None``)."""
    return FLOAT_BITS if bits is None else bits


def hierarchy_report(plan: QuantPlan, model: MemoryHierarchyEnergyModel) -> dict[str, Any]:
    """Per-level energy of a plan at its current bit widths, and which layers keep their activations on chip.

    Args:
        plan: The plan; its ``w_bits`` / ``a_bits`` are priced.
        model: The memory-hierarchy model.

    Returns:
        A JSON-ready dict: ``levels_uj_per_image`` (``mac``, ``rf``, ``sram``, ``dram``, ``total``; µJ per image),
        ``levels_share`` (each level's fraction of the total), ``spilled`` (names of the layers whose activations go
        to DRAM), ``per_layer`` rows (``name``, ``w_bits``, ``a_bits``, ``on_chip``, ``working_set_bytes`` and the
        :meth:`HierarchyEnergy.to_dict` fields in pJ), ``model`` and ``constants``.

    Raises:
        ValueError: If ``model`` is not a :class:`MemoryHierarchyEnergyModel`.
    """
    if not isinstance(model, MemoryHierarchyEnergyModel):
        raise ValueError(f"hierarchy_report needs a MemoryHierarchyEnergyModel, got {type(model).__name__}.")
    rows, total = [], HierarchyEnergy.zero()
    for spec, decision in plan.items():
        levels = model.levels(spec, decision.w_bits, decision.a_bits)
        total = total + levels
        rows.append(
            {
                "name": spec.name,
                "w_bits": decision.w_bits,
                "a_bits": decision.a_bits,
                "on_chip": model.activations_on_chip(spec, decision.w_bits, decision.a_bits),
                "working_set_bytes": model.working_set_bytes(spec, decision.w_bits, decision.a_bits),
                **levels.to_dict(),
            }
        )
    summed = {"mac": total.mac_pj, "rf": total.rf_pj, "sram": total.sram_pj, "dram": total.dram_pj}
    share = {key: value / total.total_pj if total.total_pj > 0 else math.nan for key, value in summed.items()}
    return {
        "levels_uj_per_image": {key: value / PJ_PER_UJ for key, value in summed.items()}
        | {"total": total.total_pj / PJ_PER_UJ},
        "levels_share": share,
        "spilled": [row["name"] for row in rows if not row["on_chip"]],
        "per_layer": rows,
        "model": model.name,
        "constants": dict(model.constants()),
    }


# Selectable by name with build_energy_model("memory_hierarchy"); registered here because this module imports
# models.py (the package __init__ imports both, so the registry is complete whenever lit_mpq.energy is imported).
ENERGY_MODELS[MemoryHierarchyEnergyModel.name] = MemoryHierarchyEnergyModel
