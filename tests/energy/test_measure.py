"""Measured-energy backends: selection, unavailability reasons, RAPL reading with wrap-around, phase accounting."""

from pathlib import Path

import pytest

from lit_mpq.callbacks import EnergyMeter
from lit_mpq.energy.measure import EnergyCounter, NvmlCounter, PhaseMeter, RaplCounter, select_counters


def fake_rapl(root: Path, domains: dict[str, tuple[str, int, int]]) -> Path:
    """Write a powercap tree: {dir name: (domain name, energy_uj, max_energy_range_uj)}."""
    for folder, (name, energy, limit) in domains.items():
        path = root / folder
        path.mkdir(parents=True)
        (path / "name").write_text(name + "\n")
        (path / "energy_uj").write_text(f"{energy}\n")
        (path / "max_energy_range_uj").write_text(f"{limit}\n")
    return root


def test_rapl_sums_package_and_dram_and_handles_wrap_around(tmp_path):
    root = fake_rapl(
        tmp_path,
        {
            "intel-rapl:0": ("package-0", 1_000_000, 10_000_000),
            "intel-rapl:0:0": ("core", 500_000, 10_000_000),  # a subdomain of the package: not added twice
            "intel-rapl:0:1": ("dram", 200_000, 10_000_000),
        },
    )
    counter = RaplCounter(root)
    assert counter.available
    assert counter.read_j() == pytest.approx(1.2)
    (root / "intel-rapl:0" / "energy_uj").write_text("9500000\n")
    (root / "intel-rapl:0:1" / "energy_uj").write_text("700000\n")
    assert counter.read_j() == pytest.approx(9.5 + 0.7)
    (root / "intel-rapl:0" / "energy_uj").write_text("300000\n")  # wrapped at 10 J
    assert counter.read_j() == pytest.approx(10.3 + 0.7)


def test_rapl_without_domains_or_permission_says_why(tmp_path):
    assert "no RAPL domains" in RaplCounter(tmp_path / "missing").reason
    root = fake_rapl(tmp_path / "tree", {"intel-rapl:0": ("package-0", 1, 10)})
    energy = root / "intel-rapl:0" / "energy_uj"
    energy.unlink()
    energy.mkdir()  # reading it fails with an OSError, as a root-only file does for other users (and for root too)
    counter = RaplCounter(root)
    assert not counter.available and "not readable" in counter.reason


def test_nvml_unavailable_reason_on_a_machine_without_it():
    counter = NvmlCounter()
    if counter.available:
        pytest.skip("an NVML GPU is present")
    assert "nvidia-ml-py" in counter.reason or "NVML" in counter.reason


def test_backend_selection():
    with pytest.raises(ValueError, match="bogus"):
        select_counters(["bogus"])
    counters, status = select_counters([])
    assert counters == [] and status == {}
    counters, status = select_counters(["auto"], read_rapl=False)
    assert set(status) == {"nvml", "rapl"} and status["rapl"].startswith("skipped")
    assert all(isinstance(c, EnergyCounter) and c.available for c in counters)
    for name, state in status.items():
        assert state == "ok" or state.startswith(("unavailable: ", "skipped: ")), name
    with pytest.raises(ValueError, match="bogus"):
        EnergyMeter(measure=["bogus"])


class ScriptedCounter(EnergyCounter):
    name = "scripted"

    def __init__(self, readings):
        super().__init__()
        self.readings = iter(readings)

    def read_j(self) -> float:
        return next(self.readings)


def test_phase_meter_accumulates_per_phase_and_reports_none_without_counters():
    meter = PhaseMeter([ScriptedCounter([10.0, 12.5, 20.0, 21.0, 30.0, 31.0])])
    meter.start("calibration")
    meter.stop("calibration")
    meter.start("evaluation")
    meter.stop("evaluation")
    meter.start("evaluation")
    meter.stop("evaluation")
    assert meter.joules("calibration") == pytest.approx(2.5)
    assert meter.joules("evaluation") == pytest.approx(2.0)
    assert meter.phases == ["calibration", "evaluation"] and meter.seconds("evaluation") >= 0
    empty = PhaseMeter([])
    empty.start("probe")
    empty.stop("probe")
    assert empty.joules("probe") is None and empty.seconds("probe") >= 0
