"""A small time-conditioned U-Net vector field f(t, x) for image CNFs and flow matching.

The 3x3 conv field of FFJORD sees a 7x7 neighbourhood after three layers, so its flow can move
each pixel only by what nearby pixels say: trained by flow matching on MNIST it draws blobs. A
U-Net halves the resolution at each level (28 -> 14 -> 7 for three levels), so the coarsest
level sees the whole digit, and skip connections carry the detail back up.

Everything in it is smooth and per sample, as an ODE field must be: SiLU/softplus activations,
GroupNorm (statistics over one image's channels, never over the batch, so a sample's velocity
and its Hutchinson trace do not depend on the other rows), nearest-neighbour upsampling. Time
enters through sinusoidal features of t (one time for the batch, or one per sample in flow
matching) mapped by a small MLP to a per-channel scale and shift in every residual block. The
output conv starts at zero, so an untrained field is the identity flow.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int) -> int:
    """The most groups up to 8 that divide ``channels`` (GroupNorm needs a divisor)."""
    return math.gcd(channels, 8)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t at angular frequencies from 1 to 16 through a 2-layer MLP. Diffusion
    U-Nets scale t by 1000 first; here the field is integrated in t by an adaptive solver, and
    features that oscillate 1000 times faster would make it resolve the embedding, not the flow."""

    def __init__(self, dim: int, activation: type[nn.Module]):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(math.log(16.0) * torch.arange(half) / max(half - 1, 1)),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), activation(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        args = t.to(dtype).reshape(-1, 1).expand(batch, 1) * self.freqs.to(dtype)
        return self.mlp(torch.cat([args.sin(), args.cos()], 1))


class ResBlock(nn.Module):
    """norm → act → conv → norm → time scale and shift → act → conv, plus a (1x1 if needed) skip.
    Time modulates *after* the second norm: a shift added before it would be removed by GroupNorm
    wherever a group holds one or a few channels, as it does at these widths."""

    def __init__(self, c_in: int, c_out: int, emb: int, activation: type[nn.Module]):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(emb, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.act = activation()
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm2(self.conv1(self.act(self.norm1(x))))
        scale, shift = self.time(emb)[:, :, None, None].chunk(2, dim=1)
        return self.skip(x) + self.conv2(self.act(h * (1 + scale) + shift))


class UNetField(nn.Module):
    """``f(t, x)`` for images ``(B, C, H, W)``: one residual block per level on the way down and on
    the way up (with the level's skip), a residual block at the bottom, stride-2 convs to go down,
    nearest upsampling to the skip's size plus a conv to go up (so odd sizes such as 7 work)."""

    def __init__(self, channels: int, widths: Sequence[int] = (32, 64, 64), act: type[nn.Module] = nn.SiLU):
        super().__init__()
        if not widths:
            raise ValueError("a U-Net field needs at least one level width (model.hidden_dims)")
        widths = list(widths)
        emb = 4 * widths[0]
        self.time = TimeEmbedding(emb, act)
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        prev = widths[0]
        for i, w in enumerate(widths):
            self.down.append(ResBlock(prev, w, emb, act))
            self.pool.append(nn.Conv2d(w, w, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
            prev = w
        self.middle = ResBlock(prev, prev, emb, act)
        self.up = nn.ModuleList()
        self.lift = nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up.append(ResBlock(prev + widths[i], widths[i], emb, act))
            prev = widths[max(i - 1, 0)]  # the next level up, where the lift takes it
            self.lift.append(nn.Conv2d(widths[i], prev, 3, padding=1) if i > 0 else nn.Identity())
        self.head = nn.Sequential(nn.GroupNorm(_groups(prev), prev), act(), nn.Conv2d(prev, channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        emb = self.time(t, x.shape[0], x.dtype)
        h = self.stem(x)
        skips = []
        for block, pool in zip(self.down, self.pool):
            h = block(h, emb)
            skips.append(h)
            h = pool(h)
        h = self.middle(h, emb)
        for block, lift in zip(self.up, self.lift):
            skip = skips.pop()
            h = block(torch.cat([h, skip], 1), emb)
            if skips:
                h = lift(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.head(h)
