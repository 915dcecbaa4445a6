"""Evaluations beyond top-1 that read a model's outputs (plain PyTorch/NumPy, no Lightning).

* :mod:`lit_mpq.evaluation.label_aware`: a class-similarity matrix from the FP32 model's per-class mean outputs,
  the most similar / most dissimilar / random ``k``-class subsets, and accuracy restricted to each subset
  (the ``LabelAwareEvaluation`` callback runs it inside ``validate``).
"""

from lit_mpq.evaluation.label_aware import (
    SUBSET_KINDS,
    ClassProbabilitySums,
    ClassSubset,
    MissingClassesWarning,
    label_aware_figure,
    label_aware_markdown,
    label_aware_rows,
    select_subsets,
    subset_counts,
    subset_divergence,
    symmetric_kl_matrix,
)

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
