"""Label-aware evaluation: the class-similarity matrix, the subset selection and subset accuracy on hand-made cases,
each against an independent reference (``scipy.special.rel_entr``, brute force over ``itertools.combinations``,
plain NumPy), and the ``LabelAwareEvaluation`` callback end to end on the embedded digits data."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from scipy.special import rel_entr

import lit_mpq
from lit_mpq.allocation import Uniform
from lit_mpq.callbacks import BitAllocator, Calibration, LabelAwareEvaluation, Report
from lit_mpq.data import DigitsDataModule
from lit_mpq.evaluation import (
    ClassProbabilitySums,
    MissingClassesWarning,
    label_aware_markdown,
    label_aware_rows,
    select_subsets,
    subset_counts,
    symmetric_kl_matrix,
)
from lit_mpq.module import MPQModule
from lit_mpq.quant.apply import quantizers_mode

# Four classes; the mean output on each class's images (rows sum to 1). Classes 0 and 1 are confused with each other
# (each puts 0.3 on the other), 2 and 3 are confident and far from everything.
MEANS = np.array(
    [
        [0.6, 0.3, 0.05, 0.05],
        [0.3, 0.6, 0.05, 0.05],
        [0.05, 0.05, 0.85, 0.05],
        [0.1, 0.1, 0.1, 0.7],
    ]
)


def reference_divergence(means: np.ndarray) -> np.ndarray:
    """Symmetric KL by scipy's elementwise relative entropy, pair by pair."""
    n = len(means)
    return np.array([[rel_entr(means[i], means[j]).sum() + rel_entr(means[j], means[i]).sum() for j in range(n)]
                     for i in range(n)])  # fmt: skip


def brute_force(d: np.ndarray, k: int, classes: list[int] | None = None) -> tuple[tuple, tuple]:
    """Lowest and highest total pairwise divergence over every k-subset, ties to the first in lexicographic order."""
    classes = list(range(len(d))) if classes is None else classes
    scored = [(sum(d[i, j] for i, j in itertools.combinations(s, 2)), s) for s in itertools.combinations(classes, k)]
    low = min(scored, key=lambda t: t[0])[1]
    high = max(scored, key=lambda t: t[0])[1]
    return low, high


def stats_from_means(means: np.ndarray, per_class: int = 2) -> ClassProbabilitySums:
    """Statistics whose per-class means are ``means``: each class gets ``per_class`` images spread around its mean."""
    stats = ClassProbabilitySums.zeros(len(means))
    rng = np.random.default_rng(0)
    for c, mean in enumerate(means):
        shift = rng.uniform(-0.01, 0.01, size=len(mean))
        shift -= shift.mean()  # the two images still sum to 1 and average to `mean`
        probs = torch.tensor(np.stack([mean + shift, mean - shift]))
        stats.update(probs, torch.full((per_class,), c))
    return stats


# ------------------------------------------------------------------------------------------------ statistics


def test_means_and_divergence_match_hand_and_scipy():
    stats = stats_from_means(MEANS)
    means = stats.means()
    np.testing.assert_allclose(means.numpy(), MEANS, atol=1e-15)
    d = symmetric_kl_matrix(means).numpy()
    # by hand: (0.6 - 0.3) ln(0.6/0.3) + (0.3 - 0.6) ln(0.3/0.6) = 0.6 ln 2; the other two terms are 0
    assert d[0, 1] == pytest.approx(0.6 * math.log(2), rel=1e-12)
    np.testing.assert_allclose(d, reference_divergence(MEANS), rtol=1e-12, atol=1e-15)
    assert np.array_equal(d, d.T) and np.all(np.diag(d) == 0) and np.all(d >= 0)


def test_divergence_chunked_equals_unchunked():
    rng = np.random.default_rng(1)
    means = torch.softmax(torch.tensor(rng.normal(size=(13, 13)) * 3), dim=1)
    whole = symmetric_kl_matrix(means)
    chunked = symmetric_kl_matrix(means, chunk_elements=13 * 13)  # one row at a time
    assert torch.equal(whole, chunked)
    np.testing.assert_allclose(whole.numpy(), reference_divergence(means.numpy()), rtol=1e-10)


