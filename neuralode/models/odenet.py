"""Paper Table 1 image classifiers: ODE-Net (also trained as RK-Net) and ResNet.

Both share the downsampling stem and the head; only the feature block differs,
so accuracy and parameter counts are directly comparable.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from neuralode.models.odeblock import ODEBlock
from neuralode.solvers import SolverSettings


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ConcatConv2d(nn.Module):
    """3x3 conv whose input gets the time as an extra constant channel, so one
    set of weights gives a different update at each depth t."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in + 1, dim_out, 3, padding=1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.to(x).expand(x.shape[0], 1, x.shape[2], x.shape[3])
        return self.conv(torch.cat([tt, x], dim=1))


class ConvODEFunc(nn.Module):
    """dh/dt = f(t, h): GroupNorm, ReLU and time-concatenated convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = norm(channels)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(t, torch.relu(self.norm1(x)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.norm1(x)))
        return x + self.conv2(torch.relu(self.norm2(out)))


class Augment(nn.Module):
    """Appends zero channels (Augmented Neural ODEs, Dupont et al. 2019)."""

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.extra:
            return x
        zeros = x.new_zeros(x.shape[0], self.extra, *x.shape[2:])
        return torch.cat([x, zeros], dim=1)


class ImageClassifier(nn.Sequential):
    """Stem (28x28 -> width x 6x6), feature block, then pool + linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int, block: nn.Module, block_channels: int,
                 augment_dim: int = 0):
        super().__init__(
            nn.Conv2d(in_channels, width, 3, 1),
            norm(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 4, 2, 1),
            norm(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 4, 2, 1),
            Augment(augment_dim),
            block,
            norm(block_channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(block_channels, num_classes),
        )


def odenet(in_channels: int, num_classes: int, solver: SolverSettings, width: int = 64,
           augment_dim: int = 0) -> ImageClassifier:
    channels = width + augment_dim
    block = ODEBlock(ConvODEFunc(channels), solver)
    return ImageClassifier(in_channels, num_classes, width, block, channels, augment_dim)


def resnet(in_channels: int, num_classes: int, width: int = 64, augment_dim: int = 0,
           num_blocks: int = 6) -> ImageClassifier:
    channels = width + augment_dim
    block = nn.Sequential(*[ResBlock(channels) for _ in range(num_blocks)])
    return ImageClassifier(in_channels, num_classes, width, block, channels, augment_dim)
