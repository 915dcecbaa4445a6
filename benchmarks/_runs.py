"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this folder is on the path)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lit_mpq.data import ImageFolderDataModule
from lit_mpq.quant.apply import QuantSettings

VIT_RECIPE = QuantSettings(
    act_observer="mse",
    weight_observer="mse",
    weight_granularity="per_channel",
    softmax_quantizer="log_sqrt2",
    softmax_uniform_from_bits=6,
    post_layernorm="reparam",
    act_observer_overrides=((r"blocks\..*\.mlp\.fc2", "percentile"),),
)
"""The calibration settings ``configs/deit.yaml`` had until 2026-12-03, which the study tables of ``docs/vit.md`` used
(``configs/vit_tiny.yaml`` gives the fc2 inputs power-of-two factors instead, ``ptf`` with ``ptf_max_shift: 6``; the
studies that read one histogram several ways use this one). The config now has :data:`VIT_RECIPE_4BIT`."""

VIT_RECIPE_4BIT = dataclasses.replace(
    VIT_RECIPE,
    softmax_underflow="mean",
    post_layernorm="reparam_mse",
    act_observer_overrides=((r"blocks\..*\.mlp\.fc2", "twin_uniform"),),
)
"""The calibration settings of ``configs/deit.yaml`` since 2026-12-03: twin-uniform grids for the post-GELU inputs,
the softmax zero code at the mean of what it stands for, per-channel MSE ranges in the post-LayerNorm fold."""


@torch.inference_mode()
def top1(model: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy in percent of ``model`` (any callable from images to logits) over ``(images, labels)``."""
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def fresh_run_dir(out: Path) -> Path:
    """The next unused ``out/run_<k>`` folder, created: a run never writes into another run's folder."""
    k = 0
    while (out / f"run_{k}").exists():
        k += 1
    (out / f"run_{k}").mkdir(parents=True)
    return out / f"run_{k}"


def envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The frontier through ``points`` (energy, top-1): the best top-1 at that energy or less, in energy order."""
    ordered = sorted(points)
    return [(energy, max(top for e, top in ordered if e <= energy)) for energy, _ in ordered]


def write_quiet_config(config: dict, out: Path, label: str) -> tuple[Path, Path]:
    """A copy of ``config`` with no logger, bar or figures, written beside a fresh run folder under ``out``.

    Returns:
        The run folder and the config file (``<run>_<label>.yaml``).
    """
    config = yaml.safe_load(yaml.safe_dump(config))
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("Report"):
            callback.setdefault("init_args", {})["save_figures"] = False
    config["trainer"]["logger"] = False
    config["trainer"]["enable_progress_bar"] = False
    run = fresh_run_dir(out)
    path = run.parent / f"{run.name}_{label}.yaml"
    path.write_text(yaml.safe_dump(config))
    return run, path


def quiet_sweep(config: dict, out: Path, label: str, sweep_args: Sequence[str]) -> tuple[Path, float]:
    """Run ``python cli.py sweep`` on an edited config dict with no logger, bar or figures, in a fresh folder.

    The config is written beside the run folder (the CLI saves its own copy inside it); the baselines are uniform
    W8A8 and W4A4, no seed rule, no random allocations; ``sweep_args`` add the budgets.

    Returns:
        The run folder (its sweep under ``sweep/``) and the wall time in seconds.
    """
    from lit_mpq.cli import main as cli_main  # the CLI imports the whole package: only when a sweep runs

    run, path = write_quiet_config(config, out, label)
    start = time.perf_counter()
    cli_main(
        [
            "sweep",
            "--config",
            str(path),
            f"--trainer.default_root_dir={run}",
            *sweep_args,
            "--baselines=[W8A8, W4A4]",
            "--seed_rule=false",
            "--num_random=0",
            f"--output_dir={run / 'sweep'}",
        ]
    )
    return run, time.perf_counter() - start


def quiet_run_args(config: str, out: Path) -> list[str]:
    """CLI arguments for one benchmark run of ``config``: no logger, bar or summary, in a fresh folder under ``out``."""
    return [
        "--config",
        config,
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={fresh_run_dir(out)}",  # one folder per run: runs never share results
    ]


def imagenet_data(root: Path, backbone: str, calibration: int, batch_size: int = 100) -> ImageFolderDataModule:
    """The shared ImageNet images for ``backbone``, set up.

    ``calibration`` images of ``imagenet_sample_1000`` to calibrate, the 1,300 of ``imagenet_val_1300`` to evaluate,
    labelled through ``imagenet_classes.txt``.
    """
    data = ImageFolderDataModule(
        root=str(root),
        val_dir="imagenet_val_1300",
        calib_dir="imagenet_sample_1000",
        classes_file=str(Path(root) / "imagenet_classes.txt"),
        backbone=backbone,
        batch_size=batch_size,
        num_workers=2,
        num_calibration_samples=calibration,
    )
    data.setup("validate")
    return data


def evenly_spaced(dataset: Dataset, limit: int | None) -> Dataset:
    """``limit`` images spread evenly over ``dataset`` (class folders are sorted: the first N would be few classes)."""
    if limit is None or limit >= len(dataset):
        return dataset
    indices = torch.linspace(0, len(dataset) - 1, limit).round().long().unique().tolist()
    return Subset(dataset, indices)


def cached_batches(dataset: Dataset, batch_size: int, num_workers: int) -> list[tuple[Tensor, Tensor]]:
    """Every batch of ``dataset``, decoded once (the evaluation repeats for every row)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    return [(x, y) for x, y in loader]
