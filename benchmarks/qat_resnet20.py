"""Benchmark: post-training quantization against quantization-aware training on the pretrained CIFAR-10 ResNet-20.

Two lanes, on the 1,000 lossless CIFAR-10 test images (FP32 91.5 %), training on the 4,000 lossless training images
(random crop + flip) on this machine's CPU::

    python benchmarks/qat_resnet20.py [--epochs 3] [--lanes curve,learned,input] [--figure docs/figures/ptq_vs_qat.png]

* ``curve``: uniform W16A16, W8A8 and W4A4 on every layer (stem and classifier too), each as lit_mpq's best PTQ
  (``configs/resnet20_qat.yaml`` without training: folded BatchNorm, MSE activation ranges, GPFQ rounding) and after
  QAT from it (learned steps, LSQ, distillation; ``--epochs`` at W4A4, ``--high-bit-epochs`` at W16/W8, where PTQ
  already matches FP32), next to FP32: the PTQ-vs-QAT curve over 32/16/8/4 bits.
* ``learned``: weight bit widths learned toward an average of ``--target-bits`` (activations at 4 bits, every width
  starting at 8; ``BitWidthLearning``), rounded to a plan; the exact allocator's plan at the average the rounded plan
  spends (Fisher probe); both plans evaluated as PTQ (GPFQ) and after the same QAT.
* ``input``: where uniform W4A4 loses. The config's PTQ with the stem's input (the image) or the stem and the
  classifier at 8 bits; the float model with only its input image quantized (the 4-bit grid the PTQ run calibrated);
  that float model fine-tuned for ``--adapt-epochs`` to the 4-bit image (distillation from the float model on the
  float images, mixup of the training images, BatchNorm statistics frozen; a plain PyTorch loop, not a lit_mpq
  feature), alone and as the starting weights of the config's W4A4 PTQ (with each of ``--input-roundings``).

Every training run is ``python cli.py fit --config configs/resnet20_qat.yaml`` with the policy (and callbacks)
swapped in-process; every PTQ row is the same config's ``validate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _runs import fresh_run_dir, top1

from lit_mpq.allocation import FromFile, Policy, Uniform
from lit_mpq.allocation.pinning import BitOverride
from lit_mpq.callbacks import (
    BitAllocator,
    BitWidthLearning,
    QuantizationAwareTraining,
    SensitivityProbe,
    WeightRounding,
)
from lit_mpq.cli import main as cli_main
from lit_mpq.models import create_backbone
from lit_mpq.models.factory import load_checkpoint
from lit_mpq.plan import QuantPlan
from lit_mpq.qat.distill import distillation_loss

CONFIG = "configs/resnet20_qat.yaml"
RECIPE = {"step_lr_scale": 0.05, "distill_weight": 1.0}
"""The config's QAT settings (LSQ steps at 5 % of the learning rate, distillation from the float model)."""
THREADS = 2


def _args(out: Path, extra: list[str]) -> list[str]:
    return [
        "--config",
        CONFIG,
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={fresh_run_dir(out)}",
        *extra,
    ]


def _with_policy(cli, policy: Policy, training: object | None, probe: SensitivityProbe | None = None) -> None:
    """Set the allocator's policy, replace (or drop) the training callback, add a probe before the allocator."""
    callbacks = cli.trainer.callbacks
    for index, callback in enumerate(list(callbacks)):
        if isinstance(callback, BitAllocator):
            callback.policy = policy
            if probe is not None:
                callbacks.insert(index, probe)
    qat = next(i for i, cb in enumerate(callbacks) if isinstance(cb, QuantizationAwareTraining))
    if training is None:
        del callbacks[qat]
    else:
        callbacks[qat] = training


