"""Sparsity-aware energy: what a pruned plan costs on hardware that skips zero weights and stores them compressed.

The dense models of :mod:`lit_mpq.energy.models` price every weight and every MAC, zeros included: that is what a
dense accelerator spends on a pruned network. :class:`SparsityAwareEnergyModel` wraps one of them and prices a layer
whose :attr:`~lit_mpq.plan.LayerSpec.nonzero_params` is known (set by :mod:`lit_mpq.pruning`) as follows; a layer
without a count (``None``) and an attention matmul (no weights) cost exactly what the dense model says.

* **MACs**: a MAC whose weight is zero is skipped. Every weight of a convolution or a Linear layer takes part in the
  same number of MACs per image (``H_out * W_out`` for a convolution, the number of tokens for a Linear), so the
  layer's MACs become ``macs * nonzero / params`` (:func:`effective_macs`, an exact integer) and its MAC energy
  ``E_MAC(b_w, b_a)`` times that.
* **Weights**: stored compressed, whichever of these is smaller (:func:`weight_storage`; the choice is per layer,
  its flag is not counted):

  - dense: ``params * b_w`` bits;
  - ``"bitmap"``: the nonzero values plus a 1-bit occupancy map of every weight position,
    ``nonzero * b_w + params`` bits;
  - ``"csr"``: compressed sparse rows over the weight viewed as ``out_channels x (params / out_channels)``: each
    nonzero carries a column index of ``ceil(log2(columns))`` bits, and ``out_channels + 1`` row pointers of
    ``ceil(log2(nonzero + 1))`` bits each, ``nonzero * (b_w + column bits) + (out_channels + 1) * pointer bits``.

  The index bits are fetched from DRAM once per image like the weight values, at the dense model's
  ``dram_pj_per_bit``.
* **Activations**: read as in the dense model (the inputs are dense whatever the weights).

A structurally pruned layer (channels removed by :func:`lit_mpq.pruning.prune_channels`) is a smaller dense layer:
its spec already has fewer parameters and MACs, and both models price it alike. Zeros created by rounding a weight
to a low bit width are not counted (the format is fixed at pruning time, whatever the bit width).

Example:
    >>> from lit_mpq.energy.models import HorowitzEnergyModel
    >>> from lit_mpq.plan import LayerSpec
    >>> spec = LayerSpec("fc", "linear", params=640, macs=640, act_in=64, act_out=10, weight_shape=(10, 64),
    ...                  nonzero_params=320)
    >>> terms = SparsityAwareEnergyModel(HorowitzEnergyModel()).layer(spec, 8, 8)
    >>> round(terms.mac_pj, 2), terms.weight_mem_pj   # half the MACs; (320 * 8 + 640) bits * 20 pJ
    (73.6, 64000.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lit_mpq.bits import effective_bits
from lit_mpq.energy.accounting import PJ_PER_UJ, plan_energy
from lit_mpq.energy.models import EnergyModel, EnergyTerms, HorowitzEnergyModel, PerMacEnergyModel, _check_bits
from lit_mpq.plan import FLOAT_BITS, LayerSpec, QuantPlan

__all__ = [
    "INDEX_FORMATS",
    "SparsityAwareEnergyModel",
    "WeightStorage",
    "effective_macs",
    "sparsity_report",
    "weight_storage",
]

INDEX_FORMATS = ("bitmap", "csr")
"""Compressed weight formats :func:`weight_storage` prices (see the module docstring)."""


def _check_index_format(index_format: str) -> str:
    if index_format not in INDEX_FORMATS:
        raise ValueError(f"index_format={index_format!r} is unknown: use one of {list(INDEX_FORMATS)}.")
    return index_format


def _nonzero(spec: LayerSpec) -> int:
    """The layer's nonzero weights (all of them when not counted); a count outside ``0..params`` raises."""
    if spec.nonzero_params is None:
        return spec.params
    if not 0 <= spec.nonzero_params <= spec.params:
        raise ValueError(
            f"layer {spec.name!r}: nonzero_params={spec.nonzero_params} is not between 0 and its {spec.params} "
            "weights; fix the plan's row or measure it again."
        )
    return spec.nonzero_params


def effective_macs(spec: LayerSpec) -> int:
    """MACs per image left when the MACs with a zero weight are skipped: ``macs * nonzero / params``.

    Exact for a convolution or a Linear layer (every weight is used equally often); a matmul, a layer without weights
    or without a nonzero count keeps its ``macs``.

    Example:
        >>> effective_macs(LayerSpec("c", "conv2d", 8, 512, 64, 64, (2, 1, 2, 2), nonzero_params=3))
        192
    """
    if spec.params == 0 or spec.nonzero_params is None:
        return spec.macs
    return spec.macs * _nonzero(spec) // spec.params


