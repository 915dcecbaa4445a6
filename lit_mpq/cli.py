"""The ``lit_mpq`` command line: LightningCLI over :class:`~lit_mpq.module.MPQModule` and lit_mpq's DataModules.

``python cli.py validate --config configs/default.yaml`` runs the quantization callbacks listed in the config;
``python cli.py fit --config ...`` trains the backbone in FP32; ``python cli.py sweep --config ...`` probes once and
evaluates many energy budgets (the accuracy-energy Pareto frontier). Every option is typed and listed by
``python cli.py validate --help``; config files must come after the subcommand.

The common knobs have shortcuts, so a config need not be copied to try another budget or setting::

    python cli.py validate --config configs/resnet20_energy.yaml --budget 0.8xW4A4
    python cli.py validate --config configs/resnet20_cifar10.yaml --bits W4A8

A mistake a user can make (a bad value, a missing file, a misspelled option, no network for pretrained weights)
ends the run with one short message and exit status 2, never a traceback; ``LIT_MPQ_DEBUG=1`` shows the
traceback. A run stopped by SIGTERM exits with status 143 and keeps the files it already wrote.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mpq.data import ClassificationDataModule
from lit_mpq.module import MPQModule
from lit_mpq.shortcuts import SHORTCUT_HELP, apply_shortcuts
from lit_mpq.trainer import MPQTrainer

DESCRIPTION = (
    "lit_mpq: energy-aware mixed-precision post-training quantization of image classifiers. `validate` calibrates, "
    "probes each layer's sensitivity, allocates per-layer bit widths under an energy, size or bit-ops budget, "
    "evaluates the quantized model next to FP32 and reports its energy; `sweep` traces the accuracy-energy "
    "frontier; `fit` trains a backbone in FP32. Example: python cli.py validate --config configs/default.yaml"
)

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "lit_mpq", "default_hp_metric": False},
    },
    "num_sanity_val_steps": 0,
}

SUBCOMMAND_DESCRIPTIONS = {
    "validate": "lit_mpq validate: calibrate, probe, allocate bit widths, evaluate the quantized model next to FP32 "
    "and report its energy, as the config's callbacks say.",
    "sweep": "lit_mpq sweep: probe once, then allocate and evaluate many energy budgets and baselines (the "
    "accuracy-energy frontier).",
    "fit": "lit_mpq fit: train the backbone in FP32 (how the embedded default's checkpoint is made).",
}

REFUSED_SUBCOMMANDS = {
    "test": "lit_mpq quantizes during `validate`; `test` would evaluate the float model and report it as quantized",
    "predict": "lit_mpq quantizes during `validate`; `predict` would run the float model",
}

EXIT_USER_ERROR = 2
EXIT_SIGTERM = 128 + signal.SIGTERM

MAX_MESSAGE_LINES = 8

_QUIET_LOG_MESSAGES = re.compile(
    r"^(💡 Tip|GPU available|TPU available|HPU available|IPU available|LOCAL_RANK|You are using a CUDA device|"
    r"Restoring states|Loaded model weights|Seed set to)"
)


class RunTerminated(Exception):
    """The process received SIGTERM; raised where the run is, so it stops now and exits non-zero."""


class UserError(Exception):
    """A mistake in the command line or the config, already phrased for the user."""


class NoOverwriteSaveConfig(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder, refusing a folder that already holds another run's files.

    Two runs given the same logger name and version would otherwise mix their files silently.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse a run folder that holds another run's results, then save the config as Lightning does."""
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and log_dir is not None:
            held = [name for name in ("results.json", "config.yaml") if os.path.exists(os.path.join(log_dir, name))]
            if held:
                raise UserError(
                    f"the run folder {log_dir!r} already holds another run's {' and '.join(held)}: give the logger "
                    "another name or version (e.g. --trainer.logger.init_args.version=null for the next free one), "
                    "or remove the old run first"
                )
        super().setup(trainer, pl_module, stage)


