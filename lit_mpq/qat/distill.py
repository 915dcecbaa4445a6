"""Knowledge distillation from the float model during quantization-aware training (Hinton et al., 2015).

With a few thousand training images, fitting the labels alone lets the quantized model drift toward what those
images allow; matching the float model's full output distribution on them carries far more information per image
and keeps the quantized model near the function it approximates (as in the data-limited QAT recipes of AIMET and
PyTorch's QAT tutorials).
"""

from __future__ import annotations

import torch.nn.functional as F  # noqa: N812
from torch import Tensor

__all__ = ["distillation_loss"]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 · KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T^2`` keeps the gradient's size independent of the temperature (Hinton et al., "Distilling the knowledge in
    a neural network", 2015, section 2).

    Raises:
        ValueError: If ``temperature`` is not positive.
    """
    if not temperature > 0:
        raise ValueError(f"the distillation temperature must be positive, got {temperature}")
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2
