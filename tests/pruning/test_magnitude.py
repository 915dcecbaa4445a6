"""Unstructured magnitude pruning (lit_mpq.pruning.magnitude) against a NumPy sort of |w|, global and per layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lit_mpq.pruning import magnitude_prune, make_permanent, weight_sparsity

pytestmark = pytest.mark.usefixtures("single_thread")


def small_net() -> nn.Sequential:
    """Three layers whose weights have very different scales, so that global and per-layer pruning differ."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.Flatten(), nn.Linear(5 * 2 * 2, 7))
    with torch.no_grad():
        for layer, scale in zip((net[0], net[2], net[4]), (1.0, 0.1, 3.0), strict=True):
            layer.weight.normal_(0.0, scale)  # 162, 270 and 140 weights, continuous: no ties
    return net


def weights(net: nn.Module) -> dict[str, np.ndarray]:
    return {
        name: m.weight.detach().numpy().copy()
        for name, m in net.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }


def smallest_mask(values: np.ndarray, amount: float) -> np.ndarray:
    """True where ``values`` is among the round(amount * n) smallest |values| (the NumPy reference)."""
    flat = np.abs(values).ravel()
    k = round(amount * flat.size)
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(flat, kind="stable")[:k]] = True
    return mask.reshape(values.shape)


def test_global_pruning_zeroes_exactly_the_smallest_fraction_of_all_weights():
    net = small_net()
    before = weights(net)
    biases = {name: m.bias.detach().clone() for name, m in net.named_modules() if hasattr(m, "bias") and name}
    counts = magnitude_prune(net, 0.3, scope="global")
    after = weights(net)
    names = list(before)
    everything = np.concatenate([before[n].ravel() for n in names])
    zero = smallest_mask(everything, 0.3)  # round(0.3 * 572) = 172 weights
    offset = 0
    for name in names:
        expected = zero[offset : offset + before[name].size].reshape(before[name].shape)
        offset += before[name].size
        np.testing.assert_array_equal(after[name] == 0, expected)
        np.testing.assert_array_equal(after[name][~expected], before[name][~expected])  # the rest untouched
        assert counts[name].nonzero == int((~expected).sum())
    assert sum(c.params - c.nonzero for c in counts.values()) == 172
    # Different scales: the small-scale layer loses far more than the large-scale one.
    assert counts["2"].sparsity > 0.6 and counts["4"].sparsity < 0.05
    for name, bias in biases.items():
        assert torch.equal(dict(net.named_modules())[name].bias, bias)


def test_per_layer_pruning_zeroes_the_smallest_fraction_of_each_layer():
    net = small_net()
    before = weights(net)
    counts = magnitude_prune(net, 0.5, scope="layer")
    for name, values in weights(net).items():
        expected = smallest_mask(before[name], 0.5)
        np.testing.assert_array_equal(values == 0, expected)
        assert counts[name].params - counts[name].nonzero == round(0.5 * before[name].size)


def test_ignored_layers_stay_dense_and_are_left_out_of_the_ranking():
    net = small_net()
    before = weights(net)
    magnitude_prune(net, 0.3, scope="global", ignored_layers=["re:4"])
    after = weights(net)
    np.testing.assert_array_equal(after["4"], before["4"])
    pool = np.concatenate([before["0"].ravel(), before["2"].ravel()])
    zero = smallest_mask(pool, 0.3)
    got = np.concatenate([(after["0"] == 0).ravel(), (after["2"] == 0).ravel()])
    np.testing.assert_array_equal(got, zero)


def test_permanent_pruning_leaves_plain_weights_and_masks_survive_training_otherwise():
    net = small_net()
    magnitude_prune(net, 0.5, scope="layer")
    for module in (net[0], net[2], net[4]):
        assert not prune.is_pruned(module) and isinstance(module.weight, nn.Parameter)
        assert not hasattr(module, "weight_mask") and not module._forward_pre_hooks
    assert set(net.state_dict()) == set(small_net().state_dict())

    net = small_net()
    magnitude_prune(net, 0.5, scope="layer", permanent=False)
    zeros = {name: s.params - s.nonzero for name, s in weight_sparsity(net).items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(3):  # training moves weight_orig everywhere, the mask keeps the pruned weights at zero
        optimizer.zero_grad()
        net(torch.randn(4, 3, 6, 6)).square().mean().backward()
        optimizer.step()
    assert all(torch.isfinite(m.weight_orig).all() for m in (net[0], net[2], net[4]))
    assert not torch.equal(net[0].weight_orig, small_net()[0].weight)  # it did train
    assert {name: s.params - s.nonzero for name, s in weight_sparsity(net).items()} == zeros
    assert sorted(make_permanent(net)) == ["0", "2", "4"]
    assert {name: s.params - s.nonzero for name, s in weight_sparsity(net).items()} == zeros


def test_zero_amount_prunes_nothing():
    net = small_net()
    before = weights(net)
    counts = magnitude_prune(net, 0.0)
    assert all(np.array_equal(before[n], v) for n, v in weights(net).items())
    assert all(c.nonzero == c.params for c in counts.values())


@pytest.mark.parametrize("amount", [1.0, -0.1, 1.5, "0.5", True])
def test_amount_outside_zero_one_is_refused(amount):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        magnitude_prune(small_net(), amount)


def test_unknown_scope_and_layer_names_list_the_allowed_values():
    with pytest.raises(ValueError, match=r"\['global', 'layer'\]"):
        magnitude_prune(small_net(), 0.3, scope="row")
    with pytest.raises(ValueError, match=r"'classifier' matches no Conv2d/Linear layer.*0, 2, 4"):
        magnitude_prune(small_net(), 0.3, ignored_layers=["classifier"])
    with pytest.raises(ValueError, match="not a valid regex"):
        magnitude_prune(small_net(), 0.3, ignored_layers=["re:("])
