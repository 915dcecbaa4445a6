"""Analog noise models whose size is set by the energy spent per multiply-accumulate (MAC).

An analog accelerator computes each output of a Conv2d/Linear layer as one dot product ``y = sum_j w_j x_j`` of
length ``N`` (``in_channels / groups x kernel area`` for a convolution, ``in_features`` for a Linear). Its result is
noisy, and the noise shrinks as more energy is spent per MAC: repeating an operation ``K`` times and averaging, or
using ``K`` times more photons or charge, divides the noise variance by ``K``. Following Garg, Lou, Jain and
Nahmias, "Dynamic Precision Analog Computing for Neural Networks" (arXiv:2102.06365, 2021), and the normalisations
of their code (``github.com/sahajgarg/low_precision_nn``, ``noise_models/gaussian.py`` and
``quantized_modules/fused_qconv.py``), three Gaussian models are implemented. ``E`` is the energy per MAC in units of
``E0`` (the model's reference energy), ``x^`` and ``w^`` are the layer's quantized input and weight, and for output
channel ``c``:

=========  ==================================================================  ======================================
model      noise                                                               what sets the scale
=========  ==================================================================  ======================================
thermal    ``n ~ N(0, s^2)``, ``s = sigma_t sqrt(N) Dw_c Dx / sqrt(E)``          full scales of the weight and input
                                                                               grids; independent of the signal
shot       ``n ~ N(0, s^2)``, ``s = ||w^_c|| ||x^_patch|| / sqrt(N E)``          the signal (norms of the two vectors)
weight     ``w^_cj + d_cj``, ``d_cj ~ N(0, (sigma_w Dw_c)^2 / E)``; at the       the weight grid's full scale
           output ``var = sigma_w^2 Dw_c^2 ||x^_patch||^2 / E``
=========  ==================================================================  ======================================

``Dw_c = s_w,c (q_max - q_min)`` is the full scale of output channel ``c``'s weight grid and ``Dx = s_x (q_max -
q_min)`` that of the input grid (a tensor left in float is measured on the 8-bit grid of its range). Defaults:
``sigma_t = 0.01`` and ``sigma_w = 0.1`` at ``E = 1``, the constants of the paper's code.

*Thermal* noise (Johnson-Nyquist, or any signal-independent readout noise) is one independent Gaussian per MAC, of
standard deviation ``sigma_t Dw_c Dx / sqrt(E)``; summed over the ``N`` MACs of a dot product it has ``sqrt(N)``
times that. Equivalently, relative to the dot product's full scale ``N Dw_c Dx`` the noise is ``sigma_t / sqrt(N E)``:
the signal-to-noise ratio grows with the energy spent on the whole output, ``N E``.

*Shot* noise is the counting noise of photons or electrons, Poisson, here in its Gaussian limit. The form is that of
a homodyne optical MAC (Hamerly et al., "Large-Scale Optical Neural Networks Based on Photoelectric
Multiplication", Phys. Rev. X 9, 021032, 2019), where ``E`` is the number of photons per MAC: the variance
``||w^_c||^2 ||x^_patch||^2 / (N E)`` is the mean optical power per MAC over ``E``, so it grows with the signal
(``var ~ signal / E``) and vanishes for a zero input or a zero weight row.

*Weight* noise is programming or read noise of the stored weights: every weight gets an independent Gaussian error
relative to its channel's full scale, drawn afresh at every forward call and shared by the images of the batch and
the positions of a convolution (the same physical weight multiplies them all), as in the paper's code. It is
computed exactly, as the layer's linear map of ``x^`` with the weight error.

Units: ``E0`` for shot noise is one photon; :data:`PHOTON_ENERGY_1550NM_AJ` converts photons to attojoules at
1550 nm (``hc / lambda``). For thermal and weight noise ``E0`` is the energy at which ``sigma`` holds, a property of
the device that the paper leaves abstract, so their energies convert to joules only with a unit the user gives.

Example:
    >>> build_noise("thermal").describe()
    {'noise': 'thermal', 'sigma': 0.01}
    >>> round(PHOTON_ENERGY_1550NM_AJ, 5)
    0.12816
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.quant.functional import quant_range
from lit_mpq.quant.modules import QuantLayerMixin, is_quant_layer

__all__ = [
    "NOISE_MODELS",
    "PHOTON_ENERGY_1550NM_AJ",
    "NoiseModel",
    "ShotNoise",
    "ThermalNoise",
    "WeightNoise",
    "build_noise",
    "dot_length",
    "input_full_scale",
    "patch_norm_sq",
    "quantized_input",
    "quantized_weight",
    "weight_full_scale",
]

PLANCK_J_S = 6.62607015e-34
"""Planck's constant, J s (exact, SI 2019)."""

