"""The sweep's table: one row per evaluated point, written as ``pareto.csv`` and ``pareto.md`` and printed.

Rows keep full precision in memory (for figures and checks). The files round each number to what it can claim:
accuracies (%) and their differences (percentage points) to 2 decimals, average bit widths to 2 decimals, energies,
ratios and sizes to 4 significant digits; so no float32 noise such as ``91.50000214576721`` reaches a reader.
Accuracy is in percent everywhere, as in ``results.json`` and TensorBoard. Pure: no Lightning.

Example:
    >>> row = {"name": "config", "kind": "config", "policy": "Uniform(W8A8)", "top1": 91.50000214576721,
    ...        "energy_uj": 12.345678, "relative_to_int8": 1.0}
    >>> rounded_row(row)["top1"], rounded_row(row)["energy_uj"]
    (91.5, 12.35)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_mpq.report import pareto_front, write_csv
from lit_mpq.sweep.points import SweepPoint

__all__ = [
    "METRIC_KEYS",
    "format_significant",
    "markdown_table",
    "mark_frontier",
    "rounded_row",
    "sweep_row",
    "write_tables",
]

METRIC_KEYS = {  # row column -> logged metric (accuracies in %, see lit_mpq.module)
    "top1": "val/top1",
    "top5": "val/top5",
    "energy_uj": "energy/analytic_uj_per_image",
    "relative_to_int8": "energy/relative_to_int8",
    "avg_weight_bits": "bits/avg_weight",
    "avg_act_bits": "bits/avg_act",
    "weights_mb": "size/weights_mb",
    "bit_ops_g": "bits/bit_ops_g",
}
"""Where each numeric column of a row comes from."""

DECIMALS = {"top1": 2, "top5": 2, "top1_fp32": 2, "delta_top1": 2, "avg_weight_bits": 2, "avg_act_bits": 2}
"""Columns rounded to a fixed number of decimals (percent, percentage points, bits)."""

SIGNIFICANT = {"budget_ratio": 4, "energy_uj": 4, "relative_to_int8": 4, "weights_mb": 4, "bit_ops_g": 4}
"""Columns rounded to a number of significant digits (their scale depends on the model)."""


def _finite(value: Any) -> float | None:
    """``float(value)`` when it is a finite number, else ``None``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def sweep_row(point: SweepPoint, metrics: Mapping[str, Any], fp32_top1: float | None) -> dict[str, Any]:
    """The table row of one evaluated point, at full precision.

    Args:
        point: The point.
        metrics: What ``trainer.validate`` returned for it (accuracy in %).
        fp32_top1: The FP32 top-1 (%) of the sweep, or ``None`` when it was not measured.

    Returns:
        ``name``, ``kind``, ``policy``, ``budget_ratio``, ``top1``, ``top1_fp32``, ``delta_top1`` (quantized minus
        FP32, percentage points), then the other :data:`METRIC_KEYS` columns; a metric not logged is ``None``.
    """
    row: dict[str, Any] = {
        "name": point.name,
        "kind": point.kind,
        "policy": point.policy.describe(),
        "budget_ratio": point.budget_ratio,
    }
    top1, fp32 = _finite(metrics.get(METRIC_KEYS["top1"])), _finite(fp32_top1)
    delta = top1 - fp32 if top1 is not None and fp32 is not None else None
    row |= {"top1": top1, "top1_fp32": fp32, "delta_top1": delta}
    for column, key in METRIC_KEYS.items():
        row[column] = _finite(metrics.get(key))
    return row