class MPQCLI(LightningCLI):
    """LightningCLI with lit_mpq's defaults, the ``sweep`` subcommand and the budget/policy/bits shortcuts."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``sweep`` (``test`` and ``predict`` would evaluate the float model)."""
        return {
            "fit": LightningCLI.subcommands()["fit"],
            "validate": LightningCLI.subcommands()["validate"],
            "sweep": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: Any) -> None:
        """The shortcuts ``--bits``, ``--budget`` and ``--policy`` (see :mod:`lit_mpq.quant.shortcuts`)."""
        group = parser.add_argument_group("lit_mpq shortcuts", SHORTCUT_HELP)
        group.add_argument("--bits", type=str | None, default=None, help="Uniform bit widths, e.g. W4A8.")
        group.add_argument(
            "--budget", type=str | None, default=None, help="Budget of ExactAllocation, e.g. 0.8xW4A4, 40uJ, 0.1MB."
        )
        group.add_argument(
            "--policy", type=str | None, default=None, help="Policy class name, e.g. ExactAllocation or Uniform."
        )

    def before_instantiate_classes(self) -> None:
        """Rewrite the BitAllocator entry of ``trainer.callbacks`` from the shortcuts."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        try:
            apply_shortcuts(config)
        except ValueError as err:
            raise UserError(str(err)) from None

    def instantiate_classes(self) -> None:
        """Instantiate, then record the run's global seed in the module's run record."""
        super().instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        seed = config.get("seed_everything")
        if isinstance(self.model, MPQModule) and isinstance(seed, int) and not isinstance(seed, bool):
            self.model.record.seed_everything = seed

    def after_validate(self) -> None:
        """Print each Report's summary after Lightning's own output, so it is the last thing the user sees."""
        from lit_mpq.callbacks import Report

        printed = False
        for callback in self.trainer.callbacks:
            if isinstance(callback, Report) and callback.print_summary and callback.last_summary:
                print(callback.last_summary, flush=True)
                printed = True
        if not printed and getattr(self.model, "quantization_frozen", False):  # a packed model, evaluated as it is
            metrics = self.trainer.callback_metrics
            found = {key: float(metrics[key]) for key in ("val/top1", "val/top5") if key in metrics}
            shown = ", ".join(f"{key.removeprefix('val/')} {value:.2f} %" for key, value in found.items())
            print(f"lit_mpq: packed model {self.model.hparams.checkpoint_path}: {shown}", flush=True)


def main(args: list[str] | None = None, run: bool = True) -> MPQCLI | None:
    """Build the CLI (and run the subcommand when ``run``); user errors end the process with one short message.

    Args:
        args: Command-line arguments; default: ``sys.argv[1:]``.
        run: Run the subcommand; with False only the objects are instantiated (useful in tests).

    Returns:
        The CLI object (``None`` is never returned: errors exit).
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = os.environ.get("LIT_MPQ_DEBUG", "") not in ("", "0")
    refused = next((a for a in argv if not a.startswith("-")), None)
    if refused in REFUSED_SUBCOMMANDS:
        _fail(
            f"`{refused}` is not supported: {REFUSED_SUBCOMMANDS[refused]}. Run `python cli.py validate --config ...`"
            " instead: it evaluates the same split with the quantized model next to FP32."
        )
    _quiet_lightning()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _build(argv, run)
    except RunTerminated:
        print(
            "lit_mpq: stopped by SIGTERM; files written before it (plan.yaml, sensitivity.json) are kept",
            file=sys.stderr,
        )
        sys.exit(EXIT_SIGTERM)
    except SystemExit as exc:
        if exc.code not in (0, None) or type(exc).__name__ != "SIGTERMException":
            raise
        print("lit_mpq: stopped by SIGTERM during evaluation; no results were written", file=sys.stderr)
        sys.exit(EXIT_SIGTERM)
    except Exception as exc:  # noqa: BLE001 - every user error ends in one message; bugs keep their traceback
        message = user_message(exc)
        if message is None or debug:
            raise
        _fail(message)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return None


def _build(argv: list[str], run: bool) -> MPQCLI:
    # Called from Python (tests, notebooks) the arguments come in argv, and Lightning warns when sys.argv holds others;
    # from the command line sys.argv stays whole, since DDP relaunches the other ranks from it.
    from_python = argv != sys.argv[1:]
    saved = sys.argv
    if from_python:
        sys.argv = saved[:1]
    try:
        return _cli(argv if from_python else None, run)
    finally:
        sys.argv = saved


