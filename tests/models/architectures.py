"""Realistic architectures, written for the tests: what people actually deploy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reparam.blocks import RepVGG, conv_bn


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 -> 3x3 -> 1x1 (each conv+BN), ReLUs, a residual."""

    def __init__(self, channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = 4 * width
        self.reduce = conv_bn(channels, width, 1)
        self.conv = conv_bn(width, width, 3, stride, 1)
        self.expand = conv_bn(width, out, 1)
        self.shortcut = conv_bn(channels, out, 1, stride) if stride != 1 or channels != out else None

    def forward(self, x):
        y = F.relu(self.conv(F.relu(self.reduce(x))))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.expand(y) + skip)


class ResNet50Style(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, channels = [], width
        for stage, count in enumerate([3, 4, 6, 3]):
            for i in range(count):
                blocks.append(Bottleneck(channels, width * 2**stage, 2 if i == 0 and stage > 0 else 1))
                channels = 4 * width * 2**stage
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2: 1x1 expand + ReLU6, depthwise 3x3 + ReLU6, linear 1x1 projection, residual."""

    def __init__(self, channels: int, out: int, stride: int, expansion: int = 6) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = conv_bn(channels, hidden, 1)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, 1, groups=hidden)
        self.project = conv_bn(hidden, out, 1)
        self.residual = stride == 1 and channels == out

    def forward(self, x):
        y = self.project(F.relu6(self.depthwise(F.relu6(self.expand(x)))))
        return x + y if self.residual else y


class MobileNetV2Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2, 1), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2),
            InvertedResidual(24, 24, 1),
            InvertedResidual(24, 32, 2),
            InvertedResidual(32, 32, 1),
        )
        self.last = nn.Sequential(conv_bn(32, 64, 1), nn.ReLU6())

    def forward(self, x):
        return self.last(self.blocks(self.stem(x))).mean((2, 3))


class InceptionModule(nn.Module):
    """GoogLeNet-style: 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches with ReLUs, concatenated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.b1 = conv_bn(channels, 8, 1)
        self.b3 = nn.ModuleList([conv_bn(channels, 4, 1), conv_bn(4, 8, 3, padding=1)])
        self.b5 = nn.ModuleList([conv_bn(channels, 4, 1), conv_bn(4, 8, 5, padding=2)])
        self.pool = conv_bn(channels, 8, 1)

    def forward(self, x):
        b3 = F.relu(self.b3[1](F.relu(self.b3[0](x))))
        b5 = F.relu(self.b5[1](F.relu(self.b5[0](x))))
        pooled = F.relu(self.pool(F.max_pool2d(x, 3, 1, 1)))
        return torch.cat([F.relu(self.b1(x)), b3, b5, pooled], dim=1)


class InceptionStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2, 1), nn.ReLU())
        self.mixed = nn.Sequential(InceptionModule(16), InceptionModule(32))

    def forward(self, x):
        return self.mixed(self.stem(x))


def double_conv(channels: int, out: int) -> nn.Sequential:
    return nn.Sequential(conv_bn(channels, out, 3, padding=1), nn.ReLU(), conv_bn(out, out, 3, padding=1), nn.ReLU())


class UNetStyle(nn.Module):
    """Encoder/decoder with skip connections: max-pool down, transposed conv up, concat skips."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2, self.middle = double_conv(3, 8), double_conv(8, 16), double_conv(16, 32)
        self.up2, self.dec2 = nn.ConvTranspose2d(32, 16, 2, 2), double_conv(32, 16)
        self.up1, self.dec1 = nn.ConvTranspose2d(16, 8, 2, 2), double_conv(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.middle(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.out(d1)


class Detector(nn.Module):
    """A RepVGG backbone under an FPN-style head: lateral 1x1s, top-down upsampling, 3x3 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = RepVGG((1, 2, 4, 14, 1), (8, 8, 16, 16, 32), num_classes=1).stages
        self.lateral = nn.ModuleList([nn.Conv2d(c, 16, 1) for c in (16, 16, 32)])
        self.smooth = nn.ModuleList([conv_bn(16, 16, 3, padding=1) for _ in range(3)])
        self.classify = nn.Conv2d(16, 5, 3, padding=1)

    def forward(self, x):
        features = []
        for index, stage in enumerate(self.backbone):
            x = stage(x)
            if index >= 2:
                features.append(x)
        top = self.lateral[2](features[2])
        mid = self.lateral[1](features[1]) + F.interpolate(top, scale_factor=2.0)
        low = self.lateral[0](features[0]) + F.interpolate(mid, scale_factor=2.0)
        return [self.classify(F.relu(s(p))) for s, p in zip(self.smooth, (low, mid, top))]
