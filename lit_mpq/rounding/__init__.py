"""Data-driven weight rounding: GPTQ, GPFQ and AdaRound on the weight quantizer's grid, layer by layer through a model.

- :mod:`~lit_mpq.rounding.grid`: the grid (the weight quantizer's scales) every method rounds onto;
- :mod:`~lit_mpq.rounding.gptq`: GPTQ (Frantar et al., ICLR 2023) on one layer's weight and input Hessian;
- :mod:`~lit_mpq.rounding.gpfq`: GPFQ (Lybrand and Saab 2021; Zhang, Zhou and Saab 2023) on one layer;
- :mod:`~lit_mpq.rounding.adaround`: AdaRound (Nagel et al., ICML 2020) on one layer's quadratic objective;
- :mod:`~lit_mpq.rounding.refine` and :mod:`~lit_mpq.rounding.scale_fit`: optional coordinate descent after the
  greedy pass, and a least-squares refit of each row's scale to the rounded codes (off by default);
- :mod:`~lit_mpq.rounding.layerwise`: :func:`round_model`, which walks a fake-quantized model and rounds each layer
  at its allocated width.

Plain PyTorch: no Lightning (the ``WeightRounding`` callback runs it during ``validate``).
"""

from lit_mpq.rounding.adaround import adaround
from lit_mpq.rounding.gpfq import gpfq_round, median_alphabet_scale
from lit_mpq.rounding.gptq import gptq_round
from lit_mpq.rounding.grid import Grid
from lit_mpq.rounding.layerwise import (
    METHODS,
    UPSTREAM,
    LayerRounding,
    RoundingCache,
    RoundingSettings,
    execution_order,
    round_model,
)

__all__ = [
    "METHODS",
    "UPSTREAM",
    "Grid",
    "adaround",
    "LayerRounding",
    "RoundingCache",
    "RoundingSettings",
    "execution_order",
    "gpfq_round",
    "gptq_round",
    "median_alphabet_scale",
    "round_model",
]