def _cli(args: list[str] | None, run: bool) -> MPQCLI:
    return MPQCLI(
        MPQModule,
        ClassificationDataModule,
        trainer_class=MPQTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=NoOverwriteSaveConfig,
        save_config_kwargs={"overwrite": True},  # the callback itself refuses another run's folder
        parser_kwargs={
            "description": DESCRIPTION,
            "exit_on_error": False,
            **{
                name: {
                    "description": text,
                    "exit_on_error": False,
                    "usage": f"python cli.py {name} --config CONFIG [options]",
                }
                for name, text in SUBCOMMAND_DESCRIPTIONS.items()
            },
        },
        args=args,
        run=run,
    )


def _raise_terminated(signum: int, frame: Any) -> None:
    raise RunTerminated(f"received signal {signum}")


def _fail(message: str) -> None:
    print(f"lit_mpq: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _quiet_lightning() -> None:
    """Hide Lightning's tips and device banners and library deprecation noise; lit_mpq's own messages stay."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not _QUIET_LOG_MESSAGES.match(str(record.getMessage()).strip())

    # Filters on a logger miss records of its children; the handlers Lightning attaches see them all.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_Filter())
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*Consider setting `persistent_workers=True`.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")


# ------------------------------------------------------------------------------------------------ error messages
def user_message(exc: BaseException) -> str | None:
    """The message to show for a user error, or None when ``exc`` is a bug (then the traceback is kept).

    jsonargparse wraps a constructor's error in its own, with the whole namespace appended: this keeps the
    constructor's sentence, drops the dumps, and suggests the closest option name for a misspelled key.
    """
    from lit_mpq.models.factory import PretrainedWeightsUnavailableError

    name = type(exc).__name__
    if name == "ArgumentError" or isinstance(exc, UserError):
        return _shorten(_argument_message(str(exc)))
    if isinstance(exc, PretrainedWeightsUnavailableError | MisconfigurationException | FileNotFoundError):
        return _shorten(str(exc))
    if isinstance(exc, ValueError | PermissionError | IsADirectoryError | NotADirectoryError):
        return _shorten(_argument_message(str(exc)))
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and not isinstance(exc, AssertionError):
        return user_message(cause)
    return None


def _shorten(text: str) -> str:
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > MAX_MESSAGE_LINES:
        lines = [*lines[: MAX_MESSAGE_LINES - 1], f"... ({len(lines) - MAX_MESSAGE_LINES + 1} more lines)"]
    return "\n".join(lines)


_NOISE = re.compile(
    r"(Given value( type)?:|Namespace\(|Expected a <class 'NoneType'>|^Subclass types expect|^Subtypes:|"
    r"^Does not validate against any of|^Errors:$|^Not a valid subclass of|^a class path \(str\)$|^a dict with"
    r"(out)? (class_path|init_args|parameters)|^Type <class|^Unable to load config)"
)


def _argument_message(text: str) -> str:
    kept: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"^\s*- ", "", line).strip()
        line = re.sub(r"^(Parser key \"[^\"]+\":\s*)", "", line)
        line = line.replace("Problem with given class_path ", "").strip()
        if _NOISE.search(line):
            continue
        if re.fullmatch(r"'[\w.]+':", line):
            line = f"in {line[1:-2]}:"
        if line and line not in kept:
            kept.append(line)
    message = "\n".join(kept) or text.strip().splitlines()[0]
    suggestion = _suggest_option(text)
    return f"{message}\n{suggestion}" if suggestion else message


def _suggest_option(text: str) -> str | None:
    """``Did you mean ...?`` for a key that no option has, from the parameters of the classes the message names."""
    bad = re.search(
        r"(?:No action for key|does not accept nested key|Unrecognized arguments:|Option)\s*['\"]?([\w.\-]+)", text
    )
    if bad is None:
        return None
    key = bad.group(1).lstrip("-").split("=")[0].split(".")[-1]
    candidates: set[str] = set()
    for path in re.findall(r"'((?:lit_mpq|lightning)[\w.]+)'", text):
        target = _import(path)
        if target is not None:
            candidates.update(_parameters(target))
    candidates.update(_parameters(MPQTrainer.__init__))
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.6)
    return f"There is no option {key!r}; did you mean {close[0]!r}?" if close else None


def _import(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[attr]), attr)
    except (ImportError, AttributeError, ValueError):
        return None


def _parameters(target: Callable[..., Any]) -> list[str]:
    try:
        return [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return []
