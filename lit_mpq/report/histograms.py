"""Activation histograms before and after clipping: figures and TensorBoard summaries from a histogram observer.

A :class:`~lit_mpq.quant.observers.HistogramObserver` keeps every value it saw in fixed, log-spaced bins (per sign),
so one calibration pass holds the whole distribution of a tensor. :class:`Distribution` reads it as plain NumPy bins,
each bin's count spread uniformly over its ``[lower, upper]`` interval (a zero-width bin is a point mass), and
answers the questions a clipping study asks of it:

* :meth:`Distribution.histogram`: counts on any linear bin edges (what a plot or TensorBoard shows);
* :meth:`Distribution.clipped`: the distribution after clamping to a range (the clipped mass piles up at the ends);
* :meth:`Distribution.clipped_fraction`: the share of values outside a range.

:func:`clipping_figure` draws several tensors side by side, before clipping with each method's range marked and the
share of values it clips, and after clipping; :func:`add_clipping_histograms` writes the same histograms to
TensorBoard (``SummaryWriter.add_histogram_raw``: the observer's counts, no samples kept). As in
:mod:`lit_mpq.report.figures`, figures are built as :class:`matplotlib.figure.Figure` objects with their own Agg canvas,
never through ``pyplot``.

Example:
    >>> import torch
    >>> from lit_mpq.quant.observers import HistogramObserver
    >>> observer = HistogramObserver()
    >>> _ = observer(torch.tensor([0.0, 0.5, 1.0, 8.0]))
    >>> dist = Distribution.from_observer(observer)
    >>> round(dist.clipped_fraction(0.0, 2.0), 2)  # the 8.0
    0.25
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lit_mpq.quant.observers import HistogramObserver

__all__ = [
    "ClippingPanel",
    "Distribution",
    "add_clipping_histograms",
    "clipping_figure",
    "linear_edges",
    "tag_safe",
]

BEFORE_COLOR = "0.55"
RANGE_COLORS = "tab10"
"""Matplotlib colormap whose colours mark the clipping methods, in the order the ranges are given."""


def linear_edges(low: float, high: float, num_bins: int) -> np.ndarray:
    """``num_bins + 1`` equally spaced edges from ``low`` to ``high`` (widened a little when the two coincide).

    Raises:
        ValueError: If ``num_bins`` is not positive or ``high < low``.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins}")
    if not high >= low:
        raise ValueError(f"the upper edge {high} is below the lower edge {low}")
    if high == low:  # a constant tensor: give its single value a bin of its own
        pad = max(abs(low) * 1e-3, 1e-12)
        low, high = low - pad, high + pad
    return np.linspace(low, high, num_bins + 1)


