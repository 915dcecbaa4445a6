"""Run a sweep on a Lightning Trainer: probe once, then allocate and evaluate every point in its own run.

The first point is the config's own allocation, evaluated in the config's own run (calibration and the sensitivity
probe happen there, once). Every later point gets its own run: the Trainer's TensorBoard and CSV loggers are swapped
for ones writing to ``<sweep dir>/<point name>`` and the ``Report`` callbacks write there too, so each point has its
own plan, results, card, figures and TensorBoard hparams row, and the config's run keeps its own. The original
loggers come back at the end, where the sweep adds its scalars (``sweep/top1``, ``sweep/energy_uj_per_image``, step =
point index), its table and its figures to the config's run.

A budget with no feasible allocation (:class:`~lit_mpq.allocation.solver.InfeasibleBudgetError`) is skipped and
listed; any other error stops the sweep with its own message. ``pareto.csv`` and ``pareto.md`` are rewritten after
every point, so the rows done so far are on disk whatever happens.

This is the Lightning side of :mod:`lit_mpq.sweep`. It talks to the callbacks only through their public interface:
``BitAllocator.policy`` (the allocator allocates afresh in every validation run, with the policy it then holds),
``Report.output_dir``, ``Report.print_summary`` (the points after the first print no summary of their own: the
table at the end has them all) and ``Report.probe_figures`` (the points draw no sensitivity figures: the probe's are
in the config's run), and :func:`lit_mpq.callbacks.allocation.energy_model_of`.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mpq.allocation import ExactAllocation
from lit_mpq.allocation.solver import InfeasibleBudgetError
from lit_mpq.callbacks import BitAllocator, EnergyMeter, Export, Report, SensitivityProbe
from lit_mpq.callbacks.allocation import energy_model_of
from lit_mpq.report import pareto_figure, save_figure, summary_figure
from lit_mpq.sweep.points import CONFIG_POINT, SweepPoint, SweepSettings, sweep_points
from lit_mpq.sweep.table import markdown_table, sweep_row, write_tables

__all__ = ["run_sweep"]


def _find(trainer: pl.Trainer, kind: type) -> Any:
    """The first callback of type ``kind``, or a message naming the callback the sweep needs."""
    for callback in trainer.callbacks:
        if isinstance(callback, kind):
            return callback
    raise MisconfigurationException(
        f"`sweep` needs lit_mpq.callbacks.{kind.__name__} in trainer.callbacks (see configs/resnet20_energy.yaml)"
    )


def _logger_for_point(logger: Logger, sweep_dir: Path, name: str) -> Logger:
    """A logger like ``logger`` whose run is ``<sweep_dir>/<name>``; loggers of other kinds are kept as they are."""
    if isinstance(logger, TensorBoardLogger):
        # The config's run logs hparams from the Report with its metrics; no placeholder hp_metric per point either.
        return TensorBoardLogger(save_dir=sweep_dir.parent, name=sweep_dir.name, version=name, default_hp_metric=False)
    if isinstance(logger, CSVLogger):
        return CSVLogger(save_dir=sweep_dir.parent, name=sweep_dir.name, version=name)
    return logger


@contextmanager
def _point_run(trainer: pl.Trainer, reports: Sequence[Report], sweep_dir: Path, name: str) -> Iterator[None]:
    """Send the loggers and the ``Report`` and ``Export`` callbacks to the point's own run for the block, and back."""
    loggers = list(trainer.loggers)
    saved = [(report.output_dir, report.print_summary, report.probe_figures) for report in reports]
    trainer.loggers = [_logger_for_point(logger, sweep_dir, name) for logger in loggers]
    for report in reports:
        # Explicit, so a run without a logger (output in default_root_dir) also gets a folder per point.
        report.output_dir = str(sweep_dir / name)
        # One summary per point would bury the sweep's table, which says the same for every point at the end.
        report.print_summary = False
        # The probe is the config run's: its figures are there, and would be the same in every point.
        report.probe_figures = False
    # Each point ships its own quantized.pt and model.onnx, and its own plan.yaml, beside its results (without a
    # logger the run folder is default_root_dir, the config run's: every point would overwrite its plan there).
    redirected = [callback for callback in trainer.callbacks if isinstance(callback, Export | BitAllocator)]
    saved_dirs = [callback.output_dir for callback in redirected]
    for callback in redirected:
        callback.output_dir = str(sweep_dir / name)
    try:
        yield
    finally:
        for callback, output_dir in zip(redirected, saved_dirs, strict=True):
            callback.output_dir = output_dir
        trainer.loggers = loggers
        for report, (output_dir, print_summary, probe_figures) in zip(reports, saved, strict=True):
            report.output_dir, report.print_summary, report.probe_figures = output_dir, print_summary, probe_figures