def test_statistics_merge_like_one_pass():
    rng = np.random.default_rng(2)
    logits, labels = torch.tensor(rng.normal(size=(50, 5))), torch.tensor(rng.integers(0, 5, size=50))
    whole, first, second = (ClassProbabilitySums.zeros(5) for _ in range(3))
    whole.update_from_logits(logits, labels)
    first.update_from_logits(logits[:17], labels[:17])
    second.update_from_logits(logits[17:], labels[17:])
    packed = first.as_tensor() + second.as_tensor()  # what a sum reduction across two ranks gives
    merged = ClassProbabilitySums.from_tensor(packed)
    assert torch.equal(merged.counts, whole.counts)
    torch.testing.assert_close(merged.sums, whole.sums, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(first.merge(second).means(), whole.means())


def test_class_without_samples_is_an_error_or_a_warning():
    stats = ClassProbabilitySums.zeros(4)
    stats.update(torch.tensor(MEANS[[0, 1, 3]]), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"1 of 4 classes have no calibration image \(2 \(bird\)\)"):
        stats.means(class_names=["cat", "dog", "bird", "fish"])
    with pytest.warns(MissingClassesWarning, match="left out of the class subsets"):
        means = stats.means(allow_missing=True)
    assert torch.isnan(means[2]).all() and not torch.isnan(means[[0, 1, 3]]).any()
    d = symmetric_kl_matrix(means)
    assert torch.isnan(d[2]).all() and torch.isnan(d[:, 2]).all()
    subsets = select_subsets(d, k=2, num_random=5, seed=0)
    assert all(2 not in s.classes for s in subsets)  # no subset holds the class without data
    assert subsets[0].classes == (0, 1)


def test_update_checks_shapes_and_labels():
    stats = ClassProbabilitySums.zeros(3)
    with pytest.raises(ValueError, match=r"expected probabilities \[N, 3\]"):
        stats.update(torch.ones(2, 4) / 4, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        stats.update(torch.ones(1, 3) / 3, torch.tensor([3]))


# ------------------------------------------------------------------------------------------------ selection


def test_selection_on_the_hand_made_case():
    d = symmetric_kl_matrix(torch.tensor(MEANS)).numpy()
    similar, dissimilar = select_subsets(d, k=2, num_random=0)
    assert similar.kind == "similar" and similar.classes == (0, 1)  # the confused pair
    assert similar.divergence == pytest.approx(0.6 * math.log(2), rel=1e-12)
    assert (similar.classes, dissimilar.classes) == brute_force(d, 2)
    assert similar.method == "exhaustive over 6 subsets"
    three = select_subsets(d, k=3, num_random=0)
    assert (three[0].classes, three[1].classes) == brute_force(d, 3)
    assert three[0].mean_divergence == pytest.approx(three[0].divergence / 3)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3, 4])
def test_exhaustive_selection_equals_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    a = rng.exponential(size=(8, 8))
    d = a + a.T
    np.fill_diagonal(d, 0.0)
    subsets = select_subsets(d, k=k, num_random=0)
    assert (subsets[0].classes, subsets[1].classes) == brute_force(d, k)
    assert subsets[0].divergence == pytest.approx(min(s.divergence for s in subsets[:2]))


@pytest.mark.parametrize("seed", range(4))
def test_beam_search_is_exact_for_pairs_and_with_a_full_beam(seed):
    rng = np.random.default_rng(seed)
    a = rng.exponential(size=(9, 9))
    d = a + a.T
    np.fill_diagonal(d, 0.0)
    pairs = select_subsets(d, k=2, num_random=0, exhaustive_limit=0, beam_width=1)
    assert (pairs[0].classes, pairs[1].classes) == brute_force(d, 2)
    assert pairs[0].method == "beam search, width 1, over 36 subsets"
    full = select_subsets(d, k=4, num_random=0, exhaustive_limit=0, beam_width=math.comb(9, 4))
    assert (full[0].classes, full[1].classes) == brute_force(d, 4)
    assert "(heuristic)" in full[0].method


