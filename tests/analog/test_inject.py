"""NoiseInjector: seeded and reproducible, per-layer streams, noise only while quantized, hooks removed on exit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_mpq.analog import NoiseInjector, ThermalNoise, WeightNoise
from lit_mpq.quant import QuantSettings, quantize_model, quantizers_mode
from lit_mpq.quant.apply import calibrate, set_mode


def small_cnn(device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).to(device)
    quantize_model(model, QuantSettings())
    calibrate(model, [torch.rand(16, 3, 8, 8).to(device)])  # drawn on the CPU: the same model on every device
    set_mode(model, "quant", "quant")
    return model


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer's output in one forward."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in ("0", "2")
    ]
    try:
        seen["out"] = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_the_same_seed_gives_the_same_noise_and_another_seed_other_noise():
    model = small_cnn()
    x = torch.rand(4, 3, 8, 8)
    energies = {"0": 2.0, "2": 2.0, "6": 2.0}
    runs = []
    for seed in (1, 1, 2):
        with NoiseInjector(model, ThermalNoise(), energies, seed=seed):
            runs.append(model(x))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    with NoiseInjector(model, ThermalNoise(), energies, seed=1) as injector:
        first = model(x)
        assert not torch.equal(model(x), first)  # the stream moves on
        injector.reseed(1)
        assert torch.equal(model(x), first)  # and restarts


def test_a_layers_draws_do_not_depend_on_which_other_layers_are_noisy():
    model = small_cnn()
    x = torch.rand(4, 3, 8, 8)
    clean = outputs(model, x)
    with NoiseInjector(model, ThermalNoise(), {"2": 1.0}, seed=5):
        alone = outputs(model, x)["2"] - clean["2"]
    with NoiseInjector(model, ThermalNoise(), {"0": 1.0, "2": 4.0}, seed=5):
        both = outputs(model, x)
    noise_2 = both["2"] - model[2](model[1](both["0"]))  # layer 2's own noise (at 4x the energy), hooks gone
    assert not torch.equal(both["0"], clean["0"])
    torch.testing.assert_close(noise_2, alone / 2, rtol=1e-4, atol=1e-6)


def test_the_float_reference_pass_and_layers_without_energy_stay_noise_free():
    model = small_cnn()
    x = torch.rand(4, 3, 8, 8)
    clean = outputs(model, x)
    with quantizers_mode(model, "off"):
        fp32 = model(x)
    with NoiseInjector(model, WeightNoise(), {"2": 0.5}, seed=0) as injector:
        noisy = outputs(model, x)
        with quantizers_mode(model, "off"):
            assert torch.equal(model(x), fp32)
        injector.enabled = False
        assert torch.equal(model(x), clean["out"])
    assert torch.equal(noisy["0"], clean["0"]) and not torch.equal(noisy["2"], clean["2"])
    assert torch.equal(model(x), clean["out"])  # hooks removed on exit
    assert not injector.attached


def test_energies_can_change_while_attached_and_are_checked():
    model = small_cnn()
    injector = NoiseInjector(model, ThermalNoise(), {"0": 1.0}).attach()
    try:
        injector.set_energies({"6": torch.tensor(3.0)})
        assert list(injector.energies) == ["6"]
        for bad in (0.0, -1.0, float("nan"), float("inf"), "1", True, torch.tensor(-2.0)):
            with pytest.raises(ValueError, match="finite positive energy"):
                injector.set_energies({"0": bad})
        with pytest.raises(ValueError, match=r"no quantized Conv2d/Linear layer named \['fc'\]"):
            injector.set_energies({"fc": 1.0})
        for seed in (-1, 1.5, True):
            with pytest.raises(ValueError, match="non-negative integer"):
                injector.reseed(seed)
    finally:
        injector.detach()


def test_a_model_without_quantized_layers_or_a_bad_noise_is_refused():
    with pytest.raises(ValueError, match="no quantized Conv2d/Linear"):
        NoiseInjector(nn.Sequential(nn.Linear(2, 2)), ThermalNoise())
    with pytest.raises(ValueError, match="NoiseModel"):
        NoiseInjector(small_cnn(), "thermal")  # type: ignore[arg-type]


def test_a_learned_energy_gets_a_gradient():
    """The noise scale is differentiable in the energy (what a learned allocation trains)."""
    model = small_cnn()
    log_energy = torch.zeros((), requires_grad=True)
    with NoiseInjector(model, ThermalNoise(), {"6": log_energy.exp()}, seed=0):
        loss = model(torch.rand(4, 3, 8, 8)).square().sum()
    loss.backward()
    assert log_energy.grad is not None and log_energy.grad.item() != 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_noise_is_reproducible_and_has_the_cpu_variance():
    model = small_cnn("cuda")
    x = torch.rand(256, 3, 8, 8, device="cuda")
    clean = model(x)
    runs = []
    for _ in range(2):
        with NoiseInjector(model, ThermalNoise(), {"0": 1.0}, seed=3):
            runs.append(model(x) - clean)
    assert torch.equal(runs[0], runs[1]) and runs[0].device.type == "cuda"
    # The same model on the CPU: the CUDA stream differs, its spread does not (std of the logits' noise).
    cpu = small_cnn("cpu")
    x_cpu = x.cpu()
    clean_cpu = cpu(x_cpu)
    torch.testing.assert_close(clean_cpu, clean.cpu(), rtol=1e-4, atol=1e-4)
    with NoiseInjector(cpu, ThermalNoise(), {"0": 1.0}, seed=3):
        cpu_noise = cpu(x_cpu) - clean_cpu
    assert not torch.allclose(cpu_noise, runs[0].cpu())
    assert runs[0].std().item() == pytest.approx(cpu_noise.std().item(), rel=0.15)
