"""Bit-allocation policies: pure functions of a QuantPlan, one policy per module, and the pinning they respect."""

from lit_mpq.allocation.base import Allocation, Policy
from lit_mpq.allocation.exact import ExactAllocation
from lit_mpq.allocation.from_file import FromFile
from lit_mpq.allocation.percentile import SensitivityPercentile
from lit_mpq.allocation.pinning import BitOverride, match_overrides, pin_layers
from lit_mpq.allocation.random import RandomAllocation
from lit_mpq.allocation.schemes import LinearLowBits, VarianceMixed, weight_variances
from lit_mpq.allocation.solver import InfeasibleBudgetError
from lit_mpq.allocation.split import Ascending, Descending, WeightSplit
from lit_mpq.allocation.uniform import Uniform

__all__ = [
    "Allocation",
    "Ascending",
    "BitOverride",
    "Descending",
    "ExactAllocation",
    "FromFile",
    "InfeasibleBudgetError",
    "LinearLowBits",
    "Policy",
    "RandomAllocation",
    "SensitivityPercentile",
    "Uniform",
    "VarianceMixed",
    "WeightSplit",
    "match_overrides",
    "pin_layers",
    "weight_variances",
]
