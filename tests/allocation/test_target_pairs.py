"""A hardware target's allowed W/A pairs: the exact allocator honours them, and BitAllocator refuses any other."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from lit_mpq.allocation import ExactAllocation
from lit_mpq.cli import main
from lit_mpq.plan import LayerPlan, LayerSpec, QuantPlan
from lit_mpq.quant.targets import QuantTarget, pair_allowed, resolve_target

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NPU = QuantTarget("npu", quantized_tensors="all", bit_pairs=((8, 8), (4, 8), (4, 4)))


def _plan() -> QuantPlan:
    specs = [
        LayerSpec("conv", "conv2d", params=400, macs=4000, act_in=100, act_out=100),
        LayerSpec("fc", "linear", params=300, macs=300, act_in=30, act_out=10),
        LayerSpec("add", "add", params=0, macs=0, act_in=100, act_out=100, act_other=100),
    ]
    sens = {
        "conv": {"w": {2: 9.0, 4: 2.0, 8: 0.1}, "a": {4: 8.0, 8: 0.2}},
        "fc": {"w": {2: 5.0, 4: 1.0, 8: 0.1}, "a": {4: 0.5, 8: 0.1}},
        "add": {"w": {2: 4.0, 4: 2.0, 8: 0.0}, "a": {4: 1.0, 8: 0.0}},
    }
    return QuantPlan(specs, {name: LayerPlan(sensitivity=table) for name, table in sens.items()})


def test_exact_allocation_equals_brute_force_over_the_allowed_pairs():
    plan = _plan()
    policy = ExactAllocation(w_candidates=[2, 4, 8], a_candidates=[4, 8], bit_ops_g=80000 / 1e9)
    policy.hardware_target = NPU
    chosen = policy.allocate(plan)
    best, best_cost = None, float("inf")
    options = list(itertools.product([2, 4, 8], [4, 8]))
    for combo in itertools.product(options, repeat=3):  # brute force over every option of every row
        bits = dict(zip(plan.names, combo, strict=True))
        if not all(pair_allowed(NPU, plan.specs[n].kind, *bits[n]) for n in plan.names):
            continue
        if sum(plan.specs[n].macs * w * a for n, (w, a) in bits.items()) > 80000:
            continue
        cost = sum(plan[n].sensitivity["w"][w] + plan[n].sensitivity["a"][a] for n, (w, a) in bits.items())
        if cost < best_cost:
            best, best_cost = bits, cost
    assert chosen == best
    assert all(pair_allowed(NPU, plan.specs[n].kind, *chosen[n]) for n in chosen)
    unrestricted = ExactAllocation(w_candidates=[2, 4, 8], a_candidates=[4, 8], bit_ops_g=80000 / 1e9).allocate(plan)
    assert not all(pair_allowed(NPU, plan.specs[n].kind, *unrestricted[n]) for n in unrestricted)  # it mattered


def test_candidates_that_form_no_allowed_pair_are_a_clear_error():
    policy = ExactAllocation(w_candidates=[2, 3], a_candidates=[4, 8], bit_ops_g=1.0)
    policy.hardware_target = NPU
    with pytest.raises(ValueError, match="no candidate pair of 'conv'.*bit_pairs"):
        policy.allocate(_plan())


def test_a_custom_target_in_yaml_refuses_a_uniform_policy_it_cannot_run_before_calibrating(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    callbacks[0]["init_args"]["target"] = {"name": "w8_only", "quantized_tensors": "all", "bit_pairs": [[8, 8]]}
    callbacks[2]["init_args"] = {"policy": {"class_path": "lit_mpq.allocation.Uniform", "init_args": {"w_bits": 4}}}
    path = tmp_path / "npu.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        main(["validate", "--config", str(path), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert info.value.code != 0 and "target 'w8_only' runs only the pairs [[8, 8]]" in err
    assert "Traceback" not in err and not list(tmp_path.rglob("plan.yaml"))


def test_resolve_target_reads_a_mapping_and_rejects_unknown_fields():
    assert resolve_target({"name": "x", "bit_pairs": [[8, 8], [4, 8]]}).bit_pairs == ((8, 8), (4, 8))
    with pytest.raises(ValueError, match="unknown fields \\['bits'\\]"):
        resolve_target({"bits": 4})
