"""The accuracy-energy sweep behind ``python cli.py sweep``: probe once, then allocate and evaluate many budgets.

* :mod:`lit_mpq.sweep.points`: the settings, the energy budgets and the points to evaluate (pure).
* :mod:`lit_mpq.sweep.table`: one row per point, rounded for ``pareto.csv`` and ``pareto.md`` (pure).
* :mod:`lit_mpq.sweep.runner`: :func:`~lit_mpq.sweep.runner.run_sweep`, the Lightning side: evaluates each point in
  its own run and writes, prints and logs the results. It is not imported here, so the pure parts load without
  Lightning; :meth:`lit_mpq.trainer.MPQTrainer.sweep` is the command-line entry point.
"""

from lit_mpq.sweep.points import CONFIG_POINT, SweepPoint, SweepSettings, budget_ratios, energy_span, sweep_points
from lit_mpq.sweep.table import mark_frontier, markdown_table, rounded_row, sweep_row, write_tables

__all__ = [
    "CONFIG_POINT",
    "SweepPoint",
    "SweepSettings",
    "budget_ratios",
    "energy_span",
    "mark_frontier",
    "markdown_table",
    "rounded_row",
    "sweep_points",
    "sweep_row",
    "write_tables",
]