def ptq_run(
    out: Path,
    policy: Policy,
    extra: list[str] = (),
    overrides: dict[str, BitOverride] | None = None,
    rounding: str | None = None,
) -> tuple[object, float]:
    """The CLI object and top-1 of the config's post-training pipeline with ``policy`` (no training).

    ``overrides`` are pinned in the allocator; ``rounding`` replaces the config's GPFQ when given.
    """
    cli = cli_main(_args(out, ["--model.init_args.fp32_reference=false", *extra]), run=False)
    _with_policy(cli, policy, None)
    if overrides:
        next(cb for cb in cli.trainer.callbacks if isinstance(cb, BitAllocator)).overrides = overrides
    if rounding is not None:
        rounder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, WeightRounding))
        rounder.settings = dataclasses.replace(rounder.settings, method=rounding)
    return cli, cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]["val/top1"]


def ptq(out: Path, policy: Policy, *args: Any, **kwargs: Any) -> float:
    """Top-1 of :func:`ptq_run` with the same arguments."""
    return ptq_run(out, policy, *args, **kwargs)[1]


def train(out: Path, policy: Policy, epochs: int, training: object, probe: SensitivityProbe | None = None) -> dict:
    """``fit`` with ``policy`` and the training callback; the run folder's record and the training time."""
    cli = cli_main(_args(out, [f"--trainer.max_epochs={epochs}"]), run=False)
    _with_policy(cli, policy, training, probe)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    folder = Path(cli.trainer.default_root_dir)
    name = "learned_bits.json" if isinstance(training, BitWidthLearning) else "qat.json"
    record = json.loads((folder / name).read_text())
    return {"record": record, "seconds": time.perf_counter() - start, "folder": folder}


def reload_top1(out: Path, folder: Path) -> float:
    """Top-1 of a run's packed ``quantized.pt`` (no calibration): what the trained model scores as shipped."""
    cli = cli_main(
        [
            "--config",
            "configs/resnet20_reload.yaml",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={fresh_run_dir(out)}",
            f"--model.init_args.checkpoint_path={folder / 'quantized.pt'}",
        ],
        run=False,
    )
    return cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]["val/top1"]


def fp32_top1(out: Path) -> float:
    cli = cli_main(_args(out, ["--model.init_args.fp32_reference=true"]), run=False)
    _with_policy(cli, Uniform(w_bits=8, a_bits=8), None)
    return cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]["val/top1_fp32"]


def curve(args: argparse.Namespace, out: Path) -> list[dict]:
    rows = [{"bits": 32, "ptq": fp32_top1(out), "qat": None, "seconds": None}]
    print(f"FP32: {rows[0]['ptq']:.2f}", flush=True)
    for bits in (16, 8, 4):
        policy = Uniform(w_bits=bits, a_bits=bits)
        before = ptq(out, policy)
        epochs = args.epochs if bits <= 4 else args.high_bit_epochs
        trained = train(out, policy, epochs, QuantizationAwareTraining(learn_steps=True, **RECIPE))
        # the packed format stores up to 8 bits: W16's trained top-1 is its last validation (the same model)
        if (trained["folder"] / "quantized.pt").is_file():
            after = reload_top1(out, trained["folder"])
        else:
            after = trained["record"]["last_validation"]["val/top1"]
        rows.append({"bits": bits, "ptq": before, "qat": after, "seconds": trained["seconds"], "epochs": epochs})
        print(f"W{bits}A{bits}: PTQ {before:.2f}, QAT {after:.2f} ({trained['seconds']:.0f} s)", flush=True)
    return rows


