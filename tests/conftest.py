"""Shared fixtures: the offline evaluation assets in ``../shared/data`` and a tiny ImageNet-style folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""``shared/data`` beside the repository: real CIFAR-10 images and pretrained CIFAR ResNet weights."""


def require_shared(*names: str) -> Path:
    """Return ``SHARED_DATA``; skip the test when it (or one of ``names`` in it) is absent.

    With ``LIT_MPQ_REQUIRE_SHARED=1`` in the environment a missing file fails the test instead, so CI on a machine
    that has the assets cannot silently skip the checks against real data.
    """
    missing = [str(SHARED_DATA / n) for n in names if not (SHARED_DATA / n).is_file()]
    if not SHARED_DATA.is_dir():
        missing.insert(0, str(SHARED_DATA))
    if missing:
        message = f"shared data not found: {', '.join(missing)}"
        if os.environ.get("LIT_MPQ_REQUIRE_SHARED") == "1":
            pytest.fail(message + " (LIT_MPQ_REQUIRE_SHARED=1)")
        pytest.skip(message)
    return SHARED_DATA


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, split the cores between the workers: two workers with two intra-op threads each on a
    two-core machine would spend their time descheduling each other's OpenMP threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or workers) // workers))


@pytest.fixture
def single_thread():
    """One intra-op thread (restored afterwards): small tensors and many ops run faster on shared cores, and float
    results do not depend on thread scheduling. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """Path of ``shared/data`` (skips, or fails with ``LIT_MPQ_REQUIRE_SHARED=1``, when it is absent)."""
    return require_shared()


@pytest.fixture
def tiny_image_folder(tmp_path: Path) -> Path:
    """ImageNet-style folder with ``train/`` and ``val/``, 3 classes x 4 random RGB 40x48 PNGs each; returns root."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "tiny_imagenet"
    for split in ("train", "val"):
        for cls in ("cat", "dog", "fox"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)  # H=40, W=48
                Image.fromarray(pixels).save(folder / f"{cls}_{i}.png")
    return root
