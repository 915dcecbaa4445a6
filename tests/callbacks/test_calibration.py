"""Calibration, driven by a tiny real digits Trainer and checked against references computed here.

The references are independent of lit_mpq's quantization code: the plain float ``DigitsCNN`` loaded from the
committed checkpoint, the calibration images read straight from ``datamodule.calib_dataloader()``, torch.ao's
``MinMaxObserver`` for every layer's input range, and ``hashlib`` for the per-image digests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.ao.quantization.observer import MinMaxObserver

import lit_mpq
from lit_mpq.callbacks import Calibration
from lit_mpq.data import DigitsDataModule
from lit_mpq.models.small import DigitsCNN
from lit_mpq.module import MPQModule
from lit_mpq.quant.apply import quant_layers
from lit_mpq.quant.checks import NonFiniteError

CHECKPOINT = Path(lit_mpq.__file__).parent / "assets" / "digits_cnn.pt"
LAYERS = ["conv1", "conv2", "conv3", "fc"]
CALIB = 40  # two full batches of 16 and a partial one of 8: the last, short batch must count too
BATCH = 16
VAL = 32


def float_model() -> nn.Module:
    """The plain float network: lit_mpq's architecture with the committed weights, nothing swapped."""
    model = DigitsCNN()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    return model.eval()


def digits(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(num_calibration_samples=CALIB, batch_size=BATCH, max_val_samples=VAL, **kwargs)


def new_module() -> MPQModule:
    return MPQModule(backbone="digits_cnn", checkpoint_path=str(CHECKPOINT))


def new_trainer(root: Path, *callbacks) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(root)),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def calibration_batches(datamodule: DigitsDataModule, limit: int | None = None) -> list[Tensor]:
    """The calibration images as the datamodule serves them, in batches, cut to the first ``limit`` images."""
    batches, left = [], CALIB if limit is None else limit
    for images, _ in datamodule.calib_dataloader():
        if left <= 0:
            break
        batches.append(images[:left])
        left -= images.shape[0]
    return batches


def sha256_per_image(batches: list[Tensor]) -> list[bytes]:
    """SHA-256 of each image's dtype, shape and raw float32 bytes, with hashlib alone."""
    digests = []
    for batch in batches:
        for image in batch:
            digest = hashlib.sha256(f"{image.dtype}{tuple(image.shape)}".encode())
            digest.update(image.contiguous().numpy().tobytes())
            digests.append(digest.digest())
    return digests


@torch.no_grad()
def torch_ao_input_ranges(batches: list[Tensor]) -> dict[str, tuple[float, float]]:
    """Each layer's input min/max over ``batches`` of the float model, from torch.ao MinMaxObservers."""
    model = float_model()
    observers = {name: MinMaxObserver() for name in LAYERS}
    hooks = [
        getattr(model, name).register_forward_pre_hook(lambda _, args, n=name: observers[n](args[0])) for name in LAYERS
    ]
    for batch in batches:
        model(batch)
    for hook in hooks:
        hook.remove()
    return {name: (float(obs.min_val), float(obs.max_val)) for name, obs in observers.items()}


def observed_ranges(module: MPQModule) -> dict[str, tuple[float, float]]:
    layers = quant_layers(module.model)
    return {
        name: (float(layer.input_quantizer.observer.min_val), float(layer.input_quantizer.observer.max_val))
        for name, layer in layers.items()
    }


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> SimpleNamespace:
    """One validation run with Calibration alone, on all 40 calibration images."""
    datamodule, module, callback = digits(), new_module(), Calibration()
    trainer = new_trainer(tmp_path_factory.mktemp("calibration"), callback)
    trainer.validate(module, datamodule, verbose=False)
    return SimpleNamespace(trainer=trainer, module=module, datamodule=datamodule, callback=callback)


# ------------------------------------------------------------------------------------------------ statistics
def test_first_layer_range_is_the_range_of_the_calibration_pixels(calibrated):
    images = torch.cat(calibration_batches(calibrated.datamodule))
    assert images.shape == (CALIB, 1, 8, 8)
    low, high = observed_ranges(calibrated.module)["conv1"]
    assert (low, high) == (images.min().item(), images.max().item())
    assert -1.0 <= low < high <= 1.0  # the digits are scaled to [-1, 1]: a range from some other data would not fit


