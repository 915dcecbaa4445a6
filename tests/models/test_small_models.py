"""The digits CNN of the embedded default."""

from __future__ import annotations

import torch
from torch import nn

from lit_mpq.models import backbone_input_size, create_backbone, list_backbones
from lit_mpq.models.small import DigitsCNN


def test_digits_cnn_layers_and_shapes():
    assert "digits_cnn" in list_backbones()
    model = create_backbone("digits_cnn")
    assert isinstance(model, DigitsCNN)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 3
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    assert model.default_input_size == (1, 8, 8) == backbone_input_size(model)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert create_backbone("digits_cnn", num_classes=3)(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_digits_cnn_trains_on_a_batch():
    torch.manual_seed(0)
    model = create_backbone("digits_cnn")
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
