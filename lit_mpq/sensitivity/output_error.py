"""Output-error sensitivity: how far each layer's output moves when its weights or inputs are quantized.

The seed projects' metric, ``S_l(b) = ||y_l^full - y_l^quant(b)||_2``, summed over the calibration set. One
float forward pass of the network gives every layer's float input ``x`` and output ``y``; for each candidate
bit width the layer is recomputed once with quantized weights and once with a quantized input, so all layers x
all candidates cost one pass plus the layers' own work per candidate. The float output norm ``||y_l||_2`` is
kept too, for the normalized variant ``S_l(b) / ||y_l||``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lit_mpq.quant.apply import quant_layers, quantizers_mode

ForwardFn = Callable[[Tensor], Tensor]


@dataclass
class OutputErrorStats:
    """Accumulated squared errors per layer and candidate, mergeable across ranks by summation.

    Attributes:
        weight_sq: ``{layer: {bits: sum of squared output error with quantized weights}}``.
        act_sq: ``{layer: {bits: sum of squared output error with quantized input}}``.
        output_sq: ``{layer: sum of squared float outputs}``.
        num_samples: Images seen.
    """

    weight_sq: dict[str, dict[int, float]] = field(default_factory=dict)
    act_sq: dict[str, dict[int, float]] = field(default_factory=dict)
    output_sq: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0

    def scores(self, normalized: bool = False) -> dict[str, dict[str, dict[int, float]]]:
        """``{layer: {"w": {bits: S}, "a": {bits: S}}}`` with ``S = sqrt(sum sq)``, or divided by ``||y||``."""
        result = {}
        for name in self.weight_sq:
            denom = self.output_sq[name] ** 0.5 if normalized else 1.0
            denom = denom or 1.0
            result[name] = {
                "w": {b: (v**0.5) / denom for b, v in self.weight_sq[name].items()},
                "a": {b: (v**0.5) / denom for b, v in self.act_sq[name].items()},
            }
        return result

    def as_tensor(self, names: list[str], candidates: list[int]) -> Tensor:
        """Pack into one float64 tensor (for an all-reduce)."""
        rows = [
            [*(self.weight_sq[n][b] for b in candidates), *(self.act_sq[n][b] for b in candidates), self.output_sq[n]]
            for n in names
        ]
        flat = torch.tensor(rows, dtype=torch.float64).flatten()
        return torch.cat([flat, torch.tensor([float(self.num_samples)], dtype=torch.float64)])

    @classmethod
    def from_tensor(cls, packed: Tensor, names: list[str], candidates: list[int]) -> OutputErrorStats:
        """Inverse of :meth:`as_tensor`."""
        k = len(candidates)
        table = packed[:-1].reshape(len(names), 2 * k + 1).tolist()
        stats = cls(num_samples=int(round(float(packed[-1]))))
        for name, row in zip(names, table, strict=True):
            stats.weight_sq[name] = dict(zip(candidates, row[:k], strict=True))
            stats.act_sq[name] = dict(zip(candidates, row[k : 2 * k], strict=True))
            stats.output_sq[name] = row[2 * k]
        return stats


@torch.no_grad()
def probe_output_error(
    model: nn.Module,
    batches: Iterable[Tensor],
    candidates: list[int],
    forward: ForwardFn | None = None,
    kinds: tuple[str, ...] = ("w", "a"),
) -> OutputErrorStats:
    """Accumulate every layer's output error for every candidate bit width over ``batches``.

    Activation quantizers must be calibrated already (their observers hold statistics). All quantizers are off
    during the probe, so each layer sees the float network's input.

    Args:
        model: Model prepared by :func:`~lit_mpq.quant.quantize_model`.
        batches: Input tensors (already on the model's device).
        candidates: Bit widths to probe.
        forward: Callable running the model on a batch (default ``model``).
        kinds: Which tensors to probe: ``"w"`` (weights) and/or ``"a"`` (input activations).
    """
    layers = quant_layers(model)
    stats = OutputErrorStats(
        weight_sq={n: dict.fromkeys(candidates, 0.0) for n in layers},
        act_sq={n: dict.fromkeys(candidates, 0.0) for n in layers},
        output_sq=dict.fromkeys(layers, 0.0),
    )

    def make_hook(name: str):
        def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x, y = inputs[0], output
            stats.output_sq[name] += float((y.double() ** 2).sum())
            for bits in candidates:
                if "w" in kinds:
                    y_w = layer.float_forward(x, layer.weight_quantizer.quantize(layer.weight, bits))
                    stats.weight_sq[name][bits] += float(((y_w - y).double() ** 2).sum())
                if "a" in kinds:
                    y_a = layer.float_forward(layer.input_quantizer.quantize(x, bits))
                    stats.act_sq[name][bits] += float(((y_a - y).double() ** 2).sum())

        return hook

    run = forward or model
    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        with quantizers_mode(model, "off"):
            for batch in batches:
                run(batch)
                stats.num_samples += int(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return stats
