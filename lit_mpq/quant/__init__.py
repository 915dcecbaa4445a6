"""Pure-PyTorch fake-quantization core: math, observers, quantized layers, and model surgery."""

from lit_mpq.quant.apply import (
    QuantSettings,
    apply_plan,
    default_filter,
    is_weight_layer,
    measure_layers,
    measure_model,
    quant_layer_names,
    quant_layers,
    quantize_model,
    quantizers_mode,
    set_mode,
)
from lit_mpq.quant.functional import fake_quantize, qparams_from_range, quant_range, quantize_dequantize
from lit_mpq.quant.modules import (
    ActivationQuantizer,
    QuantConv2d,
    QuantLinear,
    WeightQuantizer,
    quant_class,
    unsupported_reason,
)
from lit_mpq.quant.observers import (
    OBSERVERS,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    build_observer,
    sync_observers,
)
from lit_mpq.quant.weights import weight_qparams

__all__ = [
    "OBSERVERS",
    "ActivationQuantizer",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QuantConv2d",
    "QuantLinear",
    "QuantSettings",
    "WeightQuantizer",
    "apply_plan",
    "build_observer",
    "default_filter",
    "fake_quantize",
    "is_weight_layer",
    "measure_layers",
    "measure_model",
    "qparams_from_range",
    "quant_class",
    "quant_layer_names",
    "quant_layers",
    "quant_range",
    "quantize_dequantize",
    "quantize_model",
    "quantizers_mode",
    "set_mode",
    "sync_observers",
    "unsupported_reason",
    "weight_qparams",
]
