"""The distillation term against the formula written out in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_mpq.qat.distill import distillation_loss


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_distillation_loss_is_t_squared_kl_of_the_softened_distributions(temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(5, 7)), rng.normal(size=(5, 7)) * 3

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_teacher, p_student = softmax(teacher / temperature), softmax(student / temperature)
    expected = temperature**2 * np.mean(np.sum(p_teacher * (np.log(p_teacher) - np.log(p_student)), axis=1))
    loss = distillation_loss(torch.tensor(student), torch.tensor(teacher), temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_distillation_loss_is_zero_for_the_teacher_itself_and_rejects_a_bad_temperature():
    logits = torch.randn(3, 4)
    assert distillation_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="positive"):
        distillation_loss(logits, logits, 0.0)