def test_every_layer_range_equals_torch_ao_minmax_over_the_float_model(calibrated):
    reference = torch_ao_input_ranges(calibration_batches(calibrated.datamodule))
    observed = observed_ranges(calibrated.module)
    assert list(observed) == LAYERS
    for name in LAYERS:
        assert observed[name] == pytest.approx(reference[name], rel=1e-6, abs=1e-7), name
    # After the ReLUs every later input is non-negative; the raw pixels are not.
    assert reference["conv1"][0] < 0 and all(reference[name][0] >= 0 for name in LAYERS[1:])


def test_the_record_and_the_logged_count_give_the_calibration_set_size(calibrated):
    record = calibrated.module.record.calibration
    assert record.images == CALIB and record.images_per_rank == [CALIB]
    assert record.seconds > 0
    assert record.settings == {
        "weight_granularity": "per_channel",
        "weight_symmetric": True,
        "weight_observer": "minmax",
        "act_observer": "minmax",
        "act_symmetric": False,
        "percentile": 99.99,
        "bias_correction": False,
        "attention": True,
        "softmax_quantizer": "uniform",
        "softmax_uniform_from_bits": None,
        "softmax_underflow": "zero",
        "post_layernorm": "per_tensor",
        "act_observer_overrides": (),
        "ptf_max_shift": 3,
        "target": "lenient",
        "bn_folded": False,  # no Export callback: not folded by default
        "cross_layer_equalization": None,
    }
    assert float(calibrated.trainer.callback_metrics["calib/num_images"]) == CALIB
    assert float(calibrated.trainer.callback_metrics["calib/max_images_per_rank"]) == CALIB


def test_one_digest_per_calibration_image_in_order(calibrated):
    expected = sha256_per_image(calibration_batches(calibrated.datamodule))
    assert len(expected) == CALIB
    assert calibrated.callback.image_digests == expected


def test_quantizers_are_off_after_calibration_so_the_model_is_the_float_model(calibrated):
    module = calibrated.module
    layers = quant_layers(module.model)
    assert list(layers) == LAYERS
    assert {layer.weight_quantizer.mode for layer in layers.values()} == {"off"}
    assert {layer.input_quantizer.mode for layer in layers.values()} == {"off"}
    images = torch.cat([x for x, _ in calibrated.datamodule.val_dataloader()])
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(images), float_model()(images), rtol=0, atol=0)
    metrics = calibrated.trainer.callback_metrics
    assert float(metrics["val/top1"]) == float(metrics["val/top1_fp32"])


# ---------------------------------------------------------------------------------------------- num_samples
def test_num_samples_limits_the_images_and_other_images_give_other_digests(tmp_path, calibrated):
    """20 images (a full batch and 4 of the next) from another calibration draw (calibration_seed=1)."""
    datamodule, module, callback = digits(calibration_seed=1), new_module(), Calibration(num_samples=20)
    new_trainer(tmp_path, callback).validate(module, datamodule, verbose=False)
    batches = calibration_batches(datamodule, limit=20)
    images = torch.cat(batches)
    assert images.shape[0] == 20
    assert module.record.calibration.images == 20
    assert callback.image_digests == sha256_per_image(batches)
    low, high = observed_ranges(module)["conv1"]
    assert (low, high) == (images.min().item(), images.max().item())
    assert observed_ranges(module)["conv3"] == pytest.approx(torch_ao_input_ranges(batches)["conv3"], rel=1e-6)
    # Other images, other digests: the probe cache keyed on them cannot serve a stale table.
    assert not set(callback.image_digests) <= set(calibrated.callback.image_digests)


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_num_samples_is_refused(bad):
    with pytest.raises(ValueError, match=f"Calibration.num_samples must be a positive integer or null.*got {bad}"):
        Calibration(num_samples=bad)


def test_an_unknown_observer_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="minmax"):
        Calibration(act_observer="entropy")
    with pytest.raises(ValueError, match="per_channel"):
        Calibration(weight_granularity="per_group")


