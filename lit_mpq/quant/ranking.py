"""Ranking-aware refinement of the attention matmuls' quantization ranges (Liu et al., NeurIPS 2021).

Liu, Wang, Han, Zhang, Ma and Gao, "Post-Training Quantization for Vision Transformer" (NeurIPS 2021,
arXiv:2106.14156) calibrate a ViT layer by layer: for each layer they search the quantization intervals (scales) of
its two inputs over candidates ``alpha · Δ_init``, ``alpha`` evenly spaced in ``[0.5, 1.2]`` (100 candidates),
alternating between the two operands for a few rounds, to maximise the similarity between the float output ``O`` and
the quantized output ``Ô``: the Pearson correlation coefficient. For the attention map (the scores ``q·kᵀ``) they add
a ranking loss, because softmax and the rest of the attention depend on the *order* of a query's scores more than on
their values: a hinge on every pair of scores whose quantized difference does not keep the float order by a margin
``θ``, weighted by ``γ``. Their objective for a self-attention layer is ``max Γ(O, Ô) - γ · L_ranking`` with
``L_ranking = Σ_heads Σ_{i<j} Φ((Ô_i - Ô_j) · sign(O_i - O_j))`` and ``Φ(p) = max(0, θ - p)``
(the ranking loss and the combined objective are Eqs. 7 and 8 of the arXiv version as we recall them; the paper's
text was not available to check the numbering while this was written).

What :func:`refine_attention_ranges` implements, for every :class:`~lit_mpq.quant.attention.QuantMatmul` of a
calibrated model (``Ô = layer.product(Q_{α_a}(a), Q_{α_w}(b))``, ``O = layer.product(a, b)`` on float operands):

.. code-block:: text

    S(α_a, α_w) = 1/R · Σ_r ρ(O_r, Ô_r)                                  ρ: Pearson correlation of one output row
    L(α_a, α_w) = 1/|P| · Σ_{(r,i,j) ∈ P} max(0, θ - (Ô_{r,i} - Ô_{r,j}) · sign(O_{r,i} - O_{r,j}))
    J(α_a, α_w) = S - γ · L      for matmul_qk (the scores; rows: one query's scores over all keys)
    J(α_a, α_w) = S              for matmul_av (softmax·V; rows: one query's output features of one head)

Differences from the paper, and why:

- **Rows.** The paper correlates whole outputs and ranks within each head's map; here both work per output row,
  because softmax normalises each query's row on its own: only the order *within* a row reaches the probabilities.
- **Means, not sums.** ``L`` is the mean hinge over the pairs ``P`` instead of a sum, so ``γ`` means the same for
  any number of images, tokens or sampled pairs (a sum is the mean times ``|P|``: the same objective with ``γ``
  scaled by ``|P|``). ``θ`` and the hinge are in the scores' own unit (logits after ``head_dim ** -0.5``).
- **Sampled pairs.** A DeiT row has 197 scores, 19 306 pairs; ``P`` is a fixed sample of ``max_pairs`` triples
  (row, i, j), ``i ≠ j``, drawn once per matmul from a seeded generator, so every candidate is judged on the same
  pairs (all pairs when that is no more than ``max_pairs``).
- **Subsampled data.** The float operands are captured on the first ``max_images`` calibration images, and the left
  operand keeps ``max_rows`` of its rows (query tokens; the same seeded rows for every image and head). The
  quantization parameters are per tensor and come from the observer, so subsampling changes the estimate of ``J``,
  not the quantizer being judged.
- **Only the attention matmuls.** The paper also searches the scales of every Linear; lit_mpq's weight observers
  and activation observers stay in charge of those.
- **Never worse.** The search is coordinate ascent from the observer's own range (``α = 1``), the current factor is
  always a candidate and ties keep it, so ``J`` after refinement is never below ``J`` before, and a factor stays 1
  when no candidate beats it.

The search alternates, for ``rounds`` rounds, the right operand (k or v: the stationary operand, in the role the
weight has in the paper's alternation between weight and input intervals) and the left one (q, or the softmax
output), each over the candidate factors with the other operand's factor fixed. A factor is stored with
:meth:`~lit_mpq.quant.modules.ActivationQuantizer.set_range_factor` at the bit width the operand is refined for
(``a_bits`` for the left operand, ``w_bits`` for the right one): factors are kept per bit width, so a matmul may be
refined for several widths, and refining for the plan's widths after allocation is the intended use. A refinement
replaces any factor set earlier at those bit widths.

The paper's interval ``[0.5, 1.2]`` is the default. With minmax observers at 4 bits it is too narrow for DeiT-Tiny:
the softmax output's best factor is about 0.1 to 0.25 (a uniform grid over the whole ``[0, max]`` wastes its 16
levels on the rare large probabilities), and most factors end at 0.5. :attr:`MatmulRefinement.at_edge` flags such
operands; widen ``search_range`` for them (``benchmarks/ranking_refinement.py`` measures both).

Cost: one evaluation of ``J`` is one product of the (subsampled) operands, one fake-quantization of the operand
being searched, and the two reductions (in float32). On DeiT-Tiny with the defaults (16 images, 32 query rows,
100 candidates, 2 rounds) a refinement of the 24 matmuls takes about 100 s on one CPU core. The objective is
computed on many small tensors: on shared cores, ``torch.set_num_threads(1)`` runs it several times faster.

Example:
    >>> import timm, torch
    >>> from lit_mpq.quant.apply import QuantSettings, quantize_model, measure_model, set_mode, invalidate_qparams
    >>> model = timm.create_model("test_vit").eval()
    >>> _ = quantize_model(model, QuantSettings())
    >>> plan = measure_model(model, torch.zeros(1, 3, 32, 32))
    >>> set_mode(model, activations="observe")
    >>> with torch.no_grad():
    ...     _ = model(torch.randn(4, 3, 32, 32))
    >>> set_mode(model, activations="off"); invalidate_qparams(model)
    >>> report = refine_attention_ranges(model, [torch.randn(4, 3, 32, 32)], candidates=[0.8, 0.9], rounds=1)
    >>> sorted(report.matmuls)[:2]
    ['blocks.0.attn.matmul_av', 'blocks.0.attn.matmul_qk']
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_mpq.quant.apply import quant_layers, quantizers_mode
from lit_mpq.quant.attention import QuantMatmul, is_quant_matmul
from lit_mpq.quant.modules import ActivationQuantizer

SEARCH_RANGE = (0.5, 1.2)
"""The paper's interval of range factors ``alpha`` (``alpha · Δ_init``, ``Δ_init`` the observer's scale)."""

OPERANDS = ("w", "a")
"""Operand keys in search order: ``"w"`` the right operand (k or v, the plan's ``w_bits``), ``"a"`` the left one."""

_EPS = 1e-12


# ------------------------------------------------------------------------------------------------ the two measures
def pearson_similarity(output: Tensor, reference: Tensor) -> Tensor:
    """Mean Pearson correlation between the rows (last dimension) of ``output`` and those of ``reference``.

    A row with no spread (a constant row, e.g. every score quantized to the same level) correlates 0 with anything,
    so a range that collapses rows is penalised rather than undefined.

    Args:
        output: Quantized output ``Ô``, any shape ``[..., n]``.
        reference: Float output ``O``, the same shape.

    Returns:
        A scalar tensor in ``[-1, 1]``.
    """
    return _RowCorrelation(reference)(output)


def all_pairs(rows: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Every pair ``i < j`` of every row as ``[rows · length · (length - 1) / 2, 3]`` triples ``(row, i, j)``."""
    i, j = torch.triu_indices(length, length, offset=1, device=device)
    r = torch.arange(rows, device=device).repeat_interleave(i.numel())
    return torch.stack([r, i.repeat(rows), j.repeat(rows)], dim=1)


def sample_pairs(rows: int, length: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` random triples ``(row, i, j)`` with ``i ≠ j``, uniform over rows and ordered pairs (CPU tensor).

    The hinge of :func:`ranking_loss` is symmetric in ``i`` and ``j``, so an ordered pair measures the same as the
    unordered one; ``j = i + k mod length`` with ``k`` uniform in ``1 .. length - 1`` is uniform over ``j ≠ i``.
    """
    if length < 2:
        raise ValueError(f"a row needs at least 2 entries to form a pair, got {length}")
    r = torch.randint(rows, (count,), generator=generator)
    i = torch.randint(length, (count,), generator=generator)
    j = (i + torch.randint(1, length, (count,), generator=generator)) % length
    return torch.stack([r, i, j], dim=1)


def ranking_loss(output: Tensor, reference: Tensor, margin: float, pairs: Tensor | None = None) -> Tensor:
    """Mean pairwise ranking hinge ``max(0, θ - (Ô_i - Ô_j) · sign(O_i - O_j))`` within rows (last dimension).

    Zero when every pair keeps its float order by at least ``margin``; a pair whose order flips costs the margin
    plus the size of the flip; a pair the quantization ties costs the margin (float ties, ``sign = 0``, too).

    Args:
        output: Quantized scores ``Ô``, shape ``[..., n]``.
        reference: Float scores ``O``, the same shape.
        margin: ``θ``, in the scores' unit.
        pairs: ``[P, 3]`` triples ``(row, i, j)`` over the rows of ``output`` flattened to ``[-1, n]`` (see
            :func:`sample_pairs`); default every pair ``i < j`` of every row (:func:`all_pairs`).

    Returns:
        A scalar tensor (the mean over the pairs).
    """
    if pairs is None:
        pairs = all_pairs(reference.numel() // reference.shape[-1], reference.shape[-1], reference.device)
    return _PairHinge(reference, pairs)(output, margin)


class _RowCorrelation:
    """:func:`pearson_similarity` against a fixed reference, which is centred and normalised once.

    In float32: the search compares candidates on the same rows, and a correlation is a ratio of sums of well-scaled
    terms, so double precision would only double the cost of the search's most frequent reduction.
    """

    def __init__(self, reference: Tensor) -> None:
        ref = reference.reshape(-1, reference.shape[-1]).float()
        ref = ref - ref.mean(dim=1, keepdim=True)
        # A constant reference row correlates 0 with anything (0 / eps), like a constant output row.
        self.reference = ref / ref.norm(dim=1, keepdim=True).clamp_min(_EPS)

    def __call__(self, output: Tensor) -> Tensor:
        out = output.reshape(self.reference.shape).float()
        out = out - out.mean(dim=1, keepdim=True)
        covariance = (out * self.reference).sum(dim=1)
        return (covariance / out.norm(dim=1).clamp_min(_EPS)).mean()


class _PairHinge:
    """:func:`ranking_loss` on fixed pairs of a fixed reference: flat indices and float order computed once."""

    def __init__(self, reference: Tensor, pairs: Tensor) -> None:
        length = reference.shape[-1]
        r, i, j = pairs.to(reference.device).unbind(dim=1)
        self.first, self.second = r * length + i, r * length + j
        flat = reference.reshape(-1)
        self.sign = torch.sign(flat.index_select(0, self.first) - flat.index_select(0, self.second))

    def __call__(self, output: Tensor, margin: float) -> Tensor:
        flat = output.reshape(-1)
        # index_select: a plain gather, several times faster than advanced indexing on the CPU
        agreement = (flat.index_select(0, self.first) - flat.index_select(0, self.second)) * self.sign
        return torch.clamp(margin - agreement, min=0).mean()


# ------------------------------------------------------------------------------------------------------ the report
@dataclass(frozen=True)
class MatmulRefinement:
    """What the refinement did for one matmul.

    Attributes:
        name: The matmul's fully qualified name (a row of the plan).
        ranking: Whether its objective includes the ranking loss (the attention scores ``matmul_qk``).
        bits: Bit width each operand was refined for: ``{"a": left, "w": right}`` (None: left in float).
        factors: Chosen range factor per refined operand (``"a"`` / ``"w"``); 1 where nothing beat the observer.
        objective_before: ``J`` with the observer's own ranges (every factor 1).
        objective_after: ``J`` with the chosen factors (never below ``objective_before``).
        similarity_before: The Pearson term ``S`` before.
        similarity_after: ``S`` after.
        ranking_loss_before: The ranking term ``L`` before (None without ranking).
        ranking_loss_after: ``L`` after (None without ranking).
        at_edge: Operands whose chosen factor is the smallest or largest candidate: the optimum may lie outside the
            searched range (widen ``search_range``).
        seconds: Wall time of this matmul's search.
    """

    name: str
    ranking: bool
    bits: dict[str, int | None]
    factors: dict[str, float]
    objective_before: float
    objective_after: float
    similarity_before: float
    similarity_after: float
    ranking_loss_before: float | None
    ranking_loss_after: float | None
    at_edge: list[str]
    seconds: float


@dataclass(frozen=True)
class RefinementReport:
    """Result of :func:`refine_attention_ranges`: one entry per refined matmul, the settings and the cost.

    Attributes:
        matmuls: ``{name: MatmulRefinement}`` in model order.
        images: Calibration images the objective was measured on.
        capture_seconds: Wall time of the float pass that captured the operands.
        seconds: Total wall time (capture and search).
        settings: The search settings (candidates, range, rounds, ranking weight, margin, sampling sizes, seed).
    """

    matmuls: dict[str, MatmulRefinement]
    images: int
    capture_seconds: float
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def factors(self) -> dict[str, dict[str, float]]:
        """``{matmul: {"a": factor, "w": factor}}`` for the refined operands."""
        return {name: dict(entry.factors) for name, entry in self.matmuls.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (``json.dumps(report.to_dict())``)."""
        return {
            "matmuls": {name: asdict(entry) for name, entry in self.matmuls.items()},
            "images": self.images,
            "capture_seconds": self.capture_seconds,
            "seconds": self.seconds,
            "settings": dict(self.settings),
        }


# ------------------------------------------------------------------------------------------------------ the search
@dataclass
class _Captured:
    """One matmul's float operands on the first images: the left one with a subset of its rows."""

    a: list[Tensor] = field(default_factory=list)
    b: list[Tensor] = field(default_factory=list)
    rows: Tensor | None = None


@dataclass(frozen=True)
class _Score:
    objective: float
    similarity: float
    ranking: float | None


def _candidate_factors(candidates: int | Sequence[float], search_range: tuple[float, float]) -> list[float]:
    if isinstance(candidates, int):
        if candidates < 1:
            raise ValueError(f"candidates must be a positive count or a list of factors, got {candidates}")
        low, high = search_range
        if not 0 < low <= high:
            raise ValueError(f"search_range must be (low, high) with 0 < low <= high, got {search_range}")
        factors = torch.linspace(low, high, candidates, dtype=torch.float64).tolist() if candidates > 1 else [low]
    else:
        factors = [float(f) for f in candidates]
        if not factors or not all(f > 0 and math.isfinite(f) for f in factors):
            raise ValueError(f"candidate factors must be positive and finite, got {list(candidates)}")
    # The observer's own range is always a candidate: the search can always keep it.
    return sorted(set(factors) | {1.0})


def _resolve_bits(
    matmuls: Mapping[str, QuantMatmul],
    all_layers: Iterable[str],
    bits: Mapping[str, tuple[int | None, int | None]] | None,
) -> dict[str, dict[str, int | None]]:
    """``{matmul: {"a": left bits, "w": right bits}}`` from ``bits`` (``(w_bits, a_bits)``) or the quantizers."""
    bits = bits or {}
    unknown = sorted(set(bits) - set(all_layers))
    if unknown:
        raise ValueError(f"bits names layers the model does not have: {unknown[:5]} (names are plan rows)")
    resolved = {}
    for name, layer in matmuls.items():
        w_bits, a_bits = bits.get(name, (layer.other_quantizer.bits, layer.input_quantizer.bits))
        for width in (w_bits, a_bits):
            if width is not None and (not isinstance(width, int) or width < 2):
                raise ValueError(f"bits of {name} must be integers >= 2 or None, got {(w_bits, a_bits)}")
        resolved[name] = {"a": a_bits, "w": w_bits}
    return resolved


def _first_tensor(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]  # (images, labels, ...) from a dataloader
    raise TypeError(f"batches must yield image tensors or (images, ...) tuples, got {type(batch).__name__}")


@torch.no_grad()
def _capture(
    model: nn.Module,
    matmuls: Mapping[str, QuantMatmul],
    batches: Iterable[Any],
    max_images: int,
    max_rows: int,
    seed: int,
) -> tuple[dict[str, _Captured], int]:
    """Float operands of every matmul on the first ``max_images`` images, quantizers off, one pass at most."""
    captured = {name: _Captured() for name in matmuls}
    taken = [0]  # images of the current batch to keep (a closure cell)

    def make_hook(name: str, index: int):
        store = captured[name]

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            a, b = inputs[0], inputs[1]
            if store.rows is None:
                rows = a.shape[-2]
                generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
                keep = torch.randperm(rows, generator=generator)[:max_rows] if rows > max_rows else torch.arange(rows)
                store.rows = keep.sort().values.to(a.device)
            # Copies, so that the pass's own buffers are freed; only the kept images and rows.
            store.a.append(a.index_select(-2, store.rows).detach().clone())
            store.b.append(b.detach().clone())

        return hook

    handles = [layer.register_forward_hook(make_hook(name, k)) for k, (name, layer) in enumerate(matmuls.items())]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    images = 0
    was_training = model.training
    try:
        model.eval()
        with quantizers_mode(model, "off"):
            for batch in batches:
                x = _first_tensor(batch)
                taken[0] = min(x.shape[0], max_images - images)
                # Only the images kept run: in eval mode a model treats every image on its own.
                model(x[: taken[0]].to(device))
                images += taken[0]
                if images >= max_images:
                    break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return captured, images


def _quantized(quantizer: ActivationQuantizer, x: Tensor, bits: int | None, factor: float) -> Tensor:
    if bits is None:
        return x
    quantizer.set_range_factor(bits, factor)
    return quantizer.quantize(x, bits)


def _refine_one(
    name: str,
    layer: QuantMatmul,
    data: _Captured,
    bits: dict[str, int | None],
    factors_grid: list[float],
    rounds: int,
    ranking: bool,
    ranking_weight: float,
    margin: float,
    max_pairs: int,
    generator: torch.Generator,
) -> MatmulRefinement:
    start = time.perf_counter()
    a, b = torch.cat(data.a), torch.cat(data.b)
    reference = layer.product(a, b)
    quantizers = {"a": layer.input_quantizer, "w": layer.other_quantizer}
    operands = {"a": a, "w": b}
    searched = [kind for kind in OPERANDS if bits[kind] is not None]

    similarity_of = _RowCorrelation(reference)
    hinge = None
    rows, length = reference.numel() // reference.shape[-1], reference.shape[-1]
    if ranking and length >= 2:  # a row of one score has no order to keep
        if rows * length * (length - 1) // 2 > max_pairs:
            hinge = _PairHinge(reference, sample_pairs(rows, length, max_pairs, generator))
        else:
            hinge = _PairHinge(reference, all_pairs(rows, length, reference.device))
    ranking = hinge is not None

    def score(quantized_a: Tensor, quantized_b: Tensor) -> _Score:
        output = layer.product(quantized_a, quantized_b)
        similarity = float(similarity_of(output))
        if hinge is None:
            return _Score(similarity, similarity, None)
        loss = float(hinge(output, margin))
        return _Score(similarity - ranking_weight * loss, similarity, loss)

    def quantized(kind: str, factor: float) -> Tensor:
        return _quantized(quantizers[kind], operands[kind], bits[kind], factor)

    grid_low, grid_high = min(factors_grid), max(factors_grid)
    current = {"a": 1.0, "w": 1.0}
    before = best = score(quantized("a", 1.0), quantized("w", 1.0))
    for _ in range(rounds):
        changed = False
        for kind in searched:
            other = "a" if kind == "w" else "w"
            fixed = quantized(other, current[other])  # quantized once per sweep: only `kind` varies
            # The current factor first: ties keep it, so J never decreases and 1 stays when nothing beats it.
            for factor in [current[kind], *(f for f in factors_grid if f != current[kind])]:
                varying = quantized(kind, factor)
                trial = score(varying, fixed) if kind == "a" else score(fixed, varying)
                if trial.objective > best.objective:
                    best, current, changed = trial, {**current, kind: factor}, True
        if not changed:
            break  # a full round without a move: the next would repeat it
    for kind in searched:
        quantizers[kind].set_range_factor(bits[kind], current[kind])
    return MatmulRefinement(
        name=name,
        ranking=ranking,
        bits=dict(bits),
        factors={kind: current[kind] for kind in searched},
        objective_before=before.objective,
        objective_after=best.objective,
        similarity_before=before.similarity,
        similarity_after=best.similarity,
        ranking_loss_before=before.ranking,
        ranking_loss_after=best.ranking,
        at_edge=[kind for kind in searched if current[kind] != 1.0 and current[kind] in (grid_low, grid_high)],
        seconds=time.perf_counter() - start,
    )


def refine_attention_ranges(
    model: nn.Module,
    batches: Iterable[Any],
    bits: Mapping[str, tuple[int | None, int | None]] | None = None,
    candidates: int | Sequence[float] = 100,
    rounds: int = 2,
    ranking_weight: float = 1.0,
    margin: float = 0.1,
    max_pairs: int = 100_000,
    seed: int = 0,
    search_range: tuple[float, float] = SEARCH_RANGE,
    max_images: int = 16,
    max_rows: int = 32,
) -> RefinementReport:
    """Search the range factors of every attention matmul's operands (ranking-aware, Liu et al. 2021).

    The model must be prepared by :func:`~lit_mpq.quant.apply.quantize_model` and calibrated (its observers hold
    statistics). One float pass (quantizers off) over ``batches`` captures each matmul's operands on the first
    ``max_images`` images; then, matmul by matmul, the range factors of its two operands are searched as the module
    docstring describes and stored with ``set_range_factor`` at the widths the operands are refined for. Quantizer
    modes and ``bits`` are left as they were.

    Args:
        model: A calibrated model with :class:`~lit_mpq.quant.attention.QuantMatmul` layers.
        batches: Calibration batches: image tensors, or ``(images, ...)`` tuples (a dataloader).
        bits: ``{name: (w_bits, a_bits)}`` as a plan has them (``plan.bits()``; rows that are not matmuls are
            ignored): ``a_bits`` is the left operand's width, ``w_bits`` the right one's, None leaves it unrefined.
            A matmul missing here, or every matmul when ``bits`` is None, is refined at its quantizers' current
            ``bits``.
        candidates: Number of factors evenly spaced over ``search_range`` (the paper: 100), or the factors
            themselves. 1 (the observer's range) is always added.
        rounds: Alternating rounds (right operand, then left) per matmul; stops early when a round changes nothing.
        ranking_weight: ``γ``, the weight of the ranking loss in the objective of the scores (``matmul_qk``).
        margin: ``θ``, the ranking hinge's margin, in logits (the scores after ``head_dim ** -0.5``).
        max_pairs: Score pairs sampled per matmul for the ranking loss (all pairs when there are no more).
        seed: Seeds the row and pair sampling.
        search_range: ``(low, high)`` of the factors when ``candidates`` is a count (the paper: 0.5 to 1.2).
        max_images: Calibration images the objective is measured on (memory: DeiT-Tiny keeps about 2.4 MB per image).
        max_rows: Rows of the left operand (query tokens) kept per image and head.

    Returns:
        The :class:`RefinementReport` (factors, objective before and after, seconds).

    Raises:
        ValueError: If the model has no attention matmuls, ``bits`` names unknown layers or invalid widths, a
            setting is out of range, or ``batches`` yields no image.
        RuntimeError: If an operand to refine has not been calibrated (the observer's error).
    """
    start = time.perf_counter()
    layers = quant_layers(model)
    matmuls = {name: layer for name, layer in layers.items() if is_quant_matmul(layer)}
    if not matmuls:
        raise ValueError(
            "the model has no quantized attention matmuls: prepare it with quantize_model(model, QuantSettings("
            "attention=True)) (timm Attention modules only) and calibrate it first"
        )
    if rounds < 1 or max_images < 1 or max_rows < 1 or max_pairs < 1:
        raise ValueError(
            f"rounds, max_images, max_rows and max_pairs must be positive, got {rounds}, {max_images}, {max_rows}, "
            f"{max_pairs}"
        )
    if ranking_weight < 0 or margin < 0:
        raise ValueError(f"ranking_weight and margin must be >= 0, got {ranking_weight} and {margin}")
    grid = _candidate_factors(candidates, search_range)
    widths = _resolve_bits(matmuls, layers, bits)
    for name, layer in matmuls.items():  # fail before the pass when calibration is missing
        for kind, quantizer in (("a", layer.input_quantizer), ("w", layer.other_quantizer)):
            if widths[name][kind] is not None:
                quantizer.qparams(widths[name][kind])

    captured, images = _capture(model, matmuls, batches, max_images, max_rows, seed)
    if images == 0:
        raise ValueError("batches yielded no images: refinement needs calibration data")
    capture_seconds = time.perf_counter() - start

    generator = torch.Generator().manual_seed(seed)
    results = {}
    for name, layer in matmuls.items():
        saved = {
            kind: dict(q.range_factors) for kind, q in (("a", layer.input_quantizer), ("w", layer.other_quantizer))
        }
        try:
            with torch.no_grad():
                results[name] = _refine_one(
                    name,
                    layer,
                    captured.pop(name),  # frees this matmul's operands once searched
                    widths[name],
                    grid,
                    rounds,
                    ranking=name.rsplit(".", 1)[-1] == "matmul_qk",
                    ranking_weight=ranking_weight,
                    margin=margin,
                    max_pairs=max_pairs,
                    generator=generator,
                )
        except BaseException:
            # Put back the factors the search was trying, so that a failure leaves the model as it was.
            for kind, quantizer in (("a", layer.input_quantizer), ("w", layer.other_quantizer)):
                for width in set(quantizer.range_factors) | set(saved[kind]):
                    quantizer.set_range_factor(width, saved[kind].get(width, 1.0))
            raise
    return RefinementReport(
        matmuls=results,
        images=images,
        capture_seconds=capture_seconds,
        seconds=time.perf_counter() - start,
        settings={
            "candidates": len(grid),
            "search_range": [min(grid), max(grid)],
            "rounds": rounds,
            "ranking_weight": ranking_weight,
            "margin": margin,
            "max_pairs": max_pairs,
            "max_images": max_images,
            "max_rows": max_rows,
            "seed": seed,
        },
    )


__all__ = [
    "SEARCH_RANGE",
    "MatmulRefinement",
    "RefinementReport",
    "all_pairs",
    "pearson_similarity",
    "ranking_loss",
    "refine_attention_ranges",
    "sample_pairs",
]
