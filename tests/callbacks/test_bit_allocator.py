"""BitAllocator, driven through its hooks: with a stub trainer around a small quantized model, and a tiny real Trainer.

Expected bits are written out by hand; the allocator must pin the entry and every exit layer, apply the policy to the
rest, set the quantizers, fill the run record, write plan.yaml, hand the EnergyMeter's model to the policy, and
reject a configuration that does not fit the model in ``setup``, before calibration.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch import nn

from lit_mpq.allocation import FromFile, Policy, Uniform
from lit_mpq.callbacks import BitAllocator, BitOverride, Calibration, EnergyMeter
from lit_mpq.callbacks.allocation import energy_model_of
from lit_mpq.data import DigitsDataModule
from lit_mpq.energy import HorowitzEnergyModel
from lit_mpq.module import MPQModule
from lit_mpq.plan import LayerSpec, QuantPlan
from lit_mpq.quant.apply import QuantSettings, quant_layers, quantize_model
from lit_mpq.report.record import AllocationRecord, RunRecord

NAMES = ["stem", "body.0", "body.2", "head", "head_dist"]


class TwoHeads(nn.Module):
    """A stem, a body and two classifier heads whose logits are averaged (as in LeViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4, 3)
        self.head_dist = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(self.stem(x)).mean(dim=(2, 3))
        return (self.head(features) + self.head_dist(features)) / 2


def two_heads_plan() -> QuantPlan:
    """The plan Calibration would build for TwoHeads (numbers are placeholders; only names, entry, exit matter)."""
    specs = [LayerSpec(name, "conv2d", 10, 100, 10, 10) for name in NAMES]
    return QuantPlan(specs, entry_layers=["stem"], exit_layers=["head", "head_dist"])


def stub_trainer(tmp_path, callbacks: list) -> SimpleNamespace:
    """What BitAllocator's hooks read from a trainer, on one device."""
    return SimpleNamespace(
        callbacks=callbacks,
        sanity_checking=False,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
        is_global_zero=True,
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
    )


def stub_module(plan: QuantPlan) -> SimpleNamespace:
    """What BitAllocator's hooks read from the LightningModule: the plan, the quantized model, the record, log."""
    model = TwoHeads()
    assert quantize_model(model, QuantSettings()) == NAMES
    logged: dict[str, float] = {}
    log = logged.__setitem__  # pl_module.log(name, value)
    return SimpleNamespace(plan=plan, model=model, record=RunRecord(), log=log, logged=logged)


def run_hooks(allocator: BitAllocator, trainer, module) -> None:
    allocator.setup(trainer, module, "validate")
    allocator.on_validation_start(trainer, module)


class Spy(Policy):
    """Every layer at W4A4, remembering the energy model it was handed."""

    def __init__(self) -> None:
        self.energy_models: list = []

    def allocate(self, plan, energy_model=None):
        self.energy_models.append(energy_model)
        return dict.fromkeys(plan, (4, 4))


# --------------------------------------------------------------------------------------------- pins and bits
def test_entry_and_both_heads_pinned_policy_applied_to_quantizers_record_and_plan_file(tmp_path):
    allocator = BitAllocator(
        policy=Uniform(4, 4), first_last_bits=8, overrides={"body.2": {"w_bits": 6, "a_bits": None}}
    )
    module = stub_module(two_heads_plan())
    trainer = stub_trainer(tmp_path, [Calibration(), allocator])
    run_hooks(allocator, trainer, module)
    expected = {"stem": (8, 8), "body.0": (4, 4), "body.2": (6, None), "head": (8, 8), "head_dist": (8, 8)}
    assert module.plan.bits() == expected
    assert [module.plan[n].pinned for n in NAMES] == [True, False, True, True, True]
    layers = quant_layers(module.model)
    assert {n: (q.weight_quantizer.bits, q.input_quantizer.bits) for n, q in layers.items()} == expected
    assert {q.weight_quantizer.mode for q in layers.values()} == {"quant"}
    record = module.record.allocation
    assert isinstance(record, AllocationRecord)
    assert record.policy == "Uniform(W4A4)" and record.pinned == ["stem", "body.2", "head", "head_dist"]
    assert record.seconds >= 0 and module.logged["time/allocation_s"] == record.seconds
    saved = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert {row["name"]: (row["w_bits"], row["a_bits"]) for row in saved["layers"]} == expected


def test_a_saved_plan_replaces_the_pins(tmp_path):
    saved = two_heads_plan()
    saved.set_bits(dict.fromkeys(NAMES, (2, 16)))
    path = saved.to_yaml(tmp_path / "saved.yaml")
    allocator = BitAllocator(policy=FromFile(str(path)), first_last_bits=8)
    module = stub_module(two_heads_plan())
    run_hooks(allocator, stub_trainer(tmp_path, [Calibration(), allocator]), module)
    assert module.plan.bits() == dict.fromkeys(NAMES, (2, 16))  # a saved plan already holds its pinned layers


