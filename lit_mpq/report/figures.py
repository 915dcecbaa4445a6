"""Report figures: bit widths, sensitivities, energy, the accuracy-energy Pareto frontier, and a summary.

Figures:

* :func:`bit_width_figure`: weight and activation bit width per layer.
* :func:`bit_distribution_pie`: share of parameters (weights) and of input elements (activations) per bit width.
* :func:`sensitivity_histogram_figure` and :func:`sensitivity_heatmap_figure`: the probe's scores.
* :func:`energy_breakdown_figure` (per layer) and :func:`energy_comparison_figure` (per configuration).
* :func:`pareto_figure`: top-1 against energy for a sweep, with the non-dominated frontier (:func:`pareto_front`).
* :func:`summary_figure`: one page with accuracy, bits per layer, sensitivities, bit shares and energy (and the
  frontier when a sweep ran), drawn by the same ``_draw_*`` helpers as the single figures.

Each figure function returns a :class:`matplotlib.figure.Figure` and leaves saving to the caller, so the same
figure can go to disk (:func:`save_figure`) or to TensorBoard (``SummaryWriter.add_figure``). Every axis is
labelled with its unit, and every energy figure cites the energy model's source. Figures are built directly as
``Figure`` objects with their own Agg canvas, never through ``pyplot``: importing this module chooses no backend and
changes no global state, and the functions work on headless machines.

Example:
    >>> from lit_mpq.plan import LayerSpec, QuantPlan
    >>> plan = QuantPlan([LayerSpec(name="fc", kind="linear", params=20, macs=20, act_in=4, act_out=5)])
    >>> fig = bit_width_figure(plan)
    >>> len(fig.axes[0].patches)  # one weight bar and one activation bar
    2
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox

from lit_mpq.plan import FLOAT_BITS, QuantPlan

__all__ = [
    "accuracy_axis_range",
    "bit_distribution_pie",
    "bit_width_figure",
    "energy_breakdown_figure",
    "energy_comparison_figure",
    "pareto_figure",
    "pareto_front",
    "save_figure",
    "sensitivity_heatmap_figure",
    "sensitivity_histogram_figure",
    "summary_figure",
]

WEIGHT_COLOR = "tab:blue"
ACT_COLOR = "tab:orange"
FP32_COLOR = "lightgray"
PINNED_COLOR = "tab:red"
ENERGY_COLORS = {"mac_pj": "tab:blue", "weight_mem_pj": "tab:green", "act_mem_pj": "tab:orange"}
ENERGY_LABELS = {
    "mac_pj": "MAC arithmetic",
    "weight_mem_pj": "weight memory",
    "act_mem_pj": "activation memory",
}
ENERGY_UJ_KEYS = {
    "mac_pj": "mac_uj_per_image",
    "weight_mem_pj": "weight_mem_uj_per_image",
    "act_mem_pj": "act_mem_uj_per_image",
}
SENSITIVITY_KINDS = {"w": "weights", "a": "activations"}
DEFAULT_METRIC = "sensitivity score, in the probe metric's unit"
PJ_PER_UJ = 1e6
SAVE_DPI = 120
PARETO_KINDS = {  # kind -> (marker, colour, legend label)
    "config": ("*", "tab:red", "the config's own allocation"),
    "budget": ("o", "tab:blue", "energy budget (allocated)"),
    "uniform": ("s", "tab:green", "uniform bit width"),
    "seed_rule": ("D", "tab:purple", "seed rule"),
    "split": ("P", "tab:orange", "Asc/Desc weight split"),
    "random": (".", "tab:gray", "random allocation"),
}
OTHER_KIND = ("^", "tab:brown", "other baseline")
UNANNOTATED_KINDS = ("budget", "random")
"""Pareto points of these kinds are not labelled with their names (there are many of them)."""
ACCURACY_BAND_PP = 10.0
"""The accuracy axis of a Pareto plot spans the points within this many percentage points of the best accuracy
(or of FP32, when higher); points further below sit on the bottom edge as down-pointing markers and are listed
under the axis, so one failed configuration at 10 % does not squash the frontier into a line."""
BELOW_BAND_LISTED = 4
"""How many points below the accuracy band are named under a Pareto axis (the rest are counted)."""
LABEL_OFFSETS_PT = [
    (radius * dx, radius * dy)
    for radius in (6, 12, 20, 30)
    for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1.2, 0), (-1.2, 0), (0, 1.2), (0, -1.2))
]
"""Candidate offsets (points) of a point's label from the point, nearest first; see :func:`_place_labels`."""
FP32_GAP_BITS = 2
"""On a bit-width axis, FP32 is drawn this many bits above the widest integer width marked, past a break line."""
SUMMARY_TOP_LAYERS = 12
"""The summary's energy panel shows at most this many layers (the most expensive ones, in model order)."""


def _new_figure(width: float, height: float) -> Figure:
    """A figure with constrained layout and an Agg canvas of its own (no pyplot, no global backend).

    The canvas lets the label placement measure text and lets :func:`save_figure` write PNGs; the figure is not
    registered with pyplot, so nothing keeps it alive once the caller drops it.
    """
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _cmap(name: str) -> Any:
    """A registered matplotlib colormap, looked up without pyplot."""
    return matplotlib.colormaps[name]


def _figure_width(n_layers: int) -> float:
    """Figure width in inches that keeps per-layer bars readable, between 6 and 30 inches."""
    return float(min(max(6.0, 2.0 + 0.3 * n_layers), 30.0))


def _wrap(text: str, fig: Figure, fontsize: float) -> str:
    """Wrap each line of ``text`` so that a title at ``fontsize`` points fits the figure's width."""
    chars = max(40, int(fig.get_figwidth() * 72 / (0.65 * fontsize)))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n"))