def test_beam_search_finds_planted_clusters():
    """1000 classes (too many subsets to score): a planted tight triple and a planted far triple are found."""
    rng = np.random.default_rng(0)
    n = 1000
    a = rng.uniform(5.0, 10.0, size=(n, n))
    d = np.triu(a, 1) + np.triu(a, 1).T
    for i, j in itertools.combinations((17, 503, 911), 2):
        d[i, j] = d[j, i] = 0.5
    for i, j in itertools.combinations((2, 40, 777), 2):
        d[i, j] = d[j, i] = 50.0
    similar, dissimilar = select_subsets(d, k=3, num_random=0)
    assert similar.classes == (17, 503, 911) and dissimilar.classes == (2, 40, 777)
    assert similar.method.startswith("beam search, width 64, over 166167000 subsets")


def test_random_subsets_are_seeded_distinct_and_valid():
    d = symmetric_kl_matrix(torch.tensor(MEANS)).numpy()
    subsets = select_subsets(d, k=2, num_random=4, seed=3)
    extremes, first = {s.classes for s in subsets[:2]}, subsets[2:]
    assert first == select_subsets(d, k=2, num_random=4, seed=3)[2:]
    # the other C(4, 2) - 2 = 4 subsets, each once
    assert {s.classes for s in first} == set(itertools.combinations(range(4), 2)) - extremes
    assert all(s.kind == "random" and len(s.classes) == 2 and list(s.classes) == sorted(s.classes) for s in first)
    more = select_subsets(d, k=2, num_random=7, seed=3)[2:]  # more than there are: repeats only after all drawn
    assert len(more) == 7 and len({s.classes for s in more[:4]}) == 4
    for s in first:
        assert s.divergence == pytest.approx(d[s.classes[0], s.classes[1]])


def test_selection_rejects_bad_sizes():
    d = symmetric_kl_matrix(torch.tensor(MEANS)).numpy()
    with pytest.raises(ValueError, match="between 2 and the 4 classes"):
        select_subsets(d, k=5)
    with pytest.raises(ValueError, match="between 2 and the 4 classes"):
        select_subsets(d, k=1)


# ------------------------------------------------------------------------------------------------ accuracy


def test_subset_counts_on_hand_made_logits():
    logits = torch.tensor(
        [
            [5.0, 9.0, 1.0, 0.0],  # label 0: overall argmax 1, but within {0, 2} it is 0 -> right
            [0.0, 2.0, 3.0, 0.0],  # label 2: within {0, 2}: 2 -> right
            [4.0, 0.0, 3.0, 9.0],  # label 2: within {0, 2}: 0 -> wrong
            [1.0, 0.0, 0.0, 9.0],  # label 3: not in {0, 2}; within {1, 3}: 3 -> right
            [0.0, 5.0, 0.0, 1.0],  # label 1: not in {0, 2}; within {1, 3}: 1 -> right
        ]
    )
    labels = torch.tensor([0, 2, 2, 3, 1])
    counts = subset_counts(logits, labels, [(0, 2), (1, 3), (0, 1, 2, 3)])
    assert counts.tolist() == [[2, 3], [2, 2], [3, 5]]  # the full set is plain top-1: the 2nd, 4th and 5th right
    full_top1 = int((logits.argmax(1) == labels).sum())
    assert counts[2, 0] == full_top1


def test_rows_and_markdown():
    d = symmetric_kl_matrix(torch.tensor(MEANS)).numpy()
    subsets = select_subsets(d, k=2, num_random=1, seed=0)
    fp32 = torch.tensor([[9, 10], [10, 10], [0, 0]])
    quant = torch.tensor([[6, 10], [10, 10], [0, 0]])
    rows = label_aware_rows(subsets, fp32, quant, ["cat", "dog", "bird", "fish"])
    assert rows[0] | {"mean_divergence_nats": 0} == {
        "kind": "similar",
        "classes": [0, 1],
        "names": ["cat", "dog"],
        "mean_divergence_nats": 0,
        "images": 10,
        "top1_fp32": 90.0,
        "top1": 60.0,
        "drop": pytest.approx(30.0),
    }
    assert rows[2]["top1"] is None and rows[2]["drop"] is None
    table = label_aware_markdown(rows)
    assert "| similar | cat, dog | 0.416 | 10 | 90.0 | 60.0 | 30.0 |" in table
    assert "| n/a | n/a | n/a |" in table


