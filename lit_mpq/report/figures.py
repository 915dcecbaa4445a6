"""Report figures: bit widths, sensitivities, energy, the accuracy-energy Pareto frontier, and a summary.

Figures:

* :func:`bit_width_figure`: weight and activation bit width per layer.
* :func:`bit_distribution_pie`: share of parameters (weights) and of input elements (activations) per bit width.
* :func:`sensitivity_histogram_figure` and :func:`sensitivity_heatmap_figure`: the probe's scores.
* :func:`energy_breakdown_figure` (per layer) and :func:`energy_comparison_figure` (per configuration).
* :func:`pareto_figure`: top-1 against energy for a sweep, with the non-dominated frontier (:func:`pareto_front`).
* :func:`summary_figure`: four panels (frontier, sensitivity histogram, weight-bit pie, energy per layer), drawn
  by the same ``_draw_*`` helpers as the single figures.

Each figure function returns a :class:`matplotlib.figure.Figure` and leaves saving to the caller, so the same
figure can go to disk (:func:`save_figure`) or to TensorBoard (``SummaryWriter.add_figure``). Every axis is
labelled with its unit, and every energy figure cites the energy model's source. The non-interactive ``Agg``
backend is selected on import, so the functions work on headless machines.

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

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lit_mpq.plan import FLOAT_BITS, QuantPlan  # noqa: E402

__all__ = [
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
    "budget": ("o", "tab:blue", "energy budget (allocated)"),
    "uniform": ("s", "tab:green", "uniform bit width"),
    "seed_rule": ("D", "tab:purple", "seed rule"),
    "random": (".", "tab:gray", "random allocation"),
}
OTHER_KIND = ("^", "tab:brown", "other baseline")
UNANNOTATED_KINDS = ("budget", "random")
"""Pareto points of these kinds are not labelled with their names (there are many of them)."""
SUMMARY_TOP_LAYERS = 12
"""The summary's energy panel shows at most this many layers (the most expensive ones, in model order)."""


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


def bit_width_figure(plan: QuantPlan) -> Figure:
    """Bar chart of the weight and input-activation bit widths of every layer, in model order.

    Two bars per layer (weights, activations). A tensor that is not quantized is drawn as a 32-bit grey, hatched
    bar labelled FP32. Layers whose bits were pinned by configuration get a ``*`` and a red tick label.

    Args:
        plan: The plan at its current bit widths.

    Returns:
        The figure (one axis; ``2 * len(plan)`` bar patches).
    """
    names = plan.names
    x = np.arange(len(names))
    width = 0.4
    fig, ax = plt.subplots(figsize=(_figure_width(len(names)), 4.5), layout="constrained")
    any_fp32 = False
    bits = plan.bits()
    series = (
        (-width / 2, 0, WEIGHT_COLOR, "weights"),
        (width / 2, 1, ACT_COLOR, "activations (layer input)"),
    )
    for offset, index, color, label in series:
        values = [bits[name][index] for name in names]
        heights = [FLOAT_BITS if v is None else v for v in values]
        bars = ax.bar(x + offset, heights, width, color=color, edgecolor="black", linewidth=0.5, label=label)
        for bar, value in zip(bars, values, strict=True):
            if value is None:
                any_fp32 = True
                bar.set_facecolor(FP32_COLOR)
                bar.set_hatch("//")
    handles: list[Patch] = [Patch(facecolor=color, edgecolor="black", label=label) for _, _, color, label in series]
    if any_fp32:
        handles.append(
            Patch(
                facecolor=FP32_COLOR,
                edgecolor="black",
                hatch="//",
                label=f"FP32, not quantized (drawn as {FLOAT_BITS})",
            )
        )
    pinned = [plan[name].pinned for name in names]
    if any(pinned):
        handles.append(Patch(facecolor="white", edgecolor=PINNED_COLOR, label="* pinned by configuration"))
    _layer_ticks(ax, names, pinned)
    ticks = sorted({2, 4, 8, 16, FLOAT_BITS} | {b for pair in bits.values() for b in pair if b is not None})
    ax.set_yticks(ticks)
    ax.set_ylim(0, FLOAT_BITS + 2)
    ax.set_ylabel("bit width (bits)")
    ax.set_xlabel("layer (model order)")
    title = (
        f"Bit width per layer: {len(names)} layers, parameter-weighted mean weight width "
        f"{plan.average_weight_bits():.2f} bits, input-weighted mean activation width {plan.average_act_bits():.2f} "
        "bits (source: quantization plan)"
    )
    fig.suptitle(_wrap(title, fig, 9), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
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
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(logs))]
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
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
    fig, ax = plt.subplots(figsize=(_figure_width(len(rows)), 4.5), layout="constrained")
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


