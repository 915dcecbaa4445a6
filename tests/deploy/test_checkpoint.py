"""The packed checkpoint: bit-identical reload with no data, size against an independently computed ideal, errors."""

from __future__ import annotations

import pytest
import torch

from lit_mpq.deploy.checkpoint import (
    FORMAT,
    QuantizedExportError,
    is_packed_checkpoint,
    load_quantized,
    pack_model,
    save_quantized,
)
from lit_mpq.models import create_backbone
from lit_mpq.quant.apply import (
    QuantSettings,
    quant_layers,
)
from lit_mpq.quant.functional import quant_range

pytestmark = pytest.mark.usefixtures("single_thread")

RESNET_SETTINGS = QuantSettings(act_observer="mse", bias_correction=True)


def write(model, plan, settings, tmp_path, backbone="cifar_resnet20", size=32, pairs=(), classes=10):
    content = pack_model(
        model, plan, backbone=backbone, num_classes=classes, input_size=(3, size, size), settings=settings,
        folded_batchnorms=pairs, card={"policy": "test"},
    )  # fmt: skip
    return save_quantized(tmp_path / "quantized.pt", content)


@pytest.mark.parametrize(
    "settings",
    [
        RESNET_SETTINGS,
        QuantSettings(weight_granularity="per_tensor", weight_symmetric=False, act_observer="percentile"),
        QuantSettings(weight_observer="mse", act_symmetric=True),
        QuantSettings(act_observer="mse", target="integer_only"),
        QuantSettings(act_observer="mse", target="integer_only_pow2"),
    ],
    ids=[
        "per-channel+bias-correction",
        "per-tensor-asymmetric",
        "mse-weights-symmetric-acts",
        "integer-only",  # the residual adds' operands and the output too
        "integer-only-pow2",
    ],
)
def test_resnet_reloads_bit_identical_without_data(tmp_path, settings, calibrated_resnet):
    model, plan, x, pairs = calibrated_resnet(settings=settings)
    with torch.no_grad():
        reference = model(x)
    write(model, plan, settings, tmp_path, pairs=pairs)
    loaded = load_quantized(tmp_path / "quantized.pt")
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference)
    assert loaded.plan.bits() == plan.bits()
    assert loaded.card == {"policy": "test"}


def test_a_data_driven_rounding_survives_the_round_trip(tmp_path, calibrated_resnet):
    """Weights rounded down (not to nearest) on their grid, as GPTQ/GPFQ may round, come back as rounded."""
    model, plan, x, pairs = calibrated_resnet(seed=1)
    for layer in quant_layers(model).values():
        quantizer = layer.weight_quantizer
        scale, zero_point = quantizer.qparams(layer.weight, quantizer.bits)
        qmin, qmax = quant_range(quantizer.bits, quantizer.symmetric)
        s = scale.reshape(-1, 1, 1, 1) if layer.weight.dim() == 4 else scale.reshape(-1, 1)
        floored = (torch.floor(layer.weight.detach() / s).clamp(qmin, qmax)) * s
        quantizer.set_rounded(quantizer.bits, layer.weight, floored)
    with torch.no_grad():
        reference = model(x)
    write(model, plan, RESNET_SETTINGS, tmp_path, pairs=pairs)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "quantized.pt").model(x), reference)