def learned(args: argparse.Namespace, out: Path) -> list[dict]:
    probe = SensitivityProbe(metric="fisher", candidate_bits=[2, 3, 4, 6, 8], subsample=1)
    learning = BitWidthLearning(
        target_avg_bits=args.target_bits, candidate_bits=[2, 3, 4, 6, 8], penalty_weight=args.penalty_weight
    )
    run = train(out, Uniform(w_bits=8, a_bits=4), args.epochs, learning, probe)
    record = run["record"]
    learned_plan = QuantPlan.from_yaml(run["folder"] / "plan.yaml")
    exact_plan = QuantPlan.from_yaml(run["folder"] / "plan_exact.yaml")
    rows = [
        {
            "plan": "learned widths (trained with them, then rounded)",
            "avg_w": learned_plan.average_weight_bits(),
            "ptq": None,
            "qat": reload_top1(out, run["folder"]),
            "seconds": run["seconds"],
        }
    ]
    for name, plan_file in (("learned widths", "plan.yaml"), ("exact allocator", "plan_exact.yaml")):
        policy = FromFile(str(run["folder"] / plan_file))
        trained = train(out, policy, args.epochs, QuantizationAwareTraining(learn_steps=True, **RECIPE))
        plan = learned_plan if plan_file == "plan.yaml" else exact_plan
        rows.append(
            {
                "plan": f"{name}, PTQ then QAT from the pretrained weights",
                "avg_w": plan.average_weight_bits(),
                "ptq": ptq(out, policy),
                "qat": reload_top1(out, trained["folder"]),
                "seconds": trained["seconds"],
            }
        )
    rows[0]["record"] = {k: record[k] for k in ("rounded_value", "relaxed_value_at_end", "exact_allocation")}
    return rows


def _pretrained_float_model(cli) -> torch.nn.Module:
    """The run's backbone with its pretrained float weights, in eval mode (nothing quantized)."""
    init = cli.model.hparams
    return load_checkpoint(create_backbone(init["backbone"]), init["checkpoint_path"]).eval()