SPEED_OF_LIGHT_M_S = 299_792_458.0
"""Speed of light in vacuum, m/s (exact)."""

PHOTON_ENERGY_1550NM_AJ = PLANCK_J_S * SPEED_OF_LIGHT_M_S / 1550e-9 * 1e18
"""Energy of one 1550 nm photon, attojoules: ``hc / lambda`` = 0.12816 aJ (the unit of shot-noise energies)."""

Energy = float | Tensor
"""An energy per MAC in units of ``E0``: a number, or a 0-d tensor when it is learned."""


# --------------------------------------------------------------------------------------------- layer quantities
def _check_layer(layer: nn.Module) -> QuantLayerMixin:
    if not is_quant_layer(layer):
        raise ValueError(
            f"analog noise applies to lit_mpq's quantized Conv2d/Linear layers, got {type(layer).__name__}: "
            "run the Calibration callback (or lit_mpq.quant.quantize_model) first"
        )
    return layer  # type: ignore[return-value]


def dot_length(layer: nn.Module) -> int:
    """``N``, the length of one output's dot product: ``in_channels / groups x kernel area``, or ``in_features``.

    Raises:
        ValueError: If ``layer`` is not a quantized Conv2d/Linear.
    """
    layer = _check_layer(layer)
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    return int(layer.in_features)


def _grid_span(bits: int | None, symmetric: bool) -> int:
    qmin, qmax = quant_range(bits or 8, symmetric)
    return qmax - qmin


def weight_full_scale(layer: nn.Module) -> Tensor:
    """``Dw_c = s_w,c (q_max - q_min)``: the full scale of each output channel's weight grid, shape ``[C_out]``.

    A weight left in float (``bits`` None) is measured on the 8-bit grid of its range, which spans the same values.
    """
    layer = _check_layer(layer)
    quantizer = layer.weight_quantizer
    bits = quantizer.bits or 8
    scale, _ = quantizer.qparams(layer.effective_weight().detach(), bits, layer.weight_version())
    scale = scale.detach().flatten().to(layer.weight.dtype)
    return scale.expand(layer.weight.shape[0]) * _grid_span(bits, quantizer.symmetric)


def input_full_scale(layer: nn.Module) -> Tensor:
    """``Dx = s_x (q_max - q_min)``: the full scale of the input grid, a 0-d tensor (per-channel grids: the largest).

    Raises:
        ValueError: If the input quantizer has no calibrated range.
    """
    layer = _check_layer(layer)
    quantizer = layer.input_quantizer
    if not quantizer.observer.has_data and not quantizer.fixed_qparams:
        raise ValueError("the layer's input range is not calibrated: run the calibration before adding analog noise")
    bits = quantizer.bits or 8
    scale, _ = quantizer.qparams(bits)
    return scale.detach().max().to(layer.weight.dtype) * _grid_span(bits, quantizer.symmetric)


def quantized_input(layer: nn.Module, x: Tensor) -> Tensor:
    """``x^``: the input as the layer multiplies it (fake-quantized when its input quantizer is on)."""
    return _check_layer(layer).input_quantizer(x)


