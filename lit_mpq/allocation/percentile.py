"""The seed projects' rule: bit widths by sensitivity percentile.

Layers are ranked by their sensitivity at one probed bit width; with the default ``percentiles=[25, 75]`` and
``bits=[4, 6, 8]``, the 25 % most sensitive layers get 8 bits, the middle half 6 and the 25 % least sensitive
4. In general a layer with score ``s`` gets ``bits[i]`` where ``i`` is the number of percentile thresholds
(``numpy.percentile`` of all scores, linear interpolation) strictly below ``s``.
"""

from __future__ import annotations

import numpy as np

from lit_mpq.allocation.base import Allocation, Policy
from lit_mpq.bits import validate_bits, validate_candidates, validate_width
from lit_mpq.energy.models import EnergyModel
from lit_mpq.plan import QuantPlan

TARGETS = ("w", "a", "both")
TENSOR = {"w": "weight", "a": "activation"}


def _no_scores(name: str, kind: str, probed: bool) -> str:
    """The message for a layer without sensitivities of ``kind``; ``probed`` says whether it has any other."""
    if not probed:
        return f"layer {name!r} has no sensitivity: add a SensitivityProbe callback before BitAllocator"
    other = "w" if kind == "a" else "a"
    return (
        f"layer {name!r} has no {TENSOR[kind]} ({kind!r}) sensitivity: the SensitivityProbe measured only "
        f"{TENSOR[other]}s; add {kind!r} to SensitivityProbe.kinds, or set SensitivityPercentile.target: {other!r}"
    )


class SensitivityPercentile(Policy):
    """Assign bits by percentile of per-layer sensitivity.

    Args:
        percentiles: Increasing thresholds in (0, 100).
        bits: One more bit width than thresholds, increasing (least sensitive layers get ``bits[0]``).
        target: Which bit widths the rule decides: ``"w"`` (weights; activations at ``a_bits``), ``"a"``
            (activations; weights at ``w_bits``) or ``"both"`` (each from its own sensitivity).
        w_bits: Weight bits when ``target == "a"``.
        a_bits: Activation bits when ``target == "w"``.
        score_bits: Probed bit width whose sensitivity ranks the layers; default: the lowest probed.

    Raises:
        ValueError: On non-increasing percentiles or bits, a length mismatch, or an unknown target.
    """

    requires_sensitivity = True

    def __init__(
        self,
        percentiles: list[float] = [25.0, 75.0],  # noqa: B006 - jsonargparse shows list defaults
        bits: list[int] = [4, 6, 8],  # noqa: B006
        target: str = "w",
        w_bits: int | None = 8,
        a_bits: int | None = 8,
        score_bits: int | None = None,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"target {target!r} unknown; choose one of {list(TARGETS)}")
        if len(bits) != len(percentiles) + 1:
            raise ValueError(f"bits needs one more entry than percentiles: got {len(bits)} bits for {percentiles}")
        if any(not 0 < p < 100 for p in percentiles) or list(percentiles) != sorted(set(percentiles)):
            raise ValueError(f"percentiles must be strictly increasing values in (0, 100), got {percentiles}")
        validate_candidates(bits, "SensitivityPercentile.bits")
        if list(bits) != sorted(bits):
            raise ValueError(f"bits must be increasing (least sensitive layers get bits[0]), got {bits}")
        self.percentiles = [float(p) for p in percentiles]
        self.bits = [int(b) for b in bits]
        self.target = target
        self.w_bits = validate_bits(w_bits, "SensitivityPercentile.w_bits")
        self.a_bits = validate_bits(a_bits, "SensitivityPercentile.a_bits")
        self.score_bits = (
            None
            if score_bits is None
            else validate_width(
                score_bits, "SensitivityPercentile.score_bits", alternative="or null for the lowest probed width"
            )
        )

    def _assign(self, plan: QuantPlan, names: list[str], kind: str) -> dict[str, int]:
        """Bits of ``kind`` (``"w"`` or ``"a"``) for ``names`` by percentile of their sensitivity."""
        scores = []
        for name in names:
            table = plan[name].sensitivity.get(kind)
            if not table:
                raise ValueError(_no_scores(name, kind, probed=bool(plan[name].sensitivity)))
            bits = self.score_bits if self.score_bits is not None else min(table)
            if bits not in table:
                raise ValueError(f"score_bits={bits} was not probed for {name!r}; probed: {sorted(table)}")
            scores.append(table[bits])
        if not scores:
            return {}
        thresholds = np.percentile(np.asarray(scores, dtype=np.float64), self.percentiles)
        index = np.searchsorted(thresholds, np.asarray(scores, dtype=np.float64), side="left")
        return {name: self.bits[int(i)] for name, i in zip(names, index, strict=True)}

    def allocate(self, plan: QuantPlan, energy_model: EnergyModel | None = None) -> Allocation:
        """Bits for every non-pinned layer by percentile of its sensitivity."""
        names = [name for name in plan if not plan[name].pinned]
        w = self._assign(plan, names, "w") if self.target in ("w", "both") else dict.fromkeys(names, self.w_bits)
        a = self._assign(plan, names, "a") if self.target in ("a", "both") else dict.fromkeys(names, self.a_bits)
        return {name: (w[name], a[name]) for name in names}

    def describe(self) -> str:
        """E.g. ``SensitivityPercentile(w: [25, 75] -> [4, 6, 8])``."""
        return f"SensitivityPercentile({self.target}: {self.percentiles} -> {self.bits})"
