"""Benchmark: pruning + quantization of the pretrained CIFAR-10 ResNet-20, dense-hardware and sparsity-aware energy.

Rows: the dense model, 30 % and 50 % global unstructured magnitude pruning, and 30 % structured channel pruning (each
residual block's inner channels; the residual stream and the classifier are kept), each quantized with uniform W8A8
and with lit_mpq's energy allocation (``configs/resnet20_energy.yaml``: Fisher probe over 2-8 bits, ``ExactAllocation``
at the energy of uniform W4A4 *of the same pruned model*, priced on dense hardware). With ``--finetune-epochs N`` (the
documented run uses 1) every pruned model is also fine-tuned in FP32 before its PTQ, and gets its own rows::

    python benchmarks/pruning_table.py --finetune-epochs 1

Every PTQ row is one run of the config's own validate pipeline in-process (``Pruning`` first, then ``Calibration``,
``SensitivityProbe``, ``BitAllocator``, ``EnergyMeter``): the first 512 lossless training images calibrate, the 1,000
lossless test images evaluate. The pruning is the ``Pruning`` callback's; a fine-tuned model is pruned the same way by
:mod:`lit_mpq.pruning` (magnitude masks kept during training), fine-tuned, made permanent and handed to the run, whose
``Pruning(amount=0)`` then only records its zeros.

Fine-tuning: SGD (momentum 0.9, Nesterov, weight decay 5e-4), batch 128, learning rate ``--lr`` (0.01) annealed to 0
over all steps (cosine), random crop (padding 4) and horizontal flip, on the 4,000 lossless training images, seed 0;
BatchNorm statistics update as usual.

Columns: FP32 top-1 of the (pruned, fine-tuned) float model and quantized top-1 on the 1k test images (%); parameters
that are not zero (of the quantized layers, biases excluded); MACs per image that have a nonzero weight (dense MACs
for a structurally pruned model, which is just smaller); weight size in kbit, dense storage and sparse storage (values
plus a 1-bit-per-weight bitmap where that is smaller); analytic energy per image on dense hardware and on
sparsity-aware hardware (zero-weight MACs skipped, bitmap-compressed weights), Horowitz 45 nm
(:mod:`lit_mpq.energy.sparsity`). Then the key findings.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _runs import quiet_run_args
from torch import nn
from torch.utils.data import DataLoader

from lit_mpq.allocation import ExactAllocation, Policy, Uniform
from lit_mpq.callbacks import BitAllocator, Pruning, SensitivityProbe
from lit_mpq.cli import main as cli_main
from lit_mpq.data import CIFARDataModule
from lit_mpq.models import create_backbone, load_checkpoint
from lit_mpq.pruning import magnitude_prune, make_permanent, prune_channels

DATA = Path("../shared/data")
CONFIG = "configs/resnet20_energy.yaml"
RESIDUAL_STREAM = ["conv1", r"re:layer\d\.\d\.conv2", "linear"]
"""Layers kept by structured pruning: the stem and each block's second conv write into the residual stream, whose
"option A" shortcuts zero-pad channels (torch-pruning cannot follow them); the classifier's outputs are the classes."""
SETTINGS: dict[str, dict | None] = {
    "dense": None,
    "30 % unstructured": {"method": "unstructured", "amount": 0.3, "scope": "global"},
    "50 % unstructured": {"method": "unstructured", "amount": 0.5, "scope": "global"},
    "30 % structured": {"method": "structured", "amount": 0.3, "scope": "layer", "ignored_layers": RESIDUAL_STREAM},
}
POLICIES: dict[str, Policy] = {
    "W8A8": Uniform(8, 8),
    "energy <= W4A4": ExactAllocation(
        energy_relative_to="W4A4", energy_ratio=1.0, w_candidates=[2, 3, 4, 6, 8], a_candidates=[3, 4, 6, 8]
    ),
}
WITHIN_POINTS = 1.0
"""Accuracy-per-size trade-off: the smallest model whose quantized top-1 is within this many points of the best."""