# ------------------------------------------------------------------------------------------------ callback

CHECKPOINT = Path(lit_mpq.__file__).parent / "assets" / "digits_cnn.pt"
CALIB = 128
BATCH = 64
VAL = 200


class ForwardCounter(Callback):
    """Counts backbone forward passes during the validation loop (after calibration and the class statistics)."""

    def __init__(self) -> None:
        self.calls = 0
        self.batches = 0
        self._handle = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._handle = pl_module.model.register_forward_hook(lambda *args: setattr(self, "calls", self.calls + 1))

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        self.batches += 1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._handle.remove()


def digits_run(root: Path, fp32_reference: bool) -> tuple[MPQModule, DigitsDataModule, LabelAwareEvaluation, Path]:
    module = MPQModule(backbone="digits_cnn", checkpoint_path=str(CHECKPOINT), fp32_reference=fp32_reference)
    datamodule = DigitsDataModule(num_calibration_samples=CALIB, batch_size=BATCH, max_val_samples=VAL)
    label_aware = LabelAwareEvaluation(subset_size=3, num_random=2, seed=0)
    counter = ForwardCounter()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(root), name="run", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            Calibration(act_observer="percentile"),
            BitAllocator(policy=Uniform(2, 4)),  # coarse enough to lose accuracy on these digits
            label_aware,
            counter,
            Report(save_figures=False),
        ],
    )
    trainer.validate(module, datamodule, verbose=False)
    label_aware.counter = counter  # type: ignore[attr-defined]
    return module, datamodule, label_aware, Path(trainer.log_dir)


@pytest.fixture(scope="module")
def with_reference(tmp_path_factory):
    return digits_run(tmp_path_factory.mktemp("label_aware"), fp32_reference=True)


def direct_subset_accuracy(module: MPQModule, datamodule: DigitsDataModule, classes: list[int], fp32: bool) -> float:
    """Accuracy restricted to ``classes``, computed from scratch with NumPy over the validation set."""
    correct = total = 0
    module.eval()  # Lightning leaves the module in training mode after validate
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            if fp32:
                with quantizers_mode(module.model, "off"):
                    logits = module(x).numpy()
            else:
                logits = module(x).numpy()
            for row, label in zip(logits, y.numpy(), strict=True):
                if label in classes:
                    total += 1
                    correct += int(classes[int(np.argmax(row[classes]))] == label)
    return 100.0 * correct / total


def test_callback_table_matches_direct_computation(with_reference):
    module, datamodule, label_aware, out = with_reference
    record = module.record.label_aware
    assert record is not None and record.subset_size == 3 and record.calibration_images == CALIB
    assert record.selection == "exhaustive over 120 subsets" and record.missing_classes == []
    assert [row["kind"] for row in record.rows] == ["similar", "dissimilar", "random", "random"]
    assert sum(row["drop"] for row in record.rows) > 0  # W2A4 costs accuracy somewhere
    for row in record.rows:
        assert row["top1_fp32"] == pytest.approx(direct_subset_accuracy(module, datamodule, row["classes"], True))
        assert row["top1"] == pytest.approx(direct_subset_accuracy(module, datamodule, row["classes"], False))
    results = json.loads((out / "results.json").read_text())
    assert results["label_aware"]["rows"][0]["classes"] == record.rows[0]["classes"]
    assert results["metrics"]["label/similar_top1_fp32"] == pytest.approx(record.rows[0]["top1_fp32"], rel=1e-6)
    assert "| similar |" in (out / "label_aware.md").read_text()
    assert (out / "label_aware.png").stat().st_size > 0
    np.testing.assert_array_equal(np.load(out / "class_divergence.npy"), label_aware.divergence.numpy())