def adapt_to_input_grid(cli, quantize_input, epochs: int, lr: float = 2e-3, mixup: float = 1.0) -> torch.nn.Module:
    """The float backbone fine-tuned to see its input through ``quantize_input`` (plain PyTorch, BatchNorm frozen).

    Distillation from the untouched float model, which sees the float images; each batch is mixed with a shuffled
    copy of itself (mixup, Beta(``mixup``, ``mixup``)), so that 4,000 images give many distinct targets.
    """
    teacher = _pretrained_float_model(cli)
    student = _pretrained_float_model(cli)  # and stays in eval mode: BatchNorm statistics are the pretrained ones
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    loader = cli.datamodule.train_dataloader()
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    mixing = torch.distributions.Beta(mixup, mixup)
    for _ in range(epochs):
        for images, _labels in loader:
            share = mixing.sample((images.shape[0], 1, 1, 1))
            images = share * images + (1 - share) * images[torch.randperm(images.shape[0])]
            with torch.no_grad():
                target = teacher(images)
            loss = distillation_loss(student(quantize_input(images)), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return student


def input_lane(args: argparse.Namespace, out: Path) -> list[dict]:
    w4a4 = Uniform(w_bits=4, a_bits=4)
    cli, config_top1 = ptq_run(out, w4a4)
    rows = [{"setting": "W4A4 PTQ, every layer (the config)", "top1": config_top1}]
    stem = next(iter(cli.model.plan.specs))
    head = list(cli.model.plan.specs)[-1]
    stem_8 = {stem: BitOverride(w_bits=4, a_bits=8)}
    rows.append({"setting": f"W4A4 PTQ, the image ({stem}'s input) at 8 bits", "top1": ptq(out, w4a4, (), stem_8)})
    first_last = {stem: BitOverride(8, 8), head: BitOverride(8, 8)}
    rows.append({"setting": f"W4A4 PTQ, {stem} and {head} at W8A8", "top1": ptq(out, w4a4, (), first_last)})
    quantizer = dict(cli.model.model.named_modules())[stem].input_quantizer
    scale, zero_point = (float(t) for t in quantizer.qparams(4))
    low, high = (-8, 7) if quantizer.symmetric else (0, 15)

    def quantize_input(images: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(images, scale, int(zero_point), low, high)

    cli.datamodule.setup("fit")
    float_model = _pretrained_float_model(cli)
    val = cli.datamodule.val_dataloader()
    rows.append({"setting": "float model", "top1": top1(float_model, val)})
    only_input = top1(lambda x: float_model(quantize_input(x)), val)
    rows.append({"setting": "float model, only its input image at 4 bits", "top1": only_input})
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    adapted = adapt_to_input_grid(cli, quantize_input, args.adapt_epochs)
    seconds = time.perf_counter() - start
    rows.append(
        {
            "setting": f"float model adapted to the 4-bit image ({args.adapt_epochs} epochs, {seconds:.0f} s), "
            "input at 4 bits",
            "top1": top1(lambda x: adapted(quantize_input(x)), val),
        }
    )
    weights = fresh_run_dir(out) / "adapted_float.pt"
    torch.save(adapted.state_dict(), weights)
    for rounding in args.input_roundings:
        adapted_top1 = ptq(out, w4a4, [f"--model.init_args.checkpoint_path={weights}"], rounding=rounding)
        pretrained_top1 = config_top1 if rounding == "gpfq" else ptq(out, w4a4, rounding=rounding)
        for start, value in (("the pretrained model", pretrained_top1), ("the adapted float model", adapted_top1)):
            rows.append({"setting": f"W4A4 PTQ, every layer, {rounding}, from {start}", "top1": value})
    return rows


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [r["bits"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(bits, [r["ptq"] for r in rows], "o-", label="PTQ (lit_mpq, GPFQ)")
    trained = [r for r in rows if r["qat"] is not None]
    ax.plot([r["bits"] for r in trained], [r["qat"] for r in trained], "s-", label="QAT (LSQ)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bits, [("FP32" if b == 32 else f"W{b}A{b}") for b in bits])
    ax.set_ylabel("top-1 % (1k lossless CIFAR-10 test)")
    ax.set_title("ResNet-20: PTQ vs QAT, uniform bits on every layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="QAT epochs at W4A4 and for the learned-widths lane")
    parser.add_argument("--high-bit-epochs", type=int, default=1, help="QAT epochs at W16A16 and W8A8")
    parser.add_argument("--lanes", default="curve,learned")
    parser.add_argument("--target-bits", type=float, default=4.0)
    parser.add_argument("--penalty-weight", type=float, default=5.0, help="BitWidthLearning.penalty_weight")
    parser.add_argument("--adapt-epochs", type=int, default=20, help="input lane: epochs adapting to the 4-bit image")
    parser.add_argument("--seed", type=int, default=0, help="input lane: seed of the adaptation")
    parser.add_argument("--input-roundings", nargs="+", default=["gpfq", "gptq", "nearest"], help="input lane")
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("logs/benchmarks/qat_resnet20"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    lanes = {lane.strip() for lane in args.lanes.split(",")}
    if "curve" in lanes:
        rows = curve(args, args.out)
        print("\n| setting | PTQ top-1 % | QAT top-1 % | gain | QAT epochs | QAT time s |\n|---|---|---|---|---|---|")
        for r in rows:
            name = "FP32" if r["bits"] == 32 else f"W{r['bits']}A{r['bits']}"
            qat = "—" if r["qat"] is None else f"{r['qat']:.2f}"
            gain = "—" if r["qat"] is None else f"{r['qat'] - r['ptq']:+.2f}"
            seconds = "—" if r["seconds"] is None else f"{r['seconds']:.0f}"
            print(f"| {name} | {r['ptq']:.2f} | {qat} | {gain} | {r.get('epochs', '—')} | {seconds} |")
        if args.figure is not None:
            figure(rows, args.figure)
    if "learned" in lanes:
        rows = learned(args, args.out)
        print(f"\nlearned widths: {json.dumps(rows[0]['record'], default=float)}")
        print("\n| plan | avg W bits | PTQ top-1 % | after training % | time s |\n|---|---|---|---|---|")
        for r in rows:
            ptq_top1 = "—" if r["ptq"] is None else f"{r['ptq']:.2f}"
            print(f"| {r['plan']} | {r['avg_w']:.3f} | {ptq_top1} | {r['qat']:.2f} | {r['seconds']:.0f} |")
    if "input" in lanes:
        rows = input_lane(args, args.out)
        print("\n| setting | top-1 % |\n|---|---|")
        for r in rows:
            print(f"| {r['setting']} | {r['top1']:.2f} |")


if __name__ == "__main__":
    main()
