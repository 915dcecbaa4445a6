"""AttentionRefinement, driven through its hooks with a stub trainer around a small calibrated timm ViT.

The callback must refine at the plan's bit widths, on the first ``num_samples`` calibration images whatever the
sharding, give the same factors as the core function on those images, record its cost and settings, and refuse to
run before the BitAllocator.
"""

from __future__ import annotations

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mpq.callbacks import AttentionRefinement, BitAllocator
from lit_mpq.quant.ranking import refine_attention_ranges

timm = pytest.importorskip("timm")


def plan_bits(name: str) -> tuple[int, int]:
    """A 3-bit k and v, a 4-bit q and softmax output; W8A8 elsewhere."""
    return (3, 4) if "matmul" in name else (8, 8)


def test_refines_at_the_plans_bits_on_the_first_images_and_records_its_cost(stub_run, calibrated_test_vit):
    model, plan, images = calibrated_test_vit(plan_bits)
    reference_model, _, _ = calibrated_test_vit(plan_bits)
    callback = AttentionRefinement(num_samples=7, candidates=12, rounds=1)
    trainer, module = stub_run(images, model, plan, [BitAllocator(), callback])
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


def test_must_come_after_the_bit_allocator(stub_run, calibrated_test_vit):
    model, plan, images = calibrated_test_vit(plan_bits)
    callback = AttentionRefinement()
    trainer, module = stub_run(images, model, plan, [callback, BitAllocator()])
    trainer.callbacks = [callback, BitAllocator()]
    with pytest.raises(MisconfigurationException, match="BitAllocator"):
        callback.setup(trainer, module, "validate")


@pytest.mark.parametrize("field", ["num_samples", "candidates", "rounds"])
def test_rejects_non_positive_settings(field):
    with pytest.raises(ValueError, match=field):
        AttentionRefinement(**{field: 0})
