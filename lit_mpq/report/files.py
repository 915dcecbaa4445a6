"""Result files: ``results.json`` and CSV tables, written from plain dicts that may hold NumPy or torch values.

Values are converted to plain Python before writing: NumPy and torch scalars become ``int``/``float``/``bool``,
arrays and tensors become (nested) lists, paths become strings, and NaN or infinite floats become JSON ``null``
(an empty cell in CSV), so the files are strict JSON and load anywhere.

Example:
    >>> import json, tempfile, pathlib
    >>> path = write_results_json(pathlib.Path(tempfile.mkdtemp()) / "results.json", {"top1": float("nan")})
    >>> json.loads(path.read_text())
    {'top1': None}
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["to_plain", "write_csv", "write_results_json"]


def to_plain(value: Any) -> Any:
    """Convert ``value`` to JSON-ready plain Python, recursively.

    Args:
        value: A scalar, NumPy/torch scalar, array or tensor, dataclass, mapping, sequence, set or path.

    Returns:
        ``None`` for NaN and infinite floats; ``bool``/``int``/``float``/``str`` for scalars; lists for
        sequences, sets (sorted by their text), arrays and tensors; dicts with string keys for mappings and
        dataclasses.

    Raises:
        TypeError: If a value has no plain form (the message names its type).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return to_plain(value.item())
    if isinstance(value, np.ndarray):
        return to_plain(value.tolist())
    if isinstance(value, torch.Tensor):
        return to_plain(value.detach().cpu().tolist())
    if isinstance(value, enum.Enum):
        return to_plain(value.value)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain({field.name: getattr(value, field.name) for field in dataclasses.fields(value)})
    if isinstance(value, Mapping):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return [to_plain(item) for item in sorted(value, key=str)]
    raise TypeError(f"cannot write a value of type {type(value).__name__} to a results file: {value!r}")


def write_results_json(path: str | Path, results: Mapping[str, Any]) -> Path:
    """Write ``results`` as strict JSON (keys sorted, indent 2, NaN as ``null``); parents are created.

    Args:
        path: Destination file, e.g. ``<log_dir>/results.json``.
        results: The results; NumPy/torch values, dataclasses and paths are converted with :func:`to_plain`.

    Returns:
        The path written.

    Raises:
        ValueError: If ``results`` is not a mapping.
        TypeError: If a value cannot be converted to JSON.
    """
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict of name -> value, got {type(results).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_plain(results), sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _csv_cell(value: Any) -> Any:
    """A CSV cell: plain scalars as they are, missing or NaN as empty, containers as compact JSON."""
    plain = to_plain(value)
    if plain is None:
        return ""
    if isinstance(plain, (dict, list)):
        return json.dumps(plain, sort_keys=True, separators=(",", ":"))
    return plain


def write_csv(path: str | Path, rows: list[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as a CSV table with a header; parents are created.

    The columns are the union of the rows' keys in first-seen order; a row without a column gets an empty cell,
    as does ``None`` or NaN. Lists and dicts are written as compact JSON.

    Args:
        path: Destination file.
        rows: One dict per row, e.g. ``QuantPlan.summary_rows()`` or ``energy_report(...)["per_layer"]``.

    Returns:
        The path written.

    Raises:
        ValueError: If ``rows`` is empty or holds something other than dicts.
    """
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError("write_csv needs a non-empty list of dicts (one per row)")
    columns: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"write_csv row {i} is a {type(row).__name__}: every row must be a dict")
        columns.update(dict.fromkeys(str(key) for key in row))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({str(key): _csv_cell(value) for key, value in row.items()})
    return path
