"""Tests for lit_mpq.report.figures on a small hand-made plan."""

import os
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from lit_mpq.energy import HorowitzEnergyModel, energy_report
from lit_mpq.plan import LayerPlan, LayerSpec, QuantPlan
from lit_mpq.report import bit_width_figure, energy_breakdown_figure, save_figure, sensitivity_histogram_figure
from lit_mpq.report.figures import FP32_GAP_BITS

SPECS = [
    LayerSpec(name="stem", kind="conv2d", params=432, macs=442368, act_in=3072, act_out=16384),
    LayerSpec(name="layer1.conv", kind="conv2d", params=2304, macs=2359296, act_in=16384, act_out=16384),
    LayerSpec(name="layer2.conv", kind="conv2d", params=4608, macs=1179648, act_in=16384, act_out=8192),
    LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10),
]


def make_plan(with_sensitivity: bool) -> QuantPlan:
    layers = {
        "stem": LayerPlan(w_bits=8, a_bits=None, pinned=True),
        "layer1.conv": LayerPlan(w_bits=4, a_bits=8),
        "layer2.conv": LayerPlan(w_bits=2, a_bits=4),
        "fc": LayerPlan(w_bits=None, a_bits=None, pinned=True),
    }
    if with_sensitivity:
        rng = np.random.default_rng(0)
        for name in layers:
            layers[name].sensitivity = {
                "w": {bits: float(10.0 ** rng.uniform(-6, -1)) for bits in (2, 4, 8)},
                "a": {bits: float(10.0 ** rng.uniform(-5, 0)) for bits in (4, 8)},
            }
        layers["fc"].sensitivity["w"][2] = 0.0  # no logarithm: left out and counted
        layers["fc"].sensitivity["a"][4] = float("nan")
    return QuantPlan(SPECS, layers)


