"""Tests for the Pareto, pie, energy-comparison, heatmap and summary figures of lit_mpq.report.figures."""

import itertools
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.patches import Wedge
from matplotlib.text import Text

from lit_mpq.energy import HorowitzEnergyModel, MaxBitWidthEnergyModel, energy_report
from lit_mpq.plan import LayerPlan, LayerSpec, QuantPlan
from lit_mpq.report import (
    accuracy_axis_range,
    bit_distribution_pie,
    energy_comparison_figure,
    pareto_figure,
    pareto_front,
    save_figure,
    sensitivity_heatmap_figure,
    summary_figure,
)

SPECS = [
    LayerSpec(name="stem", kind="conv2d", params=432, macs=442368, act_in=3072, act_out=16384),
    LayerSpec(name="layer1.conv", kind="conv2d", params=2304, macs=2359296, act_in=16384, act_out=16384),
    LayerSpec(name="layer2.conv", kind="conv2d", params=4608, macs=1179648, act_in=16384, act_out=8192),
    LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10),
]

ROWS = [
    {"name": "budget 0.5", "kind": "budget", "energy_uj": 40.0, "top1": 85.0},
    {"name": "budget 0.7", "kind": "budget", "energy_uj": 55.0, "top1": 89.0},
    {"name": "W8A8", "kind": "uniform", "energy_uj": 82.0, "top1": 90.0},
    {"name": "W4A4", "kind": "uniform", "energy_uj": 39.0, "top1": 70.0},
    {"name": "first/last 8", "kind": "seed_rule", "energy_uj": 45.0, "top1": 80.0},  # dominated by budget 0.5
    {"name": "random 1", "kind": "random", "energy_uj": 60.0, "top1": 50.0},
    {"name": "random 2", "kind": "random", "energy_uj": 70.0, "top1": float("nan")},
    {"name": "HAWQ", "kind": "hawq_v3", "energy_uj": 50.0, "top1": 87.0},
    {"name": "config", "kind": "config", "energy_uj": 47.0, "top1": 86.0},
]


def make_plan(with_sensitivity: bool = True) -> QuantPlan:
    layers = {
        "stem": LayerPlan(w_bits=8, a_bits=None, pinned=True),
        "layer1.conv": LayerPlan(w_bits=4, a_bits=8),
        "layer2.conv": LayerPlan(w_bits=4, a_bits=4),
        "fc": LayerPlan(w_bits=None, a_bits=8, pinned=True),
    }
    if with_sensitivity:
        rng = np.random.default_rng(1)
        for name in ("stem", "layer1.conv", "layer2.conv"):
            layers[name].sensitivity = {
                "w": {bits: float(10.0 ** rng.uniform(-6, -1)) for bits in (2, 4, 8)},
                "a": {bits: float(10.0 ** rng.uniform(-5, 0)) for bits in (4, 8)},
            }
        layers["fc"].sensitivity = {"w": {8: 1e-3, 2: 0.0}}  # one missing column, one score without a logarithm
    return QuantPlan(SPECS, layers)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------------------ pareto_front
def brute_force_front(points):
    def dominates(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    good = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    return {i for i in good if not any(dominates(points[j], points[i]) for j in good if j != i)}


def test_pareto_front_by_hand():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 50.0), (2.0, 40.0), (3.0, 70.0), (0.5, 10.0)]) == [3, 0, 2]
    assert pareto_front([(1.0, 5.0), (1.0, 5.0), (1.0, 4.0), (2.0, 5.0)]) == [0, 1]  # duplicates both kept
    assert pareto_front([(1.0, float("nan")), (2.0, 3.0), (float("inf"), 9.0)]) == [1]


coordinate = st.one_of(st.integers(min_value=0, max_value=5).map(float), st.just(float("nan")))


@settings(max_examples=200, deadline=None)
@given(points=st.lists(st.tuples(coordinate, coordinate), max_size=25))
def test_pareto_front_matches_brute_force(points):
    front = pareto_front(points)
    assert set(front) == brute_force_front(points)
    assert len(front) == len(set(front))
    xs = [points[i][0] for i in front]
    ys = [points[i][1] for i in front]
    assert xs == sorted(xs)
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):  # accuracy rises along the frontier
        assert (x0, y0) == (x1, y1) or (x1 > x0 and y1 > y0)


