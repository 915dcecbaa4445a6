"""MPQTrainer: Lightning's Trainer plus ``sweep``, the accuracy-energy Pareto sweep behind ``python cli.py sweep``.

The sweep itself lives in :mod:`lit_mpq.sweep`; this class only gives LightningCLI a ``sweep`` subcommand whose
options are the arguments of :meth:`MPQTrainer.sweep`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lit_mpq.sweep.points import SweepSettings
from lit_mpq.sweep.runner import run_sweep


class MPQTrainer(pl.Trainer):
    """``lightning.pytorch.Trainer`` with a :meth:`sweep` subcommand."""

    def validate(
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | Path | None = None,
        verbose: bool = False,
        datamodule: pl.LightningDataModule | None = None,
        weights_only: bool | None = None,
    ) -> list[Mapping[str, float]]:
        """Lightning's ``validate``, quiet by default: the ``Report`` callback's summary replaces the metrics table.

        Args:
            model: The MPQModule.
            dataloaders: Evaluation dataloaders (default: the datamodule's).
            ckpt_path: Checkpoint to restore before evaluating.
            verbose: Also print Lightning's table of every logged metric.
            datamodule: The DataModule.
            weights_only: Passed to Lightning's checkpoint loading.
        """
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def sweep(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        num_budgets: int = 10,
        budgets: list[float] | None = None,
        relative_to: str = "W4A4",
        w_candidates: list[int] | None = None,
        a_candidates: list[int] | None = None,
        baselines: list[str] = ["W8A8", "W6A6", "W4A8", "W4A4"],  # noqa: B006 - shown by jsonargparse
        seed_rule: bool = True,
        splits: list[str] = [],  # noqa: B006 - shown by jsonargparse
        split_bits: list[int] = [3, 5],  # noqa: B006
        num_random: int = 0,
        output_dir: str | None = None,
    ) -> list[dict[str, Any]]:
        """Probe once, then allocate and evaluate for many energy budgets and baselines.

        The config's own allocation is evaluated first, in the config's own run; every other point gets its own run
        in ``<output_dir>/<point name>`` (plan, results, card, figures, TensorBoard). The table is printed at the end
        and written as ``pareto.csv`` and ``pareto.md`` (rewritten after every point), with ``pareto.png`` and
        ``summary.png``; see :mod:`lit_mpq.sweep.runner`.

        Args:
            model: The MPQModule.
            datamodule: The DataModule.
            num_budgets: Number of budgets, spread evenly between the lowest and highest energy the candidates
                allow (used when ``budgets`` is not given).
            budgets: Explicit budgets as multiples of ``relative_to``'s uniform energy, e.g. [0.8, 1.0, 1.2].
            relative_to: Uniform setting whose energy is the unit of ``budgets`` and of random allocations.
            w_candidates: Weight bit widths the solver may pick; default: the probe's candidates.
            a_candidates: Activation bit widths the solver may pick; default: the probe's candidates.
            baselines: Uniform settings evaluated as baselines (``W<b>A<b>``).
            seed_rule: Also evaluate the seed percentile rule (weights 4/6/8 by sensitivity, A8).
            splits: Weight splits to evaluate, any of ``asc`` (the first half of the weights, by cumulative weight
                count in layer order, at the lower of ``split_bits``, the second half at the higher) and ``desc``
                (the reverse), activations at 8 bits; e.g. ``[asc, desc]``.
            split_bits: The two weight bit widths of the splits.
            num_random: Random allocations at ``relative_to``'s energy (exact solver, random objective).
            output_dir: Where the sweep's files go; default: ``<log dir>/sweep``.

        Returns:
            One row per evaluated point (name, kind, policy, budget ratio, top-1 in %, energy, size, average bits),
            the config's own first; budgets without a feasible allocation are skipped and listed in ``pareto.md``.

        Raises:
            MisconfigurationException: If the config lacks a BitAllocator, an EnergyMeter or a SensitivityProbe.
            ValueError: On bad settings (checked before anything runs).
        """
        settings = SweepSettings(
            num_budgets=num_budgets,
            budgets=budgets,
            relative_to=relative_to,
            w_candidates=w_candidates,
            a_candidates=a_candidates,
            baselines=baselines,
            seed_rule=seed_rule,
            splits=tuple(splits),
            split_bits=tuple(split_bits),
            num_random=num_random,
            output_dir=output_dir,
        )
        return run_sweep(self, model, datamodule, settings)
