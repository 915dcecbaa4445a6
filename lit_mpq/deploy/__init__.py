"""Shipping a quantized model: the packed checkpoint (``quantized.pt``) and the QDQ ONNX export run by ONNX Runtime."""

from lit_mpq.deploy.checkpoint import (
    LoadedQuantized,
    PackedSize,
    QuantizedExportError,
    load_quantized,
    pack_model,
    save_quantized,
)
from lit_mpq.deploy.onnx_export import evaluate_onnx, export_onnx

__all__ = [
    "LoadedQuantized",
    "PackedSize",
    "QuantizedExportError",
    "evaluate_onnx",
    "export_onnx",
    "load_quantized",
    "pack_model",
    "save_quantized",
]