def _draw_pareto(ax: Any, rows: Sequence[Mapping[str, Any]]) -> int:
    """Scatter the sweep's points by kind, label the baselines, and draw the frontier as a step line on ``ax``.

    Returns:
        The number of points left out because their energy or accuracy is missing or not finite.
    """
    points = [(_as_float(row["energy_uj"]), _as_float(row["top1"])) for row in rows]
    finite = [math.isfinite(x) and math.isfinite(y) for x, y in points]
    kinds = list(dict.fromkeys(str(row["kind"]) for row, ok in zip(rows, finite, strict=True) if ok))
    kinds.sort(key=lambda kind: (list(PARETO_KINDS).index(kind) if kind in PARETO_KINDS else len(PARETO_KINDS), kind))
    for kind in kinds:
        marker, color, label = PARETO_KINDS.get(kind, OTHER_KIND)
        if kind not in PARETO_KINDS:
            label = f"{OTHER_KIND[2]}: {kind}"
        xs = [p[0] for p, row, ok in zip(points, rows, finite, strict=True) if ok and str(row["kind"]) == kind]
        ys = [p[1] for p, row, ok in zip(points, rows, finite, strict=True) if ok and str(row["kind"]) == kind]
        size = 20 if kind == "random" else 45
        ax.scatter(xs, ys, marker=marker, color=color, s=size, label=f"{label} ({len(xs)})", zorder=3)
    for (x, y), row, ok in zip(points, rows, finite, strict=True):
        if ok and str(row["kind"]) not in UNANNOTATED_KINDS:
            ax.annotate(str(row["name"]), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, zorder=4)
    front = pareto_front(points)
    if front:
        fx = [points[i][0] for i in front]
        fy = [points[i][1] for i in front]
        ax.step(
            fx,
            fy,
            where="post",
            color="black",
            linestyle="--",
            linewidth=1.2,
            zorder=2,
            label=f"Pareto frontier ({len(front)} points)",
        )
    ax.set_xlabel("analytic energy per image (µJ)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    if kinds:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(
            0.5, 0.5, "no points with a finite energy and accuracy", ha="center", va="center", transform=ax.transAxes
        )
    return len(rows) - sum(finite)


def pareto_figure(rows: list[dict[str, Any]]) -> Figure:
    """Top-1 accuracy against analytic energy for a sweep of configurations, with the Pareto frontier.

    Every row is one point; its marker and colour show its ``kind``: ``"budget"`` (an allocation under an energy
    budget), ``"uniform"``, ``"seed_rule"``, ``"random"``, or any other baseline name. Baselines (every kind but
    ``"budget"`` and ``"random"``) are labelled with their ``name``. The frontier (points that no other point
    beats on both energy and accuracy, see :func:`pareto_front`) is a dashed step line: the best accuracy
    reachable at or under each energy. Rows with a missing or non-finite value are left out and counted.

    Args:
        rows: One dict per configuration with ``name``, ``kind``, ``energy_uj`` (µJ per image) and ``top1`` (%).

    Returns:
        The figure: one axis, one scatter collection per kind, one step line for the frontier.

    Raises:
        ValueError: If ``rows`` is not a list of dicts with the four keys.
    """
    rows = _pareto_rows(rows)
    fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    dropped = _draw_pareto(ax, rows)
    note = f"; {dropped} rows without a finite energy or accuracy left out" if dropped else ""
    title = (
        f"Accuracy vs analytic energy: {len(rows) - dropped} configurations{note}. Dashed: Pareto frontier "
        "(lower energy, higher top-1). Source: validation top-1 and the run's energy model"
    )
    fig.suptitle(_wrap(title, fig, 9), fontsize=9)
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
    return plt.get_cmap("viridis")(min(math.log2(bits) / math.log2(FLOAT_BITS), 1.0))


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
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), layout="constrained")
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
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 1.0 * len(reports)), 5), layout="constrained")
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
    cmap = plt.get_cmap("viridis").with_extremes(bad=FP32_COLOR)
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
    fig, axes = plt.subplots(1, 2, figsize=(11, height), layout="constrained")
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


