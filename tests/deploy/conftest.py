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
    invalidate_qparams,
    measure_model,
    quantize_model,
    set_mode,
)
from lit_mpq.quant.batchnorm import fold_batchnorm
from lit_mpq.quant.modules import is_quant_layer

RESNET_SETTINGS = QuantSettings(act_observer="mse", bias_correction=True)


def calibrate(model: nn.Module, settings: QuantSettings, size: int, seed: int, a_bits=(3, 4, 6, 8)):
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
    set_mode(model, weights="off", activations="observe")
    with torch.no_grad():
        model(x[:8])
    set_mode(model, weights="off", activations="off")
    invalidate_qparams(model)
    for name in plan.names:
        plan[name].w_bits = rng.choice([2, 3, 4, 5, 6, 8])
        plan[name].a_bits = rng.choice(a_bits)
    apply_plan(model, plan)
    return plan, x


def resnet(seed: int = 0, settings: QuantSettings = RESNET_SETTINGS):
    torch.manual_seed(seed)
    model = create_backbone("cifar_resnet20").eval()
    pairs = fold_batchnorm(model, torch.zeros(1, 3, 32, 32))
    plan, x = calibrate(model, settings, 32, seed)
    return model, plan, x, pairs


@pytest.fixture
def calibrated():
    """``calibrate(model, settings, size, seed, a_bits)``: quantizers in, calibrated, a random plan applied."""
    return calibrate


@pytest.fixture
def calibrated_resnet():
    """``resnet(seed, settings)``: a BN-folded, calibrated CIFAR ResNet-20 (random weights) at a random plan."""
    return resnet
