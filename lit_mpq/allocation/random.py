"""Random allocations under the same budgets as the exact solver: the baseline any allocation method must beat.

:class:`RandomAllocation` is :class:`~lit_mpq.allocation.ExactAllocation` with the sensitivities replaced by seeded
uniform noise: it returns a random feasible allocation (the budget usually binds, since most options cost more
than the usual reference settings), and needs no probe.
"""

from __future__ import annotations

import numpy as np

from lit_mpq.allocation.exact import ExactAllocation
from lit_mpq.plan import QuantPlan


class RandomAllocation(ExactAllocation):
    """A seeded random allocation that satisfies the budgets.

    Args:
        seed: Seed of the noise objective; the same seed and plan give the same allocation.
        w_candidates: Weight bit widths a layer may get.
        a_candidates: Activation bit widths a layer may get.
        energy_uj: Energy budget, µJ per image.
        energy_relative_to: Energy budget relative to a uniform setting, e.g. ``"W4A4"``.
        energy_ratio: Multiplier for ``energy_relative_to``.
        size_mb: Weight-size budget, MB.
        bit_ops_g: Bit-operation budget, 10^9 per image.
        avg_weight_bits: Budget on the average weight bit width.
        avg_act_bits: Budget on the average activation bit width.
    """

    requires_sensitivity = False

    def __init__(
        self,
        seed: int = 0,
        w_candidates: list[int] = [4, 6, 8],  # noqa: B006 - jsonargparse shows list defaults; = the probe default
        a_candidates: list[int] = [4, 6, 8],  # noqa: B006
        energy_uj: float | None = None,
        energy_relative_to: str | None = None,
        energy_ratio: float = 1.0,
        size_mb: float | None = None,
        bit_ops_g: float | None = None,
        avg_weight_bits: float | None = None,
        avg_act_bits: float | None = None,
    ) -> None:
        super().__init__(
            w_candidates=w_candidates,
            a_candidates=a_candidates,
            energy_uj=energy_uj,
            energy_relative_to=energy_relative_to,
            energy_ratio=energy_ratio,
            size_mb=size_mb,
            bit_ops_g=bit_ops_g,
            avg_weight_bits=avg_weight_bits,
            avg_act_bits=avg_act_bits,
        )
        self.seed = seed

    def _objective(self, plan: QuantPlan, names: list[str]) -> np.ndarray:
        """Seeded uniform noise in place of sensitivities."""
        return np.random.default_rng(self.seed).random((len(names), len(self.options)))

    def describe(self) -> str:
        """E.g. ``RandomAllocation(seed=3, energy<=1.00xW4A4)``."""
        return super().describe().replace("ExactAllocation(", f"RandomAllocation(seed={self.seed}, ", 1)
