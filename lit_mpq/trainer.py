"""MPQTrainer: Lightning's Trainer plus ``sweep``, the accuracy-energy Pareto sweep behind ``python cli.py sweep``.

A sweep runs the config's callbacks once (calibration and the sensitivity probe happen a single time), then
re-allocates and re-evaluates the model for K energy budgets with the exact solver, plus baselines: uniform
settings, the seed percentile rule, and optionally random allocations at the budget of the reference setting.
It writes ``pareto.csv``, ``pareto.png``, ``summary.png`` (the config's own allocation with the frontier),
per-point plans and results under ``sweep/``, and
TensorBoard scalars ``sweep/top1`` and ``sweep/energy_uj_per_image`` (step = point index).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tqdm.auto import tqdm

from lit_mpq.allocation import ExactAllocation, Policy, SensitivityPercentile, Uniform
from lit_mpq.allocation.exact import parse_uniform_setting
from lit_mpq.allocation.random import RandomAllocation
from lit_mpq.callbacks import BitAllocator, EnergyMeter, Report, SensitivityProbe
from lit_mpq.energy import uniform_energy
from lit_mpq.report import pareto_figure, save_figure, summary_figure, write_csv


class MPQTrainer(pl.Trainer):
    """``lightning.pytorch.Trainer`` with a :meth:`sweep` subcommand."""

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
        num_random: int = 0,
        output_dir: str | None = None,
    ) -> list[dict[str, Any]]:
        """Probe once, then allocate and evaluate for many energy budgets and baselines.

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
            num_random: Random allocations at ``relative_to``'s energy (exact solver, random objective).
            output_dir: Where the sweep's files go; default: ``<log dir>/sweep``.

        Returns:
            One row per evaluated point: name, kind, budget ratio, top-1, energy, size, average bits.

        Raises:
            MisconfigurationException: If the config lacks a BitAllocator, an EnergyMeter or a SensitivityProbe.
            ValueError: On bad budgets or settings.
        """
        allocator = self._find(BitAllocator)
        probe = self._find(SensitivityProbe)
        self._find(EnergyMeter)
        reports = [cb for cb in self.callbacks if isinstance(cb, Report)]
        if budgets is not None and any(b <= 0 for b in budgets):
            raise ValueError(f"budgets are multiples of {relative_to}'s energy and must be positive, got {budgets}")
        if num_budgets < 1 and not budgets:
            raise ValueError(f"num_budgets must be at least 1, got {num_budgets}")
        for setting in [relative_to, *baselines]:
            parse_uniform_setting(setting)
        w_candidates = list(w_candidates or probe.candidate_bits)
        a_candidates = list(a_candidates or probe.candidate_bits)

        # First point: the config's own policy; it runs calibration and the probe.
        base_dir = None
        points: list[tuple[str, str, float | None, Policy]] = [("config", "config", None, allocator.policy)]
        rows: list[dict[str, Any]] = []
        fp32 = {"top1": math.nan}
        summary: dict[str, Any] = {}
        expected = 1 + (len(budgets) if budgets else num_budgets) + len(baselines) + int(seed_rule) + num_random
        progress = tqdm(desc="sweep", unit="point", disable=not self.is_global_zero, total=expected)

        def evaluate(name: str, kind: str, ratio: float | None, policy: Policy) -> None:
            nonlocal base_dir
            allocator.policy = policy
            allocator._done = False
            if base_dir is not None:
                for report in reports:
                    report.output_dir = str(base_dir / name)
            metrics = self.validate(model, datamodule, verbose=False)[0]
            if base_dir is None:
                base_dir = Path(output_dir) if output_dir else Path(self.log_dir or self.default_root_dir) / "sweep"
            if "val/top1_fp32" in metrics:
                fp32["top1"] = 100 * float(metrics["val/top1_fp32"])
            model.hparams.fp32_reference = False  # the FP32 figure is the same for every point
            rows.append({**self._row(name, kind, ratio, policy, metrics), "top1_fp32": fp32["top1"]})
            if kind == "config":  # the summary figure shows the config's own allocation
                summary["plan"] = copy.deepcopy(model.plan)
                summary["energy"] = copy.deepcopy(model.results.get("energy", {}))
            progress.update(1)
            progress.set_postfix_str(f"{name}: top1 {rows[-1]['top1']:.2f} % at {rows[-1]['energy_uj']:.2f} µJ")

        evaluate(*points[0])
        plan = model.plan
        energy_model = model.energy_model
        unit_uj = uniform_energy(plan, energy_model, *parse_uniform_setting(relative_to)).total_pj / 1e6
        if budgets is None:
            low, high = self._energy_span(plan, energy_model, w_candidates, a_candidates)
            budgets = (
                [low / unit_uj]
                if num_budgets == 1
                else [(low + (high - low) * k / (num_budgets - 1)) / unit_uj for k in range(num_budgets)]
            )
        points = [
            (
                f"budget_{k:02d}",
                "budget",
                ratio,
                ExactAllocation(
                    w_candidates=w_candidates,
                    a_candidates=a_candidates,
                    energy_relative_to=relative_to,
                    energy_ratio=ratio,
                ),
            )
            for k, ratio in enumerate(budgets)
        ]
        points += [(f"uniform_{s}", "uniform", None, Uniform(*parse_uniform_setting(s))) for s in baselines]
        if seed_rule:
            points.append(("seed_rule", "seed_rule", None, SensitivityPercentile(target="w", a_bits=8)))
        points += [
            (
                f"random_{i}",
                "random",
                1.0,
                RandomAllocation(
                    seed=i, w_candidates=w_candidates, a_candidates=a_candidates, energy_relative_to=relative_to
                ),
            )
            for i in range(num_random)
        ]
        for point in points:
            try:
                evaluate(*point)
            except ValueError as err:  # an infeasible budget: report it and go on with the others
                rank_zero_info(f"sweep point {point[0]} skipped: {err}")
        progress.close()
        self._write(rows, base_dir, summary)
        return rows

    # ----------------------------------------------------------------------------------------------- helpers
    def _find(self, kind: type) -> Any:
        for callback in self.callbacks:
            if isinstance(callback, kind):
                return callback
        raise MisconfigurationException(
            f"`sweep` needs lit_mpq.callbacks.{kind.__name__} in trainer.callbacks (see configs/resnet20_cifar10.yaml)"
        )

    @staticmethod
    def _energy_span(plan, energy_model, w_candidates, a_candidates) -> tuple[float, float]:
        """Lowest and highest energy (µJ) reachable with the candidates, pinned layers at their bits."""
        low = high = 0.0
        for spec, decision in plan.items():
            if decision.pinned:
                e = energy_model.layer(spec, decision.w_bits, decision.a_bits).total_pj
                low, high = low + e, high + e
                continue
            options = [energy_model.layer(spec, w, a).total_pj for w in w_candidates for a in a_candidates]
            low, high = low + min(options), high + max(options)
        return low / 1e6, high / 1e6

    @staticmethod
    def _row(name, kind, ratio, policy, metrics) -> dict[str, Any]:
        value = lambda key: float(metrics.get(key, math.nan))  # noqa: E731
        return {
            "name": name,
            "kind": kind,
            "policy": policy.describe(),
            "budget_ratio": ratio,
            "top1": 100 * value("val/top1"),
            "top5": 100 * value("val/top5"),
            "energy_uj": value("energy/analytic_uj_per_image"),
            "relative_to_int8": value("energy/relative_to_int8"),
            "avg_weight_bits": value("bits/avg_weight"),
            "avg_act_bits": value("bits/avg_act"),
            "weights_mb": value("size/weights_mb"),
            "bit_ops_g": value("bits/bit_ops_g"),
        }

    def _write(self, rows: list[dict[str, Any]], base_dir: Path | None, summary: dict[str, Any]) -> None:
        if not self.is_global_zero or base_dir is None:
            return
        base_dir.mkdir(parents=True, exist_ok=True)
        write_csv(base_dir / "pareto.csv", rows)
        figure_rows = [r for r in rows if r["kind"] != "config"]
        figures = {
            "pareto": pareto_figure(figure_rows),
            "summary": summary_figure(summary["plan"], summary["energy"], figure_rows),
        }
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                for step, row in enumerate(figure_rows):
                    logger.experiment.add_scalar("sweep/top1", row["top1"], step)
                    logger.experiment.add_scalar("sweep/energy_uj_per_image", row["energy_uj"], step)
                for name, fig in figures.items():
                    logger.experiment.add_figure(f"sweep/{name}", fig, 0, close=False)
                logger.experiment.flush()
        for name, fig in figures.items():
            save_figure(fig, base_dir / f"{name}.png")
        rank_zero_info(f"sweep: {len(rows)} points written to {base_dir / 'pareto.csv'}")
