"""Small CNN for the embedded default dataset (scikit-learn's 8x8 handwritten digits).

The model is deliberately tiny (about 24k parameters) so that ``fit`` on the embedded digits data takes seconds on a
CPU, yet it has the layer types that matter for mixed-precision quantization: three convolutions (the first one sees
the raw input) and a linear classifier.
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_mpq.models.registry import register_backbone

__all__ = ["DigitsCNN", "digits_cnn"]


class DigitsCNN(nn.Module):
    """Three 3x3 conv/BN/ReLU stages, global average pooling and a linear classifier.

    Layout: ``conv1(1->16)``, ``conv2(16->32)`` followed by 2x2 max pooling (8x8 -> 4x4), ``conv3(32->64)``,
    global average pooling, ``fc(64->num_classes)``.

    Args:
        num_classes: Output classes.
        in_channels: Input channels (1 for the grayscale digits).
    """

    default_input_size: tuple[int, int, int] = (1, 8, 8)

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels}.")
        self.num_classes = num_classes
        self.default_input_size = (in_channels, 8, 8)
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape ``[N, num_classes]`` for images of shape ``[N, C, H, W]``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.flatten(self.pool(x)))


@register_backbone("digits_cnn")
def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    """Small CNN for the 1x8x8 scikit-learn digits (the embedded default)."""
    return DigitsCNN(num_classes=num_classes)
