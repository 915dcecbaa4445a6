"""End-to-end sensitivity: how much the network's output distribution moves with one layer quantized.

For each layer, tensor kind (weights or input activations) and candidate bit width, only that quantizer is switched
on and the calibration images are run again; the score is the mean KL divergence ``KL(p_float || p_quant)`` of the
softmax outputs. It measures exactly what matters, at the price of ``2 x layers x candidates`` network passes, so
it is the slow reference against which the cheap metrics are judged (Kendall's tau in ``benchmarks/``).

Each setting runs the layers' own quantized forward, so subclasses of the float layers (timm's standardized and
SAME-padded convolutions) are measured as they will run, with nothing special here; so is bias correction, when the
layers have it (the output-error and Fisher probes leave it out).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.quant.apply import quant_layers, quantizers_mode
from lit_mpq.sensitivity.output_error import SensitivityStats

ForwardFn = Callable[[Tensor], Tensor]


@torch.no_grad()
def probe_end_to_end(
    model: nn.Module,
    batches: Iterable[Tensor],
    candidates: list[int],
    forward: ForwardFn | None = None,
    kinds: tuple[str, ...] = ("w", "a"),
    progress: Callable[[int], None] | None = None,
    rows: Collection[str] | None = None,
) -> SensitivityStats:
    """Sum of per-image ``KL(p_float || p_quant)`` with one quantizer on at a time.

    Args:
        model: Model prepared by :func:`~lit_mpq.quant.quantize_model`, activation quantizers calibrated.
        batches: Input tensors on the model's device; they are kept in memory and replayed for every setting.
        candidates: Bit widths to probe.
        forward: Callable running the model on a batch (default ``model``).
        kinds: ``"w"`` and/or ``"a"``.
        progress: Called with 1 after each (layer, kind, bits) setting.
        rows: Probe only these rows of :func:`~lit_mpq.quant.apply.quant_layers` (default all); the others keep no
            entry in the returned stats, so their scores are missing, never a silent zero.

    Raises:
        ValueError: ``rows`` names a row the model does not have.
    """
    run = forward or model
    inputs = list(batches)
    layers = quant_layers(model)
    if rows is not None:
        unknown = sorted(set(rows) - set(layers))
        if unknown:
            raise ValueError(f"probe_end_to_end: no quantized row named {unknown[:3]}; rows are {list(layers)[:3]}...")
        layers = {name: layer for name, layer in layers.items() if name in rows}
    stats = SensitivityStats.empty(list(layers), candidates)
    stats.num_samples = sum(int(x.shape[0]) for x in inputs)
    with quantizers_mode(model, "off"):
        reference = [F.log_softmax(run(x).double(), dim=-1) for x in inputs]
        for name, layer in layers.items():
            for kind in kinds:
                quantizer = layer.quantizer(kind)  # a matmul's "w" is its right-hand operand
                saved_bits = quantizer.bits
                quantizer.mode = "quant"
                try:
                    for bits in candidates:
                        quantizer.bits = bits
                        total = 0.0
                        for x, log_p in zip(inputs, reference, strict=True):
                            log_q = F.log_softmax(run(x).double(), dim=-1)
                            total += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))
                        (stats.weight_sq if kind == "w" else stats.act_sq)[name][bits] = total
                        if progress is not None:
                            progress(1)
                finally:
                    quantizer.mode = "off"
                    quantizer.bits = saved_bits
    return stats