def _check_candidates(settings: SweepSettings, probe: SensitivityProbe) -> None:
    """Stop before any work when the solver's candidates include bit widths the probe does not score."""
    for what, bits in (("w_candidates", settings.w_candidates), ("a_candidates", settings.a_candidates)):
        missing = sorted(set(bits or ()) - set(probe.candidate_bits))
        if missing:
            raise ValueError(
                f"sweep {what}={list(bits or ())} include {missing}, which SensitivityProbe.candidate_bits="
                f"{probe.candidate_bits} does not probe: the solver needs a sensitivity for every candidate. Add them "
                "to the probe's candidate_bits or choose the candidates among them"
            )


def _say(trainer: pl.Trainer, text: str, stream: Any = None) -> None:
    """Print ``text`` once (rank 0): the sweep's table and notes are its output, not log records."""
    if trainer.is_global_zero:
        print(text, file=stream or sys.stdout, flush=True)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _result_text(row: dict[str, Any]) -> str:
    """``"top-1 91.30 % at 61.06 µJ/image"`` for a progress line."""
    top1, energy = row["top1"], row["energy_uj"]
    accuracy = f"top-1 {top1:.2f} %" if top1 is not None else "top-1 not measured"
    return accuracy + (f" at {energy:.4g} µJ/image" if energy is not None else "")