def test_import_chooses_no_backend_and_no_pyplot():
    code = (
        "import sys, matplotlib\n"
        "import lit_mpq.report.figures\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert matplotlib.rcParams._get_backend_or_none() is None, matplotlib.rcParams._get_backend_or_none()\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}  # no backend chosen from outside
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr


def test_bit_width_figure_bars_and_fp32():
    fig = bit_width_figure(make_plan(False))
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * len(SPECS)  # weight + activation bar per layer
    heights = [patch.get_height() for patch in ax.patches]
    # weights in model order, then activations; FP32 at its own level just above 8 bits, not at 32
    fp32 = 8 + FP32_GAP_BITS
    assert heights == [8, 4, 2, fp32, fp32, 8, 4, fp32]
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["2", "4", "8", "FP32"]
    assert list(ax.get_yticks()) == [2, 4, 8, fp32]
    assert ax.get_ylim()[1] < 12  # 2 to 8 bits keep most of the height
    hatched = [bool(patch.get_hatch()) for patch in ax.patches]
    assert hatched == [False, False, False, True, True, False, False, True]
    assert "bits" in ax.get_ylabel()
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels == ["stem *", "layer1.conv", "layer2.conv", "fc *"]  # pinned layers marked
    legend_texts = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any("FP32" in text for text in legend_texts) and any("pinned" in text for text in legend_texts)


def test_bit_width_axis_marks_the_candidates_and_no_fp32_when_all_quantized():
    plan = QuantPlan(SPECS[:2], {"stem": LayerPlan(w_bits=4, a_bits=8), "layer1.conv": LayerPlan(w_bits=2, a_bits=3)})
    ax = bit_width_figure(plan, candidate_bits=[2, 3, 4, 6, 8]).axes[0]
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["2", "3", "4", "6", "8"]
    assert [patch.get_height() for patch in ax.patches] == [4, 2, 8, 3]
    # Without candidates given, the probed widths are marked.
    plan["stem"].sensitivity = {"w": {2: 0.1, 6: 0.01}}
    ax = bit_width_figure(plan).axes[0]
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["2", "3", "4", "6", "8"]


def test_sensitivity_histogram_with_data():
    fig = sensitivity_histogram_figure(make_plan(True), bins=10)
    w_ax, a_ax = fig.axes[:2]
    assert len(w_ax.patches) == 10 * 3  # 10 bins x candidate bit widths (2, 4, 8)
    assert len(a_ax.patches) == 10 * 2  # 10 bins x (4, 8)
    # every positive, finite score is counted once: 4 layers x 3 widths - 1 zero score
    assert sum(patch.get_height() for patch in w_ax.patches) == 4 * 3 - 1
    assert sum(patch.get_height() for patch in a_ax.patches) == 4 * 2 - 1  # one NaN left out
    assert "log10" in w_ax.get_xlabel() and "count" in w_ax.get_ylabel()
    assert "1 non-positive or non-finite" in w_ax.get_title().replace("\n", " ")
    assert "1 non-positive or non-finite" in a_ax.get_title().replace("\n", " ")


def test_sensitivity_histogram_single_value():
    plan = QuantPlan(SPECS[:1], {"stem": LayerPlan(sensitivity={"w": {8: 0.5}})})
    fig = sensitivity_histogram_figure(plan)
    assert len(fig.axes[0].patches) == 20  # default 20 bins x one bit width
    assert sum(patch.get_height() for patch in fig.axes[0].patches) == 1
    assert "no activations sensitivity data" in [text.get_text() for text in fig.axes[1].texts]


def test_sensitivity_histogram_without_data():
    fig = sensitivity_histogram_figure(make_plan(False))
    texts = [text.get_text() for ax in fig.axes for text in ax.texts]
    assert "no weights sensitivity data" in texts and "no activations sensitivity data" in texts
    assert all(len(ax.patches) == 0 for ax in fig.axes)


@pytest.mark.parametrize("bins", [0, -1, 2.5, True])
def test_sensitivity_histogram_bad_bins(bins):
    with pytest.raises(ValueError, match="positive integer"):
        sensitivity_histogram_figure(make_plan(True), bins=bins)


def test_energy_breakdown_figure():
    report = energy_report(make_plan(False), HorowitzEnergyModel())
    fig = energy_breakdown_figure(report)
    ax = fig.axes[0]
    assert len(ax.patches) == 3 * len(SPECS)  # MAC, weight memory, activation memory per layer
    assert "µJ" in ax.get_ylabel()
    title = fig.get_suptitle().replace("\n", " ")
    assert "horowitz45nm" in title and "Horowitz" in title and "µJ" in title
    # stacked heights in µJ add up to the per-layer totals in pJ / 1e6
    n = len(SPECS)
    for i, row in enumerate(report["per_layer"]):
        stacked = sum(ax.patches[i + k * n].get_height() for k in range(3))
        assert stacked == pytest.approx(row["total_pj"] / 1e6)


@pytest.mark.parametrize("bad", [{}, {"per_layer": "x"}, {"per_layer": [{"name": "a", "mac_pj": 1.0}]}, []])
def test_energy_breakdown_rejects_bad_report(bad):
    with pytest.raises(ValueError, match="per_layer|lacks"):
        energy_breakdown_figure(bad)


def test_save_figure(tmp_path):
    plan = make_plan(True)
    figures = {
        "bits.png": bit_width_figure(plan),
        "sens.png": sensitivity_histogram_figure(plan),
        "sens_empty.png": sensitivity_histogram_figure(make_plan(False)),
        "energy.png": energy_breakdown_figure(energy_report(plan, HorowitzEnergyModel())),
    }
    for name, fig in figures.items():
        path = save_figure(fig, tmp_path / "nested" / "dir" / name)
        assert path.is_file() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == []  # figures never go through pyplot, so nothing holds them open


def test_save_figure_rejects_other_suffix(tmp_path):
    fig = bit_width_figure(make_plan(False))
    with pytest.raises(ValueError, match=".png"):
        save_figure(fig, tmp_path / "bits.pdf")