def test_vit_with_every_special_quantizer_reloads_bit_identical(tmp_path, calibrated, vit_recipe):
    """Attention matmuls, log-sqrt2 softmax with its mean zero code, twin-uniform fc2, RepQ-ViT reparam_mse inputs."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    plan, x = calibrated(model, vit_recipe, 32, seed=2, a_bits=(4, 6, 8))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"LogQuantizer", "TwinUniformQuantizer", "ChannelwiseActivationQuantizer"} <= kinds
    with torch.no_grad():
        reference = model(x)
    write(model, plan, vit_recipe, tmp_path, backbone="test_vit", classes=model.num_classes)
    fresh = timm.create_model("test_vit", pretrained=False).eval()
    loaded = load_quantized(tmp_path / "quantized.pt", model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference)


def test_packed_size_is_within_ten_percent_of_the_ideal(tmp_path, calibrated_resnet):
    model, plan, _, pairs = calibrated_resnet(seed=3)
    layers = quant_layers(model)
    # The ideal, computed here from the model alone: b-bit codes, one float32 scale per output channel, every other
    # tensor (biases, the head) as float32, per activation quantizer a float32 scale, an int64 zero point and the
    # observed float32 min and max.
    ideal_codes = sum(plan[name].w_bits * layer.weight.numel() / 8 for name, layer in layers.items())
    scales = sum(4 * layer.weight.shape[0] for layer in layers.values())
    floats = sum(
        t.numel() * t.element_size()
        for key, t in model.state_dict().items()
        if "quantizer" not in key and "bias_correction" not in key and key.removesuffix(".weight") not in layers
    )
    shifts = sum(4 * layer.weight.shape[0] for layer in layers.values())  # bias correction's stored shifts
    size = write(model, plan, RESNET_SETTINGS, tmp_path, pairs=pairs)
    assert size.weight_bits_bytes == ideal_codes
    assert size.file_bytes == (tmp_path / "quantized.pt").stat().st_size
    activations = (4 + 8 + 4 + 4) * len(layers)
    ideal = ideal_codes + scales + floats + shifts + activations
    assert size.ideal_bytes == ideal
    assert size.file_bytes <= 1.10 * ideal


def test_not_a_packed_file_and_a_future_format_are_refused(tmp_path, calibrated_resnet):
    plain = tmp_path / "plain.pt"
    torch.save(create_backbone("cifar_resnet20").state_dict(), plain)
    with pytest.raises(ValueError, match="not a packed quantized checkpoint"):
        load_quantized(plain)
    model, plan, _, pairs = calibrated_resnet()
    content = pack_model(
        model, plan, backbone="cifar_resnet20", num_classes=10, input_size=(3, 32, 32), settings=RESNET_SETTINGS,
        folded_batchnorms=pairs,
    )  # fmt: skip
    assert is_packed_checkpoint(content) and content["format"] == FORMAT
    with pytest.raises(ValueError, match="upgrade lit_mpq"):
        load_quantized(content | {"format": "lit_mpq.quantized/99"})
    with pytest.raises(ValueError, match="another model"):
        load_quantized(content, model=create_backbone("cifar_resnet32"))


def test_mpq_module_loads_the_packed_file_and_calibration_refuses_it(tmp_path, calibrated_resnet):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lit_mpq.callbacks import Calibration
    from lit_mpq.module import MPQModule

    model, plan, x, pairs = calibrated_resnet(seed=4)
    with torch.no_grad():
        reference = model(x)
    write(model, plan, RESNET_SETTINGS, tmp_path, pairs=pairs)
    path = str(tmp_path / "quantized.pt")
    with pytest.warns(UserWarning, match="fp32_reference is turned off"):
        module = MPQModule(backbone="cifar_resnet20", checkpoint_path=path)
    assert module.quantization_frozen and not module.hparams.fp32_reference
    assert module.plan.bits() == plan.bits()
    with torch.no_grad():
        assert torch.equal(module.eval()(x), reference)
    with pytest.raises(MisconfigurationException, match="packed checkpoint"):
        Calibration().setup(None, module, "validate")
    with pytest.raises(ValueError, match="holds a quantized 'cifar_resnet20'"):
        MPQModule(backbone="cifar_resnet32", checkpoint_path=path)


def test_weights_wider_than_eight_bits_are_refused_with_the_layer_named(tmp_path, calibrated_resnet):
    model, plan, _, pairs = calibrated_resnet()
    name = plan.names[3]
    quant_layers(model)[name].weight_quantizer.bits = 16
    with pytest.raises(QuantizedExportError, match=f"layer '{name}' has 16-bit weights"):
        write(model, plan, RESNET_SETTINGS, tmp_path, pairs=pairs)
