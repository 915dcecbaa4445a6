"""Structured channel pruning (lit_mpq.pruning.structured, torch-pruning): runnable, coupled layers shrink together,
and the pruned model's MACs and parameters equal a count by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lit_mpq.models import create_backbone
from lit_mpq.models.cifar_resnet import PadShortcut
from lit_mpq.plan import LayerSpec, QuantPlan
from lit_mpq.pruning import measure_pruned, prune_channels

pytest.importorskip("torch_pruning")
pytestmark = pytest.mark.usefixtures("single_thread")


class ResidualNet(nn.Module):
    """conv1 (3->8) -> [conv2 (8->8) + identity] -> conv3 (8->16, stride 2) -> pool -> fc (16->10), on 3x8x8 inputs.

    The residual addition couples conv1's and conv2's output channels (and conv2's and conv3's inputs): one group.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


def residual_net() -> ResidualNet:
    torch.manual_seed(0)
    return ResidualNet().eval()


EXAMPLE = torch.zeros(1, 3, 8, 8)


def total(plan: QuantPlan, key: str) -> int:
    return sum(getattr(spec, key) for spec in plan.specs.values())


def test_half_the_channels_give_the_mac_count_by_hand():
    net = residual_net()
    dense = measure_pruned(net, EXAMPLE)
    # By hand, before: conv1 8 out x 64 positions x 3*9, conv2 8 x 64 x 8*9, conv3 16 x 16 (4x4 after stride 2) x 8*9,
    # fc 16 x 10.
    assert total(dense, "macs") == 8 * 64 * 27 + 8 * 64 * 72 + 16 * 16 * 72 + 160 == 69280
    changes = prune_channels(net, EXAMPLE, 0.5, ignored_layers=["fc"])
    # The residual group (conv1 out = conv2 in = conv2 out = conv3 in) goes 8 -> 4, conv3's outputs 16 -> 8.
    shapes = {name: (c.in_after, c.out_after) for name, c in changes.items()}
    assert shapes == {"conv1": (3, 4), "conv2": (4, 4), "conv3": (4, 8), "fc": (8, 10)}
    assert (changes["conv3"].in_before, changes["conv3"].out_before) == (8, 16)
    assert net.bn1.num_features == net.bn2.num_features == 4 and net.bn3.num_features == 8
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    plan = measure_pruned(net, EXAMPLE)
    macs = {
        "conv1": 4 * 64 * 3 * 9,  # 6912
        "conv2": 4 * 64 * 4 * 9,  # 9216
        "conv3": 8 * 16 * 4 * 9,  # 4608
        "fc": 8 * 10,  # 80
    }
    assert {name: spec.macs for name, spec in plan.specs.items()} == macs
    assert total(plan, "macs") == 20816
    assert {name: spec.params for name, spec in plan.specs.items()} == {
        "conv1": 108,
        "conv2": 144,
        "conv3": 288,
        "fc": 80,
    }
    assert all(spec.nonzero_params == spec.params for spec in plan.specs.values())  # smaller, and dense


def test_the_lowest_l1_channels_are_removed():
    net = residual_net()
    with torch.no_grad():
        # conv3's output channel c has L1 norm growing with c; bn3 and fc treat every channel alike.
        net.conv3.weight.copy_(torch.arange(1, 17, dtype=torch.float32).view(16, 1, 1, 1).expand(16, 8, 3, 3))
        net.bn3.weight.fill_(1.0)
        net.fc.weight.fill_(0.1)
    original = net.conv3.weight.detach().clone()
    prune_channels(net, EXAMPLE, 0.5, ignored_layers=["fc", "conv1", "conv2"])
    # Only conv3's outputs are free to go (the residual group's writers are ignored): channels 8..15 stay, in order.
    assert net.conv1.out_channels == 8 and net.conv3.in_channels == 8
    assert torch.equal(net.conv3.weight, original[8:])


def test_resnet20_with_its_residual_stream_kept_runs_and_shrinks():
    net = create_backbone("cifar_resnet20").eval()
    example = torch.zeros(1, 3, 32, 32)
    dense = measure_pruned(net, example)
    prune_channels(net, example, 0.3, ignored_layers=["conv1", r"re:layer\d\.\d\.conv2", "linear"])
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plan = measure_pruned(net, example)
    assert plan.names == dense.names
    # Each block's inner channels lose 30 % (16 -> 11, 32 -> 22, 64 -> 44 with torch-pruning's rounding).
    inner = [plan.specs[f"layer{s}.{b}.conv1"].weight_shape[0] for s in (1, 2, 3) for b in range(3)]
    assert inner == [11] * 3 + [22] * 3 + [44] * 3
    assert total(plan, "macs") < 0.75 * total(dense, "macs")


def test_a_shortcut_that_pads_channels_is_an_error_naming_the_fix():
    class PadNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
            self.shortcut = PadShortcut(4, 8, stride=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x: Tensor) -> Tensor:
            x = self.conv1(x)
            return self.fc((self.conv2(x) + self.shortcut(x)).mean(dim=(2, 3)))

    with pytest.raises(RuntimeError, match="ignored_layers"):
        prune_channels(PadNet().eval(), EXAMPLE, 0.5, ignored_layers=["fc"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_channels(residual_net(), EXAMPLE, 1.0, ["fc"])
    with pytest.raises(ValueError, match=r"\['global', 'layer'\]"):
        prune_channels(residual_net(), EXAMPLE, 0.5, ["fc"], scope="channel")
    with pytest.raises(ValueError, match="'head' matches no Conv2d/Linear layer"):
        prune_channels(residual_net(), EXAMPLE, 0.5, ["head"])


def test_plan_rows_keep_the_nonzero_count_through_yaml_and_old_rows_read_as_dense(tmp_path):
    spec = LayerSpec("fc", "linear", 160, 160, 16, 10, (10, 16), nonzero_params=80)
    plan = QuantPlan([spec, LayerSpec("c", "conv2d", 8, 64, 8, 8, (2, 4))])
    again = QuantPlan.from_yaml(plan.to_yaml(tmp_path / "plan.yaml"))
    assert again.specs["fc"] == spec and again.specs["fc"].density == 0.5
    assert again.specs["c"].nonzero_params is None and again.specs["c"].density == 1.0
    assert "nonzero_params" not in plan.to_dict()["layers"][1]["spec"]  # plans without pruning are written as before