def mark_frontier(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` with ``pareto``: whether the row is on the frontier (:func:`~lit_mpq.report.pareto_front`).

    A row is on it when no other row has lower energy and higher top-1; rows without both numbers never are.
    """
    points = [(_finite(row.get("energy_uj")), _finite(row.get("top1"))) for row in rows]
    front = set(pareto_front([(math.nan if x is None else x, math.nan if y is None else y) for x, y in points]))
    return [{**row, "pareto": i in front} for i, row in enumerate(rows)]


def format_significant(value: float, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits in positional notation (no exponent), e.g. ``12.35``, ``0.001235``.

    Example:
        >>> format_significant(12345.678), format_significant(0.00123456), format_significant(0.0)
        ('12346', '0.001235', '0')
    """
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    decimals = max(digits - 1 - math.floor(math.log10(abs(value))), 0)
    return f"{value:.{decimals}f}"


def rounded_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with its numbers rounded as the module docstring says (for files; text and flags unchanged)."""
    out = dict(row)
    for column, value in row.items():
        number = _finite(value) if not isinstance(value, bool) else None
        if number is None:
            continue
        if column in DECIMALS:
            out[column] = round(number, DECIMALS[column])
        elif column in SIGNIFICANT:
            out[column] = float(format_significant(number, SIGNIFICANT[column]))
    return out


def _cell(row: Mapping[str, Any], column: str) -> str:
    """One markdown cell: the rounded number, ``-`` when missing."""
    value = _finite(row.get(column))
    if value is None:
        return "-"
    if column in DECIMALS:
        sign = "+" if column == "delta_top1" else ""
        return f"{value:{sign}.{DECIMALS[column]}f}"
    return format_significant(value, SIGNIFICANT.get(column, 4))


MARKDOWN_COLUMNS = (
    ("point", "left"),
    ("policy", "left"),
    ("top-1 (%)", "right"),
    ("Δ vs FP32 (pp)", "right"),
    ("energy (µJ/image)", "right"),
    ("× INT8", "right"),
    ("avg bits W / A", "right"),
    ("size (MB)", "right"),
    ("frontier", "left"),
)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    energy_model: str | None = None,
    energy_source: str | None = None,
    skipped: Sequence[tuple[str, str]] = (),
) -> str:
    """The sweep's table in markdown, with aligned columns so that it also reads as plain text in a terminal.

    Args:
        rows: The rows (:func:`sweep_row`), in evaluation order.
        energy_model: Name of the energy model, for the caption.
        energy_source: Citation of the energy model's constants, for the caption.
        skipped: ``(point name, reason)`` of points with no allocation under their budget.

    Returns:
        A title, a caption with the FP32 top-1 and the units, the table, and the skipped points.
    """
    rows = mark_frontier(rows)
    fp32 = next((row["top1_fp32"] for row in rows if _finite(row.get("top1_fp32")) is not None), None)
    body = [
        [
            str(row["name"]),
            str(row["policy"]),
            _cell(row, "top1"),
            _cell(row, "delta_top1"),
            _cell(row, "energy_uj"),
            _cell(row, "relative_to_int8"),
            f"{_cell(row, 'avg_weight_bits')} / {_cell(row, 'avg_act_bits')}",
            _cell(row, "weights_mb"),
            "yes" if row["pareto"] else "",
        ]
        for row in rows
    ]
    headers = [name for name, _ in MARKDOWN_COLUMNS]
    widths = [max(len(text) for text in column) for column in zip(headers, *body, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            text.rjust(width) if align == "right" else text.ljust(width)
            for text, width, (_, align) in zip(cells, widths, MARKDOWN_COLUMNS, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    dashes = [
        "-" * (width - 1) + ":" if align == "right" else "-" * width
        for width, (_, align) in zip(widths, MARKDOWN_COLUMNS, strict=True)
    ]
    rule = "| " + " | ".join(dashes) + " |"
    fp32_text = f"FP32 top-1 {fp32:.2f} %" if fp32 is not None else "FP32 top-1 not measured"
    model = f", energy model {energy_model}" if energy_model else ""
    source = f" (source: {energy_source})" if energy_source else ""
    lines = [
        f"## Sweep: {len(rows)} allocations, accuracy against analytic energy",
        "",
        f"{fp32_text}. Energy: analytic, µJ per image{model}{source}; × INT8: relative to every layer at W8A8. "
        "Avg bits: parameter-weighted (weights) and input-weighted (activations). Frontier: no other point has "
        "lower energy and higher top-1.",
        "",
        line(headers),
        rule,
        *(line(cells) for cells in body),
    ]
    if skipped:
        lines += ["", f"Skipped, no allocation meets the budget ({len(skipped)}):"]
        lines += [f"- {name}: {' '.join(reason.split())}" for name, reason in skipped]
    return "\n".join(lines) + "\n"


def write_tables(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    energy_model: str | None = None,
    energy_source: str | None = None,
    skipped: Sequence[tuple[str, str]] = (),
) -> tuple[Path, Path]:
    """Write ``pareto.csv`` (rounded rows plus the ``pareto`` flag) and ``pareto.md`` into ``out_dir``.

    Called after every point, so the rows done so far are on disk whatever stops the sweep.

    Returns:
        The paths of the CSV and the markdown file.

    Raises:
        ValueError: If ``rows`` is empty.
    """
    out_dir = Path(out_dir)
    csv_path = write_csv(out_dir / "pareto.csv", [rounded_row(row) for row in mark_frontier(rows)])
    md_path = out_dir / "pareto.md"
    md_path.write_text(markdown_table(rows, energy_model, energy_source, skipped), encoding="utf-8")
    return csv_path, md_path