def test_each_validation_run_allocates_with_the_policy_set_then(tmp_path):
    allocator = BitAllocator(policy=Uniform(8, 8))
    module = stub_module(two_heads_plan())
    trainer = stub_trainer(tmp_path, [Calibration(), allocator])
    run_hooks(allocator, trainer, module)
    allocator.on_validation_start(trainer, module)  # a second epoch of the same run: nothing changes
    assert set(module.plan.bits().values()) == {(8, 8)}
    allocator.policy = Uniform(4, None)  # what a sweep does between trainer.validate calls
    run_hooks(allocator, trainer, module)
    assert set(module.plan.bits().values()) == {(4, None)}
    assert module.record.allocation.policy == "Uniform(W4AFP)"


# ----------------------------------------------------------------------------------------------- energy model
def test_the_energy_meters_model_is_handed_to_the_policy(tmp_path):
    meters_model = HorowitzEnergyModel(dram_pj_per_bit=0.0)
    spy = Spy()
    allocator = BitAllocator(policy=spy)
    trainer = stub_trainer(tmp_path, [Calibration(), allocator, EnergyMeter(energy_model=meters_model, measure=[])])
    run_hooks(allocator, trainer, stub_module(two_heads_plan()))
    assert spy.energy_models == [meters_model]
    assert energy_model_of(trainer) is meters_model


def test_without_an_energy_meter_the_policy_gets_the_default_model(tmp_path):
    spy = Spy()
    allocator = BitAllocator(policy=spy)
    run_hooks(allocator, stub_trainer(tmp_path, [Calibration(), allocator]), stub_module(two_heads_plan()))
    assert len(spy.energy_models) == 1 and type(spy.energy_models[0]) is HorowitzEnergyModel
    assert spy.energy_models[0].dram_pj_per_bit == HorowitzEnergyModel().dram_pj_per_bit


# ------------------------------------------------------------------------------------------- checks at setup
def test_setup_rejects_a_plan_file_of_another_model(tmp_path):
    other = QuantPlan([LayerSpec(name, "conv2d", 1, 1, 1, 1) for name in ["conv1", "fc"]])
    path = other.to_yaml(tmp_path / "other.yaml")
    allocator = BitAllocator(policy=FromFile(str(path)))
    module = stub_module(two_heads_plan())
    with pytest.raises(ValueError, match="does not fit this model") as err:
        allocator.setup(stub_trainer(tmp_path, [Calibration(), allocator]), module, "validate")
    assert str(path) in str(err.value) and "'conv1'" in str(err.value) and "'stem'" in str(err.value)


def test_setup_rejects_an_override_that_matches_nothing(tmp_path):
    allocator = BitAllocator(overrides={"hed": BitOverride(8, 8)})
    module = stub_module(two_heads_plan())
    with pytest.raises(ValueError, match="override 'hed' matches no quantized layer: did you mean 'head'"):
        allocator.setup(stub_trainer(tmp_path, [Calibration(), allocator]), module, "validate")
    assert not any(module.plan[n].pinned for n in NAMES)


def test_setup_needs_calibration_first(tmp_path):
    allocator = BitAllocator()
    with pytest.raises(Exception, match="add lit_mpq.callbacks.Calibration to trainer.callbacks before it"):
        allocator.setup(stub_trainer(tmp_path, [allocator]), stub_module(two_heads_plan()), "validate")
    allocator.setup(stub_trainer(tmp_path, [allocator]), stub_module(two_heads_plan()), "fit")  # not a quant stage


@pytest.mark.parametrize("bits", [1, 33, 0])
def test_bad_bits_are_rejected(bits):
    with pytest.raises(ValueError, match=str(bits)):
        BitAllocator(first_last_bits=bits)
    with pytest.raises(ValueError, match=str(bits)):
        BitOverride(w_bits=bits)


# ------------------------------------------------------------------------------------------- a real Trainer
def tiny_trainer(tmp_path, *callbacks) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def digits() -> DigitsDataModule:
    return DigitsDataModule(num_calibration_samples=32, batch_size=64, max_val_samples=64)


def test_a_real_validation_run_pins_entry_and_exit_layers(tmp_path):
    allocator = BitAllocator(policy=Uniform(4, 6), first_last_bits=8)
    module = MPQModule(backbone="digits_cnn", fp32_reference=False)
    tiny_trainer(tmp_path, Calibration(num_samples=32), allocator).validate(module, digits(), verbose=False)
    plan = module.plan
    pinned = [*plan.entry_layers, *plan.exit_layers]
    assert module.record.allocation.pinned == [n for n in plan.names if n in pinned]
    assert module.record.calibration is not None
    assert {n: plan[n].pinned for n in plan} == {n: n in pinned for n in plan}
    assert all(plan.bits()[n] == ((8, 8) if n in pinned else (4, 6)) for n in plan)
    assert (tmp_path / "plan.yaml").is_file()


def test_a_real_run_stops_on_a_wrong_plan_file_before_calibrating(tmp_path):
    other = QuantPlan([LayerSpec(name, "conv2d", 1, 1, 1, 1) for name in ["conv1", "fc"]])
    path = other.to_yaml(tmp_path / "other.yaml")
    module = MPQModule(backbone="digits_cnn", fp32_reference=False)
    trainer = tiny_trainer(tmp_path, Calibration(num_samples=32), BitAllocator(policy=FromFile(str(path))))
    with pytest.raises(ValueError, match="does not fit this model"):
        trainer.validate(module, digits(), verbose=False)
    assert module.record.calibration is None  # stopped in setup: no calibration pass was spent