def _layer_ticks(ax: Any, names: Sequence[str], pinned: Sequence[bool] = ()) -> None:
    """Label the x axis with layer names (rotated), pinned layers in the pinned colour with a ``*``."""
    ax.set_xticks(np.arange(len(names)))
    labels = [f"{name} *" if (pinned and pinned[i]) else name for i, name in enumerate(names)]
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    for i, tick in enumerate(ax.get_xticklabels()):
        if pinned and pinned[i]:
            tick.set_color(PINNED_COLOR)
    ax.set_xlim(-0.6, max(len(names) - 0.4, 0.6))


def _bit_levels(plan: QuantPlan, candidate_bits: Sequence[int] | None) -> tuple[list[int], float | None]:
    """The integer bit widths marked on a bit axis, and the height at which FP32 is drawn (``None``: no FP32 tensor).

    The marked widths are the candidates (default: those the probe scored) and every width in use. FP32 is not drawn
    at 32 on the same linear scale, which would squash 2 to 8 bits into the bottom quarter: it gets its own level
    :data:`FP32_GAP_BITS` above the widest marked width, past a dotted break line.
    """
    pairs = plan.bits().values()
    used = {bits for pair in pairs for bits in pair if bits is not None}
    if candidate_bits is None:
        candidate_bits = [bits for name in plan.names for table in plan[name].sensitivity.values() for bits in table]
    levels = sorted(used | {int(bits) for bits in candidate_bits}) or [8]
    has_fp32 = any(bits is None for pair in pairs for bits in pair)
    return levels, (levels[-1] + FP32_GAP_BITS if has_fp32 else None)


def _draw_bit_widths(
    ax: Any, plan: QuantPlan, candidate_bits: Sequence[int] | None, layer_labels: bool = True
) -> list[Patch]:
    """Draw a weight and an activation bar per layer on ``ax``; return the legend handles.

    Args:
        ax: The axis.
        plan: The plan at its current bit widths.
        candidate_bits: Widths to mark on the y axis besides those in use.
        layer_labels: Name every layer on the x axis (otherwise only layer indices, for small panels).
    """
    names = plan.names
    x = np.arange(len(names))
    width = 0.4
    bits = plan.bits()
    levels, fp32_level = _bit_levels(plan, candidate_bits)
    series = (
        (-width / 2, 0, WEIGHT_COLOR, "weights"),
        (width / 2, 1, ACT_COLOR, "activations (layer input)"),
    )
    any_fp32 = False
    for offset, index, color, label in series:
        values = [bits[name][index] for name in names]
        heights = [fp32_level if v is None else v for v in values]
        bars = ax.bar(x + offset, heights, width, color=color, edgecolor="black", linewidth=0.5, label=label)
        for bar, value in zip(bars, values, strict=True):
            if value is None:
                any_fp32 = True
                bar.set_facecolor(FP32_COLOR)
                bar.set_hatch("//")
    handles = [Patch(facecolor=color, edgecolor="black", label=label) for _, _, color, label in series]
    if any_fp32:
        handles.append(Patch(facecolor=FP32_COLOR, edgecolor="black", hatch="//", label="FP32, not quantized"))
    pinned = [plan[name].pinned for name in names]
    if any(pinned):
        handles.append(Patch(facecolor="white", edgecolor=PINNED_COLOR, label="* pinned by configuration"))
    if layer_labels:
        _layer_ticks(ax, names, pinned)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        ax.set_xlim(-0.6, max(len(names) - 0.4, 0.6))
    if fp32_level is None:
        ax.set_yticks(levels)
        ax.set_ylim(0, levels[-1] + 0.8)
    else:
        ax.set_yticks([*levels, fp32_level])
        ax.set_yticklabels([str(level) for level in levels] + ["FP32"])
        ax.set_ylim(0, fp32_level + 0.8)
        # The dotted line marks the break in the scale: FP32 is a label above it, not 32 units up.
        ax.axhline(levels[-1] + FP32_GAP_BITS / 2, color="gray", linestyle=":", linewidth=1.0)
    ax.set_ylabel("bit width (bits)")
    ax.set_xlabel("layer (model order)" if layer_labels else "layer index (model order)")
    ax.grid(axis="y", alpha=0.3)
    return handles


def bit_width_figure(plan: QuantPlan, candidate_bits: Sequence[int] | None = None) -> Figure:
    """Bar chart of the weight and input-activation bit widths of every layer, in model order.

    Two bars per layer (weights, activations). The y axis has a tick at each candidate bit width and at each width
    in use, on a linear scale; a tensor that is not quantized is a grey, hatched bar up to its own "FP32" level just
    above the widest width (past a dotted break line), so that 2 to 8 bits keep most of the height. Layers whose
    bits were pinned by configuration get a ``*`` and a red tick label.

    Args:
        plan: The plan at its current bit widths.
        candidate_bits: Bit widths to mark on the y axis (e.g. the probe's candidates); default: the widths the
            plan's sensitivities were probed at. Widths in use are always marked.

    Returns:
        The figure (one axis; ``2 * len(plan)`` bar patches).
    """
    fig = _new_figure(_figure_width(len(plan)), 4.5)
    ax = fig.add_subplot()
    handles = _draw_bit_widths(ax, plan, candidate_bits)
    title = (
        f"Bit width per layer: {len(plan)} layers, parameter-weighted mean weight width "
        f"{plan.average_weight_bits():.2f} bits, input-weighted mean activation width {plan.average_act_bits():.2f} "
        "bits (source: quantization plan)"
    )
    fig.suptitle(_wrap(title, fig, 9), fontsize=9)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _sensitivity_values(plan: QuantPlan, kind: str) -> tuple[dict[int, np.ndarray], int]:
    """Positive, finite sensitivity scores per candidate bit width, and how many scores were left out."""
    scores: dict[int, list[float]] = {}
    dropped = 0
    for name in plan.names:
        for bits, score in plan[name].sensitivity.get(kind, {}).items():
            value = float(score)
            if math.isfinite(value) and value > 0:
                scores.setdefault(int(bits), []).append(value)
            else:
                dropped += 1
    return {bits: np.asarray(values) for bits, values in sorted(scores.items())}, dropped


