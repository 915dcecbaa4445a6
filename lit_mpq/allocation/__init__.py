"""Bit-allocation policies: pure functions of a QuantPlan, one policy per module."""

from lit_mpq.allocation.base import Allocation, Policy
from lit_mpq.allocation.exact import ExactAllocation
from lit_mpq.allocation.from_file import FromFile
from lit_mpq.allocation.percentile import SensitivityPercentile
from lit_mpq.allocation.random import RandomAllocation
from lit_mpq.allocation.uniform import Uniform

__all__ = [
    "Allocation",
    "ExactAllocation",
    "FromFile",
    "Policy",
    "RandomAllocation",
    "SensitivityPercentile",
    "Uniform",
]
