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