def test_callback_divergence_equals_scipy_on_calibration_outputs(with_reference):
    module, datamodule, label_aware, _ = with_reference
    sums, counts = np.zeros((10, 10)), np.zeros(10)
    module.eval()
    with torch.no_grad(), quantizers_mode(module.model, "off"):
        for x, y in datamodule.calib_dataloader():
            probs = torch.softmax(module(x).double(), dim=1).numpy()
            for p, label in zip(probs, y.numpy(), strict=True):
                sums[label] += p
                counts[label] += 1
    reference = reference_divergence(sums / counts[:, None])
    np.testing.assert_allclose(label_aware.divergence.numpy(), reference, rtol=1e-6, atol=1e-9)
    low, high = brute_force(reference, 3)
    assert (label_aware.subsets[0].classes, label_aware.subsets[1].classes) == (low, high)


def test_callback_reuses_the_modules_logits(with_reference):
    """With the FP32 reference on, the module's own two passes per batch are all there is: no extra forward."""
    _, _, label_aware, _ = with_reference
    counter = label_aware.counter
    assert counter.batches == math.ceil(VAL / BATCH)
    assert counter.calls == 2 * counter.batches


def test_callback_without_fp32_reference_runs_the_fp32_pass_itself(tmp_path, with_reference):
    module, _, label_aware, _ = digits_run(tmp_path, fp32_reference=False)
    assert label_aware.counter.calls == 2 * label_aware.counter.batches
    assert module.record.label_aware.rows == with_reference[0].record.label_aware.rows


def test_callback_argument_checks():
    with pytest.raises(ValueError, match="subset_size must be at least 2"):
        LabelAwareEvaluation(subset_size=1)
    with pytest.raises(ValueError, match=r"on_missing_class must be one of \['warn', 'error'\]"):
        LabelAwareEvaluation(on_missing_class="ignore")
    with pytest.raises(ValueError, match="num_samples must be positive"):
        LabelAwareEvaluation(num_samples=0)


def test_callback_subset_larger_than_the_classes(tmp_path):
    module = MPQModule(backbone="digits_cnn", checkpoint_path=str(CHECKPOINT))
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Calibration(), LabelAwareEvaluation(subset_size=11)],
    )
    with pytest.raises(MisconfigurationException, match="subset_size is 11 but the model has 10 classes"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.validate(module, DigitsDataModule(num_calibration_samples=16, max_val_samples=16), verbose=False)


# ------------------------------------------------------------------------------------------------ two processes

REPO = Path(__file__).resolve().parents[2]


def cli_run(tmp_path: Path, devices: int) -> dict:
    """``cli.py validate`` on the digits: Calibration, a uniform W3A4 allocation and the label-aware callback."""
    import os
    import subprocess
    import sys

    import yaml

    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "lit_mpq.callbacks.Calibration"},
        {
            "class_path": "lit_mpq.callbacks.BitAllocator",
            "init_args": {
                "policy": {"class_path": "lit_mpq.allocation.Uniform", "init_args": {"w_bits": 3, "a_bits": 4}}
            },
        },
        {"class_path": "lit_mpq.callbacks.LabelAwareEvaluation", "init_args": {"subset_size": 3, "num_random": 2}},
        {"class_path": "lit_mpq.callbacks.Report", "init_args": {"save_figures": False}},
    ]
    path = tmp_path / "label_aware.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        "cli.py",
        "validate",
        "--config",
        str(path),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.logger.init_args.name=d{devices}",
        "--trainer.logger.init_args.version=0",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.max_val_samples=449",
        f"--trainer.devices={devices}",
        *(["--trainer.strategy=ddp"] if devices > 1 else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / f"d{devices}" / "version_0"
    assert (run / "label_aware.md").is_file()
    return json.loads((run / "results.json").read_text())["label_aware"]


@pytest.mark.slow
def test_two_processes_give_the_single_device_table(tmp_path):
    """Class sums and subset counts are reduced across ranks: the 2-process table is the 1-process table."""
    one, two = cli_run(tmp_path, 1), cli_run(tmp_path, 2)
    assert one["calibration_images"] == two["calibration_images"] == 256
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert a | {"mean_divergence_nats": 0} == b | {"mean_divergence_nats": 0}
        assert a["mean_divergence_nats"] == pytest.approx(b["mean_divergence_nats"], rel=1e-9)
    assert sum(row["images"] for row in one["rows"][:2]) > 0
