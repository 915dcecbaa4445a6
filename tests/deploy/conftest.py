"""Fixtures of the deployment tests: calibrated fake-quantized models at random mixed 2-8-bit plans."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lit_mpq.models import create_backbone
from lit_mpq.quant.apply import (
    QuantSettings,
    apply_plan,
    apply_post_layernorm,
    calibrate,
    measure_model,
    quantize_model,
)
from lit_mpq.quant.batchnorm import fold_batchnorm
from lit_mpq.quant.modules import is_quant_layer

RESNET_SETTINGS = QuantSettings(act_observer="mse", bias_correction=True)

VIT_RECIPE = QuantSettings(
    act_observer="mse",
    weight_observer="mse",
    softmax_quantizer="log_sqrt2",
    softmax_uniform_from_bits=6,
    softmax_underflow="mean",
    post_layernorm="reparam_mse",
    act_observer_overrides=((r"blocks\..*\.mlp\.fc2", "twin_uniform"),),
)
"""configs/deit.yaml's calibration settings: every special quantizer (log-sqrt2 softmax with its mean zero code,
twin-uniform fc2 inputs, RepQ-ViT reparam_mse) and the attention matmuls."""


def calibrated_model(model: nn.Module, settings: QuantSettings, size: int, seed: int, a_bits=(3, 4, 6, 8)):
    """Quantizers in, calibrated on random images, a random mixed 2-8-bit plan applied; returns the plan and inputs."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    example = torch.zeros(1, 3, size, size)
    quantize_model(model, settings)
    plan = measure_model(model, example)
    if settings.post_layernorm != "per_tensor":
        apply_post_layernorm(model, example, "mse" if settings.post_layernorm == "reparam_mse" else "minmax")
    if settings.bias_correction:
        for module in model.modules():
            if is_quant_layer(module):
                module.enable_bias_correction()
    x = torch.randn(16, 3, size, size)
    calibrate(model, [x[:8]])
    plan.set_bits({name: (rng.choice([2, 3, 4, 5, 6, 8]), rng.choice(a_bits)) for name in plan.names})
    apply_plan(model, plan)
    return plan, x


def resnet(seed: int = 0, settings: QuantSettings = RESNET_SETTINGS):
    torch.manual_seed(seed)
    model = create_backbone("cifar_resnet20").eval()
    pairs = fold_batchnorm(model, torch.zeros(1, 3, 32, 32))
    plan, x = calibrated_model(model, settings, 32, seed)
    return model, plan, x, pairs


@pytest.fixture
def calibrated():
    """``calibrated(model, settings, size, seed, a_bits)``: quantizers in, calibrated, a random plan applied."""
    return calibrated_model


@pytest.fixture
def calibrated_resnet():
    """``resnet(seed, settings)``: a BN-folded, calibrated CIFAR ResNet-20 (random weights) at a random plan."""
    return resnet


@pytest.fixture
def vit_recipe() -> QuantSettings:
    """:data:`VIT_RECIPE`."""
    return VIT_RECIPE
