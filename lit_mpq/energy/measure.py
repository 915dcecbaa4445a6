"""Measured energy from hardware counters: NVML (GPU), RAPL (CPU package and DRAM), and CodeCarbon (CO2).

Each backend reads a cumulative energy counter; :class:`PhaseMeter` turns readings into joules per named phase
(calibration, probing, evaluation). A backend that cannot read its counter on this machine (no GPU, no NVML
library, RAPL files missing or not readable without root, CodeCarbon not installed) reports *why* it is
unavailable and is never used, so no number is ever invented.

- ``nvml``: ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since driver load; Volta and newer) through the
  ``nvidia-ml-py`` package (``pip install nvidia-ml-py``), for the GPU this process uses.
- ``rapl``: Linux powercap files ``/sys/class/powercap/intel-rapl:*/energy_uj`` (package domains and their
  ``dram`` subdomains), wrap-around handled with ``max_energy_range_uj``. The counters are per socket, shared by
  every process on the machine, so only local rank 0 reads them (summing ranks would count them twice).
- ``codecarbon``: ``codecarbon.OfflineEmissionsTracker`` with a country ISO code (no network), for kg CO2-eq.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

RAPL_ROOT = Path("/sys/class/powercap")


class EnergyCounter(ABC):
    """A cumulative energy counter."""

    name: str = "counter"

    def __init__(self) -> None:
        self.reason: str | None = None
        """Why the counter is unavailable (None when it works)."""

    @property
    def available(self) -> bool:
        """Whether the counter can be read here."""
        return self.reason is None

    @abstractmethod
    def read_j(self) -> float:
        """Joules since an arbitrary origin (monotonic between two reads of one phase)."""


class NvmlCounter(EnergyCounter):
    """The NVML energy counter of one GPU.

    Args:
        device_index: CUDA device index (the process's own GPU under DDP).
    """

    name = "nvml"

    def __init__(self, device_index: int = 0) -> None:
        super().__init__()
        self._handle: Any = None
        try:
            import pynvml  # from the nvidia-ml-py package

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        except Exception as err:  # NVMLError_LibraryNotFound, NotSupported, no device, ...
            self.reason = f"NVML energy counter not readable: {err}"

    def read_j(self) -> float:
        """Joules (NVML reports millijoules)."""
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0


class RaplCounter(EnergyCounter):
    """Sum of the RAPL package and DRAM energy counters of every socket.

    Args:
        root: The powercap directory (a parameter so tests can point it at a fake tree).
    """

    name = "rapl"

    def __init__(self, root: Path = RAPL_ROOT) -> None:
        super().__init__()
        self._domains: list[tuple[Path, int]] = []
        self._last: list[int] = []
        self._wraps: list[int] = []
        candidates = sorted(root.glob("intel-rapl:*")) if root.is_dir() else []
        for domain in candidates:
            energy = domain / "energy_uj"
            name_file = domain / "name"
            name = name_file.read_text().strip() if name_file.is_file() else ""
            if not (name.startswith("package") or name == "dram"):
                continue
            try:
                value = int(energy.read_text())
                limit = int((domain / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            self._domains.append((energy, limit))
            self._last.append(value)
            self._wraps.append(0)
        if not candidates:
            self.reason = f"no RAPL domains under {root} (not an Intel/AMD Linux host, or powercap not exposed)"
        elif not self._domains:
            self.reason = f"RAPL energy files under {root} are not readable (they need root on recent kernels)"

    def read_j(self) -> float:
        """Joules summed over domains, counting wrap-arounds since construction."""
        total_uj = 0
        for i, (path, limit) in enumerate(self._domains):
            value = int(path.read_text())
            if value < self._last[i]:
                self._wraps[i] += 1
            self._last[i] = value
            total_uj += value + self._wraps[i] * limit
        return total_uj / 1e6


BACKENDS: dict[str, type[EnergyCounter]] = {"nvml": NvmlCounter, "rapl": RaplCounter}
"""Counter backends by name; ``"auto"`` selects every one that is available."""


def select_counters(
    names: list[str], device_index: int = 0, read_rapl: bool = True
) -> tuple[list[EnergyCounter], dict[str, str]]:
    """Build the requested counters and say, for each backend, whether it works here.

    Args:
        names: Backend names, or ``["auto"]`` for all; ``[]`` measures nothing.
        device_index: CUDA device for NVML.
        read_rapl: False on all but one process per machine (RAPL counters are shared by the machine).

    Returns:
        ``(usable counters, {backend: "ok" | "unavailable: <reason>" | "skipped: <reason>"})``.

    Raises:
        ValueError: On an unknown backend name.
    """
    unknown = [n for n in names if n != "auto" and n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown energy measurement backend(s) {unknown}; choose from {['auto', *BACKENDS]}")
    wanted = list(BACKENDS) if "auto" in names else list(dict.fromkeys(names))
    counters, status = [], {}
    for name in wanted:
        if name == "rapl" and not read_rapl:
            status[name] = "skipped: read by local rank 0 only (machine-wide counter)"
            continue
        counter = NvmlCounter(device_index) if name == "nvml" else BACKENDS[name]()
        if counter.available:
            counters.append(counter)
            status[name] = "ok"
        else:
            status[name] = f"unavailable: {counter.reason}"
    return counters, status


class PhaseMeter:
    """Joules and seconds per named phase from a set of counters.

    Example:
        >>> meter = PhaseMeter([])
        >>> meter.start("calibration"); meter.stop("calibration")
        >>> meter.joules("calibration") is None  # no counter: unknown, not zero
        True
    """

    def __init__(self, counters: list[EnergyCounter]) -> None:
        self.counters = counters
        self._open: dict[str, tuple[float, list[float]]] = {}
        self._joules: dict[str, float] = {}
        self._seconds: dict[str, float] = {}

    def start(self, phase: str) -> None:
        """Begin (or resume) ``phase``."""
        self._open[phase] = (time.perf_counter(), [c.read_j() for c in self.counters])

    def stop(self, phase: str) -> None:
        """End ``phase`` and add its energy and time to the totals."""
        if phase not in self._open:
            return
        started, readings = self._open.pop(phase)
        self._seconds[phase] = self._seconds.get(phase, 0.0) + time.perf_counter() - started
        if self.counters:
            used = sum(c.read_j() - r for c, r in zip(self.counters, readings, strict=True))
            self._joules[phase] = self._joules.get(phase, 0.0) + used

    @property
    def phases(self) -> list[str]:
        """Phases measured so far, in order."""
        return list(self._seconds)

    def joules(self, phase: str) -> float | None:
        """Energy of ``phase`` on this process's counters, or None when no counter is available."""
        return self._joules.get(phase) if self.counters else None

    def seconds(self, phase: str) -> float:
        """Wall time of ``phase``."""
        return self._seconds.get(phase, 0.0)


def codecarbon_tracker(country_iso_code: str) -> tuple[Any, str]:
    """An offline CodeCarbon tracker for ``country_iso_code`` (e.g. ``"FRA"``), or None and the reason why not."""
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError:
        return None, "unavailable: codecarbon is not installed (pip install codecarbon)"
    try:
        tracker = OfflineEmissionsTracker(country_iso_code=country_iso_code, save_to_file=False, log_level="error")
    except Exception as err:  # codecarbon raises various errors when it finds no usable sensor
        return None, f"unavailable: {err}"
    return tracker, "ok"