def quantized_weight(layer: nn.Module) -> Tensor:
    """``w^``: the kernel as the layer multiplies it (fake-quantized when its weight quantizer is on)."""
    layer = _check_layer(layer)
    return layer.weight_quantizer(layer.effective_weight(), layer.weight_version())


def linear_map(layer: nn.Module, x_hat: Tensor, weight: Tensor) -> Tensor:
    """The layer's convolution or matrix product of ``x_hat`` with ``weight``, without bias (padding as its own)."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(layer.pad_input(x_hat), weight, None)
    return F.linear(x_hat, weight)


def patch_norm_sq(layer: nn.Module, x_hat: Tensor) -> Tensor:
    """``||x^_patch||^2`` of every output position, broadcastable to the layer's output.

    A convolution sums the squared input over each receptive field (zero padding counts as zeros), per group; a
    Linear sums over the features.
    """
    layer = _check_layer(layer)
    squared = x_hat.detach().square()
    if isinstance(layer, nn.Conv2d):
        rows = 1 if layer.groups == 1 else layer.out_channels
        ones = torch.ones(rows, layer.in_channels // layer.groups, *layer.kernel_size, dtype=x_hat.dtype)
        return linear_map(layer, squared, ones.to(x_hat.device))
    return squared.sum(dim=-1, keepdim=True)


def _per_channel(values: Tensor, layer: nn.Module, ndim: int) -> Tensor:
    """``[C_out]`` values shaped to broadcast over an output of ``ndim`` dims (channels at dim 1, or last)."""
    shape = [1] * ndim
    shape[1 if isinstance(layer, nn.Conv2d) else -1] = -1
    return values.reshape(shape)


def _inverse_sqrt(energy: Energy, like: Tensor) -> Tensor:
    return torch.as_tensor(energy, dtype=like.dtype, device=like.device).rsqrt()


# ------------------------------------------------------------------------------------------------------ models
class NoiseModel(ABC):
    """One analog noise model: the noise added to a quantized layer's output at an energy per MAC.

    Args:
        sigma: Relative noise at ``E = 1`` (``None``: the model's default, :attr:`default_sigma`).

    Raises:
        ValueError: If ``sigma`` is not a finite positive number.
    """

    name: ClassVar[str]
    default_sigma: ClassVar[float]
    default_unit_aj: ClassVar[float | None] = None
    """Attojoules of one ``E0``, when physics fixes it (one photon for shot noise); ``None`` otherwise."""

    def __init__(self, sigma: float | None = None) -> None:
        sigma = self.default_sigma if sigma is None else sigma
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"{type(self).__name__}: sigma={sigma!r} must be a finite positive number")
        self.sigma = float(sigma)

    @abstractmethod
    def output_std(self, layer: nn.Module, x: Tensor, energy: Energy) -> Tensor:
        """Standard deviation of the noise on each output element, broadcastable to the layer's output.

        Args:
            layer: A quantized Conv2d/Linear.
            x: The layer's input (as its forward receives it).
            energy: Energy per MAC, units of ``E0``.
        """

    def sample(self, layer: nn.Module, x: Tensor, output: Tensor, energy: Energy, generator: torch.Generator) -> Tensor:
        """One draw of the noise to add to ``output`` (the layer's output for input ``x``).

        Args:
            layer: A quantized Conv2d/Linear.
            x: The layer's input.
            output: The layer's noise-free output (its shape, dtype and device are used).
            energy: Energy per MAC, units of ``E0``.
            generator: Source of the standard normal draws (on ``output``'s device).
        """
        z = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)
        return self.output_std(layer, x, energy).to(output.dtype) * z

    def describe(self) -> dict[str, Any]:
        """The settings, for the run record."""
        return {"noise": self.name, "sigma": self.sigma}


class ThermalNoise(NoiseModel):
    """Signal-independent noise: ``s = sigma_t sqrt(N) Dw_c Dx / sqrt(E)`` per output element of channel ``c``.

    ``sigma_t`` per MAC, relative to the product of the weight and input full scales (see the module docstring);
    relative to the dot product's full scale ``N Dw_c Dx`` it is ``sigma_t / sqrt(N E)``.
    """

    name = "thermal"
    default_sigma = 0.01

    def output_std(self, layer: nn.Module, x: Tensor, energy: Energy) -> Tensor:  # noqa: D102
        scale = weight_full_scale(layer) * input_full_scale(layer) * math.sqrt(dot_length(layer))
        return _per_channel(self.sigma * scale, layer, x.dim()) * _inverse_sqrt(energy, scale)


class ShotNoise(NoiseModel):
    """Photon (or electron) counting noise: ``s = sigma ||w^_c|| ||x^_patch|| / sqrt(N E)``, ``E`` in photons per MAC.

    ``sigma`` is 1 for the ideal homodyne detector of Hamerly et al. (2019); a larger value stands for excess noise.
    """

    name = "shot"
    default_sigma = 1.0
    default_unit_aj = PHOTON_ENERGY_1550NM_AJ

    def output_std(self, layer: nn.Module, x: Tensor, energy: Energy) -> Tensor:  # noqa: D102
        weight = quantized_weight(layer).detach()
        weight_norm = weight.flatten(1).norm(dim=1)
        x_hat = quantized_input(layer, x)
        norm_sq = patch_norm_sq(layer, x_hat).clamp_min(0)  # a convolution's sum of squares can round below 0
        product = _per_channel(weight_norm, layer, norm_sq.dim()) * norm_sq.sqrt()
        return self.sigma * product / math.sqrt(dot_length(layer)) * _inverse_sqrt(energy, product)


class WeightNoise(NoiseModel):
    """Weight programming noise: ``w^_cj + d_cj``, ``d_cj ~ N(0, (sigma_w Dw_c)^2 / E)``, one draw per forward call.

    At the output that is ``var = sigma_w^2 Dw_c^2 ||x^_patch||^2 / E`` (:meth:`output_std`), correlated across the
    positions and images that share the weight; :meth:`sample` draws the weight error itself.
    """

    name = "weight"
    default_sigma = 0.1

    def _weight_std(self, layer: nn.Module, energy: Energy) -> Tensor:
        scale = self.sigma * weight_full_scale(layer)
        return scale * _inverse_sqrt(energy, scale)

    def output_std(self, layer: nn.Module, x: Tensor, energy: Energy) -> Tensor:  # noqa: D102
        norm_sq = patch_norm_sq(layer, quantized_input(layer, x)).clamp_min(0)
        return _per_channel(self._weight_std(layer, energy), layer, norm_sq.dim()) * norm_sq.sqrt()

    def sample(  # noqa: D102
        self, layer: nn.Module, x: Tensor, output: Tensor, energy: Energy, generator: torch.Generator
    ) -> Tensor:
        weight = quantized_weight(layer)
        z = torch.randn(weight.shape, generator=generator, dtype=output.dtype, device=output.device)
        std = self._weight_std(layer, energy).reshape(-1, *[1] * (weight.dim() - 1))  # output channels along dim 0
        return linear_map(layer, quantized_input(layer, x), (z * std).to(output.dtype))


NOISE_MODELS: dict[str, type[NoiseModel]] = {"thermal": ThermalNoise, "shot": ShotNoise, "weight": WeightNoise}
"""The noise models by name."""


def build_noise(name: str, sigma: float | None = None) -> NoiseModel:
    """The noise model called ``name`` (``"thermal"``, ``"shot"`` or ``"weight"``).

    Raises:
        ValueError: On an unknown name or a bad ``sigma``.
    """
    if name not in NOISE_MODELS:
        raise ValueError(f"unknown analog noise {name!r}; choose one of {list(NOISE_MODELS)}")
    return NOISE_MODELS[name](sigma)
