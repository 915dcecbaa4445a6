"""Tests for lit_mpq.report.histograms: observer histograms against numpy on the raw samples, figure, TensorBoard."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from lit_mpq.quant.observers import HistogramObserver, PercentileObserver
from lit_mpq.report.histograms import (
    ClippingPanel,
    Distribution,
    add_clipping_histograms,
    clipping_figure,
    linear_edges,
    tag_safe,
)


def heavy_tailed(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    """GELU of a Gaussian, plus a few large outliers and exact zeros: the shapes a clipping study meets."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.gelu(torch.randn(n, generator=generator) * 1.5)
    x[:50] = torch.rand(50, generator=generator) * 20 + 5
    x[50:1000] = 0.0
    return x


def observed(x: torch.Tensor, bins_per_octave: int = 1024) -> Distribution:
    observer = HistogramObserver(bins_per_octave=bins_per_octave)
    observer(x)
    return Distribution.from_observer(observer)


def test_histogram_matches_numpy_on_the_samples():
    x = heavy_tailed()
    dist = observed(x)
    assert dist.total == len(x)
    assert dist.min == pytest.approx(float(x.min())) and dist.max == pytest.approx(float(x.max()))
    edges = linear_edges(dist.min, dist.max, 80)
    expected, _ = np.histogram(x.numpy(), edges)
    ours = dist.histogram(edges)
    assert ours.sum() == pytest.approx(len(x))
    # Values are spread within 0.1 %-wide bins, so only those straddling an edge can land in the neighbour bin.
    np.testing.assert_allclose(ours, expected, atol=0.002 * len(x) / 80 + 60)


def test_point_mass_at_zero_goes_into_one_bin():
    x = torch.cat([torch.zeros(100), torch.rand(100) + 1])
    dist = observed(x)
    counts = dist.histogram(np.array([0.0, 0.5, 1.0, 2.0]))
    np.testing.assert_allclose(counts, [100, 0, 100])


@pytest.mark.parametrize(("low", "high"), [(-0.1, 2.0), (0.0, 0.5), (-0.2, 10.0)])
def test_clipped_distribution_and_fraction_match_numpy(low, high):
    x = heavy_tailed(seed=1)
    dist = observed(x)
    samples = x.double().numpy()  # float64: a float32 clipped to -0.1 would fall just outside the edges
    fraction = np.mean((samples < low) | (samples > high))
    assert dist.clipped_fraction(low, high) == pytest.approx(fraction, abs=2e-3)
    edges = linear_edges(low, high, 40)
    expected, _ = np.histogram(np.clip(samples, low, high), edges)
    clipped = dist.clipped(low, high)
    assert clipped.total == pytest.approx(len(x))
    assert clipped.min >= low and clipped.max <= high
    np.testing.assert_allclose(clipped.histogram(edges), expected, atol=0.003 * len(x) / 40 + 60)


def test_moments_match_numpy():
    x = heavy_tailed(seed=2)
    total, squares = observed(x).moments()
    assert total == pytest.approx(float(x.double().sum()), rel=2e-3)
    assert squares == pytest.approx(float((x.double() ** 2).sum()), rel=2e-3)


def test_percentile_range_clips_what_it_promises():
    observer = PercentileObserver(percentile=99.0)
    x = heavy_tailed(seed=3)
    observer(x)
    low, high = (float(v) for v in observer.clip_range(8))
    # Asymmetric: 1 % below the lower end and 1 % above the upper end.
    assert Distribution.from_observer(observer).clipped_fraction(low, high) == pytest.approx(0.02, abs=2e-3)


def test_empty_observer_and_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="no statistics"):
        Distribution.from_observer(HistogramObserver())
    dist = observed(heavy_tailed(1000))
    with pytest.raises(ValueError, match="empty"):
        dist.clipped(1.0, 0.0)
    with pytest.raises(ValueError, match="num_bins"):
        linear_edges(0.0, 1.0, 0)
    edges = linear_edges(2.0, 2.0, 3)  # a constant tensor still gets bins around its value
    assert edges[0] < 2.0 < edges[-1]


def test_clipping_figure_draws_ranges_and_clipped_shares():
    dist = observed(heavy_tailed(20_000), bins_per_octave=32)
    ranges = {"min/max": (dist.min, dist.max), "p99": (-0.1, 3.0), "p95": (-0.1, 2.0)}
    panels = [
        ClippingPanel("fc2 input", dist, ranges, subtitle="after GELU"),
        ClippingPanel("softmax", dist, {"min/max": (dist.min, dist.max)}, note="for comparison only"),
    ]
    fig = clipping_figure(panels, "test")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(text.startswith("min/max") and "0 % clipped" in text for text in legend)
    assert any(text.startswith("p95") for text in legend)
    after = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]  # row-major: axes[2] is panel 0, after
    assert after == ["p99", "p95"]  # min/max clips nothing: not drawn after clipping
    assert not fig.axes[3].axison  # the softmax panel's only range clips nothing
    with pytest.raises(ValueError, match="at least one panel"):
        clipping_figure([], "empty")


def test_tensorboard_histograms_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    dist = observed(heavy_tailed(20_000), bins_per_octave=32)
    with SummaryWriter(tmp_path) as writer:
        tags = add_clipping_histograms(writer, "model/layer", dist, {"percentile 99": (-0.1, 3.0)}, num_bins=50)
    assert tags == ["model/layer/before", "model/layer/after/percentile_99"]
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    assert sorted(events.Tags()["histograms"]) == sorted(tags)
    before = events.Histograms("model/layer/before")[0].histogram_value
    after = events.Histograms("model/layer/after/percentile_99")[0].histogram_value
    assert before.num == pytest.approx(20_000) and after.num == pytest.approx(20_000)
    assert after.max <= 3.0 + 1e-9 and before.max > 3.0


def test_tag_safe_keeps_one_tag_level():
    assert tag_safe("min/max") == "min_max"
    assert tag_safe("MSE (A4)") == "MSE_A4"
    assert tag_safe("percentile 99.9") == "percentile_99.9"
