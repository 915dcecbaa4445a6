"""Tests for lit_mpq.report.files: results JSON and CSV tables."""

import csv
import json

import numpy as np
import pytest
import torch

from lit_mpq.energy import EnergyTerms, HorowitzEnergyModel, energy_report
from lit_mpq.plan import LayerSpec, QuantPlan
from lit_mpq.report import to_plain, write_csv, write_results_json


def test_results_json_round_trip(tmp_path):
    results = {"val/top1": 91.5, "name": "resnet20", "layers": [1, 2, 3], "nested": {"b": True, "a": None}}
    path = write_results_json(tmp_path / "out" / "results.json", results)
    assert path == tmp_path / "out" / "results.json"
    assert json.loads(path.read_text()) == results
    text = path.read_text()
    assert text.index('"layers"') < text.index('"name"') < text.index('"nested"')  # keys sorted
    assert '\n  "layers"' in text  # indent 2


def test_results_json_converts_numpy_torch_and_nan(tmp_path):
    results = {
        "np_float": np.float32(0.5),
        "np_int": np.int64(7),
        "np_bool": np.bool_(True),
        "torch_scalar": torch.tensor(1.25),
        "torch_int": torch.tensor(3),
        "torch_vector": torch.tensor([1.0, float("nan")]),
        "np_array": np.array([[1, 2], [3, 4]]),
        "nan": float("nan"),
        "np_nan": np.float64("nan"),
        "torch_nan": torch.tensor(float("nan")),
        "inf": float("inf"),
        "bits": {8: 0.1, 4: 0.2},  # int keys become strings
        "terms": EnergyTerms(1.0, 2.0, 3.0),
        "shape": (3, 32, 32),
        "path": tmp_path / "x.png",
    }
    loaded = json.loads(write_results_json(tmp_path / "results.json", results).read_text())
    assert loaded["np_float"] == 0.5 and isinstance(loaded["np_float"], float)
    assert loaded["np_int"] == 7 and isinstance(loaded["np_int"], int)
    assert loaded["np_bool"] is True
    assert loaded["torch_scalar"] == 1.25
    assert loaded["torch_int"] == 3
    assert loaded["torch_vector"] == [1.0, None]
    assert loaded["np_array"] == [[1, 2], [3, 4]]
    assert loaded["nan"] is None and loaded["np_nan"] is None and loaded["torch_nan"] is None
    assert loaded["inf"] is None
    assert loaded["bits"] == {"4": 0.2, "8": 0.1}
    assert loaded["terms"] == {"mac_pj": 1.0, "weight_mem_pj": 2.0, "act_mem_pj": 3.0}
    assert loaded["shape"] == [3, 32, 32]
    assert loaded["path"] == str(tmp_path / "x.png")
    assert "NaN" not in (tmp_path / "results.json").read_text()


def test_energy_report_written_as_json(tmp_path):
    plan = QuantPlan([LayerSpec(name="fc", kind="linear", params=640, macs=640, act_in=64, act_out=10)])
    report = energy_report(plan, HorowitzEnergyModel())
    loaded = json.loads(write_results_json(tmp_path / "r.json", {"energy": report}).read_text())
    assert loaded["energy"]["relative_to_int8"] == pytest.approx(1.0)
    assert loaded["energy"]["per_layer"][0]["name"] == "fc"


def test_results_json_errors(tmp_path):
    with pytest.raises(ValueError, match="dict"):
        write_results_json(tmp_path / "r.json", [1, 2])
    with pytest.raises(TypeError, match="object"):
        write_results_json(tmp_path / "r.json", {"x": object()})


def test_to_plain_scalars():
    assert to_plain(np.float16(2.0)) == 2.0
    assert to_plain({1, 3, 2}) == [1, 2, 3]
    assert to_plain([float("-inf"), np.float32("nan")]) == [None, None]


def test_write_csv(tmp_path):
    rows = [
        {"name": "conv", "w_bits": 8, "total_pj": np.float64(1.5), "shape": [16, 3]},
        {"name": "fc", "w_bits": None, "total_pj": float("nan"), "extra": torch.tensor(2)},
    ]
    path = write_csv(tmp_path / "deep" / "table.csv", rows)
    with path.open(newline="") as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == ["name", "w_bits", "total_pj", "shape", "extra"]
    assert read[0] == {"name": "conv", "w_bits": "8", "total_pj": "1.5", "shape": "[16,3]", "extra": ""}
    assert read[1] == {"name": "fc", "w_bits": "", "total_pj": "", "shape": "", "extra": "2"}


@pytest.mark.parametrize("bad", [[], [1, 2], "rows"])
def test_write_csv_errors(tmp_path, bad):
    with pytest.raises(ValueError, match="dict"):
        write_csv(tmp_path / "t.csv", bad)
