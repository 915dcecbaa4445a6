"""Report figures: bit widths per layer, sensitivity histograms and the energy breakdown.

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure` and leaves saving to the caller, so the
same figure can go to disk (:func:`save_figure`) or to TensorBoard (``SummaryWriter.add_figure``). Every axis
is labelled with its unit, and every energy figure cites the energy model's source. The non-interactive ``Agg``
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
    "bit_width_figure",
    "energy_breakdown_figure",
    "save_figure",
    "sensitivity_histogram_figure",
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
SENSITIVITY_KINDS = {"w": "weights", "a": "activations"}
PJ_PER_UJ = 1e6
SAVE_DPI = 120


def _figure_width(n_layers: int) -> float:
    """Figure width in inches that keeps per-layer bars readable, between 6 and 30 inches."""
    return float(min(max(6.0, 2.0 + 0.3 * n_layers), 30.0))


def _wrap(text: str, fig: Figure, fontsize: float) -> str:
    """Wrap each line of ``text`` so that a title at ``fontsize`` points fits the figure's width."""
    chars = max(40, int(fig.get_figwidth() * 72 / (0.65 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


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


def sensitivity_histogram_figure(
    plan: QuantPlan, bins: int = 20, metric: str = "sensitivity score, in the probe metric's unit"
) -> Figure:
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
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins={bins!r} is not valid: use a positive integer number of histogram bins.")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, (kind, label) in zip(axes, SENSITIVITY_KINDS.items(), strict=True):
        per_bits, dropped = _sensitivity_values(plan, kind)
        ax.set_xlabel(f"log10 of {metric}")
        ax.set_ylabel("layers (count)")
        if not per_bits:
            ax.text(0.5, 0.5, f"no {label} sensitivity data", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{label}: no sensitivity data", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
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
    return fig


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
    rows = report.get("per_layer") if isinstance(report, Mapping) else None
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise ValueError(
            "energy_breakdown_figure needs the dict returned by lit_mpq.energy.energy_report(plan, model), "
            "with a 'per_layer' list of rows"
        )
    required = ("name", *ENERGY_COLORS)
    for row in rows:
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"energy report row {row!r} lacks {missing}: each row needs the keys {list(required)}")
    names = [str(row["name"]) for row in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(_figure_width(len(names)), 4.5), layout="constrained")
    bottom = np.zeros(len(names))
    for key, color in ENERGY_COLORS.items():
        heights = np.asarray([float(row[key]) for row in rows]) / PJ_PER_UJ
        ax.bar(x, heights, 0.7, bottom=bottom, color=color, edgecolor="black", linewidth=0.5, label=ENERGY_LABELS[key])
        bottom += heights
    _layer_ticks(ax, names)
    ax.set_ylabel("energy per image (µJ)")
    ax.set_xlabel("layer (model order)")
    model = report.get("model", "unknown model")
    total = report.get("total_uj_per_image")
    total_text = f": total {float(total):.4g} µJ per image" if total is not None else ""
    relative = report.get("relative_to_int8")
    relative_text = (
        f" ({float(relative):.3f} x uniform W8A8)" if relative is not None and math.isfinite(float(relative)) else ""
    )
    source = report.get("source") or "not given"
    title = f"Analytic energy per layer, model {model}{total_text}{relative_text}\nSource of the constants: {source}"
    fig.suptitle(_wrap(title, fig, 8), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
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
