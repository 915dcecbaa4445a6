"""The packed quantized checkpoint (``quantized.pt``): a calibrated mixed-precision model in as many bits as it needs.

What a run quantized, and nothing else, so that the model can be shipped, reloaded and evaluated with no calibration
data and no recalibration:

- every quantized weight as integer codes bit-packed at its allocated width (:mod:`lit_mpq.deploy.packing`), with its
  scales (one per output channel or one per tensor) and, for asymmetric weights, zero points;
- the activation quantization parameters each quantizer used at its allocated width (scale and zero point; the
  log-softmax zero-code value, twin-uniform steps, per-channel LayerNorm ranges where those quantizers are used),
  and the observed range;
- the output shift of bias correction, and the weight and bias a RepQ-ViT-folded Linear computes with;
- every tensor that stays in floating point (biases, norms, embeddings, float layers) in its own dtype;
- the plan, the quantization card, the quantizer settings, the folded BatchNorm pairs and the backbone's name.

The file is a ``torch.save`` dict of tensors and plain data only, read back with ``torch.load(weights_only=True)``
(:func:`~lit_mpq.models.factory.load_weights_file`). Small tensors of one dtype share one flat tensor, so that the
container adds a few hundred bytes per dtype rather than per tensor: :func:`packed_size` compares the file with the
ideal ``Σ bits·params/8`` plus scales, zero points, activation parameters and the float tensors at their own width.

:func:`load_quantized` rebuilds the model: the backbone by name, the same BatchNorm folding, quantizers with the
stored settings and bit widths, weights that are exactly the dequantized codes, and quantization parameters taken as
stored instead of recomputed. Its logits are bit-identical to the run's fake-quantized model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from lit_mpq.deploy.packing import pack_codes, unpack_codes
from lit_mpq.plan import QuantPlan
from lit_mpq.quant.apply import (
    QuantSettings,
    apply_plan,
    apply_post_layernorm,
    measure_model,
    quant_layers,
    quantize_model,
)
from lit_mpq.quant.batchnorm import fold_batchnorm
from lit_mpq.quant.functional import _broadcast, dequantize, quant_range
from lit_mpq.quant.modules import ActivationQuantizer, QuantLayerMixin, QuantLinear
from lit_mpq.quant.weights import weight_qparams

__all__ = [
    "FORMAT",
    "FrozenOutputShift",
    "LoadedQuantized",
    "PackedSize",
    "QuantizedExportError",
    "is_packed_checkpoint",
    "load_packed_if_any",
    "load_quantized",
    "read_index",
    "pack_model",
    "quantized_weight",
    "packed_size",
    "save_quantized",
]

FORMAT = "lit_mpq.quantized/1"
"""The ``format`` entry of a packed checkpoint; a reader refuses any other."""

_QUANTIZER_PARTS = (".weight_quantizer.", ".input_quantizer.", ".other_quantizer.", ".bias_correction.")


class QuantizedExportError(ValueError):
    """The model holds something the packed format cannot represent exactly."""


class FrozenOutputShift(nn.Module):
    """Bias correction of a reloaded layer: the per-channel output shift the run computed, applied as stored.

    The live :class:`~lit_mpq.quant.modules.BiasCorrection` computes ``(W - W_q) E[x]`` from the float weight, which
    a packed model no longer has.
    """

    def __init__(self, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift.detach().clone())

    def correction(self, weight: Tensor, quantized: Tensor, key: tuple, groups: int = 1) -> Tensor:
        """The stored shift (the arguments of the live correction are ignored)."""
        return self.shift

    def observe(self, feature_sum: Tensor, rows: int) -> None:
        """A packed model is not recalibrated."""
        raise RuntimeError("a model loaded from a packed checkpoint cannot be recalibrated")


@dataclass(frozen=True)
class PackedSize:
    """A packed file's size next to the ideal one, in bytes.

    Attributes:
        file_bytes: The file on disk.
        weight_bits_bytes: ``Σ bits·params/8`` over the packed weights.
        scale_bytes: Weight scales and zero points at their stored width.
        activation_bytes: Activation quantization parameters (and observed ranges).
        float_bytes: Tensors kept in floating point, at their own width.
    """

    file_bytes: int
    weight_bits_bytes: float
    scale_bytes: int
    activation_bytes: int
    float_bytes: int

    @property
    def ideal_bytes(self) -> float:
        """What the content needs with no container at all."""
        return self.weight_bits_bytes + self.scale_bytes + self.activation_bytes + self.float_bytes

    @property
    def overhead(self) -> float:
        """``file / ideal - 1``: 0.05 is a file 5 % over the ideal."""
        return self.file_bytes / self.ideal_bytes - 1.0


@dataclass
class LoadedQuantized:
    """What :func:`load_quantized` rebuilt.

    Attributes:
        model: The quantized model, quantizers in ``quant`` mode at the plan's widths.
        plan: The plan the run applied (sensitivities included).
        card: The run's quantization card (empty when the run wrote none).
        content: The file's raw content (metadata, sizes).
    """

    model: nn.Module
    plan: QuantPlan
    card: dict[str, Any]
    content: dict[str, Any]


# ------------------------------------------------------------------------------------------------ value encoding
# Cached quantization parameters are tensors (mostly 0-d), numbers and tuples of those. 0-d tensors are stored as
# Python numbers with their dtype (a float32 is exact in a Python float): a tensor record each would cost the
# container more than the parameters themselves.


def _encode(value: Any, blobs: _Blobs) -> Any:
    if isinstance(value, Tensor):
        if value.dim() == 0:
            return {"scalar": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
        return {"tensor": blobs.add(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, blobs) for v in value]}
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    raise QuantizedExportError(f"cannot store a cached quantization parameter of type {type(value).__name__}")


def _decode(value: Any, blobs: Mapping[str, Tensor], device: torch.device) -> Any:
    if isinstance(value, Mapping):
        if "scalar" in value:
            return torch.tensor(value["scalar"], dtype=getattr(torch, value["dtype"]), device=device)
        if "tensor" in value:
            return _take(blobs, value["tensor"]).to(device)
        return tuple(_decode(v, blobs, device) for v in value["tuple"])
    return value


def _encoded_bytes(value: Any, blobs: Mapping[str, Tensor]) -> int:
    if isinstance(value, Mapping):
        if "scalar" in value:
            return torch.empty((), dtype=getattr(torch, value["dtype"])).element_size()
        if "tensor" in value:
            return _nbytes(blobs, value["tensor"])
        return sum(_encoded_bytes(v, blobs) for v in value["tuple"])
    return 0


def _text(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(zlib.compress(data, 9)), dtype=torch.uint8)


def _untext(blob: Tensor) -> str:
    return zlib.decompress(blob.numpy().tobytes()).decode("utf-8")


class _Blobs:
    """Tensors of one dtype concatenated into one flat tensor each; entries say where each one lies."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, tensor: Tensor) -> dict[str, Any]:
        dtype = str(tensor.dtype).removeprefix("torch.")
        flat = tensor.detach().cpu().reshape(-1)
        offset = self.sizes.get(dtype, 0)
        self.parts.setdefault(dtype, []).append(flat)
        self.sizes[dtype] = offset + flat.numel()
        return {"dtype": dtype, "offset": offset, "shape": list(tensor.shape)}

    def tensors(self) -> dict[str, Tensor]:
        return {dtype: torch.cat(parts) for dtype, parts in self.parts.items()}


