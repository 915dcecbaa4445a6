"""On-disk cache of sensitivity tables, keyed on the content the probe saw.

The key is a SHA-256 over the model's float weights, the calibration images' pixels (one digest per image, in
calibration order, as the loader delivers them), and every setting that changes the scores (quantizer settings,
calibration size and batching, metric, candidate bits, probed tensors, subsampling). Settings that cannot change
the scores stay out of it: the number of evaluation images, the device count (calibration is cut into the same
batches on any number of devices), paths and names. So a replaced calibration file misses, and a one-device table
serves a two-device run.

Entries are written atomically (a temporary file renamed over the target); an unreadable or truncated entry is
ignored with a warning and rewritten, and a cache folder that cannot be written is a warning, never a failure after
a full probe.

Example:
    >>> import tempfile
    >>> cache = ProbeCache(tempfile.mkdtemp())
    >>> key = probe_cache_key({}, [image_digest(torch.zeros(3))], {"metric": "output_l2"})
    >>> cache.store(key, {"layers": {}}) is not None
    True
    >>> cache.load(key)
    {'layers': {}}
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CACHE_FORMAT", "ProbeCache", "image_digest", "probe_cache_key", "weights_digest"]

CACHE_FORMAT = 4
"""Version of the key recipe and file layout; entries of another version never match.

Also bumped when the code behind the scores changes what a key stands for (4: the histogram observers' bins became
linear within each octave, which moves percentile and MSE activation ranges, and so the activation scores).
"""

SKIPPED_STATE = ("quantizer", "bias_correction")
"""State-dict entries that calibration fills (observer statistics): they are covered by the data and settings."""


def image_digest(image: Tensor) -> bytes:
    """SHA-256 of one image's values as the loader delivered them (dtype and shape included)."""
    data = image.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.numpy().tobytes())
    return digest.digest()


def weights_digest(state_dict: Mapping[str, Tensor]) -> bytes:
    """SHA-256 of a model's tensors by name, leaving out the statistics that calibration fills."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        if any(part in name for part in SKIPPED_STATE):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


def probe_cache_key(
    state_dict: Mapping[str, Tensor], image_digests: Iterable[bytes], settings: Mapping[str, Any]
) -> str:
    """Key of one probe result.

    Args:
        state_dict: The model's state dict (quantized layers included; observer statistics are skipped).
        image_digests: :func:`image_digest` of every calibration image, in calibration order.
        settings: Every setting that changes the scores (plain JSON data).

    Returns:
        24 hex characters.
    """
    digest = hashlib.sha256(f"lit_mpq probe cache v{CACHE_FORMAT}".encode())
    digest.update(weights_digest(state_dict))
    count = 0
    for item in image_digests:
        digest.update(item)
        count += 1
    digest.update(json.dumps({"images": count, **settings}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


class ProbeCache:
    """A folder of JSON sensitivity tables, one file per key.

    Args:
        directory: The cache folder (created on first store).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        """File of ``key``."""
        return self.directory / f"{key}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        """The stored document, or None when absent or unreadable (then with a warning; it will be rewritten)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            document = json.loads(path.read_text())
            if not isinstance(document, dict) or not isinstance(document.get("layers"), dict):
                raise ValueError("not a sensitivity table")
            return document
        except (OSError, ValueError) as err:
            warnings.warn(
                f"ignoring the unreadable probe cache file {str(path)!r} ({err}); probing again", stacklevel=2
            )
            return None

    def store(self, key: str, document: Mapping[str, Any]) -> Path | None:
        """Write ``document`` atomically; on failure warn and return None (the run goes on without caching)."""
        path = self.path(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
            try:
                with os.fdopen(handle, "w") as file:
                    json.dump(document, file, allow_nan=False)
                os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
        except OSError as err:
            warnings.warn(
                f"could not write the probe cache in {str(self.directory)!r} ({err.strerror or err}); the run goes on "
                "without caching (set SensitivityProbe.cache_dir to a writable folder, or null)",
                stacklevel=2,
            )
            return None
        return path


def stack_digests(digests: list[bytes]) -> Tensor:
    """Digests as an ``[n, 4]`` int64 tensor, so they can be gathered across ranks like any rows."""
    if not digests:
        return torch.zeros((0, 4), dtype=torch.int64)
    return torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.int64).reshape(len(digests), 4).clone()


def unstack_digests(rows: Tensor) -> list[bytes]:
    """Inverse of :func:`stack_digests`."""
    return [bytes(row.contiguous().numpy().tobytes()) for row in rows.cpu()]