def _check_bins(bins: int) -> None:
    """Raise a ``ValueError`` unless ``bins`` is a positive integer."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins={bins!r} is not valid: use a positive integer number of histogram bins.")


def _no_data(ax: Any, text: str, title: str | None = None) -> None:
    """Replace an empty panel's content by a centred ``text`` (and the title, when given)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    if title is not None:
        ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_sensitivity_histogram(ax: Any, plan: QuantPlan, kind: str, bins: int, metric: str) -> bool:
    """Draw the histogram of log10 sensitivity per candidate bit width of ``kind`` (``"w"`` or ``"a"``) on ``ax``.

    Returns:
        True if there was data to draw; otherwise the panel says so.
    """
    label = SENSITIVITY_KINDS[kind]
    per_bits, dropped = _sensitivity_values(plan, kind)
    ax.set_xlabel(f"log10 of {metric}")
    ax.set_ylabel("layers (count)")
    if not per_bits:
        _no_data(ax, f"no {label} sensitivity data", f"{label}: no sensitivity data")
        return False
    logs = {bits: np.log10(values) for bits, values in per_bits.items()}
    everything = np.concatenate(list(logs.values()))
    low, high = float(everything.min()), float(everything.max())
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    colors = [_cmap("tab10")(i % 10) for i in range(len(logs))]
    ax.hist(
        list(logs.values()),
        bins=edges,
        histtype="bar",
        color=colors,
        label=[f"{bits} bits ({values.size} layers)" for bits, values in logs.items()],
    )
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    note = f", {dropped} non-positive or non-finite scores left out" if dropped else ""
    title = f"{label}: sensitivity per candidate bit width (source: sensitivity probe){note}"
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return True


def sensitivity_histogram_figure(plan: QuantPlan, bins: int = 20, metric: str = DEFAULT_METRIC) -> Figure:
    """Histograms of log10 sensitivity per candidate bit width, weights and activations side by side.

    Scores come from ``plan[name].sensitivity["w"]`` and ``["a"]``. Scores that are zero, negative or not finite
    have no logarithm: they are left out and counted in the axis title. A plan without sensitivity data gives a
    figure that says so instead of raising.

    Args:
        plan: The plan, after a sensitivity probe filled ``LayerPlan.sensitivity``.
        bins: Number of histogram bins, shared by all bit widths of one panel.
        metric: Name and unit of the probe's metric, used in the x label (e.g. ``"loss increase, nats"``).

    Returns:
        The figure: two axes (weights, activations); each has ``bins`` bars per candidate bit width, side by side
        within a bin.

    Raises:
        ValueError: If ``bins`` is not a positive integer.
    """
    _check_bins(bins)
    fig = _new_figure(11, 4)
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, SENSITIVITY_KINDS, strict=True):
        _draw_sensitivity_histogram(ax, plan, kind, bins, metric)
    return fig


