"""lit_mpq.sweep.table: rows, rounding, the frontier flag, pareto.csv and pareto.md (no Trainer)."""

from __future__ import annotations

import csv

import pytest

from lit_mpq.allocation import Uniform
from lit_mpq.sweep import SweepPoint, mark_frontier, markdown_table, rounded_row, sweep_row, write_tables
from lit_mpq.sweep.table import format_significant

METRICS = {
    "val/top1": 91.50000214576721,  # float32 noise, in percent
    "val/top5": 99.70000386238098,
    "energy/analytic_uj_per_image": 12.345678901,
    "energy/relative_to_int8": 0.512345678,
    "bits/avg_weight": 5.872340425,
    "bits/avg_act": 8.0,
    "size/weights_mb": 0.1234567,
    "bits/bit_ops_g": 1.98765432,
}


def rows():
    config = sweep_row(SweepPoint("config", "config", Uniform(8, 8)), METRICS, 91.8)
    cheap = sweep_row(
        SweepPoint("budget_00", "budget", Uniform(4, 4), 0.6666666),
        {**METRICS, "val/top1": 10.0, "energy/analytic_uj_per_image": 5.0},
        91.8,
    )
    dominated = sweep_row(
        SweepPoint("uniform_W8A8", "uniform", Uniform(8, 8)),
        {**METRICS, "val/top1": 90.0, "energy/analytic_uj_per_image": 20.0},
        91.8,
    )
    return [config, cheap, dominated]


def test_row_keeps_full_precision_and_percent():
    row = rows()[0]
    assert row["top1"] == METRICS["val/top1"] and row["top1_fp32"] == 91.8
    assert row["delta_top1"] == pytest.approx(METRICS["val/top1"] - 91.8)
    assert row["policy"] == "Uniform(W8A8)" and row["budget_ratio"] is None
    assert list(row)[:7] == ["name", "kind", "policy", "budget_ratio", "top1", "top1_fp32", "delta_top1"]
    missing = sweep_row(SweepPoint("x", "budget", Uniform()), {"val/top1": float("nan")}, None)
    assert missing["top1"] is None and missing["delta_top1"] is None and missing["energy_uj"] is None


def test_rounding_removes_float32_noise():
    row = rounded_row(rows()[0])
    assert row["top1"] == 91.5 and row["top5"] == 99.7 and row["delta_top1"] == -0.3
    assert row["energy_uj"] == 12.35 and row["relative_to_int8"] == 0.5123
    assert row["avg_weight_bits"] == 5.87 and row["weights_mb"] == 0.1235 and row["bit_ops_g"] == 1.988
    assert rounded_row(rows()[1])["budget_ratio"] == 0.6667
    assert format_significant(12345.678) == "12346" and format_significant(0.00123456) == "0.001235"


def test_frontier_flag():
    flags = [row["pareto"] for row in mark_frontier(rows())]
    assert flags == [True, True, False]  # 20 µJ at 90 % is beaten by 12.3 µJ at 91.5 %


def test_csv_and_markdown(tmp_path):
    skipped = [("budget_01", "no\nway")]
    csv_path, md_path = write_tables(tmp_path / "sweep", rows(), "horowitz45nm", "Horowitz 2014", skipped)
    text = csv_path.read_text()
    assert "91.50000" not in text and "12.345" not in text
    read = list(csv.DictReader(text.splitlines()))
    assert [r["name"] for r in read] == ["config", "budget_00", "uniform_W8A8"]
    assert read[0]["top1"] == "91.5" and read[0]["pareto"] == "True" and read[2]["pareto"] == "False"
    md = md_path.read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, one line per row
    assert "top-1 (%)" in table[0] and "Δ vs FP32 (pp)" in table[0] and "× INT8" in table[0]
    cells = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert cells == ["config", "Uniform(W8A8)", "91.50", "-0.30", "12.35", "0.5123", "5.87 / 8.00", "0.1235", "yes"]
    assert len({len(line) for line in table}) == 1  # aligned: reads as a table in a terminal too
    assert "FP32 top-1 91.80 %" in md and "horowitz45nm" in md and "Horowitz 2014" in md
    assert "- budget_01: no way" in md


def test_markdown_without_fp32():
    row = sweep_row(SweepPoint("config", "config", Uniform()), METRICS, None)
    md = markdown_table([row])
    assert "FP32 top-1 not measured" in md and "| -" in md.replace("  ", " ")
