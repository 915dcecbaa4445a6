"""SensitivityProbe, driven by a tiny real digits Trainer: the scores, ``sensitivity.json`` and the probe cache.

The scores are checked against a brute-force ``output_l2`` computed here in float64 with torch.ao's observers and
fake-quantization ops: for each layer, ``sqrt(sum over the calibration images of ||f(x, Q_b(W)) - f(x, W)||^2)`` for
the weights and ``||f(Q_b(x), W) - f(x, W)||`` for the input, with ``x`` the plain float model's layer inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

import lit_mpq
from lit_mpq.callbacks import Calibration, SensitivityProbe
from lit_mpq.data import DigitsDataModule
from lit_mpq.models.small import DigitsCNN
from lit_mpq.module import MPQModule

CHECKPOINT = Path(lit_mpq.__file__).parent / "assets" / "digits_cnn.pt"
LAYERS = ["conv1", "conv2", "conv3", "fc"]
BITS = [4, 8]
CALIB = 32
BATCH = 16
VAL = 16


def float_model() -> nn.Module:
    model = DigitsCNN()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    return model.eval()


def digits(**kwargs) -> DigitsDataModule:
    settings = {"num_calibration_samples": CALIB, "batch_size": BATCH, "max_val_samples": VAL} | kwargs
    return DigitsDataModule(**settings)


def probe_run(root: Path, cache_dir: Path | str | None, datamodule: DigitsDataModule | None = None) -> SimpleNamespace:
    """Calibration + SensitivityProbe(output_l2, bits 4 and 8) in one validation run."""
    module = MPQModule(backbone="digits_cnn", checkpoint_path=str(CHECKPOINT), fp32_reference=False)
    probe = SensitivityProbe(candidate_bits=BITS, cache_dir=None if cache_dir is None else str(cache_dir))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(root)),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Calibration(), probe],
    )
    trainer.validate(module, datamodule or digits(), verbose=False)
    table = {name: module.plan[name].sensitivity for name in module.plan.names}
    return SimpleNamespace(module=module, trainer=trainer, table=table, run_dir=Path(trainer.log_dir))


def strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@torch.no_grad()
def brute_force_output_l2(datamodule: DigitsDataModule) -> dict[str, dict[str, dict[int, float]]]:
    """``output_l2`` of every layer, weights and inputs, at every bit width in BITS, in float64."""
    model = float_model()
    inputs: dict[str, list[Tensor]] = {name: [] for name in LAYERS}
    hooks = [
        getattr(model, name).register_forward_pre_hook(lambda _, args, n=name: inputs[n].append(args[0].clone()))
        for name in LAYERS
    ]
    for images, _ in datamodule.calib_dataloader():
        model(images)
    for hook in hooks:
        hook.remove()
    scores = {}
    for name in LAYERS:
        layer = getattr(model, name)
        x = torch.cat(inputs[name])
        assert x.shape[0] == CALIB

        def apply(x: Tensor, weight: Tensor, layer=layer) -> Tensor:
            if isinstance(layer, nn.Conv2d):
                return F.conv2d(x.double(), weight.double(), None, layer.stride, layer.padding)
            return F.linear(x.double(), weight.double())

        w = layer.weight.detach()
        y = apply(x, w)
        table: dict[str, dict[int, float]] = {"w": {}, "a": {}}
        for bits in BITS:
            low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            weights = PerChannelMinMaxObserver(
                ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=low, quant_max=high
            )
            weights(w)
            scale, zero_point = weights.calculate_qparams()
            w_q = torch.fake_quantize_per_channel_affine(w, scale, zero_point.int(), 0, low, high)
            table["w"][bits] = float(torch.linalg.vector_norm(apply(x, w_q) - y))
            acts = MinMaxObserver(
                dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=2**bits - 1
            )
            acts(x)
            scale, zero_point = acts.calculate_qparams()
            x_q = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, 2**bits - 1)
            table["a"][bits] = float(torch.linalg.vector_norm(apply(x_q, w) - y))
        scores[name] = table
    return scores


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> SimpleNamespace:
    """A first run, with an empty probe cache: a miss that probes and fills the cache."""
    root = tmp_path_factory.mktemp("probe")
    run = probe_run(root / "logs", root / "cache")
    run.cache_dir = root / "cache"
    return run


# ----------------------------------------------------------------------------------------------------- scores
def test_every_layer_and_candidate_is_scored_like_a_brute_force_output_l2(probed):
    reference = brute_force_output_l2(digits())
    assert list(probed.table) == LAYERS
    for name in LAYERS:
        assert probed.table[name].keys() == {"w", "a"}
        for kind in ("w", "a"):
            assert sorted(probed.table[name][kind]) == BITS
            assert probed.table[name][kind] == pytest.approx(reference[name][kind], rel=1e-5), (name, kind)
            assert probed.table[name][kind][4] > probed.table[name][kind][8] > 0


def test_the_record_and_the_logs_say_what_was_probed(probed):
    record = probed.module.record.sensitivity
    assert (record.metric, record.candidate_bits, record.kinds) == ("output_l2", BITS, ["w", "a"])
    assert record.images == CALIB and record.cache == "miss" and record.subsample == 1
    assert isinstance(record.cache_key, str) and len(record.cache_key) == 24
    metrics = probed.trainer.callback_metrics
    assert float(metrics["sens/images"]) == CALIB and float(metrics["sens/cache_hit"]) == 0.0


def test_sensitivity_json_is_strict_json_holding_the_plans_table(probed):
    document = strict_json((probed.run_dir / "sensitivity.json").read_text())
    assert document["metric"] == "output_l2" and document["images"] == CALIB
    as_json = {
        name: {kind: {str(b): s for b, s in t.items()} for kind, t in v.items()} for name, v in probed.table.items()
    }
    assert document["layers"] == as_json


# ------------------------------------------------------------------------------------------------------ cache
def test_a_second_run_with_other_evaluation_data_hits_the_cache(tmp_path, probed):
    """max_val_samples only changes the evaluation set: same key, the stored table, nothing probed again."""
    again = probe_run(tmp_path, probed.cache_dir, digits(max_val_samples=2 * VAL))
    record = again.module.record.sensitivity
    assert record.cache == "hit" and record.cache_key == probed.module.record.sensitivity.cache_key
    assert record.images == CALIB
    assert again.table == probed.table
    assert float(again.trainer.callback_metrics["sens/cache_hit"]) == 1.0
    assert (
        strict_json((again.run_dir / "sensitivity.json").read_text())["layers"]
        == strict_json((probed.run_dir / "sensitivity.json").read_text())["layers"]
    )
    assert [p.name for p in probed.cache_dir.iterdir()] == [f"{record.cache_key}.json"]


def test_another_calibration_draw_misses_and_is_stored_under_another_key(tmp_path, probed):
    cache = tmp_path / "cache"
    shutil.copytree(probed.cache_dir, cache)
    other = probe_run(tmp_path / "logs", cache, digits(calibration_seed=1))
    record = other.module.record.sensitivity
    assert record.cache == "miss" and record.cache_key != probed.module.record.sensitivity.cache_key
    reference = brute_force_output_l2(digits(calibration_seed=1))
    for name in LAYERS:
        for kind in ("w", "a"):
            assert other.table[name][kind] == pytest.approx(reference[name][kind], rel=1e-5), (name, kind)
    assert other.table != probed.table
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [f"{record.cache_key}.json", f"{probed.module.record.sensitivity.cache_key}.json"]
    )


def test_a_truncated_cache_file_is_ignored_with_a_warning_and_rewritten(tmp_path, probed):
    cache = tmp_path / "cache"
    shutil.copytree(probed.cache_dir, cache)
    key = probed.module.record.sensitivity.cache_key
    entry = cache / f"{key}.json"
    whole = entry.read_text()
    entry.write_text(whole[: len(whole) // 2])
    with pytest.warns(UserWarning, match="unreadable probe cache file"):
        run = probe_run(tmp_path / "logs", cache)
    assert run.module.record.sensitivity.cache == "miss" and run.module.record.sensitivity.cache_key == key
    assert run.table == probed.table
    assert strict_json(entry.read_text()) == strict_json(whole)


def test_an_unwritable_cache_dir_is_a_warning_and_the_run_completes(tmp_path, probed):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not write the probe cache"):
        run = probe_run(tmp_path / "logs", blocker / "cache")
    assert run.module.record.sensitivity.cache == "miss"
    assert run.table == probed.table
    assert strict_json((run.run_dir / "sensitivity.json").read_text())["images"] == CALIB
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("bits", "message"),
    [
        ([4, 9], r"SensitivityProbe\.candidate_bits.*9.*\[2, 3, 4, 5, 6, 7, 8, 16\]"),
        ([], r"candidate_bits must list at least one bit width"),
        ([None], r"SensitivityProbe\.candidate_bits.*FP32"),
    ],
)
def test_candidate_bits_are_validated_with_the_allowed_widths(bits, message):
    with pytest.raises(ValueError, match=message):
        SensitivityProbe(candidate_bits=bits)


def test_other_settings_are_validated_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"unknown sensitivity metric 'hessian'.*'output_l2'.*'fisher'.*'kl'"):
        SensitivityProbe(metric="hessian")
    with pytest.raises(ValueError, match=r"kinds must be a non-empty subset of \['w', 'a'\]"):
        SensitivityProbe(kinds=["x"])
    with pytest.raises(ValueError, match="num_samples"):
        SensitivityProbe(num_samples=0)


def test_the_probe_before_calibration_is_refused_at_setup(tmp_path):
    module = MPQModule(backbone="digits_cnn", checkpoint_path=str(CHECKPOINT))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(tmp_path)),
        enable_progress_bar=False,
        callbacks=[SensitivityProbe(cache_dir=None), Calibration()],
    )
    with pytest.raises(MisconfigurationException, match="listed after it"):
        trainer.validate(module, digits(), verbose=False)
    assert module.record.calibration is None and module.record.sensitivity is None
