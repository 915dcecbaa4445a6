"""Report outputs: figures (returned as matplotlib figures), result files (JSON, CSV) and the quantization card.

No Lightning here: the ``Report`` callback calls these functions and decides where the outputs go.
"""

from lit_mpq.report.card import build_card, write_card
from lit_mpq.report.figures import (
    accuracy_axis_range,
    bit_distribution_pie,
    bit_width_figure,
    energy_breakdown_figure,
    energy_comparison_figure,
    pareto_figure,
    pareto_front,
    save_figure,
    sensitivity_heatmap_figure,
    sensitivity_histogram_figure,
    summary_figure,
)
from lit_mpq.report.files import to_plain, write_csv, write_results_json

__all__ = [
    "accuracy_axis_range",
    "bit_distribution_pie",
    "bit_width_figure",
    "build_card",
    "energy_breakdown_figure",
    "energy_comparison_figure",
    "pareto_figure",
    "pareto_front",
    "save_figure",
    "sensitivity_heatmap_figure",
    "sensitivity_histogram_figure",
    "summary_figure",
    "to_plain",
    "write_card",
    "write_csv",
    "write_results_json",
]