@dataclass(frozen=True)
class WeightStorage:
    """How one layer's weights are stored at a bit width, and how many bits that takes.

    Attributes:
        format: ``"dense"``, ``"bitmap"`` or ``"csr"``.
        value_bits: Bits of the stored weight values.
        index_bits: Bits of the index (occupancy map, or column indices and row pointers); 0 when dense.
    """

    format: str
    value_bits: int
    index_bits: int

    @property
    def total_bits(self) -> int:
        """Values plus index, bits."""
        return self.value_bits + self.index_bits


def _compressed(spec: LayerSpec, w_bits: int, index_format: str) -> WeightStorage:
    nonzero = _nonzero(spec)
    if index_format == "bitmap":
        return WeightStorage("bitmap", nonzero * w_bits, spec.params)
    rows = spec.weight_shape[0] if spec.weight_shape else 1
    columns = spec.params // rows
    column_bits = max(1, math.ceil(math.log2(columns)))
    pointer_bits = max(1, math.ceil(math.log2(nonzero + 1)))
    return WeightStorage("csr", nonzero * w_bits, nonzero * column_bits + (rows + 1) * pointer_bits)


def weight_storage(spec: LayerSpec, w_bits: int | None, index_format: str = "bitmap") -> WeightStorage:
    """The smaller of dense and ``index_format`` storage for ``spec``'s weights at ``w_bits`` bits per weight.

    Args:
        spec: The layer; without ``nonzero_params`` it is stored dense.
        w_bits: Weight bit width, ``None`` for FP32 (32 bits).
        index_format: ``"bitmap"`` or ``"csr"`` (see the module docstring).

    Returns:
        The storage; a tie goes to dense.

    Raises:
        ValueError: On an unknown format, a bit width outside 1..32, or a nonzero count outside ``0..params``.

    Example:
        >>> spec = LayerSpec("c", "conv2d", 8, 512, 64, 64, (2, 1, 2, 2), nonzero_params=3)
        >>> weight_storage(spec, 4).total_bits, weight_storage(spec, 4, "csr")   # bitmap 3*4+8; csr 3*(4+2)+3*2
        (20, WeightStorage(format='csr', value_bits=12, index_bits=12))
    """
    _check_index_format(index_format)
    bits = FLOAT_BITS if _check_bits(w_bits, "w_bits") is None else w_bits
    dense = WeightStorage("dense", spec.params * bits, 0)
    if spec.nonzero_params is None or spec.params == 0:
        return dense
    compressed = _compressed(spec, bits, index_format)
    return compressed if compressed.total_bits < dense.total_bits else dense


class SparsityAwareEnergyModel(EnergyModel):
    """A dense energy model's prices on hardware that skips zero-weight MACs and stores weights compressed.

    Usable wherever an energy model is (``EnergyMeter(energy_model=...)`` in a config: then the allocation is priced
    sparsity-aware too). See the module docstring for the formulas.

    Args:
        dense: The dense model whose per-MAC energies and DRAM energy per bit are used; default the Horowitz table.
        index_format: ``"bitmap"`` or ``"csr"``.

    Raises:
        ValueError: On an unknown ``index_format``, or a ``dense`` that is not a per-MAC model (every built-in one is).
    """

    def __init__(self, dense: PerMacEnergyModel | None = None, index_format: str = "bitmap") -> None:
        dense = dense if dense is not None else HorowitzEnergyModel()
        if not isinstance(dense, PerMacEnergyModel):
            raise ValueError(
                f"dense={dense!r} is not a per-MAC energy model: use HorowitzEnergyModel, MaxBitWidthEnergyModel or "
                "TableEnergyModel."
            )
        self.dense = dense
        self.index_format = _check_index_format(index_format)
        self.name = f"{dense.name}+sparse_{index_format}"
        self.source = (
            f"{dense.source}; sparsity: MACs with a zero weight skipped, weights stored {index_format}-compressed when "
            "smaller (lit_mpq.energy.sparsity)"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dense={self.dense!r}, index_format={self.index_format!r})"

    def constants(self) -> dict[str, float]:
        """The dense model's constants (pJ)."""
        return self.dense.constants()

    def layer(self, spec: LayerSpec, w_bits: int | None, a_bits: int | None) -> EnergyTerms:
        """Energy of ``spec`` per image (pJ): skipped zero-weight MACs, compressed weights, dense activations.

        Args:
            spec: The layer; its ``nonzero_params`` (``None``: dense) decides the savings.
            w_bits: Weight bit width, or ``None`` for FP32.
            a_bits: Input-activation bit width, or ``None`` for FP32.

        Returns:
            ``EnergyTerms(effective_macs * E_MAC, stored bits * E_bit, dense activation term)``.

        Raises:
            ValueError: If a bit width is not ``None`` or 1..32, or the nonzero count is outside ``0..params``.
        """
        dense = self.dense.layer(spec, w_bits, a_bits)
        if spec.params == 0 or spec.nonzero_params is None:
            return dense
        stored = weight_storage(spec, w_bits, self.index_format)
        return EnergyTerms(
            mac_pj=effective_macs(spec) * self.dense.mac_pj(w_bits, a_bits),
            weight_mem_pj=stored.total_bits * self.dense.dram_pj_per_bit,
            act_mem_pj=dense.act_mem_pj,
        )