def summary_figure(
    plan: QuantPlan,
    energy_report: Mapping[str, Any] | None,
    pareto_rows: list[dict[str, Any]] | None = None,
    metric: str = DEFAULT_METRIC,
) -> Figure:
    """One page with four panels: Pareto frontier, weight sensitivity histogram, weight-bit pie, energy per layer.

    The panels are drawn by the same helpers as :func:`pareto_figure`, :func:`sensitivity_histogram_figure`,
    :func:`bit_distribution_pie` and :func:`energy_breakdown_figure`. The sensitivity panel shows the weights'
    scores (the activations' when the weights have none). The energy panel shows the 12 most expensive layers in
    model order when the plan has more.

    Args:
        plan: The plan at its current bit widths (with sensitivities, when a probe ran).
        energy_report: The dict returned by :func:`lit_mpq.energy.energy_report`, or ``None`` (the panel says so).
        pareto_rows: Rows for :func:`pareto_figure` from a sweep, or ``None`` (the panel says "no sweep").
        metric: Name and unit of the probe's metric, for the histogram's x label.

    Returns:
        The figure with four panel axes (plus the pie's, all in a 2 x 2 grid).

    Raises:
        ValueError: If ``energy_report`` or ``pareto_rows`` is given but malformed.
    """
    rows = _energy_rows(energy_report) if energy_report is not None else None
    sweep = _pareto_rows(pareto_rows) if pareto_rows else None
    fig, axes = plt.subplots(2, 2, figsize=(15, 10), layout="constrained")
    (ax_pareto, ax_sens), (ax_pie, ax_energy) = axes
    if sweep:
        dropped = _draw_pareto(ax_pareto, sweep)
        note = f", {dropped} left out" if dropped else ""
        ax_pareto.set_title(f"Accuracy vs energy: {len(sweep) - dropped} configurations{note}", fontsize=9)
    else:
        _no_data(ax_pareto, "no sweep: run a budget sweep to draw the accuracy-energy frontier", "Pareto frontier")
    if not _draw_sensitivity_histogram(ax_sens, plan, "w", 20, metric) and _sensitivity_values(plan, "a")[0]:
        ax_sens.clear()
        _draw_sensitivity_histogram(ax_sens, plan, "a", 20, metric)
    _draw_bit_pie(ax_pie, plan, "w")
    if rows:
        shown = _top_energy_rows(rows, SUMMARY_TOP_LAYERS)
        _draw_energy_breakdown(ax_energy, shown)
        which = f"top {len(shown)} of {len(rows)} layers by energy" if len(shown) < len(rows) else "all layers"
        ax_energy.set_title(f"Energy by term per layer ({which})", fontsize=9)
    else:
        _no_data(ax_energy, "no energy report", "Energy by term per layer")
    headline = _energy_headline(energy_report) if energy_report is not None else "no energy report"
    source = (energy_report or {}).get("source") or "not given"
    title = (
        f"Quantization summary: {len(plan)} layers, mean weight width {plan.average_weight_bits():.2f} bits, "
        f"mean activation width {plan.average_act_bits():.2f} bits; energy {headline}\n"
        f"Source of the energy constants: {source}"
    )
    fig.suptitle(_wrap(title, fig, 9), fontsize=9)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as a PNG at 120 dpi (parent folders created) and close it.

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
    try:
        fig.savefig(path, format="png", dpi=SAVE_DPI)
    finally:
        plt.close(fig)
    return path
