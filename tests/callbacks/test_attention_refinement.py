"""AttentionRefinement, driven through its hooks with a stub trainer around a small calibrated timm ViT.

The callback must refine at the plan's bit widths, on the first ``num_samples`` calibration images whatever the
sharding, give the same factors as the core function on those images, record its cost and settings, and refuse to
run before the BitAllocator.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mpq.callbacks import AttentionRefinement, BitAllocator
from lit_mpq.quant.apply import QuantSettings, apply_plan, invalidate_qparams, measure_model, quantize_model, set_mode
from lit_mpq.quant.ranking import refine_attention_ranges
from lit_mpq.report.record import RunRecord

timm = pytest.importorskip("timm")


def calibrated_vit():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    quantize_model(model, QuantSettings(act_observer="minmax"))
    plan = measure_model(model, torch.zeros(1, 3, 32, 32))
    images = torch.randn(12, 3, 32, 32)
    set_mode(model, weights="off", activations="observe")
    with torch.no_grad():
        model(images)
    set_mode(model, weights="off", activations="off")
    invalidate_qparams(model)
    for name, layer in plan.layers.items():
        layer.w_bits, layer.a_bits = (3, 4) if "matmul" in name else (8, 8)
    apply_plan(model, plan)
    return model, plan, images


def stub(images: torch.Tensor, model, plan, callbacks: list):
    logged: dict[str, float] = {}
    batches = [(images[i : i + 5], torch.zeros(5)) for i in range(0, len(images), 5)]  # (x, y) like a dataloader
    trainer = SimpleNamespace(
        callbacks=callbacks,
        sanity_checking=False,
        datamodule=SimpleNamespace(calib_dataloader=lambda: iter(batches)),
        strategy=SimpleNamespace(batch_to_device=lambda x: x),
    )
    module = SimpleNamespace(plan=plan, model=model, record=RunRecord(), log=logged.__setitem__, logged=logged)
    return trainer, module


def test_refines_at_the_plans_bits_on_the_first_images_and_records_its_cost():
    model, plan, images = calibrated_vit()
    reference_model, _, _ = calibrated_vit()
    callback = AttentionRefinement(num_samples=7, candidates=12, rounds=1)
    trainer, module = stub(images, model, plan, [BitAllocator(), callback])
    callback.setup(trainer, module, "validate")
    callback.on_validation_start(trainer, module)

    expected = refine_attention_ranges(
        reference_model, [images[:7]], plan.bits(), candidates=12, rounds=1, max_images=7, search_range=(0.05, 1.2)
    ).factors
    record = module.record.refinement
    assert record["images"] == 7
    assert {name: entry["factors"] for name, entry in record["matmuls"].items()} == expected
    qk = model.blocks[0].attn.matmul_qk
    # Factors are stored at the allocated widths only: 4 bits for q (left), 3 bits for k (right).
    assert set(qk.input_quantizer.range_factors) <= {4} and set(qk.other_quantizer.range_factors) <= {3}
    assert any(f != 1.0 for entry in expected.values() for f in entry.values())
    assert record["settings"]["method"].startswith("ranking-aware")
    assert module.logged["time/refinement_s"] == record["wall_seconds"] > 0


def test_must_come_after_the_bit_allocator():
    model, plan, images = calibrated_vit()
    callback = AttentionRefinement()
    trainer, module = stub(images, model, plan, [callback, BitAllocator()])
    trainer.callbacks = [callback, BitAllocator()]
    with pytest.raises(MisconfigurationException, match="BitAllocator"):
        callback.setup(trainer, module, "validate")


@pytest.mark.parametrize("field", ["num_samples", "candidates", "rounds"])
def test_rejects_non_positive_settings(field):
    with pytest.raises(ValueError, match=field):
        AttentionRefinement(**{field: 0})
