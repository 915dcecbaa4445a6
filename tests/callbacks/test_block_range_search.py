"""BlockRangeSearch, driven through its hooks with a stub trainer around a small calibrated timm ViT.

The callback must search at the plan's widths on the first ``num_samples`` calibration images, give the factors the
core function gives on those images, record its report and cost, and refuse to run before the BitAllocator.
"""

from __future__ import annotations

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mpq.callbacks import BitAllocator, BlockRangeSearch, WeightRounding
from lit_mpq.quant.block_ranges import refine_block_ranges

timm = pytest.importorskip("timm")


def plan_bits(name: str) -> tuple[int, int]:
    """3-bit activations everywhere, 8-bit weights."""
    return (8, 3)


def test_searches_on_the_first_images_and_records_the_report(stub_run, calibrated_test_vit):
    model, plan, images = calibrated_test_vit(plan_bits)
    reference_model, _, _ = calibrated_test_vit(plan_bits)
    callback = BlockRangeSearch(num_samples=7, candidates=[0.5, 0.8], rounds=1)
    trainer, module = stub_run(images, model, plan, [BitAllocator(), callback])
    callback.setup(trainer, module, "validate")
    callback.on_validation_start(trainer, module)

    expected = refine_block_ranges(reference_model, [images[:7]], candidates=[0.5, 0.8], rounds=1, max_images=7)
    record = module.record.block_ranges
    assert record["images"] == 7
    assert [block["factors"] for block in record["blocks"]] == [block.factors for block in expected.blocks]
    assert any(f != 1.0 for block in expected.blocks for f in block.factors.values())
    assert record["settings"]["candidates"] == [0.5, 0.8]
    assert module.logged["time/block_ranges_s"] == record["wall_seconds"] > 0


def test_must_come_after_the_bit_allocator(stub_run, calibrated_test_vit):
    model, plan, images = calibrated_test_vit(plan_bits)
    callback = BlockRangeSearch()
    trainer, module = stub_run(images, model, plan, [callback, BitAllocator()])
    with pytest.raises(MisconfigurationException, match="BitAllocator"):
        callback.setup(trainer, module, "validate")


def test_must_come_before_the_weight_rounding(stub_run, calibrated_test_vit):
    model, plan, images = calibrated_test_vit(plan_bits)
    callback = BlockRangeSearch()
    trainer, module = stub_run(images, model, plan, [BitAllocator(), WeightRounding(), callback])
    with pytest.raises(MisconfigurationException, match="before"):
        callback.setup(trainer, module, "validate")


BAD_SETTINGS = [{"num_samples": 0}, {"rounds": 0}, {"candidates": [0.5, -1.0]}, {"objective": "kl"}, {"target": "x"}]


@pytest.mark.parametrize("settings", BAD_SETTINGS)
def test_rejects_bad_settings(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        BlockRangeSearch(**settings)


def test_each_run_starts_from_the_observers_ranges_not_the_previous_runs_choice(stub_run, calibrated_test_vit):
    """A sweep runs the callback once per point: a point's search must not start from the previous point's factors."""
    model, plan, images = calibrated_test_vit(plan_bits)
    callback = BlockRangeSearch(num_samples=7, candidates=[0.5, 0.8], rounds=1)
    trainer, module = stub_run(images, model, plan, [BitAllocator(), callback])
    callback.setup(trainer, module, "validate")
    callback.on_validation_start(trainer, module)
    first = module.record.block_ranges["blocks"]
    assert any(block["error_after"] < block["error_before"] for block in first)  # it moved some factor
    callback.on_validation_start(trainer, module)
    second = module.record.block_ranges["blocks"]
    assert second == [{**block, "seconds": again["seconds"]} for block, again in zip(first, second, strict=True)]
