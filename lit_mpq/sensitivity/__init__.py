"""Per-layer sensitivity metrics: pure functions over a prepared model and calibration batches.

Each probe returns :class:`SensitivityStats` (sums mergeable across ranks); :data:`SENSITIVITY_METRICS` maps a
metric name to its probe function and to how the sums become scores.
"""

from lit_mpq.sensitivity.end_to_end import probe_end_to_end
from lit_mpq.sensitivity.gradient import probe_fisher
from lit_mpq.sensitivity.output_error import OutputErrorStats, SensitivityStats, probe_output_error

SENSITIVITY_METRICS = {
    "output_l2": (probe_output_error, "sqrt"),
    "output_l2_normalized": (probe_output_error, "normalized"),
    "fisher": (probe_fisher, "mean"),
    "kl": (probe_end_to_end, "mean"),
}
"""Metric name -> (probe function, score transform for :meth:`SensitivityStats.scores`)."""

__all__ = [
    "SENSITIVITY_METRICS",
    "OutputErrorStats",
    "SensitivityStats",
    "probe_end_to_end",
    "probe_fisher",
    "probe_output_error",
]