def _nbytes(blobs: Mapping[str, Tensor], entry: Mapping[str, Any]) -> int:
    return math.prod(entry["shape"]) * blobs[entry["dtype"]].element_size()


def _take(blobs: Mapping[str, Tensor], entry: Mapping[str, Any]) -> Tensor:
    flat = blobs[entry["dtype"]][entry["offset"] : entry["offset"] + math.prod(entry["shape"])]
    return flat.reshape(entry["shape"]).clone()


# ---------------------------------------------------------------------------------------------------------- packing


def _reparameterization(layer: QuantLayerMixin):
    return layer._reparameterization(active=True) if isinstance(layer, QuantLinear) else None


def quantized_weight(
    name: str, layer: QuantLayerMixin, bits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The integer form of ``layer``'s fake-quantized weight at ``bits``.

    Returns:
        ``(codes, scale, zero_point, output_shift, reparam_bias)``: int64 codes of the weight's shape with
        ``scale * (codes - zero_point)`` bit for bit the fake-quantized weight (per output channel or per tensor);
        the bias-correction shift (or None); for a RepQ-ViT-folded Linear, the bias it computes with (the codes
        are then those of the folded weight ``W diag(r1)``), else None.

    Raises:
        QuantizedExportError: If the weight is computed from the parameters (weight standardization), or the
            fake-quantized weight is not exactly on its grid.
    """
    if type(layer).effective_weight is not QuantLayerMixin.effective_weight:
        raise QuantizedExportError(
            f"layer {name!r} ({type(layer).__name__}) computes its kernel from its parameters (weight "
            "standardization); packing it is not supported: quantize it in float (leave it out of the plan)"
        )
    quantizer = layer.weight_quantizer
    reparam_bias = shift = None
    with torch.no_grad():
        rep = _reparameterization(layer)
        if rep is not None:
            source = layer.weight * rep.r1.to(layer.weight)
            quantized = layer._fake_quantize_uncached(source, bits)
            frozen = getattr(layer, "frozen_simulated", None)  # loaded from a packed file: its bias as stored
            reparam_bias = (
                frozen[2] if frozen is not None and frozen[0] == bits else layer._simulated_params(rep, bits)[1]
            )
            # what QuantLinear._fake_quantize_uncached quantizes W diag(r1) with
            scale, zero_point = quantizer.fixed_qparams.get(bits) or weight_qparams(
                source, bits, quantizer.symmetric, quantizer.per_channel, quantizer.method
            )
        else:  # a data-driven rounding rounds on this same grid
            source = layer.weight
            quantized = layer.quantize_weight(bits)
            scale, zero_point = quantizer.qparams(source, bits, layer.weight_version())
        qmin, qmax = quant_range(bits, quantizer.symmetric)
        axis = 0 if scale.dim() == 1 else None
        codes = torch.round(quantized / _broadcast(scale, quantized, axis)) + _broadcast(zero_point, quantized, axis)
        dequantized = dequantize(codes, scale, zero_point, axis)
        if not torch.equal(dequantized, quantized) or int(codes.min()) < qmin or int(codes.max()) > qmax:
            raise QuantizedExportError(
                f"layer {name!r}: its quantized weight is not exactly scale·(code - zero point) on its {bits}-bit grid "
                f"(largest difference {float((dequantized - quantized).abs().max()):.3g}); it cannot be packed"
            )
        if layer.bias_correction is not None:
            key = (quantizer.bits, quantizer.rounding_version, *layer.weight_version())
            shift = layer.bias_correction.correction(layer.weight, quantized, key, getattr(layer, "groups", 1))
    return codes.to(torch.int64), scale.float(), zero_point, shift, reparam_bias


def _pack_weight(name: str, layer: QuantLayerMixin, bits: int, blobs: _Blobs) -> tuple[dict[str, Any], Tensor]:
    """One layer's codes (packed) and their metadata, its scales and zero points added to ``blobs``."""
    codes, scale, zero_point, shift, reparam_bias = quantized_weight(name, layer, bits)
    qmin, _ = quant_range(bits, layer.weight_quantizer.symmetric)
    entry: dict[str, Any] = {"bits": bits, "shape": list(codes.shape), "qmin": qmin, "count": codes.numel()}
    entry["scale"] = blobs.add(scale)
    if not layer.weight_quantizer.symmetric:
        entry["zero_point"] = blobs.add(zero_point.to(torch.int32))
    if shift is not None:
        entry["output_shift"] = blobs.add(shift)
    if reparam_bias is not None:
        entry["reparam_bias"] = blobs.add(reparam_bias)
    return entry, pack_codes(codes, bits, qmin)


def _activation_state(quantizer: ActivationQuantizer, blobs: _Blobs) -> dict[str, Any]:
    bits = quantizer.bits
    entries = [
        [_encode(key, blobs), _encode(value, blobs)]
        for key, value in quantizer._cache.items()
        if key == bits or (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and key[1] == bits)
    ]
    if not any(key == bits for key, _ in entries):
        entries.append([bits, _encode(quantizer.qparams(bits), blobs)])
    return {
        "type": type(quantizer).__name__,
        "bits": bits,
        "cache": entries,
        "min_val": _encode(quantizer.observer.min_val, blobs),
        "max_val": _encode(quantizer.observer.max_val, blobs),
    }


def pack_model(
    model: nn.Module,
    plan: QuantPlan,
    *,
    backbone: str,
    num_classes: int,
    input_size: tuple[int, ...],
    settings: QuantSettings,
    folded_batchnorms: list[tuple[str, str]] = (),
    card: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of a packed checkpoint for ``model`` as it is now (quantizers at the plan's widths).

    Args:
        model: The calibrated, fake-quantized backbone, its plan applied; one forward at the plan's widths has run
            (the validation loop), or runs here on zeros to fill the quantizers' parameters.
        plan: The applied plan.
        backbone: The backbone's registry name (what :func:`load_quantized` rebuilds it from).
        num_classes: Its number of classes.
        input_size: ``(C, H, W)`` of one input image.
        settings: The quantizer settings of the run.
        folded_batchnorms: The ``(layer, batchnorm)`` pairs folded before quantizing.
        card: The run's quantization card.
        model_kwargs: The keyword arguments the backbone was built with (:func:`~lit_mpq.models.create_backbone`).

    Raises:
        QuantizedExportError: If a layer cannot be represented exactly (see the message).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_size, device=device))  # fills every quantizer's parameters at its width
    model.train(was_training)
    blobs = _Blobs()
    weights: dict[str, dict[str, Any]] = {}
    packed: list[Tensor] = []
    offset = 0
    packed_keys: set[str] = set()
    for name, layer in quant_layers(model).items():
        if not isinstance(layer, QuantLayerMixin):
            continue
        quantizer = layer.weight_quantizer
        if quantizer.mode != "quant" or quantizer.bits is None:
            continue
        if quantizer.bits > 8:
            raise QuantizedExportError(
                f"layer {name!r} has {quantizer.bits}-bit weights; the packed format stores 1 to 8 bits (keep wider "
                "layers in float: a None width in the plan)"
            )
        entry, codes = _pack_weight(name, layer, quantizer.bits, blobs)
        entry["offset"], entry["nbytes"] = offset, codes.numel()
        offset += codes.numel()
        packed.append(codes)
        weights[name] = entry
        packed_keys.add(f"{name}.weight")
    activations = {
        name: _activation_state(module, blobs)
        for name, module in model.named_modules()
        if isinstance(module, ActivationQuantizer) and module.mode == "quant" and module.bits is not None
    }
    floats = {
        key: blobs.add(value)
        for key, value in model.state_dict().items()
        if key not in packed_keys and not any(part in f".{key}" for part in _QUANTIZER_PARTS)
    }
    settings_dict = dataclasses.asdict(settings)
    settings_dict["act_observer_overrides"] = [list(pair) for pair in settings.act_observer_overrides]
    index = {
        "num_classes": int(num_classes),
        "model_kwargs": dict(model_kwargs or {}),
        "input_size": [int(size) for size in input_size],
        "settings": settings_dict,
        "folded_batchnorms": [list(pair) for pair in folded_batchnorms],
        "weights": weights,
        "floats": floats,
        "activations": activations,
    }
    return {
        "format": FORMAT,
        "backbone": backbone,
        # Names, shapes, offsets and 0-d parameters as compressed JSON: pickled, they would outweigh a small model's
        # scales (a float survives JSON exactly: Python writes the shortest repr that reads back to the same value).
        "index": _text(json.dumps(index).encode()),
        "plan": _text(yaml.safe_dump(plan.to_dict(), sort_keys=False).encode()),
        "card": _text(yaml.safe_dump(dict(card or {}), sort_keys=False, allow_unicode=True).encode()),
        "codes": torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8),
        "blobs": blobs.tensors(),
    }


