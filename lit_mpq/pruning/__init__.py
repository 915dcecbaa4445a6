"""Pruning before quantization: unstructured magnitude pruning, structured channel pruning, and their counts.

Plain PyTorch (no Lightning), testable without a Trainer; the :class:`~lit_mpq.callbacks.Pruning` callback is the thin
recipe that runs it inside ``validate``.

* :mod:`lit_mpq.pruning.layers`: which layers are pruned (names, ``re:<regex>`` patterns, the classifier).
* :mod:`lit_mpq.pruning.magnitude`: zero the smallest-magnitude weights, over the whole model or per layer
  (``torch.nn.utils.prune``), permanently or with the masks kept for fine-tuning.
* :mod:`lit_mpq.pruning.structured`: remove whole channels with torch-pruning's dependency graph, so that every layer
  reading a removed channel shrinks with it.
* :mod:`lit_mpq.pruning.counting`: nonzero weights per layer, and the plan of a pruned model (its MACs and
  parameters measured by :func:`lit_mpq.quant.apply.measure_model`, its nonzero counts recorded per row).
"""

from lit_mpq.pruning.counting import (
    LayerSparsity,
    annotate_nonzeros,
    classifier_layers,
    measure_pruned,
    weight_sparsity,
)
from lit_mpq.pruning.layers import select_layers
from lit_mpq.pruning.magnitude import SCOPES, magnitude_prune, make_permanent
from lit_mpq.pruning.structured import ChannelChange, prune_channels

__all__ = [
    "SCOPES",
    "ChannelChange",
    "LayerSparsity",
    "annotate_nonzeros",
    "classifier_layers",
    "magnitude_prune",
    "make_permanent",
    "measure_pruned",
    "prune_channels",
    "select_layers",
    "weight_sparsity",
]