# ------------------------------------------------------------------------------------------------ non-finite
def test_a_nan_weight_in_the_first_conv_stops_calibration(tmp_path):
    module = new_module()
    with torch.no_grad():
        module.model.conv1.weight[0, 0, 0, 0] = float("nan")
    trainer = new_trainer(tmp_path, Calibration())
    with pytest.raises(ValueError, match="NaN") as err:
        trainer.validate(module, digits(), verbose=False)
    assert isinstance(err.value, NonFiniteError) and "'conv1.weight'" in str(err.value)
    assert module.record.calibration is None


@pytest.mark.parametrize("layer", ["conv1", "fc"])
def test_a_nan_weight_is_reported_on_the_layer_that_holds_it(tmp_path, layer):
    module = new_module()
    with torch.no_grad():
        getattr(module.model, layer).weight.view(-1)[0] = float("nan")
    trainer = new_trainer(tmp_path, Calibration())
    with pytest.raises(ValueError, match=rf"'{layer}(\.weight)?'"):
        trainer.validate(module, digits(), verbose=False)


def test_the_4_bit_vit_recipe_is_wired_from_the_callback_settings():
    """configs/deit.yaml's 4-bit settings reach the quantizers: twin-uniform fc2 inputs, per-channel MSE ranges in
    the post-LayerNorm fold, the softmax zero code at the mean."""
    import timm

    from lit_mpq.quant.layernorm import ChannelwiseActivationQuantizer, ChannelwiseMSEObserver
    from lit_mpq.quant.softmax import LogQuantizer
    from lit_mpq.quant.twin_uniform import TwinUniformQuantizer

    callback = Calibration(
        softmax_quantizer="log_sqrt2",
        softmax_underflow="mean",
        post_layernorm="reparam_mse",
        act_observer_overrides={r"blocks\..*\.mlp\.fc2": "twin_uniform"},
    )
    holder = nn.Module()
    holder.model, holder.plan, holder.input_size = timm.create_model("test_vit").eval(), None, (3, 160, 160)
    callback.setup(SimpleNamespace(datamodule=SimpleNamespace(input_size=(3, 160, 160))), holder, "validate")
    layers = quant_layers(holder.model)
    fc2 = [name for name in layers if name.endswith("mlp.fc2")]
    folded = [name for name in layers if name.endswith(("attn.qkv", "mlp.fc1"))]
    assert fc2 and all(isinstance(layers[name].input_quantizer, TwinUniformQuantizer) for name in fc2)
    for name in folded:
        quantizer = layers[name].input_quantizer
        assert isinstance(quantizer, ChannelwiseActivationQuantizer)
        assert isinstance(quantizer.observer, ChannelwiseMSEObserver)
    softmax = [layers[name].input_quantizer for name in layers if name.endswith("matmul_av")]
    assert softmax and all(isinstance(q, LogQuantizer) and q.underflow == "mean" for q in softmax)
    with pytest.raises(ValueError, match="post_layernorm"):
        Calibration(post_layernorm="reparam_percentile")


# ------------------------------------------------------------------------------------ cross-layer equalization
def test_cross_layer_equalization_keeps_the_float_model_and_is_recorded(tmp_path):
    """The digits CNN: conv1 → ReLU → conv2 → ReLU → max-pool → conv3 → ReLU → pool → fc, three pairs."""
    datamodule, module = digits(), new_module()
    callback = Calibration(cross_layer_equalization=5)
    new_trainer(tmp_path, callback).validate(module, datamodule, verbose=False)
    assert callback.equalized_pairs == [("conv1", "conv2"), ("conv2", "conv3"), ("conv3", "fc")]
    assert callback.folded_batchnorms  # equalization folds BatchNorm first
    assert module.record.calibration.settings["cross_layer_equalization"] == {"iterations": 5, "pairs": 3}
    datamodule.setup("validate")
    images = torch.cat([x for x, _ in datamodule.val_dataloader()])
    with torch.no_grad():  # the quantizers are off after calibration: the equalized model is the float one
        torch.testing.assert_close(module(images), float_model()(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [-1, True])
def test_a_bad_equalization_count_is_refused(bad):
    with pytest.raises(ValueError, match="number of iterations"):
        Calibration(cross_layer_equalization=bad)


def test_equalization_without_folding_is_refused():
    with pytest.raises(ValueError, match="BatchNorm folded first"):
        Calibration(cross_layer_equalization=20, fold_batchnorm=False)
