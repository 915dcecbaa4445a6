"""Report outputs: figures (returned as matplotlib figures) and result files (JSON, CSV).

No Lightning here: the ``Report`` callback calls these functions and decides where the outputs go.
"""

from lit_mpq.report.figures import (
    bit_width_figure,
    energy_breakdown_figure,
    save_figure,
    sensitivity_histogram_figure,
)
from lit_mpq.report.files import to_plain, write_csv, write_results_json

__all__ = [
    "bit_width_figure",
    "energy_breakdown_figure",
    "save_figure",
    "sensitivity_histogram_figure",
    "to_plain",
    "write_csv",
    "write_results_json",
]