def packed_size(content: Mapping[str, Any], file_bytes: int) -> PackedSize:
    """The ideal size of ``content`` (see :class:`PackedSize`) next to ``file_bytes``."""
    blobs, index = content["blobs"], read_index(content)
    weights, activations = index["weights"].values(), index["activations"].values()
    scales = sum(
        _nbytes(blobs, e["scale"]) + (_nbytes(blobs, e["zero_point"]) if "zero_point" in e else 0) for e in weights
    )
    extra = sum(_nbytes(blobs, e[k]) for e in weights for k in ("output_shift", "reparam_bias") if k in e)
    activation_bytes = sum(_encoded_bytes(value, blobs) for state in activations for _, value in state["cache"]) + sum(
        _encoded_bytes(state[k], blobs) for state in activations for k in ("min_val", "max_val")
    )
    return PackedSize(
        file_bytes=int(file_bytes),
        weight_bits_bytes=sum(e["bits"] * e["count"] / 8 for e in weights),
        scale_bytes=scales,
        activation_bytes=activation_bytes,
        float_bytes=sum(_nbytes(blobs, entry) for entry in index["floats"].values()) + extra,
    )


def read_index(content: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON index of a packed checkpoint: shapes, widths and offsets of every stored tensor, and the settings."""
    return json.loads(_untext(content["index"]))


def save_quantized(path: str | os.PathLike, content: Mapping[str, Any]) -> PackedSize:
    """Write the packed checkpoint ``content`` (from :func:`pack_model`) to ``path``; returns its size report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(dict(content), buffer)
    path.write_bytes(buffer.getvalue())
    return packed_size(content, path.stat().st_size)


# ---------------------------------------------------------------------------------------------------------- loading


def is_packed_checkpoint(content: Any) -> bool:
    """Whether ``content`` (a loaded file) is a packed quantized checkpoint."""
    return (
        isinstance(content, Mapping)
        and isinstance(content.get("format"), str)
        and content["format"].startswith("lit_mpq.quantized/")
    )


def load_packed_if_any(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The content of ``path`` when it is a packed quantized checkpoint; None for no path or any other file.

    Only a ``torch.save`` zip archive is opened (and read weights-only); other files are left to the usual loader.
    """
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file() or not zipfile.is_zipfile(file):
        return None
    with zipfile.ZipFile(file) as archive:  # cheap: a packed file's pickle holds the word, a state_dict's does not
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if not pickles or b"lit_mpq.quantized/" not in archive.read(pickles[0]):
            return None
    from lit_mpq.models.factory import load_weights_file

    content = load_weights_file(file)
    return content if is_packed_checkpoint(content) else None


def load_quantized(source: str | os.PathLike | Mapping[str, Any], model: nn.Module | None = None) -> LoadedQuantized:
    """Rebuild the quantized model of a packed checkpoint, with no data: logits bit-identical to the run's.

    Args:
        source: The file (read with ``torch.load(weights_only=True)``) or its already loaded content.
        model: A fresh float backbone of the right architecture; default: built from the stored name (random
            weights, replaced by the file's).

    Raises:
        ValueError: If the file is not a packed checkpoint of a format this version reads, or does not match
            ``model``.
    """
    from lit_mpq.models.factory import create_backbone, load_weights_file  # models imports quant, not deploy

    label = str(source) if not isinstance(source, Mapping) else "the packed checkpoint"
    content = dict(source) if isinstance(source, Mapping) else load_weights_file(source)
    if not is_packed_checkpoint(content):
        raise ValueError(f"{label} is not a packed quantized checkpoint (no 'format: {FORMAT}' entry)")
    if content["format"] != FORMAT:
        raise ValueError(f"{label} has format {content['format']!r}; this lit_mpq reads {FORMAT!r}: upgrade lit_mpq")
    index = read_index(content)
    if model is None:
        model = create_backbone(
            content["backbone"], num_classes=index["num_classes"], model_kwargs=index.get("model_kwargs")
        )
    device = next(model.parameters()).device
    example = torch.zeros(1, *index["input_size"], device=device)
    model.eval()
    stored_pairs = [tuple(pair) for pair in index["folded_batchnorms"]]
    if stored_pairs:
        pairs = fold_batchnorm(model, example)
        if pairs != stored_pairs:
            raise ValueError(
                f"{label} was written for another model: it folded {len(stored_pairs)} BatchNorm layers, this "
                f"{content['backbone']!r} has {len(pairs)} to fold"
            )
    raw = dict(index["settings"])
    raw["act_observer_overrides"] = tuple(tuple(pair) for pair in raw.get("act_observer_overrides", ()))
    settings = QuantSettings(**raw)
    quantize_model(model, settings)
    structure = measure_model(model, example)
    if settings.post_layernorm in ("reparam", "reparam_mse"):
        apply_post_layernorm(model, example, "mse" if settings.post_layernorm == "reparam_mse" else "minmax")
    plan = QuantPlan.from_dict(yaml.safe_load(_untext(content["plan"])))
    if plan.names != structure.names:
        raise ValueError(
            f"{label} was written for another model: its plan names other layers than {content['backbone']!r}"
        )
    apply_plan(model, plan)
    blobs = content["blobs"]
    floats = {key: _take(blobs, entry) for key, entry in index["floats"].items()}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    packed_keys = {f"{name}.weight" for name in index["weights"]}
    missing = [k for k in missing if k not in packed_keys and not any(p in f".{k}" for p in _QUANTIZER_PARTS)]
    if missing or unexpected:
        raise ValueError(f"{label} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, state in index["activations"].items():
        quantizer = model.get_submodule(name)
        if type(quantizer).__name__ != state["type"] or quantizer.bits != state["bits"]:
            raise ValueError(
                f"{label}: {name} is a {type(quantizer).__name__} at {quantizer.bits} bits here, a "
                f"{state['type']} at {state['bits']} bits in the file"
            )
        quantizer._cache.clear()
        for key, value in state["cache"]:
            quantizer._cache[_decode(key, blobs, device)] = _decode(value, blobs, device)
        quantizer.observer.min_val = _decode(state["min_val"], blobs, device)
        quantizer.observer.max_val = _decode(state["max_val"], blobs, device)
    layers = quant_layers(model)
    codes = content["codes"]
    for name, entry in index["weights"].items():
        layer = layers[name]
        flat = unpack_codes(
            codes[entry["offset"] : entry["offset"] + entry["nbytes"]], entry["bits"], entry["qmin"], entry["count"]
        )
        scale = _take(blobs, entry["scale"]).to(device)
        zero_point = _take(blobs, entry["zero_point"]).to(device) if "zero_point" in entry else torch.zeros_like(scale)
        axis = 0 if scale.dim() == 1 else None
        quantized = dequantize(flat.reshape(entry["shape"]).to(device), scale, zero_point, axis)
        bits = entry["bits"]
        with torch.no_grad():
            if "reparam_bias" in entry:
                r1 = layer._reparameterization(active=True).r1.to(quantized)
                layer.weight.copy_(quantized / r1)
                layer.frozen_simulated = (bits, quantized / r1, _take(blobs, entry["reparam_bias"]).to(device))
                source = layer.weight * r1  # what the layer quantizes: its folded weight
            else:
                layer.weight.copy_(quantized)
                source = layer.weight
        # The weight is its own dequantized codes: keep the stored grid rather than derive one from it.
        layer.weight_quantizer.set_rounded(bits, source, quantized)
        layer.weight_quantizer.fixed_qparams[bits] = (scale, zero_point.long())
        if "output_shift" in entry:
            layer.bias_correction = FrozenOutputShift(_take(blobs, entry["output_shift"]).to(device))
    card = yaml.safe_load(_untext(content["card"])) or {}
    return LoadedQuantized(model=model, plan=plan, card=card, content=content)