@dataclass(frozen=True)
class Distribution:
    """Observed values as bins, each bin's count spread uniformly over ``[lower, upper]`` (a point when equal).

    Attributes:
        lower: Lower bin ends, ascending, float64.
        upper: Upper bin ends (``>= lower``), ascending, float64.
        counts: Values per bin, float64 (no empty bins).
    """

    lower: np.ndarray
    upper: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_observer(cls, observer: HistogramObserver) -> Distribution:
        """The distribution a histogram observer collected (its outermost bins tightened to the observed min/max).

        Raises:
            ValueError: If the observer has seen no finite value.
        """
        if not observer.has_data:
            raise ValueError(f"the {type(observer).__name__} has no statistics: run calibration first")
        lower, upper, counts = (t.cpu().numpy() for t in observer.signed_distribution())
        keep = counts > 0  # most of the 3,000 fixed bins are empty; dropping them keeps every sum below short
        return cls(lower[keep], upper[keep], counts[keep])

    @property
    def total(self) -> float:
        """Number of values."""
        return float(self.counts.sum())

    @property
    def min(self) -> float:
        """Smallest value."""
        return float(self.lower[0])

    @property
    def max(self) -> float:
        """Largest value."""
        return float(self.upper[-1])

    def _split(self, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
        """Per bin, the share of its count below ``low`` and above ``high`` (uniform within a bin)."""
        width = self.upper - self.lower
        wide = width > 0
        safe = np.where(wide, width, 1.0)
        below = np.where(wide, np.clip((low - self.lower) / safe, 0.0, 1.0), (self.lower < low).astype(float))
        above = np.where(wide, np.clip((self.upper - high) / safe, 0.0, 1.0), (self.upper > high).astype(float))
        return below, above

    def clipped_fraction(self, low: float, high: float) -> float:
        """Share of the values outside ``[low, high]`` (0 to 1)."""
        below, above = self._split(low, high)
        return float((self.counts * (below + above)).sum() / self.total)

    def clipped(self, low: float, high: float) -> Distribution:
        """The distribution after clamping every value to ``[low, high]``: the mass outside becomes two point masses.

        Raises:
            ValueError: If ``high < low``.
        """
        if not high >= low:
            raise ValueError(f"the clipping range [{low}, {high}] is empty")
        below, above = self._split(low, high)
        inside = self.counts * np.clip(1.0 - below - above, 0.0, 1.0)
        keep = inside > 0
        lower = np.clip(self.lower[keep], low, high)
        upper = np.clip(self.upper[keep], low, high)
        lower = np.concatenate([[low], lower, [high]])
        upper = np.concatenate([[low], upper, [high]])
        counts = np.concatenate([[(self.counts * below).sum()], inside[keep], [(self.counts * above).sum()]])
        nonempty = counts > 0
        return Distribution(lower[nonempty], upper[nonempty], counts[nonempty])

    def histogram(self, edges: np.ndarray) -> np.ndarray:
        """Counts on the bins ``[edges[i], edges[i + 1])`` (the last bin closed), like ``numpy.histogram``.

        Values outside ``[edges[0], edges[-1]]`` are not counted.
        """
        edges = np.asarray(edges, dtype=np.float64)
        width = self.upper - self.lower
        wide = width > 0
        # Spread bins: the share of each bin's interval left of every edge gives the cumulative count at the edges.
        lo, hi, count = self.lower[wide], self.upper[wide], self.counts[wide]
        left = np.clip((edges[:, None] - lo[None, :]) / (hi - lo)[None, :], 0.0, 1.0) @ count
        counts = np.diff(left)
        # Point masses: into the bin whose half-open interval holds them (the last bin also takes its right edge).
        points, mass = self.lower[~wide], self.counts[~wide]
        inside = (points >= edges[0]) & (points <= edges[-1])
        index = np.clip(np.searchsorted(edges, points[inside], side="right") - 1, 0, len(edges) - 2)
        np.add.at(counts, index, mass[inside])
        return counts

    def moments(self) -> tuple[float, float]:
        """``(sum, sum of squares)`` of the values, exact for values uniform within their bins."""
        lo, hi = self.lower, self.upper
        return float((self.counts * (lo + hi) / 2).sum()), float((self.counts * (lo**2 + lo * hi + hi**2) / 3).sum())


@dataclass(frozen=True)
class ClippingPanel:
    """One tensor of :func:`clipping_figure`: its distribution and the clipping ranges to compare on it.

    Attributes:
        title: Panel title (the tensor, e.g. ``"blocks.5.mlp.fc2 input"``).
        distribution: What calibration observed.
        ranges: ``{method label: (low, high)}``, in legend order.
        subtitle: A second title line (what the tensor is, e.g. ``"after GELU"``).
        note: A remark shown with the after-clipping panel (e.g. that the ranges are shown for comparison only).
        colors: Colour per method label; labels missing here take the next colour of :data:`RANGE_COLORS`.
    """

    title: str
    distribution: Distribution
    ranges: Mapping[str, tuple[float, float]]
    subtitle: str = ""
    note: str = ""
    colors: Mapping[str, Any] = field(default_factory=dict)


def _colors(labels: Sequence[str], given: Mapping[str, Any]) -> dict[str, Any]:
    cmap = matplotlib.colormaps[RANGE_COLORS]
    return {label: given.get(label, cmap(i % cmap.N)) for i, label in enumerate(labels)}


def clipping_figure(panels: Sequence[ClippingPanel], title: str, num_bins: int = 120) -> Figure:
    """Histograms of several tensors before clipping (each method's range marked) and after clipping.

    Top row: the observed distribution over ``[min, max]`` as the share of values per bin (log scale, so the tails
    show), each method's range as a pair of vertical lines of its colour, and the share of values it clips in the
    legend. Bottom row: the distribution after clamping to each range that clips anything (a step line per method,
    the clipped mass piled up in the end bins), over the span of those ranges.

    Args:
        panels: One column per tensor.
        title: Figure title.
        num_bins: Linear bins per histogram.

    Returns:
        The figure (save it with :func:`lit_mpq.report.figures.save_figure` or log it with ``add_figure``).

    Raises:
        ValueError: If ``panels`` is empty.
    """
    if not panels:
        raise ValueError("clipping_figure needs at least one panel")
    fig = Figure(figsize=(4.6 * len(panels), 9.0), layout="constrained")
    FigureCanvasAgg(fig)  # own canvas: no pyplot, no global backend
    axes = fig.subplots(2, len(panels), squeeze=False)
    for column, panel in enumerate(panels):
        _draw_before(axes[0, column], panel, num_bins)
        _draw_after(axes[1, column], panel, num_bins)
    fig.suptitle(title)
    return fig


def _draw_before(ax: Any, panel: ClippingPanel, num_bins: int) -> None:
    dist = panel.distribution
    edges = linear_edges(dist.min, dist.max, num_bins)
    share = dist.histogram(edges) / dist.total
    ax.stairs(share, edges, fill=True, color=BEFORE_COLOR, alpha=0.6, label="observed (before clipping)")
    colors = _colors(list(panel.ranges), panel.colors)
    for label, (low, high) in panel.ranges.items():
        percent = 100 * dist.clipped_fraction(low, high)
        text = f"{label}: [{low:.3g}, {high:.3g}], {percent:.2g} % clipped"
        ax.axvline(low, color=colors[label], linestyle="--", linewidth=1.1, label=text)
        ax.axvline(high, color=colors[label], linestyle="--", linewidth=1.1)
    _log_y(ax, share)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_title(f"{panel.title}\n{panel.subtitle}" if panel.subtitle else panel.title, fontsize=9)
    ax.set_xlabel("activation value (as the layer sees it)", fontsize=8)
    ax.set_ylabel(f"share of values per bin (of {int(dist.total):,}; log)", fontsize=8)
    # Under the axes: inside, the seven or so entries would hide the tails the figure is about.
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.tick_params(labelsize=7)


def _log_y(ax: Any, *shares: np.ndarray) -> None:
    """Log y axis from just under the smallest non-zero share (a single value in a bin) to above the largest."""
    values = np.concatenate(shares)
    positive = values[values > 0]
    ax.set_yscale("log")
    if positive.size:
        ax.set_ylim(positive.min() / 2, positive.max() * 2)


def _draw_after(ax: Any, panel: ClippingPanel, num_bins: int) -> None:
    dist = panel.distribution
    colors = _colors(list(panel.ranges), panel.colors)
    clipping = {label: r for label, r in panel.ranges.items() if dist.clipped_fraction(*r) > 0}
    if not clipping:
        ax.text(0.5, 0.5, "no range clips any value", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    edges = linear_edges(min(r[0] for r in clipping.values()), max(r[1] for r in clipping.values()), num_bins)
    shares = []
    for label, (low, high) in clipping.items():
        shares.append(dist.clipped(low, high).histogram(edges) / dist.total)
        ax.stairs(shares[-1], edges, color=colors[label], linewidth=1.2, label=label)
    unclipped = [label for label in panel.ranges if label not in clipping]
    _log_y(ax, *shares)
    ax.set_xlim(edges[0], edges[-1])
    lines = ["after clipping (clipped values pile up at the range ends)"]
    if unclipped:
        lines.append(f"clip nothing: {', '.join(unclipped)}")
    lines += textwrap.wrap(panel.note, 70)
    ax.set_title("\n".join(lines), fontsize=8)
    ax.set_xlabel("activation value after clipping", fontsize=8)
    ax.set_ylabel("share of values per bin (log)", fontsize=8)
    ax.legend(fontsize=6.5, loc="upper right")
    ax.tick_params(labelsize=7)


def tag_safe(label: str) -> str:
    """``label`` as one TensorBoard tag level: ``"min/max"`` -> ``"min_max"``, ``"MSE (A4)"`` -> ``"MSE_A4"``.

    Runs of characters other than letters, digits, ``.`` and ``-`` become ``_`` (a ``/`` would open a new level).
    """
    return re.sub(r"[^\w.\-]+", "_", label).strip("_") or "_"


def _add_raw(writer: Any, tag: str, dist: Distribution, edges: np.ndarray, step: int) -> None:
    counts = dist.histogram(edges)
    total, squares = dist.moments()
    writer.add_histogram_raw(
        tag,
        min=dist.min,
        max=dist.max,
        num=dist.total,
        sum=total,
        sum_squares=squares,
        bucket_limits=edges[1:].tolist(),  # TensorBoard buckets are named by their right edge
        bucket_counts=counts.tolist(),
        global_step=step,
    )


def add_clipping_histograms(
    writer: Any,
    tag: str,
    distribution: Distribution,
    ranges: Mapping[str, tuple[float, float]],
    num_bins: int = 200,
    step: int = 0,
) -> list[str]:
    """Write a tensor's histogram before clipping and after clipping to each range to TensorBoard.

    Tags: ``<tag>/before`` and ``<tag>/after/<method label>`` (the label through :func:`tag_safe`; each
    after-clipping histogram on linear bins over its own range, so a tight range still gets ``num_bins`` bins).

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (anything with its ``add_histogram_raw``).
        tag: Tag prefix, e.g. ``"deit_tiny/blocks.5.mlp.fc2.input"``.
        distribution: What calibration observed.
        ranges: ``{method label: (low, high)}``.
        num_bins: Linear bins per histogram.
        step: Global step of the summaries.

    Returns:
        The tags written.
    """
    tags = [f"{tag}/before"]
    _add_raw(writer, tags[0], distribution, linear_edges(distribution.min, distribution.max, num_bins), step)
    for label, (low, high) in ranges.items():
        tags.append(f"{tag}/after/{tag_safe(label)}")
        _add_raw(writer, tags[-1], distribution.clipped(low, high), linear_edges(low, high, num_bins), step)
    return tags