def run_sweep(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    settings: SweepSettings,
) -> list[dict[str, Any]]:
    """Probe once, then allocate and evaluate every point of ``settings``; write, print and log the table.

    Args:
        trainer: The Trainer, with the config's callbacks: ``Calibration``, ``SensitivityProbe``, ``BitAllocator``,
            ``EnergyMeter`` and usually ``Report``.
        model: The ``MPQModule``.
        datamodule: The DataModule.
        settings: What to evaluate.

    Returns:
        One row per evaluated point at full precision (:func:`lit_mpq.sweep.table.sweep_row`), the config's first.

    Raises:
        MisconfigurationException: If a needed callback is missing.
        ValueError: If the solver's candidates include bit widths the probe does not score, or ``output_dir`` holds
            another sweep's table (both before any work).
        Exception: Whatever stops a point other than an infeasible budget, unchanged (the rows done are on disk).
    """
    allocator: BitAllocator = _find(trainer, BitAllocator)
    probe: SensitivityProbe = _find(trainer, SensitivityProbe)
    _find(trainer, EnergyMeter)
    reports = [callback for callback in trainer.callbacks if isinstance(callback, Report)]
    _check_candidates(settings, probe)
    if settings.output_dir and (Path(settings.output_dir) / "pareto.csv").exists():
        # The default folder is inside a fresh run folder; an explicit one may hold an earlier sweep's table.
        raise ValueError(
            f"sweep output_dir {settings.output_dir!r} already holds another sweep's pareto.csv: choose another "
            "folder, or leave output_dir unset to write into the run's own folder"
        )
    # The config's own point, in the config's own run: calibration and the probe happen here, once.
    config = SweepPoint(CONFIG_POINT, CONFIG_POINT, allocator.policy)
    metrics = trainer.validate(model, datamodule, verbose=False)[0]
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
    sweep_dir = Path(settings.output_dir) if settings.output_dir else run_dir / "sweep"
    fp32_top1 = metrics.get("val/top1_fp32")
    rows = [sweep_row(config, metrics, fp32_top1)]
    skipped: list[tuple[str, str]] = []
    config_plan = copy.deepcopy(model.plan)
    config_energy = copy.deepcopy(model.record.energy) or {}
    energy_name, energy_source = config_energy.get("model"), config_energy.get("source")
    # One line per point rather than a second progress bar beside Lightning's (one style, which follows the
    # trainer's enable_progress_bar).
    show_progress = trainer.progress_bar_callback is not None
    total = settings.expected_points

    def progress(done: int, text: str) -> None:
        if show_progress:
            _say(trainer, f"sweep {done}/{total}: {text}")

    progress(1, f"{config.name}: {_result_text(rows[0])}")

    def write() -> None:
        if trainer.is_global_zero:
            write_tables(sweep_dir, rows, energy_name, energy_source, skipped)

    write()
    policy = config.policy
    config_candidates = (policy.w_candidates, policy.a_candidates) if isinstance(policy, ExactAllocation) else None
    points = sweep_points(settings, model.plan, energy_model_of(trainer), probe.candidate_bits, config_candidates)
    fp32_reference = model.hparams.get("fp32_reference")
    current = config
    try:
        # The FP32 accuracy does not change from point to point: measure it once, in the config's run.
        if fp32_reference is not None:
            model.hparams.fp32_reference = False
        for current in points:
            # BitAllocator allocates afresh in every validation run, with the policy it holds at that time.
            allocator.policy = current.policy
            with _point_run(trainer, reports, sweep_dir, current.name):
                try:
                    metrics = trainer.validate(model, datamodule, verbose=False)[0]
                except InfeasibleBudgetError as err:
                    skipped.append((current.name, str(err)))
                    _say(trainer, f"sweep {len(rows) + len(skipped)}/{total}: {current.name} skipped: {_one_line(err)}")
                    write()
                    continue
            rows.append(sweep_row(current, metrics, fp32_top1))
            write()
            progress(len(rows) + len(skipped), f"{current.name}: {_result_text(rows[-1])}")
    except BaseException:
        _say(
            trainer,
            f"sweep stopped at point {current.name}; the {len(rows)} rows done are in {sweep_dir / 'pareto.csv'}",
            sys.stderr,
        )
        raise
    finally:
        allocator.policy = config.policy
        if fp32_reference is not None:
            model.hparams.fp32_reference = fp32_reference
    table = markdown_table(rows, energy_name, energy_source, skipped)
    if trainer.is_global_zero:
        figures = {
            "pareto": pareto_figure(rows, fp32_top1=fp32_top1),
            "summary": summary_figure(
                config_plan,
                config_energy or None,
                rows,
                top1=rows[0]["top1"],
                top1_fp32=fp32_top1,
                candidate_bits=probe.candidate_bits,
            ),
        }
        _log_tensorboard(trainer.loggers, rows, table, figures)
        for name, fig in figures.items():
            save_figure(fig, sweep_dir / f"{name}.png")
    _say(trainer, "\n" + table)
    _say(
        trainer,
        f"sweep: {len(rows)} points evaluated, {len(skipped)} skipped; pareto.csv, pareto.md and the figures are in "
        f"{sweep_dir}, each point's own files and TensorBoard run in {sweep_dir}/<point>",
    )
    if not rows[1:] and points:
        rank_zero_warn("sweep: every point after the config's own was skipped; see the reasons above")
    return rows


def _log_tensorboard(
    loggers: Sequence[Logger], rows: Sequence[dict[str, Any]], table: str, figures: dict[str, Any]
) -> None:
    """Add the sweep's scalars (step = point index), table and figures to the config's own TensorBoard run."""
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment
        for step, row in enumerate(rows):
            if row["top1"] is not None:
                writer.add_scalar("sweep/top1", row["top1"], step)
            if row["energy_uj"] is not None:
                writer.add_scalar("sweep/energy_uj_per_image", row["energy_uj"], step)
        writer.add_text("sweep/table", table, 0)
        for name, fig in figures.items():
            writer.add_figure(f"sweep/{name}", fig, 0, close=False)
        writer.flush()