def _energy_rows(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The ``per_layer`` rows of an :func:`~lit_mpq.energy.energy_report` dict, checked.

    Raises:
        ValueError: If ``report`` has no ``per_layer`` list, or a row lacks one of the energy keys.
    """
    rows = report.get("per_layer") if isinstance(report, Mapping) else None
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise ValueError(
            "energy figures need the dict returned by lit_mpq.energy.energy_report(plan, model), "
            "with a 'per_layer' list of rows"
        )
    required = ("name", *ENERGY_COLORS)
    for row in rows:
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"energy report row {row!r} lacks {missing}: each row needs the keys {list(required)}")
    return list(rows)


def _draw_energy_breakdown(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Draw one stacked bar per layer row (MAC, weight memory, activation memory), in µJ per image, on ``ax``."""
    names = [str(row["name"]) for row in rows]
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for key, color in ENERGY_COLORS.items():
        heights = np.asarray([float(row[key]) for row in rows]) / PJ_PER_UJ
        ax.bar(x, heights, 0.7, bottom=bottom, color=color, edgecolor="black", linewidth=0.5, label=ENERGY_LABELS[key])
        bottom += heights
    _layer_ticks(ax, names)
    ax.set_ylabel("energy per image (µJ)")
    ax.set_xlabel("layer (model order)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _energy_headline(report: Mapping[str, Any]) -> str:
    """``"model M: total X µJ per image (R x uniform W8A8)"`` from an energy report, skipping what it lacks."""
    model = report.get("model", "unknown model")
    total = report.get("total_uj_per_image")
    total_text = f": total {float(total):.4g} µJ per image" if total is not None else ""
    relative = report.get("relative_to_int8")
    relative_text = (
        f" ({float(relative):.3f} x uniform W8A8)" if relative is not None and math.isfinite(float(relative)) else ""
    )
    return f"model {model}{total_text}{relative_text}"


def energy_breakdown_figure(report: Mapping[str, Any]) -> Figure:
    """Stacked bars of the analytic energy of each layer: MAC arithmetic, weight memory, activation memory.

    Args:
        report: The dict returned by :func:`lit_mpq.energy.energy_report` (``per_layer`` rows in pJ per image;
            ``model``, ``source`` and ``total_uj_per_image`` are shown when present).

    Returns:
        The figure (one axis; three stacked bar patches per layer), energy in µJ per image.

    Raises:
        ValueError: If ``report`` has no ``per_layer`` list, or a row lacks one of the energy keys.
    """
    rows = _energy_rows(report)
    fig = _new_figure(_figure_width(len(rows)), 4.5)
    ax = fig.add_subplot()
    _draw_energy_breakdown(ax, rows)
    source = report.get("source") or "not given"
    title = f"Analytic energy per layer, {_energy_headline(report)}\nSource of the constants: {source}"
    fig.suptitle(_wrap(title, fig, 8), fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------ Pareto frontier
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when lower ``x`` (energy) and higher ``y`` (accuracy) are better.

    Point ``j`` dominates point ``i`` when ``x_j <= x_i`` and ``y_j >= y_i`` with at least one strict inequality.
    Identical points do not dominate each other, so duplicates on the frontier are all kept. Points with a NaN or
    infinite coordinate are never on the frontier.

    Args:
        points: ``(x, y)`` pairs, e.g. ``(energy_uj, top1)``.

    Returns:
        The indices of the non-dominated points, sorted by increasing ``x`` (ties by index); along it ``y`` increases
        strictly from one distinct point to the next.

    Example:
        >>> pareto_front([(1.0, 50.0), (2.0, 40.0), (3.0, 70.0), (0.5, 10.0)])
        [3, 0, 2]
    """
    finite = [
        (float(x), float(y), i)
        for i, (x, y) in enumerate(points)
        if math.isfinite(float(x)) and math.isfinite(float(y))
    ]
    finite.sort(key=lambda item: (item[0], -item[1], item[2]))
    front: list[int] = []
    best_y = -math.inf  # best accuracy among points with strictly smaller x
    start = 0
    while start < len(finite):
        stop = start
        while stop < len(finite) and finite[stop][0] == finite[start][0]:
            stop += 1
        group_best = finite[start][1]  # the group is sorted by decreasing y
        if group_best > best_y:
            front.extend(i for _, y, i in finite[start:stop] if y == group_best)
            best_y = group_best
        start = stop
    return front


def _pareto_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Check the rows of a Pareto sweep.

    Raises:
        ValueError: If ``rows`` is not a list of dicts with ``name``, ``kind``, ``energy_uj`` and ``top1``.
    """
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise ValueError("Pareto figures need a list of dicts with keys 'name', 'kind', 'energy_uj' and 'top1'")
    required = ("name", "kind", "energy_uj", "top1")
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"Pareto row {row!r} is not a dict with keys {list(required)}")
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"Pareto row {row!r} lacks {missing}: each row needs the keys {list(required)}")
    return list(rows)


def _as_float(value: Any) -> float:
    """``float(value)``, or NaN when ``value`` is ``None`` or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _reference_accuracy(rows: Sequence[Mapping[str, Any]], fp32_top1: float | None) -> float | None:
    """The FP32 top-1 to draw: ``fp32_top1`` when given, else the first finite ``top1_fp32`` of the rows."""
    if fp32_top1 is not None:
        value = _as_float(fp32_top1)
        return value if math.isfinite(value) else None
    for row in rows:
        value = _as_float(row.get("top1_fp32"))
        if math.isfinite(value):
            return value
    return None


def accuracy_axis_range(accuracies: Sequence[float], fp32_top1: float | None = None) -> tuple[float, float] | None:
    """The accuracy range (%) a Pareto axis shows: the band where the comparisons happen.

    The band reaches :data:`ACCURACY_BAND_PP` percentage points below the best accuracy (or FP32, when higher),
    down to the lowest point inside it, so points far below (a failed 2-bit setting at 10 %) do not squash the
    frontier; it always holds the three best points, and it is padded by 12 % of its span (at least 0.12 pp).

    Args:
        accuracies: The points' top-1 accuracies (%); non-finite values are ignored.
        fp32_top1: The FP32 reference (%), drawn as a line, or ``None``.

    Returns:
        ``(bottom, top)`` in %, or ``None`` when there is no finite accuracy.

    Example:
        >>> accuracy_axis_range([91.0, 88.0, 85.5, 10.0], fp32_top1=91.5)
        (84.78, 92.22)
    """
    values = sorted(value for value in map(float, accuracies) if math.isfinite(value))
    if not values:
        return None
    reference = max(values[-1], fp32_top1) if fp32_top1 is not None else values[-1]
    inside = [value for value in values if value >= reference - ACCURACY_BAND_PP]
    if len(inside) < min(3, len(values)):
        inside = values[-3:]
    low = min(inside) if fp32_top1 is None else min(min(inside), fp32_top1)
    pad = 0.12 * max(reference - low, 1.0)
    return round(low - pad, 6), round(reference + pad, 6)


def _draw_pareto(
    ax: Any, rows: Sequence[Mapping[str, Any]], fp32_top1: float | None = None, legend_inside: bool = False
) -> tuple[int, list[Any]]:
    """Scatter the sweep's points by kind, draw the frontier and the FP32 line, and label the baselines on ``ax``.

    Points below the accuracy band (:func:`accuracy_axis_range`) are drawn as down-pointing markers on the bottom
    edge and named under the x axis. Labels start next to their points; :func:`_place_labels` moves them apart once
    the figure's layout is final.

    Args:
        ax: The axis.
        rows: The checked rows (:func:`_pareto_rows`).
        fp32_top1: FP32 top-1 (%), see :func:`_reference_accuracy`.
        legend_inside: Put the legend in the lower right corner (dominated, so usually empty) instead of beside the
            axis; for small panels.

    Returns:
        The number of rows left out because their energy or accuracy is missing or not finite, and the label
        annotations (for :func:`_place_labels`).
    """
    points = [(_as_float(row["energy_uj"]), _as_float(row["top1"])) for row in rows]
    finite = [math.isfinite(x) and math.isfinite(y) for x, y in points]
    shown = [(point, row) for point, row, ok in zip(points, rows, finite, strict=True) if ok]
    fp32 = _reference_accuracy(rows, fp32_top1)
    band = accuracy_axis_range([y for (_, y), _ in shown], fp32)
    bottom = band[0] if band else -math.inf
    kinds = list(dict.fromkeys(str(row["kind"]) for _, row in shown))
    kinds.sort(key=lambda kind: (list(PARETO_KINDS).index(kind) if kind in PARETO_KINDS else len(PARETO_KINDS), kind))
    for kind in kinds:
        marker, color, label = PARETO_KINDS.get(kind, OTHER_KIND)
        if kind not in PARETO_KINDS:
            label = f"{OTHER_KIND[2]}: {kind}"
        mine = [point for point, row in shown if str(row["kind"]) == kind]
        size = {"random": 20, "config": 160}.get(kind, 45)
        inside = [(x, y) for x, y in mine if y >= bottom]
        below = [x for x, y in mine if y < bottom]
        # One legend entry per kind, from whichever collection is drawn first.
        legend = f"{label} ({len(mine)})"
        if inside:
            xs, ys = zip(*inside, strict=True)
            if kind == "config":  # hollow, so a baseline with the same allocation stays visible underneath
                style = {"facecolors": "none", "edgecolors": color, "linewidths": 1.6, "zorder": 4}
            else:
                style = {"color": color, "zorder": 3}
            ax.scatter(xs, ys, marker=marker, s=size, label=legend, **style)
            legend = "_nolegend_"
        if below:
            # Blended transform: x in data, y in axes units, so the marker sits on the bottom edge.
            ax.scatter(
                below,
                [0.02] * len(below),
                transform=ax.get_xaxis_transform(),
                marker="v",
                color=color,
                s=40,
                label=legend,
                zorder=3,
                clip_on=False,
            )
    front = pareto_front(points)
    if front:
        ax.step(
            [points[i][0] for i in front],
            [points[i][1] for i in front],
            where="post",
            color="black",
            linestyle="--",
            linewidth=1.2,
            zorder=2,
            label=f"Pareto frontier ({len(front)} points)",
        )
    if fp32 is not None:
        ax.axhline(fp32, color="tab:red", linestyle=":", linewidth=1.2, zorder=1, label=f"FP32 top-1 {fp32:.2f} %")
    labels = [
        ax.annotate(
            "config" if str(row["kind"]) == "config" else str(row["name"]),
            (x, y),
            textcoords="offset points",
            xytext=LABEL_OFFSETS_PT[0],
            fontsize=7,
            zorder=5,
            annotation_clip=False,
            arrowprops={"arrowstyle": "-", "color": "0.55", "linewidth": 0.6, "shrinkA": 1, "shrinkB": 4},
        )
        for (x, y), row in shown
        if str(row["kind"]) not in UNANNOTATED_KINDS and y >= bottom
    ]
    for label in labels:
        label.set_in_layout(False)  # labels move after the layout is fixed; they must not change it
    xlabel = "analytic energy per image (µJ)"
    below_rows = sorted(((y, row) for (_, y), row in shown if y < bottom), key=lambda item: -item[0])
    if below_rows:
        named = ", ".join(f"{row['name']} {y:.1f} %" for y, row in below_rows[:BELOW_BAND_LISTED])
        more = f" and {len(below_rows) - BELOW_BAND_LISTED} more" if len(below_rows) > BELOW_BAND_LISTED else ""
        note = f"▼ on the bottom edge: {len(below_rows)} below {bottom:.1f} % ({named}{more})"
        xlabel += "\n" + textwrap.fill(note, 70 if legend_inside else 110)
    ax.set_xlabel(xlabel, fontsize=8 if below_rows else None)
    ax.set_ylabel("top-1 accuracy (%)")
    if band:
        ax.set_ylim(*band)
        xs = [x for (x, _), _ in shown]
        span = max(xs) - min(xs)
        pad = 0.06 * span if span > 0 else 0.05 * (abs(xs[0]) or 1.0)  # one energy: a window around it
        ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.grid(alpha=0.3)
    if kinds:
        if legend_inside:
            ax.legend(fontsize=6, loc="lower right", framealpha=0.8)
        else:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(
            0.5, 0.5, "no points with a finite energy and accuracy", ha="center", va="center", transform=ax.transAxes
        )
    return len(rows) - len(shown), labels


def _overlap(a: Any, b: Any) -> float:
    """Area (square pixels) shared by two display-space bounding boxes."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def _place_labels(fig: Figure, ax: Any, labels: Sequence[Any]) -> None:
    """Move each point label to the nearest offset where it overlaps no other label, no marker and stays inside.

    Greedy, in order of energy: for each label the candidate offsets of :data:`LABEL_OFFSETS_PT` are tried nearest
    first; the first free one wins, else the one with the least overlap. Labels farther from their point keep a thin
    leader line to it. Runs on the final layout (the labels themselves are kept out of the layout).
    """
    if not labels:
        return
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    obstacles = []
    for collection in ax.collections:
        transform = collection.get_offset_transform()
        for px, py in transform.transform(np.asarray(collection.get_offsets(), dtype=float)):
            obstacles.append(Bbox.from_extents(px - 5, py - 5, px + 5, py + 5))
    placed: list[Any] = []
    for label in sorted(labels, key=lambda item: tuple(item.xy)):
        best: tuple[float, tuple[float, float], str, str] | None = None
        for dx, dy in LABEL_OFFSETS_PT:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            label.set_position((dx, dy))
            label.set_horizontalalignment(ha)
            label.set_verticalalignment(va)
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)  # the text alone, not its leader line
            outside = box.width * box.height - _overlap(box, frame)
            cost = 10 * outside + sum(_overlap(box, other) for other in (*placed, *obstacles))
            if best is None or cost < best[0]:
                best = (cost, (dx, dy), ha, va)
            if cost == 0:
                break
        assert best is not None
        _, offset, ha, va = best
        label.set_position(offset)
        label.set_horizontalalignment(ha)
        label.set_verticalalignment(va)
        label.update_positions(renderer)
        placed.append(Text.get_window_extent(label, renderer))


