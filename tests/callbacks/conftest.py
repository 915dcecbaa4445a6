"""Fixtures shared by the callback tests: a stub trainer and LightningModule around a model and its plan."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from lit_mpq.report.record import RunRecord


@pytest.fixture
def stub_run() -> Callable:
    """``stub_run(images, model, plan, callbacks) -> (trainer, module)``.

    The trainer serves ``images`` as calibration batches of 5 ``(x, y)`` pairs, like a dataloader, and lists
    ``callbacks``; the module holds ``model``, ``plan``, a fresh run record and a ``logged`` dict of what it logged.
    """

    def stub(images: torch.Tensor, model, plan, callbacks: list) -> tuple[SimpleNamespace, SimpleNamespace]:
        logged: dict[str, float] = {}
        batches = [(images[i : i + 5], torch.zeros(5)) for i in range(0, len(images), 5)]
        trainer = SimpleNamespace(
            callbacks=callbacks,
            sanity_checking=False,
            datamodule=SimpleNamespace(calib_dataloader=lambda: iter(batches)),
            strategy=SimpleNamespace(batch_to_device=lambda x: x),
        )
        module = SimpleNamespace(plan=plan, model=model, record=RunRecord(), log=logged.__setitem__, logged=logged)
        return trainer, module

    return stub


@pytest.fixture
def calibrated_test_vit() -> Callable:
    """``calibrated_test_vit(bits_of) -> (model, plan, images)``: timm's ``test_vit`` quantized (min/max activation
    ranges), calibrated on 12 random images and carrying the plan ``{name: bits_of(name)}`` (``(w_bits, a_bits)``)."""
    timm = pytest.importorskip("timm")
    from lit_mpq.quant.apply import QuantSettings, apply_plan, calibrate, measure_model, quantize_model

    def build(bits_of: Callable[[str], tuple[int | None, int | None]]):
        torch.manual_seed(0)
        model = timm.create_model("test_vit", pretrained=False).eval()
        quantize_model(model, QuantSettings(act_observer="minmax"))
        plan = measure_model(model, torch.zeros(1, 3, 32, 32))
        images = torch.randn(12, 3, 32, 32)
        calibrate(model, [images])
        plan.set_bits({name: bits_of(name) for name in plan.names})
        apply_plan(model, plan)
        return model, plan, images

    return build