# ------------------------------------------------------------------------------------------ pareto_figure
def offsets(ax):
    """Every scatter point on ``ax`` in display coordinates (whatever transform its collection uses)."""
    return [
        tuple(xy)
        for c in ax.collections
        if isinstance(c, PathCollection)
        for xy in c.get_offset_transform().transform(np.asarray(c.get_offsets(), dtype=float))
    ]


def test_pareto_figure_points_frontier_fp32_and_labels():
    fig = pareto_figure(ROWS, fp32_top1=91.0)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    collections = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in collections) == len(ROWS) - 1  # the NaN row is left out
    (frontier,) = [line for line in ax.lines if "Pareto" in str(line.get_label())]
    finite = [(r["energy_uj"], r["top1"]) for r in ROWS]
    expected = [finite[i] for i in pareto_front(finite)]
    assert list(zip(frontier.get_xdata(), frontier.get_ydata(), strict=True)) == expected
    assert expected == [(39.0, 70.0), (40.0, 85.0), (47.0, 86.0), (50.0, 87.0), (55.0, 89.0), (82.0, 90.0)]
    (fp32,) = [line for line in ax.lines if "FP32" in str(line.get_label())]
    assert list(fp32.get_ydata()) == [91.0, 91.0] and "91.00 %" in fp32.get_label()
    annotations = {text.get_text() for text in ax.texts}
    assert {"W8A8", "HAWQ", "config"} <= annotations  # baselines and the config's own point are named
    assert not annotations & {"budget 0.5", "random 1"}
    assert "µJ" in ax.get_xlabel() and "%" in ax.get_ylabel()
    assert "1 rows without a finite" in fig.get_suptitle().replace("\n", " ")
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    for word in ("config's own", "hawq_v3", "frontier", "FP32"):
        assert any(word in text for text in legend), word
    (config,) = [c for c in collections if "config" in str(c.get_label())]
    assert config.get_facecolor().size == 0  # hollow: a baseline with the same allocation shows through


def test_pareto_axis_shows_the_band_and_lists_points_below_it():
    fig = pareto_figure(ROWS, fp32_top1=91.0)
    ax = fig.axes[0]
    bottom, top = ax.get_ylim()
    # Within 10 points of FP32 lie 85-90 %; 70, 80 and 50 % would squash them: they sit on the bottom edge instead.
    assert 84.0 < bottom < 85.0 and 91.0 < top < 92.0
    assert bottom == pytest.approx(accuracy_axis_range([r["top1"] for r in ROWS], 91.0)[0])
    xlabel = ax.get_xlabel().replace("\n", " ")
    assert "3 below" in xlabel and "W4A4 70.0 %" in xlabel and "random 1 50.0 %" in xlabel
    frame = ax.get_window_extent()
    for x, y in offsets(ax):  # every marker is drawn where the reader can see it
        assert frame.x0 - 1 <= x <= frame.x1 + 1 and frame.y0 - 1 <= y <= frame.y1 + 1


def test_pareto_fp32_from_rows_and_no_clipping_when_all_points_are_close():
    rows = [{**row, "top1_fp32": 90.5} for row in ROWS if row["kind"] in ("budget", "uniform") and row["top1"] > 80]
    ax = pareto_figure(rows).axes[0]
    assert any("90.50 %" in str(line.get_label()) for line in ax.lines)
    assert "below" not in ax.get_xlabel()
    assert ax.get_ylim()[0] < min(row["top1"] for row in rows)
    assert accuracy_axis_range([]) is None


def test_pareto_labels_do_not_overlap():
    # Eight named baselines packed into a corner, plus budget points around them.
    crowded = [
        {"name": f"uniform_W{w}A{a}", "kind": "uniform", "energy_uj": 10 + 0.3 * i, "top1": 90.0 + 0.05 * (i % 3)}
        for i, (w, a) in enumerate([(8, 8), (6, 8), (8, 6), (6, 6), (4, 8), (8, 4), (4, 6), (6, 4)])
    ]
    crowded += [{"name": f"b{i}", "kind": "budget", "energy_uj": 8 + i, "top1": 85 + i} for i in range(6)]
    fig = pareto_figure(crowded, fp32_top1=91.0)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(text, renderer) for text in ax.texts if text.get_text().startswith("uniform")]
    assert len(boxes) == 8
    for first, second in itertools.combinations(boxes, 2):
        assert not first.overlaps(second), (first, second)