def pareto_figure(rows: list[dict[str, Any]], fp32_top1: float | None = None) -> Figure:
    """Top-1 accuracy against analytic energy for a sweep of configurations, with the Pareto frontier.

    Every row is one point; its marker and colour show its ``kind``: ``"config"`` (the config's own allocation, a
    large star), ``"budget"`` (an allocation under an energy budget), ``"uniform"``, ``"seed_rule"``, ``"random"``,
    or any other baseline name. The config's point and the baselines (every kind but ``"budget"`` and ``"random"``)
    are labelled with their ``name``, placed so that labels do not overlap each other or the markers. The frontier
    (points that no other point beats on both energy and accuracy, see :func:`pareto_front`) is a dashed step line:
    the best accuracy reachable at or under each energy. The FP32 accuracy is a dotted horizontal line. The accuracy
    axis shows the band where the comparisons happen (:func:`accuracy_axis_range`); points below it sit on the
    bottom edge as down-pointing markers and are named under the axis. Rows with a missing or non-finite value are
    left out and counted.

    Args:
        rows: One dict per configuration with ``name``, ``kind``, ``energy_uj`` (µJ per image) and ``top1`` (%),
            optionally ``top1_fp32`` (%).
        fp32_top1: FP32 top-1 (%) for the reference line; default: the first finite ``top1_fp32`` of the rows
            (no line when there is none).

    Returns:
        The figure: one axis, one scatter collection per kind (two when some of its points fall below the band),
        one step line for the frontier, one horizontal line for FP32.

    Raises:
        ValueError: If ``rows`` is not a list of dicts with the four keys.
    """
    rows = _pareto_rows(rows)
    fig = _new_figure(10, 5.5)
    ax = fig.add_subplot()
    dropped, labels = _draw_pareto(ax, rows, fp32_top1)
    note = f"; {dropped} rows without a finite energy or accuracy left out" if dropped else ""
    title = (
        f"Accuracy vs analytic energy: {len(rows) - dropped} configurations{note}. Dashed: Pareto frontier "
        "(lower energy, higher top-1). Source: validation top-1 and the run's energy model"
    )
    fig.suptitle(_wrap(title, fig, 9), fontsize=9)
    _place_labels(fig, ax, labels)
    return fig