@dataclass
class Row:
    """One line of the table."""

    setting: str
    finetuned: bool
    precision: str
    top1_fp32: float | None = None
    top1: float | None = None
    report: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``"<pruning>[ + FT], <precision>"``."""
        return f"{self.setting}{' + FT' if self.finetuned else ''}, {self.precision}"


def ptq(pruning: Pruning, policy: Policy, out: Path, model: nn.Module | None, fp32: bool) -> tuple[dict, dict]:
    """One validate run of the config with ``pruning`` first and ``policy`` allocating; ``model`` replaces its own."""
    args = [*quiet_run_args(CONFIG, out), f"--model.init_args.fp32_reference={str(fp32).lower()}"]
    cli = cli_main(args, run=False)
    callbacks = cli.trainer.callbacks
    if not policy.requires_sensitivity:
        callbacks[:] = [cb for cb in callbacks if not isinstance(cb, SensitivityProbe)]
    for callback in callbacks:
        if isinstance(callback, BitAllocator):
            callback.policy = policy
    callbacks.insert(0, pruning)
    if model is not None:
        cli.model.model = model
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    return metrics, pruning.report


def pretrained() -> nn.Module:
    model = create_backbone("cifar_resnet20")
    load_checkpoint(model, str(DATA / "cifar10_resnet20.pt"))
    return model.eval()


def finetune(model: nn.Module, data: CIFARDataModule, epochs: int, lr: float) -> float:
    """Fine-tune ``model`` in FP32 in place (see the module docstring); returns the seconds it took."""
    torch.manual_seed(0)
    loader = DataLoader(data.train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return time.perf_counter() - start


def pruned_and_finetuned(settings: dict, data: CIFARDataModule, epochs: int, lr: float) -> tuple[nn.Module, float]:
    """The pretrained model pruned as ``settings`` say (masks kept while training), fine-tuned, pruning permanent."""
    model = pretrained()
    if settings["method"] == "unstructured":
        magnitude_prune(model, settings["amount"], settings["scope"], ["linear"], permanent=False)
    else:
        prune_channels(model, torch.zeros(1, 3, 32, 32), settings["amount"], settings["ignored_layers"], "layer")
    seconds = finetune(model, data, epochs, lr)
    make_permanent(model)
    return model, seconds


# ---------------------------------------------------------------------------------------------------------- output
def _f(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}"


def table(rows: list[Row]) -> str:
    head = (
        "| pruning | PTQ | FP32 top-1 (%) | quantized top-1 (%) | nonzero params | effective MACs (M) | "
        "size dense / sparse (kbit) | energy dense HW (µJ/img) | energy sparsity-aware (µJ/img) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for row in rows:
        r = row.report
        lines.append(
            f"| {row.setting}{' + FT' if row.finetuned else ''} | {row.precision} | {_f(row.top1_fp32, '.1f')} | "
            f"{_f(row.top1, '.1f')} | {r['nonzero_params']:,} / {r['params']:,} | {r['effective_macs'] / 1e6:.2f} | "
            f"{r['dense_weight_bits'] / 1e3:.0f} / {r['stored_weight_bits'] / 1e3:.0f} | "
            f"{r['dense']['total_uj_per_image']:.2f} | {r['sparse']['total_uj_per_image']:.2f} |"
        )
    return "\n".join(lines)


def key_findings(rows: list[Row]) -> str:
    """Best accuracy, smallest model, best accuracy-per-size trade-off, lowest energy (see WITHIN_POINTS)."""
    measured = [row for row in rows if row.top1 is not None]
    best = max(measured, key=lambda row: row.top1)
    smallest = min(measured, key=lambda row: row.report["stored_weight_bits"])
    close = [row for row in measured if row.top1 >= best.top1 - WITHIN_POINTS]
    trade = min(close, key=lambda row: row.report["stored_weight_bits"])
    frugal = min(measured, key=lambda row: row.report["sparse"]["total_uj_per_image"])

    def kbit(row: Row) -> str:
        return f"{row.report['stored_weight_bits'] / 1e3:.0f} kbit"

    def uj(row: Row) -> str:
        return f"{row.report['sparse']['total_uj_per_image']:.2f} µJ/image"

    return "\n".join(
        [
            "Key findings",
            f"- best accuracy: {best.name}: {best.top1:.1f} % ({kbit(best)}, {uj(best)} sparsity-aware)",
            f"- smallest model: {smallest.name}: {kbit(smallest)} at {smallest.top1:.1f} %",
            f"- best accuracy-per-size trade-off (smallest model within {WITHIN_POINTS:g} point of the best "
            f"top-1): {trade.name}: {trade.top1:.1f} % at {kbit(trade)}, "
            f"{best.report['stored_weight_bits'] / trade.report['stored_weight_bits']:.2f}x smaller than the best",
            f"- lowest sparsity-aware energy: {frugal.name}: {uj(frugal)} at {frugal.top1:.1f} % "
            f"(dense hardware: {frugal.report['dense']['total_uj_per_image']:.2f} µJ/image)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finetune-epochs", type=int, default=0, help="FP32 fine-tuning epochs per pruned model")
    parser.add_argument("--lr", type=float, default=0.01, help="peak fine-tuning learning rate")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = args.out or Path(tempfile.mkdtemp(prefix="pruning_table_"))
    data = CIFARDataModule(
        train_npz=str(DATA / "cifar10_train_4k_lossless.npz"), test_npz=str(DATA / "cifar10_test_1k_lossless.npz")
    )
    data.setup("fit")
    start = time.perf_counter()
    rows: list[Row] = []
    notes = []
    variants = [(name, settings, False) for name, settings in SETTINGS.items()]
    if args.finetune_epochs > 0:
        variants += [(name, settings, True) for name, settings in SETTINGS.items() if settings is not None]
    for name, settings, tuned in variants:
        model = None
        if tuned:
            model, seconds = pruned_and_finetuned(settings, data, args.finetune_epochs, args.lr)
            notes.append(f"fine-tuning {name}: {args.finetune_epochs} epochs in {seconds:.0f} s")
        for index, (precision, policy) in enumerate(POLICIES.items()):
            if tuned or settings is None:
                pruning = Pruning(method="unstructured", amount=0.0)  # records the zeros of the model it is given
            else:
                pruning = Pruning(**settings)
            first = index == 0
            metrics, report = ptq(pruning, policy, out, copy.deepcopy(model) if model is not None else None, first)
            row = Row(name, tuned, precision, top1=metrics["val/top1"], report=report)
            row.top1_fp32 = metrics.get("val/top1_fp32") if first else rows[-1].top1_fp32
            rows.append(row)
            print(f"{row.name}: top-1 {row.top1:.2f} % (FP32 {_f(row.top1_fp32, '.2f')} %)", flush=True)
    print()
    print(table(rows))
    print()
    print(key_findings(rows))
    print()
    for note in notes:
        print(note)
    print(f"total {time.perf_counter() - start:.0f} s; runs in {out}")


if __name__ == "__main__":
    main()