@pytest.mark.parametrize("bad", ["rows", [{"name": "a", "kind": "budget", "top1": 1.0}], [3]])
def test_pareto_figure_rejects_bad_rows(bad):
    with pytest.raises(ValueError, match="energy_uj|keys"):
        pareto_figure(bad)


def test_pareto_figure_without_points():
    fig = pareto_figure([])
    assert not fig.axes[0].collections
    assert any("no points" in text.get_text() for text in fig.axes[0].texts)


# ------------------------------------------------------------------------------------------ pie
def test_bit_distribution_pie_is_weighted():
    fig = bit_distribution_pie(make_plan())
    w_ax, a_ax = fig.axes[:2]
    w_wedges = [p for p in w_ax.patches if isinstance(p, Wedge)]
    a_wedges = [p for p in a_ax.patches if isinstance(p, Wedge)]
    assert len(w_wedges) == 3  # 4 bits, 8 bits, FP32
    assert len(a_wedges) == 3  # 4, 8, FP32
    labels = [t.get_text() for t in w_ax.texts]
    assert "FP32" in labels and "4 bits" in labels and "8 bits" in labels
    # parameter-weighted: 4 bits holds (2304 + 4608) / 7984 of the weights
    total = sum(spec.params for spec in SPECS)
    angles = {lbl: w.theta2 - w.theta1 for lbl, w in zip(["4 bits", "8 bits", "FP32"], w_wedges, strict=True)}
    assert angles["4 bits"] == pytest.approx(360 * (2304 + 4608) / total)
    assert angles["FP32"] == pytest.approx(360 * 640 / total)
    # activation-weighted: FP32 is the stem's input (3072 of 35904 elements)
    a_total = sum(spec.act_in for spec in SPECS)
    assert a_wedges[-1].theta2 - a_wedges[-1].theta1 == pytest.approx(360 * 3072 / a_total)
    assert "params-weighted" in w_ax.get_title().replace("\n", " ")
    assert "act-weighted" in a_ax.get_title().replace("\n", " ")


def test_bit_distribution_pie_empty_plan():
    fig = bit_distribution_pie(QuantPlan([]))
    assert all(not ax.patches for ax in fig.axes)
    assert any("no parameters" in t.get_text() for t in fig.axes[0].texts)


# ------------------------------------------------------------------------------------------ energy comparison
def test_energy_comparison_figure_stacks_three_terms_per_configuration():
    plan = make_plan()
    reports = {
        "mixed (Horowitz)": energy_report(plan, HorowitzEnergyModel()),
        "uniform W8A8": energy_report(QuantPlan(SPECS), HorowitzEnergyModel()),
        "mixed (max bit width)": energy_report(plan, MaxBitWidthEnergyModel()),
    }
    fig = energy_comparison_figure(reports)
    ax = fig.axes[0]
    assert len(ax.patches) == 3 * len(reports)
    n = len(reports)
    for i, report in enumerate(reports.values()):
        stacked = sum(ax.patches[i + k * n].get_height() for k in range(3))
        assert stacked == pytest.approx(report["total_uj_per_image"])
    assert [t.get_text() for t in ax.get_xticklabels()] == list(reports)
    assert "µJ" in ax.get_ylabel()
    title = fig.get_suptitle().replace("\n", " ")
    assert "Horowitz" in title and "Spingarn-Eliezer" in title and "compare with care" in title


@pytest.mark.parametrize("bad", [{}, {"a": {"mac_uj_per_image": 1.0}}, {"a": 3}])
def test_energy_comparison_rejects_bad_reports(bad):
    with pytest.raises(ValueError):
        energy_comparison_figure(bad)


# ------------------------------------------------------------------------------------------ heatmap
def test_sensitivity_heatmap_shape_and_values():
    plan = make_plan()
    fig = sensitivity_heatmap_figure(plan)
    heat_axes = [ax for ax in fig.axes if ax.images]
    assert len(heat_axes) == 2
    w_image = heat_axes[0].images[0].get_array()
    a_image = heat_axes[1].images[0].get_array()
    assert w_image.shape == (len(SPECS), 3)  # layers x (2, 4, 8)
    assert a_image.shape == (len(SPECS), 2)  # layers x (4, 8)
    assert w_image[1, 2] == pytest.approx(math.log10(plan["layer1.conv"].sensitivity["w"][8]))
    assert np.ma.is_masked(w_image[3, 0]) and np.ma.is_masked(w_image[3, 1])  # zero score; no 4-bit score
    assert w_image[3, 2] == pytest.approx(-3.0)
    assert np.ma.getmaskarray(a_image)[3].all()
    assert [t.get_text() for t in heat_axes[0].get_yticklabels()] == plan.names
    assert [t.get_text() for t in heat_axes[0].get_xticklabels()] == ["2", "4", "8"]
    colorbars = [ax for ax in fig.axes if ax not in heat_axes]
    assert len(colorbars) == 2 and all("log10" in ax.get_ylabel() for ax in colorbars)