# ------------------------------------------------------------------------------------------ bit distribution
def _bit_shares(plan: QuantPlan, kind: str) -> dict[int | None, int]:
    """Parameters (``"w"``) or input elements (``"a"``) per bit width, ``None`` (FP32) last, zero weights dropped."""
    shares: dict[int | None, int] = {}
    for spec, lp in plan.items():
        bits, weight = (lp.w_bits, spec.params) if kind == "w" else (lp.a_bits, spec.act_in)
        if weight > 0:
            shares[bits] = shares.get(bits, 0) + int(weight)
    return dict(sorted(shares.items(), key=lambda item: (item[0] is None, item[0] or 0)))


def _bit_color(bits: int | None) -> Any:
    """A fixed colour per bit width (the same in every figure), light grey for FP32."""
    if bits is None:
        return FP32_COLOR
    return _cmap("viridis")(min(math.log2(bits) / math.log2(FLOAT_BITS), 1.0))


def _draw_bit_pie(ax: Any, plan: QuantPlan, kind: str) -> None:
    """Draw the share of parameters (``"w"``) or input activation elements (``"a"``) per bit width on ``ax``."""
    label, unit = ("weights", "parameters") if kind == "w" else ("activations", "input activation elements")
    shares = _bit_shares(plan, kind)
    title = f"{label}: share of {unit} at each bit width ({'params' if kind == 'w' else 'act'}-weighted)"
    if not shares:
        _no_data(ax, f"no {unit} in the plan", textwrap.fill(title, 45))
        return
    total = sum(shares.values())
    labels = ["FP32" if bits is None else f"{bits} bits" for bits in shares]
    ax.pie(
        list(shares.values()),
        labels=labels,
        colors=[_bit_color(bits) for bits in shares],
        autopct=lambda pct: f"{pct:.1f} %",
        startangle=90,
        counterclock=False,
        wedgeprops={"edgecolor": "white", "linewidth": 1},
        textprops={"fontsize": 8},
    )
    ax.set_title(textwrap.fill(f"{title}; total {total:,} {unit}", 45), fontsize=9)
    ax.set_aspect("equal")


