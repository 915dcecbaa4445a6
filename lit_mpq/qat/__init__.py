"""Training under quantization, in plain PyTorch: learned step sizes (LSQ), learned bit widths, the training start.

The Lightning side is :class:`lit_mpq.callbacks.QuantizationAwareTraining` and
:class:`lit_mpq.callbacks.BitWidthLearning`, which run these in ``fit``.
"""

from lit_mpq.qat.learned_bits import (
    LearnedBitWeightQuantizer,
    budget_penalty,
    learned_bit_quantizers,
    relaxed_cost,
    round_to_budget,
)
from lit_mpq.qat.lsq import (
    LearnedStepActivationQuantizer,
    LearnedStepWeightQuantizer,
    add_learned_steps,
    freeze_learned_steps,
    init_learned_steps,
    learned_step_fake_quantize,
    lsq_gradient_scale,
)
from lit_mpq.qat.start import TrainingStart, start_from_post_training

__all__ = [
    "LearnedBitWeightQuantizer",
    "LearnedStepActivationQuantizer",
    "LearnedStepWeightQuantizer",
    "TrainingStart",
    "add_learned_steps",
    "budget_penalty",
    "freeze_learned_steps",
    "init_learned_steps",
    "learned_bit_quantizers",
    "learned_step_fake_quantize",
    "lsq_gradient_scale",
    "relaxed_cost",
    "round_to_budget",
    "start_from_post_training",
]
