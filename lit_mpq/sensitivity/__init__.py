"""Per-layer sensitivity metrics: pure functions over a prepared model and calibration batches."""

from lit_mpq.sensitivity.output_error import OutputErrorStats, probe_output_error

SENSITIVITY_METRICS = ("output_l2", "output_l2_normalized")
"""Metric names accepted by the ``SensitivityProbe`` callback."""

__all__ = ["SENSITIVITY_METRICS", "OutputErrorStats", "probe_output_error"]