def bit_distribution_pie(plan: QuantPlan) -> Figure:
    """Two pies: the share of weights and of input activations quantized at each bit width.

    The weight pie is weighted by parameters (``LayerSpec.params``) and the activation pie by input elements per
    image (``LayerSpec.act_in``), so a large layer counts more than a small one; tensors that are not quantized
    are labelled "FP32". A plan with no parameters (or no inputs) gives a panel that says so.

    Args:
        plan: The plan at its current bit widths.

    Returns:
        The figure: two axes (weights, activations), one wedge per bit width present.
    """
    fig = _new_figure(10, 5)
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, SENSITIVITY_KINDS, strict=True):
        _draw_bit_pie(ax, plan, kind)
    fig.suptitle(f"Bit-width distribution over {len(plan)} layers (source: quantization plan)", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ energy comparison
def _draw_energy_comparison(ax: Any, reports: Mapping[str, Mapping[str, Any]]) -> None:
    """Draw one stacked bar (MAC, weight memory, activation memory; µJ per image) per configuration on ``ax``."""
    names = list(reports)
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for term, uj_key in ENERGY_UJ_KEYS.items():
        heights = np.asarray([float(reports[name][uj_key]) for name in names])
        ax.bar(
            x,
            heights,
            0.6,
            bottom=bottom,
            color=ENERGY_COLORS[term],
            edgecolor="black",
            linewidth=0.5,
            label=ENERGY_LABELS[term],
        )
        bottom += heights
    for i, name in enumerate(names):
        relative = _as_float(reports[name].get("relative_to_int8"))
        text = f"{bottom[i]:.4g} µJ" + (f"\n{relative:.3f} x W8A8" if math.isfinite(relative) else "")
        ax.annotate(text, (x[i], bottom[i]), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    _layer_ticks(ax, names)
    ax.set_ylim(0, max(float(bottom.max(initial=0.0)), 1e-12) * 1.18)
    ax.set_ylabel("energy per image (µJ)")
    ax.set_xlabel("configuration")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def energy_comparison_figure(reports: dict[str, dict[str, Any]]) -> Figure:
    """One stacked bar per configuration: MAC arithmetic, weight memory and activation memory, µJ per image.

    Args:
        reports: ``{configuration name: energy_report(...) dict}``, in the order the bars should appear. Each dict
            needs ``mac_uj_per_image``, ``weight_mem_uj_per_image`` and ``act_mem_uj_per_image``; the total and,
            when present, ``relative_to_int8`` are written above each bar.

    Returns:
        The figure: one axis, three stacked bar patches per configuration.

    Raises:
        ValueError: If ``reports`` is empty, or a report lacks one of the three energy keys.
    """
    if not isinstance(reports, Mapping) or not reports:
        raise ValueError("energy_comparison_figure needs a non-empty dict {configuration name: energy_report(...)}")
    for name, report in reports.items():
        missing = [key for key in ENERGY_UJ_KEYS.values() if not isinstance(report, Mapping) or key not in report]
        if missing:
            raise ValueError(
                f"energy report for {name!r} lacks {missing}: pass the dicts returned by lit_mpq.energy.energy_report"
            )
    fig = _new_figure(max(6.0, 2.5 + 1.0 * len(reports)), 5)
    ax = fig.add_subplot()
    _draw_energy_comparison(ax, reports)
    sources = list(dict.fromkeys(str(report.get("source") or "not given") for report in reports.values()))
    models = list(dict.fromkeys(str(report.get("model", "unknown model")) for report in reports.values()))
    caveat = "" if len(models) == 1 else " (different energy models: compare with care)"
    title = (
        f"Analytic energy per configuration, model {', '.join(models)}{caveat}\n"
        f"Source of the constants: {'; '.join(sources)}"
    )
    fig.suptitle(_wrap(title, fig, 8), fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------ sensitivity heatmap
def _sensitivity_matrix(plan: QuantPlan, kind: str) -> tuple[np.ndarray, list[int], int]:
    """``log10`` sensitivity as a ``(layers, bits)`` array, its bit-width columns, and the count of unusable scores.

    Cells without a score, or whose score is zero, negative or not finite, are NaN; the count is of the latter.
    """
    columns = sorted({int(bits) for name in plan.names for bits in plan[name].sensitivity.get(kind, {})})
    matrix = np.full((len(plan), len(columns)), np.nan)
    dropped = 0
    for row, name in enumerate(plan.names):
        for bits, score in plan[name].sensitivity.get(kind, {}).items():
            value = float(score)
            if math.isfinite(value) and value > 0:
                matrix[row, columns.index(int(bits))] = math.log10(value)
            else:
                dropped += 1
    return matrix, columns, dropped


def _draw_sensitivity_heatmap(fig: Figure, ax: Any, plan: QuantPlan, kind: str, metric: str) -> bool:
    """Draw layers x candidate bits of log10 sensitivity for ``kind`` on ``ax``, with a labelled colorbar.

    Returns:
        True if there was data to draw; otherwise the panel says so.
    """
    label = SENSITIVITY_KINDS[kind]
    matrix, columns, dropped = _sensitivity_matrix(plan, kind)
    if not columns or np.isnan(matrix).all():
        _no_data(ax, f"no {label} sensitivity data", f"{label}: no sensitivity data")
        return False
    cmap = _cmap("viridis").with_extremes(bad=FP32_COLOR)
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xticks(np.arange(len(columns)))
    ax.set_xticklabels([str(bits) for bits in columns])
    ax.set_yticks(np.arange(len(plan)))
    ax.set_yticklabels(plan.names, fontsize=7 if len(plan) <= 40 else 5)
    ax.set_xlabel("candidate bit width (bits)")
    ax.set_ylabel("layer (model order)")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(f"log10 of {metric}", fontsize=8)
    missing = int(np.isnan(matrix).sum())
    note = f"; grey: {missing} cells without a score" if missing else ""
    note += f" ({dropped} non-positive or non-finite)" if dropped else ""
    ax.set_title(textwrap.fill(f"{label}: log10 sensitivity (source: sensitivity probe){note}", 50), fontsize=9)
    return True


def sensitivity_heatmap_figure(plan: QuantPlan, metric: str = DEFAULT_METRIC) -> Figure:
    """Heatmaps of log10 sensitivity: layers (rows, model order) x candidate bit widths (columns).

    Two panels, weights and activations, each with a labelled colorbar. Cells without a score, or with a zero,
    negative or non-finite score (no logarithm), are grey. A panel without data says so instead of raising.

    Args:
        plan: The plan, after a sensitivity probe filled ``LayerPlan.sensitivity``.
        metric: Name and unit of the probe's metric, used in the colorbar label.

    Returns:
        The figure: a heatmap axis per kind with data (its image array has shape ``(layers, candidate bits)``),
        plus its colorbar axis.
    """
    height = float(min(max(4.0, 2.0 + 0.22 * len(plan)), 30.0))
    fig = _new_figure(11, height)
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, SENSITIVITY_KINDS, strict=True):
        _draw_sensitivity_heatmap(fig, ax, plan, kind, metric)
    fig.suptitle(f"Sensitivity per layer and candidate bit width, {len(plan)} layers", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ summary
def _top_energy_rows(rows: Sequence[Mapping[str, Any]], top: int) -> list[Mapping[str, Any]]:
    """The ``top`` rows with the largest total energy, kept in model order."""
    if len(rows) <= top:
        return list(rows)

    def total(row: Mapping[str, Any]) -> float:
        return sum(float(row[key]) for key in ENERGY_COLORS)

    keep = set(sorted(range(len(rows)), key=lambda i: -total(rows[i]))[:top])
    return [row for i, row in enumerate(rows) if i in keep]


def _accuracy_headline(top1: float | None, top1_fp32: float | None) -> str:
    """``"top-1 89.06 % (FP32 91.50 %, -2.44 pp); "``, what is known of it, or nothing when no accuracy is given."""
    quantized = _as_float(top1)
    fp32 = _as_float(top1_fp32)
    if not math.isfinite(quantized):
        return f"FP32 top-1 {fp32:.2f} %; " if math.isfinite(fp32) else ""
    if not math.isfinite(fp32):
        return f"top-1 {quantized:.2f} %; "
    return f"top-1 {quantized:.2f} % (FP32 {fp32:.2f} %, {quantized - fp32:+.2f} pp); "


def summary_figure(
    plan: QuantPlan,
    energy_report: Mapping[str, Any] | None,
    pareto_rows: list[dict[str, Any]] | None = None,
    metric: str = DEFAULT_METRIC,
    *,
    top1: float | None = None,
    top1_fp32: float | None = None,
    candidate_bits: Sequence[int] | None = None,
) -> Figure:
    """One page: accuracy, bits per layer, sensitivities, bit shares, energy per layer, and the frontier of a sweep.

    The headline gives the quantized top-1 next to FP32 with the difference, the energy and the mean weight and
    activation widths. The panels are drawn by the same helpers as the single figures: weight and activation bits
    per layer (:func:`bit_width_figure`), the weights' sensitivity histogram (the activations' when the weights have
    none), the share of weights and of activations at each width (:func:`bit_distribution_pie`), the energy per
    layer (:func:`energy_breakdown_figure`; the 12 most expensive layers in model order when the plan has more), and,
    only when sweep rows are given, the accuracy-energy frontier (:func:`pareto_figure`). Without a sweep the bits
    panel takes the frontier's place: no empty panel.

    Args:
        plan: The plan at its current bit widths (with sensitivities, when a probe ran).
        energy_report: The dict returned by :func:`lit_mpq.energy.energy_report`, or ``None`` (the panel says so).
        pareto_rows: Rows for :func:`pareto_figure` from a sweep, or ``None``/empty (no frontier panel).
        metric: Name and unit of the probe's metric, for the histogram's x label.
        top1: Quantized top-1 (%) for the headline.
        top1_fp32: FP32 top-1 (%) for the headline and the frontier's reference line.
        candidate_bits: Bit widths marked on the bits axis; default: those the plan was probed at.

    Returns:
        The figure. Its first axes are, in order: the frontier (only with a sweep), bits per layer, sensitivity
        histogram, weight pie, activation pie, energy per layer.

    Raises:
        ValueError: If ``energy_report`` or ``pareto_rows`` is given but malformed.
    """
    rows = _energy_rows(energy_report) if energy_report is not None else None
    sweep = _pareto_rows(pareto_rows) if pareto_rows else None
    fig = _new_figure(18, 10)
    grid = fig.add_gridspec(2, 3)
    labels: list[Any] = []
    ax_pareto = fig.add_subplot(grid[0, 0]) if sweep else None
    ax_bits = fig.add_subplot(grid[0, 1] if sweep else grid[0, :2])
    ax_sens = fig.add_subplot(grid[0, 2])
    ax_w_pie, ax_a_pie, ax_energy = (fig.add_subplot(grid[1, column]) for column in range(3))
    if ax_pareto is not None and sweep is not None:
        dropped, labels = _draw_pareto(ax_pareto, sweep, top1_fp32, legend_inside=True)
        note = f", {dropped} left out" if dropped else ""
        ax_pareto.set_title(f"Accuracy vs energy: {len(sweep) - dropped} configurations{note}", fontsize=9)
    handles = _draw_bit_widths(ax_bits, plan, candidate_bits, layer_labels=len(plan) <= 40)
    ax_bits.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax_bits.set_title(
        f"Bits per layer: weights mean {plan.average_weight_bits():.2f}, activations mean "
        f"{plan.average_act_bits():.2f} (parameter- and input-weighted)",
        fontsize=9,
    )
    if not _draw_sensitivity_histogram(ax_sens, plan, "w", 20, metric) and _sensitivity_values(plan, "a")[0]:
        ax_sens.clear()
        _draw_sensitivity_histogram(ax_sens, plan, "a", 20, metric)
    _draw_bit_pie(ax_w_pie, plan, "w")
    _draw_bit_pie(ax_a_pie, plan, "a")
    if rows:
        shown = _top_energy_rows(rows, SUMMARY_TOP_LAYERS)
        _draw_energy_breakdown(ax_energy, shown)
        which = f"top {len(shown)} of {len(rows)} layers by energy" if len(shown) < len(rows) else "all layers"
        ax_energy.set_title(f"Energy by term per layer ({which})", fontsize=9)
    else:
        _no_data(ax_energy, "no energy report", "Energy by term per layer")
    energy = _energy_headline(energy_report) if energy_report is not None else "no energy report"
    source = (energy_report or {}).get("source") or "not given"
    title = (
        f"{_accuracy_headline(top1, top1_fp32)}mean weight width {plan.average_weight_bits():.2f} bits, mean "
        f"activation width {plan.average_act_bits():.2f} bits; {len(plan)} layers\n"
        f"Energy {energy}. Source of the energy constants: {source}"
    )
    fig.suptitle(_wrap(title, fig, 11), fontsize=11)
    if ax_pareto is not None:
        _place_labels(fig, ax_pareto, labels)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as a PNG at 120 dpi (parent folders created); works without pyplot or a chosen backend.

    Args:
        fig: The figure.
        path: Destination file; it must end in ``.png``.

    Returns:
        The path written.

    Raises:
        ValueError: If ``path`` does not end in ``.png``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figure path {str(path)!r} has suffix {path.suffix!r}: figures are saved as '.png' only")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=SAVE_DPI)
    return path
