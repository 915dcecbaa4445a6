"""The ``lit_mpq`` command line: LightningCLI over :class:`~lit_mpq.module.MPQModule` and lit_mpq's DataModules.

``python cli.py validate --config configs/default.yaml`` runs the quantization callbacks listed in the config;
``python cli.py fit --config ...`` trains the backbone in FP32; ``python cli.py sweep --config ...`` probes once and
evaluates many energy budgets (the accuracy-energy Pareto frontier). Every option is typed and listed by
``python cli.py validate --help``; config files must come after the subcommand.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lit_mpq.data import ClassificationDataModule
from lit_mpq.module import MPQModule
from lit_mpq.trainer import MPQTrainer

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "lit_mpq", "default_hp_metric": False},
    },
    "num_sanity_val_steps": 0,
}


class MPQCLI(LightningCLI):
    """LightningCLI with lit_mpq's defaults and the ``sweep`` subcommand (see :meth:`MPQTrainer.sweep`)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``sweep``."""
        return {**LightningCLI.subcommands(), "sweep": {"model", "datamodule"}}


def main(args: list[str] | None = None, run: bool = True) -> MPQCLI:
    """Build the CLI (and run the subcommand when ``run``).

    Args:
        args: Command-line arguments; default: ``sys.argv[1:]``.
        run: Run the subcommand; with False only the objects are instantiated (useful in tests).
    """
    return MPQCLI(
        MPQModule,
        ClassificationDataModule,
        trainer_class=MPQTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
