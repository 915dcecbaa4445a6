"""Inject analog noise at the outputs of a model's quantized Conv2d/Linear layers, seeded and reproducible.

:class:`NoiseInjector` registers one forward hook per quantized weight layer (attention matmuls multiply two
activations and are left alone). A hook adds one draw of the noise model (:mod:`lit_mpq.analog.noise`) at the layer's
energy per MAC to its output, only while the layer is quantized (a quantizer in ``"quant"`` mode): the FP32 reference
pass of :class:`~lit_mpq.module.MPQModule`, which switches the quantizers off, stays noise-free.

Reproducibility: each layer draws from its own ``torch.Generator``, seeded from ``(seed, stream, layer index)``
(:class:`numpy.random.SeedSequence` mixes them), created on the device of the layer's output. The same seed, model,
inputs and device type give the same noise, whatever the energies: the standard normal draws are the same and only
their scale changes (common random numbers, so two allocations are compared on the same draws), and a layer's draws
do not depend on which other layers are noisy. CPU and CUDA generators produce different (equally distributed)
streams.

Example:
    >>> import torch
    >>> from lit_mpq.analog.noise import ThermalNoise
    >>> from lit_mpq.quant import QuantSettings, quantize_model
    >>> from lit_mpq.quant.apply import calibrate, set_mode
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> _ = quantize_model(model, QuantSettings())
    >>> _ = calibrate(model, [torch.randn(16, 8)])
    >>> set_mode(model, "quant", "quant")
    >>> x = torch.randn(2, 8)
    >>> with NoiseInjector(model, ThermalNoise(), {"0": 10.0}, seed=1):
    ...     a = model(x)
    >>> with NoiseInjector(model, ThermalNoise(), {"0": 10.0}, seed=1):
    ...     b = model(x)
    >>> torch.equal(a, b), torch.equal(a, model(x))
    (True, False)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_mpq.analog.noise import Energy, NoiseModel
from lit_mpq.quant.modules import is_quant_layer

__all__ = ["NoiseInjector", "check_energy", "noisy_layers"]


def noisy_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the quantized Conv2d/Linear layers of ``model``, in model order: where noise goes."""
    return {name: module for name, module in model.named_modules() if is_quant_layer(module)}


def check_energy(value: Any, what: str) -> Energy:
    """``value`` if it is a finite positive energy (a number, or a 0-d tensor whose value is checked).

    Raises:
        ValueError: Otherwise, naming ``what``.
    """
    number = value.detach().item() if isinstance(value, Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what}={value!r} must be a finite positive energy per MAC (units of E0)")
    return value if isinstance(value, Tensor) else float(number)


def _layer_seed(seed: int, stream: int, index: int) -> int:
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & 0x7FFF_FFFF_FFFF_FFFF


class NoiseInjector:
    """Adds ``noise`` to the outputs of the quantized layers, each at its own energy per MAC.

    Use it as a context manager (hooks attached on entry, removed on exit), or call :meth:`attach` and
    :meth:`detach`. Energies and seeds may change while it is attached.

    Args:
        model: A model whose Conv2d/Linear layers lit_mpq quantized (calibrated).
        noise: The noise model.
        energies: ``{layer name: energy per MAC}`` in units of ``E0``; layers not listed get no noise.
        seed: Seed of the noise draws.
        stream: A second seed component (e.g. the draw index, or the process rank), so that several independent
            streams share one ``seed``.

    Raises:
        ValueError: If ``model`` has no quantized layer, a name is not one of them, or an energy is not a finite
            positive number, or the seed is not an integer.
    """

    def __init__(
        self,
        model: nn.Module,
        noise: NoiseModel,
        energies: Mapping[str, Energy] | None = None,
        seed: int = 0,
        stream: int = 0,
    ) -> None:
        if not isinstance(noise, NoiseModel):
            raise ValueError(f"noise must be a lit_mpq.analog NoiseModel, got {type(noise).__name__}")
        self.layers = noisy_layers(model)
        if not self.layers:
            raise ValueError("the model has no quantized Conv2d/Linear layer: quantize and calibrate it first")
        self.noise = noise
        self._index = {name: i for i, name in enumerate(self.layers)}
        self._energies: dict[str, Energy] = {}
        self._generators: dict[tuple[str, str], torch.Generator] = {}
        self._handles: list[Any] = []
        self.enabled = True
        """Add noise (False: the hooks pass outputs through unchanged)."""
        self.set_energies(energies or {})
        self.reseed(seed, stream)

    # ----------------------------------------------------------------------------------------------- settings
    @property
    def energies(self) -> dict[str, Energy]:
        """``{layer: energy per MAC}`` of the noisy layers (a copy)."""
        return dict(self._energies)

    def set_energies(self, energies: Mapping[str, Energy]) -> None:
        """Replace every layer's energy (layers not in ``energies`` become noise-free).

        Raises:
            ValueError: On an unknown layer name or an energy that is not finite and positive.
        """
        unknown = [name for name in energies if name not in self.layers]
        if unknown:
            raise ValueError(
                f"no quantized Conv2d/Linear layer named {unknown[:3]}; the layers are {list(self.layers)[:4]}..."
            )
        self._energies = {name: check_energy(value, f"energy of {name!r}") for name, value in energies.items()}

    def reseed(self, seed: int, stream: int = 0) -> None:
        """Restart every layer's draws from ``(seed, stream)``.

        Raises:
            ValueError: If ``seed`` or ``stream`` is not a non-negative integer.
        """
        for value, what in ((seed, "seed"), (stream, "stream")):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"NoiseInjector {what}={value!r} must be a non-negative integer")
        self.seed, self.stream = int(seed), int(stream)
        self._generators.clear()

    def _generator(self, name: str, device: torch.device) -> torch.Generator:
        key = (name, str(device))
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(_layer_seed(self.seed, self.stream, self._index[name]))
            self._generators[key] = generator
        return generator

    # -------------------------------------------------------------------------------------------------- hooks
    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            energy = self._energies.get(name)
            if not self.enabled or energy is None:
                return None
            if module.input_quantizer.mode != "quant" and module.weight_quantizer.mode != "quant":
                return None  # the float reference pass
            generator = self._generator(name, output.device)
            return output + self.noise.sample(module, inputs[0], output, energy, generator)

        return hook

    def attach(self) -> NoiseInjector:
        """Register the forward hooks (once); returns ``self``."""
        if not self._handles:
            self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        return self

    def detach(self) -> None:
        """Remove the hooks; the layers compute without noise again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def __enter__(self) -> NoiseInjector:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()