def test_sensitivity_heatmap_without_data():
    fig = sensitivity_heatmap_figure(make_plan(with_sensitivity=False))
    assert not any(ax.images for ax in fig.axes)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no weights sensitivity data" in texts and "no activations sensitivity data" in texts


# ------------------------------------------------------------------------------------------ summary
def test_summary_figure_with_a_sweep():
    plan = make_plan()
    report = energy_report(plan, HorowitzEnergyModel())
    fig = summary_figure(plan, report, ROWS, top1=86.0, top1_fp32=91.0)
    pareto_ax, bits_ax, sens_ax, w_pie_ax, a_pie_ax, energy_ax = fig.axes[:6]
    assert sum(len(c.get_offsets()) for c in pareto_ax.collections) == len(ROWS) - 1
    assert any("Pareto" in str(line.get_label()) for line in pareto_ax.lines)
    assert any("FP32" in str(line.get_label()) for line in pareto_ax.lines)
    assert len(bits_ax.patches) == 2 * len(SPECS)  # weight and activation bits per layer
    assert sens_ax.patches and "log10" in sens_ax.get_xlabel()
    assert len([p for p in w_pie_ax.patches if isinstance(p, Wedge)]) == 3
    assert len([p for p in a_pie_ax.patches if isinstance(p, Wedge)]) == 3  # activations: 4, 8 bits and FP32
    assert "activation" in a_pie_ax.get_title()
    assert len(energy_ax.patches) == 3 * len(SPECS)
    assert "µJ" in energy_ax.get_ylabel()
    title = fig.get_suptitle().replace("\n", " ")
    assert "top-1 86.00 % (FP32 91.00 %, -5.00 pp)" in title
    assert "mean activation width" in title and "Horowitz" in title


def test_summary_figure_without_sweep_or_energy_and_top_layers():
    specs = [
        LayerSpec(name=f"l{i}", kind="linear", params=10 * (i + 1), macs=100, act_in=10, act_out=10) for i in range(20)
    ]
    plan = QuantPlan(specs)
    fig = summary_figure(plan, energy_report(plan, HorowitzEnergyModel()), None, top1=97.5)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert not any("sweep" in text for text in texts)  # no empty frontier panel
    assert any("no weights sensitivity data" in text for text in texts)
    bits_ax, _, _, _, energy_ax = fig.axes[:5]
    assert len(bits_ax.patches) == 2 * 20 and "bit width" in bits_ax.get_ylabel()
    assert len(energy_ax.patches) == 3 * 12  # the 12 most expensive layers
    assert [t.get_text() for t in energy_ax.get_xticklabels()] == [f"l{i}" for i in range(8, 20)]
    assert "top 12 of 20" in energy_ax.get_title()
    assert fig.get_suptitle().startswith("top-1 97.50 %;")
    fig = summary_figure(plan, None, [])
    assert any("no energy report" in t.get_text() for ax in fig.axes for t in ax.texts)
    assert not fig.get_suptitle().startswith("top-1")  # no accuracy given: none claimed


def test_new_figures_save_to_png(tmp_path):
    plan = make_plan()
    report = energy_report(plan, HorowitzEnergyModel())
    figures = {
        "pareto.png": pareto_figure(ROWS),
        "pie.png": bit_distribution_pie(plan),
        "compare.png": energy_comparison_figure({"mixed": report}),
        "heatmap.png": sensitivity_heatmap_figure(plan),
        "heatmap_empty.png": sensitivity_heatmap_figure(make_plan(with_sensitivity=False)),
        "summary.png": summary_figure(plan, report, ROWS),
        "summary_empty.png": summary_figure(QuantPlan([]), None, None),
    }
    for name, fig in figures.items():
        path = save_figure(fig, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
