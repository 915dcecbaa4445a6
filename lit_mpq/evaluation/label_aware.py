"""Label-aware evaluation: which classes the FP32 model confuses, and what quantization costs on such class subsets.

The question (from the source project of issue 9) is whether quantization hurts more when the classes to tell apart
are alike. Four pure steps, no Lightning:

1. :class:`ClassProbabilitySums`: per-class sums of the FP32 model's softmax outputs and per-class counts over the
   calibration images. Sums and counts merge by addition, so every rank accumulates its own shard and one ``sum``
   reduction gives the single-device statistics (:meth:`ClassProbabilitySums.as_tensor` /
   :meth:`~ClassProbabilitySums.from_tensor` pack them into one tensor for the reduction).
   :meth:`~ClassProbabilitySums.means` gives the per-class mean softmax ``p_c`` (row ``c``: the mean output on the
   images labelled ``c``). A class without a single image has no mean: that is an error, or, when the caller allows
   it, a warning that names the classes, whose rows are then NaN and which no subset may contain.
2. :func:`symmetric_kl_matrix`: ``D[i, j] = KL(p_i || p_j) + KL(p_j || p_i) = sum_c (p_i[c] - p_j[c]) (log p_i[c] -
   log p_j[c])`` in nats. It is symmetric, zero on the diagonal and non-negative; **a low divergence means similar
   classes** (the model's average output on one class looks like its average output on the other, i.e. it spreads
   probability over the same alternatives). Probabilities are floored at ``eps`` (1e-12) so the logarithm is finite.
3. :func:`select_subsets`: ``k``-class subsets. The *most similar* subset minimises the total pairwise divergence
   ``sum_{i<j in S} D[i, j]``, the *most dissimilar* maximises it, and ``num_random`` *random* subsets are drawn with
   a seeded generator, uniformly among the other subsets (distinct from each other and from the two extremes while
   there are enough subsets). The extremes are exact (every
   subset scored) when ``C(n, k) <= exhaustive_limit`` (CIFAR-10, k=3: 120 subsets; CIFAR-100, k=3: 161,700); beyond
   that (ImageNet: C(1000, 3) = 166 million) a beam search builds them: start from the ``beam_width`` best pairs,
   extend every kept subset by every other class, keep the ``beam_width`` best distinct subsets by total divergence,
   repeat until ``k`` classes. The beam is exact for ``k = 2`` and when it holds every subset; otherwise it is a
   heuristic and says so (``method``). Ties go to the lexicographically smallest class tuple.
4. :func:`subset_counts`: accuracy restricted to a subset: over the images whose label is in the subset, the
   prediction is the argmax of the logits *of the subset's classes only*. Counts (correct, total) add across ranks.

Example:
    >>> import torch
    >>> stats = ClassProbabilitySums.zeros(3)
    >>> stats.update(torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.7, 0.2]]), torch.tensor([0, 1, 2]))
    >>> D = symmetric_kl_matrix(stats.means())
    >>> bool(D[1, 2] < D[0, 2])  # class 2's outputs look like class 1's
    True
    >>> similar = select_subsets(D, k=2, num_random=0)[0]
    >>> similar.kind, similar.classes
    ('similar', (1, 2))
    >>> # the first image's largest logit (class 1) is outside the subset {0, 2}: among 0 and 2 it is right
    >>> subset_counts(torch.tensor([[5.0, 9.0, 1.0], [0.0, 2.0, 3.0]]), torch.tensor([0, 2]), [(0, 2)])
    tensor([[2, 2]])
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SUBSET_KINDS",
    "ClassProbabilitySums",
    "ClassSubset",
    "MissingClassesWarning",
    "label_aware_figure",
    "label_aware_markdown",
    "label_aware_rows",
    "select_subsets",
    "subset_counts",
    "subset_divergence",
    "symmetric_kl_matrix",
]

SUBSET_KINDS = ("similar", "dissimilar", "random")
"""Kinds of subsets, in the order :func:`select_subsets` returns them."""
EPS = 1e-12
"""Floor of the mean probabilities before the logarithm of the divergence."""
DEFAULT_EXHAUSTIVE_LIMIT = 1_000_000
"""Score every subset up to this many (``C(n, k)``); beam search beyond."""
DEFAULT_BEAM_WIDTH = 64
"""Subsets kept per size by the beam search."""


class MissingClassesWarning(UserWarning):
    """Some classes have no calibration images, so they have no mean output and take no part in the subsets."""


# ------------------------------------------------------------------------------------------------ class statistics


@dataclass
class ClassProbabilitySums:
    """Mergeable per-class statistics of softmax outputs: ``sums[c]`` adds the outputs on images labelled ``c``.

    Attributes:
        sums: ``[C, C]`` float64; row ``c`` is the sum of the probability vectors of the images labelled ``c``.
        counts: ``[C]`` int64; images labelled ``c``.
    """

    sums: Tensor
    counts: Tensor

    @classmethod
    def zeros(cls, num_classes: int) -> ClassProbabilitySums:
        """Empty statistics for ``num_classes`` classes.

        Raises:
            ValueError: If ``num_classes`` is below 2.
        """
        if num_classes < 2:
            raise ValueError(f"label-aware statistics need at least 2 classes, got {num_classes}")
        sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        return cls(sums, torch.zeros(num_classes, dtype=torch.int64))

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return int(self.counts.numel())

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch of probability vectors ``[N, C]`` with their labels ``[N]``.

        Raises:
            ValueError: If the shapes do not match or a label is outside ``[0, C)``.
        """
        if probs.ndim != 2 or probs.shape[1] != self.num_classes or labels.shape != (probs.shape[0],):
            raise ValueError(
                f"expected probabilities [N, {self.num_classes}] and labels [N], got {tuple(probs.shape)} and "
                f"{tuple(labels.shape)}"
            )
        labels = labels.detach().to("cpu", torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            low, high = int(labels.min()), int(labels.max())
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {low}..{high}")
        self.sums.index_add_(0, labels, probs.detach().to("cpu", torch.float64))
        self.counts += torch.bincount(labels, minlength=self.num_classes)

    def update_from_logits(self, logits: Tensor, labels: Tensor) -> None:
        """Add a batch of logits ``[N, C]`` (softmax taken in float64) with their labels ``[N]``."""
        self.update(torch.softmax(logits.detach().double(), dim=1), labels)

    def merge(self, other: ClassProbabilitySums) -> ClassProbabilitySums:
        """The statistics of both (what a ``sum`` reduction across ranks gives)."""
        return ClassProbabilitySums(self.sums + other.sums, self.counts + other.counts)

    def as_tensor(self) -> Tensor:
        """One ``[C, C + 1]`` float64 tensor (sums, then counts) for a single ``sum`` reduction."""
        return torch.cat([self.sums, self.counts.double()[:, None]], dim=1)

    @classmethod
    def from_tensor(cls, packed: Tensor) -> ClassProbabilitySums:
        """Inverse of :meth:`as_tensor`."""
        packed = packed.detach().to("cpu", torch.float64)
        return cls(packed[:, :-1].clone(), packed[:, -1].round().to(torch.int64))

    def missing_classes(self) -> list[int]:
        """Classes without a single image."""
        return [int(c) for c in torch.nonzero(self.counts == 0).flatten()]

    def means(self, allow_missing: bool = False, class_names: Sequence[str] | None = None) -> Tensor:
        """Per-class mean probability vectors ``[C, C]`` (float64).

        Args:
            allow_missing: For classes without images, warn (:class:`MissingClassesWarning`, naming them) and give
                NaN rows instead of raising.
            class_names: Names used in the message.

        Raises:
            ValueError: If a class has no image and ``allow_missing`` is false.
        """
        missing = self.missing_classes()
        if missing:
            shown = ", ".join(_class_label(c, class_names) for c in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            message = (
                f"{len(missing)} of {self.num_classes} classes have no calibration image ({shown}{more}), so they "
                "have no mean output"
            )
            if not allow_missing:
                raise ValueError(message + ": use more calibration images (or a class-balanced calibration set)")
            warnings.warn(message + "; they are left out of the class subsets", MissingClassesWarning, stacklevel=2)
        means = self.sums / self.counts.clamp_min(1).double()[:, None]
        means[self.counts == 0] = float("nan")
        return means


def _class_label(c: int, names: Sequence[str] | None) -> str:
    return f"{c} ({names[c]})" if names is not None and c < len(names) else str(c)


# ------------------------------------------------------------------------------------------------ divergence


def symmetric_kl_matrix(means: Tensor, eps: float = EPS, chunk_elements: int = 1 << 22) -> Tensor:
    """Symmetric KL divergence between every pair of per-class mean distributions, in nats.

    ``D[i, j] = KL(p_i || p_j) + KL(p_j || p_i) = sum_c (p_i[c] - p_j[c]) (log p_i[c] - log p_j[c])``; every term is
    non-negative, so ``D`` is exactly symmetric with a zero diagonal. Low divergence = similar classes. Rows of NaN
    (classes without data) give NaN rows and columns.

    Args:
        means: ``[C, C]`` rows of probabilities (each summing to 1), e.g. :meth:`ClassProbabilitySums.means`.
        eps: Floor of the probabilities before the logarithm.
        chunk_elements: Largest ``rows x C x C`` block computed at once (memory bound for 1000 classes).

    Returns:
        ``[C, C]`` float64.
    """
    p = means.detach().to("cpu", torch.float64).clamp_min(eps)
    p[torch.isnan(means.detach().cpu()).any(dim=1)] = float("nan")
    logp = p.log()
    n = p.shape[0]
    rows = max(1, chunk_elements // max(1, n * p.shape[1]))
    out = torch.empty(n, n, dtype=torch.float64)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        diff = p[start:stop, None, :] - p[None, :, :]
        out[start:stop] = (diff * (logp[start:stop, None, :] - logp[None, :, :])).sum(dim=-1)
    return out


def subset_divergence(divergence: Tensor | np.ndarray, classes: Sequence[int]) -> float:
    """Total pairwise divergence ``sum_{i<j in S} D[i, j]`` of a subset."""
    d = np.asarray(divergence, dtype=np.float64)
    return float(sum(d[i, j] for i, j in itertools.combinations(classes, 2)))


# ------------------------------------------------------------------------------------------------ subset selection


@dataclass(frozen=True)
class ClassSubset:
    """A ``k``-class subset and why it was chosen.

    Attributes:
        kind: ``"similar"``, ``"dissimilar"`` or ``"random"``.
        classes: Class indices, ascending.
        divergence: Total pairwise symmetric KL ``sum_{i<j} D[i, j]`` in nats.
        method: How it was found (``"exhaustive over 120 subsets"``, ``"beam search, width 64 (heuristic)"``,
            ``"random, seed 0"``).
    """

    kind: str
    classes: tuple[int, ...]
    divergence: float
    method: str

    @property
    def mean_divergence(self) -> float:
        """Mean pairwise symmetric KL (nats): the total over ``k (k - 1) / 2`` pairs."""
        pairs = len(self.classes) * (len(self.classes) - 1) // 2
        return self.divergence / pairs if pairs else 0.0


def _exhaustive(d: np.ndarray, candidates: list[int], k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Lowest and highest total-divergence subsets, scoring every subset in lexicographic order (ties: first)."""
    combos = np.array(list(itertools.combinations(candidates, k)), dtype=np.int64)
    scores = np.zeros(len(combos))
    for a, b in itertools.combinations(range(k), 2):
        scores += d[combos[:, a], combos[:, b]]
    return tuple(int(c) for c in combos[np.argmin(scores)]), tuple(int(c) for c in combos[np.argmax(scores)])


def _beam(d: np.ndarray, candidates: list[int], k: int, width: int, largest: bool) -> tuple[int, ...]:
    """Beam search for the extreme total-divergence ``k``-subset (see the module docstring).

    Every pair is scored and the ``width`` best are kept; each kept subset is then extended by every other class,
    and the ``width`` best distinct subsets are kept, until ``k`` classes. Ties: lexicographically smallest.
    """
    sign = -1.0 if largest else 1.0
    idx = np.asarray(candidates, dtype=np.int64)
    first, second = np.triu_indices(len(idx), 1)
    scores = d[idx[first], idx[second]]
    order = np.lexsort((second, first, sign * scores))[:width]
    beam = [((int(idx[first[o]]), int(idx[second[o]])), float(scores[o])) for o in order]
    for _ in range(3, k + 1):
        scored: dict[tuple[int, ...], float] = {}
        for subset, total in beam:
            gains = d[np.ix_(idx, list(subset))].sum(axis=1)
            for c, gain in zip(idx.tolist(), gains.tolist(), strict=True):
                if c not in subset:
                    scored.setdefault(tuple(sorted((*subset, c))), total + gain)
        beam = sorted(scored.items(), key=lambda item: (sign * item[1], item[0]))[:width]
    return beam[0][0]


def select_subsets(
    divergence: Tensor | np.ndarray,
    k: int,
    num_random: int = 3,
    seed: int = 0,
    exhaustive_limit: int = DEFAULT_EXHAUSTIVE_LIMIT,
    beam_width: int = DEFAULT_BEAM_WIDTH,
) -> list[ClassSubset]:
    """The most similar, the most dissimilar and ``num_random`` random ``k``-class subsets.

    Classes whose divergence row holds NaN (no calibration images) are left out of every subset.

    Args:
        divergence: ``[C, C]`` symmetric divergence (:func:`symmetric_kl_matrix`).
        k: Classes per subset (at least 2).
        num_random: Random subsets to draw (distinct from each other and from the two extremes while ``C(n, k)``
            allows; repeats only once every subset has been drawn).
        seed: Seed of the random subsets (``numpy.random.default_rng``).
        exhaustive_limit: Score every subset when there are at most this many; beam search otherwise.
        beam_width: Subsets the beam search keeps per size.

    Returns:
        ``[similar, dissimilar, random_0, ..., random_{num_random - 1}]``.

    Raises:
        ValueError: If ``k`` is below 2 or above the number of classes with data, or a count is negative.
    """
    d = np.asarray(divergence, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"the divergence must be a square matrix, got shape {d.shape}")
    candidates = [c for c in range(d.shape[0]) if np.isfinite(d[c, c])]  # a class without data has a NaN row
    if not np.isfinite(d[np.ix_(candidates, candidates)]).all():
        raise ValueError("the divergence between classes with data must be finite")
    if k < 2 or k > len(candidates):
        raise ValueError(f"subset size must be between 2 and the {len(candidates)} classes with data, got {k}")
    if num_random < 0 or beam_width < 1 or exhaustive_limit < 0:
        raise ValueError("num_random and exhaustive_limit must be >= 0 and beam_width >= 1")
    total = math.comb(len(candidates), k)
    if total <= exhaustive_limit:
        similar, dissimilar = _exhaustive(d, candidates, k)
        method = f"exhaustive over {total} subsets"
    else:
        similar = _beam(d, candidates, k, beam_width, largest=False)
        dissimilar = _beam(d, candidates, k, beam_width, largest=True)
        method = f"beam search, width {beam_width}, over {total} subsets" + (" (heuristic)" if k > 2 else "")
    subsets = [
        ClassSubset("similar", similar, subset_divergence(d, similar), method),
        ClassSubset("dissimilar", dissimilar, subset_divergence(d, dissimilar), method),
    ]
    rng = np.random.default_rng(seed)
    drawn: set[tuple[int, ...]] = {similar, dissimilar}
    for _ in range(num_random):
        while True:
            pick = tuple(sorted(int(c) for c in rng.choice(candidates, size=k, replace=False)))
            if pick not in drawn or len(drawn) >= total:  # distinct until every subset has been drawn
                break
        drawn.add(pick)
        subsets.append(ClassSubset("random", pick, subset_divergence(d, pick), f"random, seed {seed}"))
    return subsets


# ------------------------------------------------------------------------------------------------ subset accuracy


def subset_counts(logits: Tensor, labels: Tensor, subsets: Sequence[Sequence[int]]) -> Tensor:
    """Correct and total counts of the argmax restricted to each subset, over the images labelled in it.

    Args:
        logits: ``[N, C]`` model outputs.
        labels: ``[N]`` true classes.
        subsets: Class index tuples.

    Returns:
        ``[len(subsets), 2]`` int64: ``(correct, total)`` per subset; they add across batches and ranks.
    """
    logits, labels = logits.detach(), labels.detach().to(logits.device)
    out = torch.zeros(len(subsets), 2, dtype=torch.int64)
    for row, classes in enumerate(subsets):
        index = torch.as_tensor(list(classes), dtype=torch.int64, device=logits.device)
        inside = torch.isin(labels, index)
        predicted = index[logits[inside][:, index].argmax(dim=1)]
        out[row, 0] = int((predicted == labels[inside]).sum())
        out[row, 1] = int(inside.sum())
    return out


def label_aware_rows(
    subsets: Sequence[ClassSubset],
    fp32_counts: Tensor,
    quant_counts: Tensor,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The table: one plain-data row per subset, accuracy in percent.

    Args:
        subsets: From :func:`select_subsets`.
        fp32_counts: ``[S, 2]`` (correct, total) of the FP32 model (:func:`subset_counts`, summed).
        quant_counts: ``[S, 2]`` of the quantized model.
        class_names: Names of the classes, when known.

    Returns:
        Rows with ``kind``, ``classes``, ``names``, ``mean_divergence_nats``, ``images``, ``top1_fp32``, ``top1``
        and ``drop`` (FP32 minus quantized, percentage points; ``None`` where the subset has no image).
    """
    rows = []
    for subset, fp32, quant in zip(subsets, fp32_counts.tolist(), quant_counts.tolist(), strict=True):
        images = int(fp32[1])
        top1_fp32 = 100.0 * fp32[0] / images if images else None
        top1 = 100.0 * quant[0] / int(quant[1]) if quant[1] else None
        rows.append(
            {
                "kind": subset.kind,
                "classes": list(subset.classes),
                "names": [class_names[c] if class_names is not None else str(c) for c in subset.classes],
                "mean_divergence_nats": subset.mean_divergence,
                "images": images,
                "top1_fp32": top1_fp32,
                "top1": top1,
                "drop": None if top1 is None or top1_fp32 is None else top1_fp32 - top1,
            }
        )
    return rows


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def label_aware_markdown(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """The rows of :func:`label_aware_rows` as a Markdown table (accuracy in %, divergence in nats)."""
    lines = [f"{title}\n" if title else ""]
    lines.append(
        "| subset | classes | mean sym. KL (nats) | images | FP32 top-1 % | quantized top-1 % | drop, points |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for row in rows:
        drop = "n/a" if row["drop"] is None else f"{round(row['drop'], 1) + 0.0:.1f}"  # + 0.0: no "-0.0"
        lines.append(
            f"| {row['kind']} | {', '.join(row['names'])} | {row['mean_divergence_nats']:.3f} | {row['images']} "
            f"| {_pct(row['top1_fp32'])} | {_pct(row['top1'])} | {drop} |"
        )
    return "\n".join(line for line in lines if line) + "\n"


# ------------------------------------------------------------------------------------------------ figure

HEATMAP_MAX_CLASSES = 30
"""The figure shows the divergence matrix beside the bars up to this many classes."""


def label_aware_figure(
    rows: Sequence[dict[str, Any]],
    divergence: Tensor | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Any:
    """Bar chart of FP32 vs quantized top-1 per subset (and the divergence matrix, for up to 30 classes).

    Returns:
        A :class:`matplotlib.figure.Figure` with its own Agg canvas (no pyplot), to save with
        :func:`lit_mpq.report.save_figure`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = None if divergence is None else np.asarray(divergence, dtype=np.float64)
    heatmap = d is not None and d.shape[0] <= HEATMAP_MAX_CLASSES
    fig = Figure(figsize=(13 if heatmap else 8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, width_ratios=[1, 1.3]) if heatmap else [fig.subplots(1, 1)]
    if heatmap:
        ax_d = axes[0]
        image = ax_d.imshow(d, cmap="viridis_r")
        labels = list(class_names) if class_names is not None else [str(c) for c in range(d.shape[0])]
        ax_d.set_xticks(range(d.shape[0]), labels, rotation=60, ha="right", fontsize=7)
        ax_d.set_yticks(range(d.shape[0]), labels, fontsize=7)
        ax_d.set_title("Symmetric KL between per-class mean FP32 outputs\n(low = similar classes)", fontsize=9)
        fig.colorbar(image, ax=ax_d, label="symmetric KL, nats")
    ax = axes[-1]
    x = np.arange(len(rows))
    fp32 = [r["top1_fp32"] if r["top1_fp32"] is not None else np.nan for r in rows]
    quant = [r["top1"] if r["top1"] is not None else np.nan for r in rows]
    ax.bar(x - 0.2, fp32, 0.4, label="FP32", color="lightgray", edgecolor="black", linewidth=0.5)
    ax.bar(x + 0.2, quant, 0.4, label="quantized", color="tab:blue")
    for xi, f, q in zip(x, fp32, quant, strict=True):
        if np.isfinite(f) and np.isfinite(q):
            ax.annotate(f"{q - f:+.1f} pp", (xi + 0.2, q), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"{r['kind']}\n" + "\n".join(r["names"]) for r in rows], fontsize=7)
    finite = [v for v in fp32 + quant if np.isfinite(v)]
    low = max(0.0, min(finite) - 10.0) if finite else 0.0
    ax.set_ylim(low, 100.0 + 0.15 * (100.0 - low))  # room above the bars for the legend
    ax.set_ylabel("top-1 within the subset, %")
    ax.set_title("Accuracy on k-class subsets (argmax over the subset's classes)", fontsize=9)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