def sparsity_report(plan: QuantPlan, dense: EnergyModel, index_format: str = "bitmap") -> dict[str, Any]:
    """Dense-hardware and sparsity-aware energy, parameters, MACs and weight size of a plan at its bit widths.

    Args:
        plan: The plan; its rows' ``nonzero_params`` (``None``: dense) and bit widths are used.
        dense: The dense energy model (a :class:`SparsityAwareEnergyModel` is unwrapped to its dense model).
        index_format: Compressed weight format of the sparsity-aware side.

    Raises:
        ValueError: If ``dense`` is not a per-MAC model, or on an unknown ``index_format``.

    Returns:
        A JSON-ready dict: ``params``, ``nonzero_params``, ``sparsity_pct`` (zero weights over all weights of the
        plan's layers, %), ``macs`` and ``effective_macs`` per image, ``dense_weight_bits`` and ``stored_weight_bits``
        (values plus index, the smaller format per layer), ``dense`` and ``sparse`` energy (``total_uj_per_image``,
        ``mac_uj_per_image``, ``weight_mem_uj_per_image``, ``act_mem_uj_per_image``), ``sparse_relative_to_dense``,
        ``index_format``, the dense model's ``model`` and ``source``, and ``per_layer`` rows (``name``, ``params``,
        ``nonzero_params``, ``sparsity_pct``, ``macs``, ``effective_macs``, ``storage``, ``stored_bits``,
        ``dense_pj``, ``sparse_pj``).
    """
    base = dense.dense if isinstance(dense, SparsityAwareEnergyModel) else dense
    sparse = SparsityAwareEnergyModel(base, index_format)
    rows = []
    for spec, lp in plan.items():
        storage = weight_storage(spec, lp.w_bits, index_format) if spec.params else WeightStorage("none", 0, 0)
        nonzero = _nonzero(spec)
        rows.append(
            {
                "name": spec.name,
                "params": spec.params,
                "nonzero_params": nonzero,
                "sparsity_pct": 100.0 * (1 - nonzero / spec.params) if spec.params else 0.0,
                "macs": spec.macs,
                "effective_macs": effective_macs(spec),
                "storage": storage.format,
                "stored_bits": storage.total_bits,
                "dense_pj": base.layer(spec, lp.w_bits, lp.a_bits).total_pj,
                "sparse_pj": sparse.layer(spec, lp.w_bits, lp.a_bits).total_pj,
            }
        )
    params = sum(row["params"] for row in rows)
    nonzero = sum(row["nonzero_params"] for row in rows)
    dense_terms, sparse_terms = plan_energy(plan, base), plan_energy(plan, sparse)

    def terms(energy: EnergyTerms) -> dict[str, float]:
        return {f"{key[:-3]}_uj_per_image": value / PJ_PER_UJ for key, value in energy.to_dict().items()}

    return {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity_pct": 100.0 * (1 - nonzero / params) if params else 0.0,
        "macs": sum(row["macs"] for row in rows),
        "effective_macs": sum(row["effective_macs"] for row in rows),
        "dense_weight_bits": sum(spec.params * effective_bits(lp.w_bits) for spec, lp in plan.items()),
        "stored_weight_bits": sum(row["stored_bits"] for row in rows),
        "dense": terms(dense_terms),
        "sparse": terms(sparse_terms),
        "sparse_relative_to_dense": (
            sparse_terms.total_pj / dense_terms.total_pj if dense_terms.total_pj > 0 else float("nan")
        ),
        "index_format": index_format,
        "model": base.name,
        "source": base.source,
        "per_layer": rows,
    }
