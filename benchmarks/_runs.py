"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this folder is on the path)."""

from __future__ import annotations

from pathlib import Path


def fresh_run_dir(out: Path) -> Path:
    """The next unused ``out/run_<k>`` folder, created: a run never writes into another run's folder."""
    k = 0
    while (out / f"run_{k}").exists():
        k += 1
    (out / f"run_{k}").mkdir(parents=True)
    return out / f"run_{k}"


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
