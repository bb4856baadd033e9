"""Toy 2-D densities for continuous normalizing flows.

Every generator is a pure function of a ``torch.Generator``, so train and test
sets are reproducible from ``(seed, split)``. The shapes follow the usual
FFJORD/RNODE benchmarks; the exact definitions (used for the entropies quoted in
the README) are in the docstrings below.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.data import Dataset, TensorDataset

Sampler = Callable[[int, torch.Generator], torch.Tensor]
_GENERATORS: dict[str, Sampler] = {}

# 8gaussians: 8 isotropic Gaussians of std 0.5/sqrt(2) (variance 0.125 per axis) on a circle of radius 4/sqrt(2).
EIGHT_RADIUS = 4.0 / math.sqrt(2.0)
EIGHT_STD = 0.5 / math.sqrt(2.0)


def _gen(name: str):
    def wrap(fn: Sampler) -> Sampler:
        _GENERATORS[name] = fn
        return fn
    return wrap


def _randn(n: int, g: torch.Generator, d: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=g)


def _rand(n: int, g: torch.Generator, d: int = 1) -> torch.Tensor:
    return torch.rand(n, d, generator=g)


def eight_centers() -> torch.Tensor:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return EIGHT_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], 1)


@_gen("8gaussians")
def eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    """Uniform mixture of N(c_k, 0.125 I), c_k = (4/sqrt 2)(cos 2πk/8, sin 2πk/8)."""
    k = torch.randint(0, 8, (n,), generator=g)
    return (eight_centers()[k] + EIGHT_STD * _randn(n, g).double()).float()


@_gen("checkerboard")
def checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    """Uniform on the 8 'black' 2x2 squares of a 4x4 board covering [-4, 4]^2 (area 32)."""
    x1 = _rand(n, g)[:, 0] * 4 - 2
    x2 = _rand(n, g)[:, 0] - torch.randint(0, 2, (n,), generator=g).float() * 2
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2


@_gen("pinwheel")
def pinwheel(n: int, g: torch.Generator) -> torch.Tensor:
    """Five arms: Gaussian blobs stretched radially and twisted by an angle growing with radius."""
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    k = torch.randint(0, arms, (n,), generator=g)
    feats = _randn(n, g) * torch.tensor([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angle = k.float() * (2 * math.pi / arms) + rate * torch.exp(feats[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    x = torch.stack([c * feats[:, 0] - s * feats[:, 1], s * feats[:, 0] + c * feats[:, 1]], 1)
    return 2 * x


@_gen("2spirals")
def two_spirals(n: int, g: torch.Generator) -> torch.Tensor:
    """Two interleaved Archimedean spirals with Gaussian noise (std 0.1)."""
    r = torch.sqrt(_rand(n, g)[:, 0]) * 540 * (2 * math.pi) / 360
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    x = torch.stack([-torch.cos(r) * r, torch.sin(r) * r], 1) * sign[:, None]
    return x / 3 + 0.1 * _randn(n, g)


@_gen("moons")
def moons(n: int, g: torch.Generator) -> torch.Tensor:
    """Two interleaving half circles with Gaussian noise (std 0.1), centred and scaled to about [-4, 4]."""
    theta = _rand(n, g)[:, 0] * math.pi
    upper = torch.randint(0, 2, (n,), generator=g).bool()
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x, y], 1) + 0.1 * _randn(n, g)
    return (pts - torch.tensor([0.5, 0.25])) * 2.5


@_gen("circles")
def circles(n: int, g: torch.Generator) -> torch.Tensor:
    """Two concentric circles (radii 3 and 1.5) with Gaussian noise (std 0.08)."""
    theta = _rand(n, g)[:, 0] * 2 * math.pi
    radius = torch.where(torch.randint(0, 2, (n,), generator=g).bool(), 3.0, 1.5)
    return torch.stack([torch.cos(theta), torch.sin(theta)], 1) * radius[:, None] + 0.08 * _randn(n, g)


@_gen("rings")
def rings(n: int, g: torch.Generator) -> torch.Tensor:
    """Four concentric rings (radii 1, 2, 3, 4) with Gaussian noise (std 0.08)."""
    theta = _rand(n, g)[:, 0] * 2 * math.pi
    radius = torch.randint(1, 5, (n,), generator=g).float()
    return torch.stack([torch.cos(theta), torch.sin(theta)], 1) * radius[:, None] + 0.08 * _randn(n, g)


@_gen("swissroll")
def swissroll(n: int, g: torch.Generator) -> torch.Tensor:
    """The 2-D swiss roll t(cos t, sin t)/3, t ~ U(1.5π, 4.5π), with Gaussian noise (std 0.25)."""
    t = 1.5 * math.pi * (1 + 2 * _rand(n, g)[:, 0])
    return torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 3 + 0.25 * _randn(n, g)


TOY_NAMES = tuple(_GENERATORS)


def sample_toy(name: str, n: int, seed: int) -> torch.Tensor:
    """``n`` samples of generator ``name`` as a float32 (n, 2) tensor, a pure function of ``seed``."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown toy dataset {name!r}; valid names: {', '.join(TOY_NAMES)}")
    return _GENERATORS[name](n, torch.Generator().manual_seed(seed)).float()


def toy_datasets(name: str, n_train: int, n_test: int, seed: int) -> tuple[Dataset, Dataset]:
    """Train and test sets drawn with different seeds derived from ``seed``."""
    return (TensorDataset(sample_toy(name, n_train, 2 * seed)), TensorDataset(sample_toy(name, n_test, 2 * seed + 1)))


# -- exact densities and entropies (for the benchmark) -----------------------------------------
def log_density(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of the 8gaussians and checkerboard generators."""
    x = x.double()
    if name == "8gaussians":
        d2 = ((x[:, None, :] - eight_centers()[None]) ** 2).sum(-1)
        var = EIGHT_STD ** 2
        return torch.logsumexp(-d2 / (2 * var), 1) - math.log(8) - math.log(2 * math.pi * var)
    if name == "checkerboard":
        i, j = torch.floor(x[:, 0] / 2), torch.floor(x[:, 1] / 2)
        inside = (x.abs() <= 4).all(1) & ((i + j) % 2 == 0)
        return torch.where(inside, -math.log(32.0), -math.inf)
    raise ValueError(f"no closed-form density for {name!r}")


def entropy(name: str, n: int = 1_000_000, seed: int = 12345) -> tuple[float, float]:
    """Differential entropy H = -E log p(x) in nats, with its Monte Carlo standard error
    (zero where it is exact: checkerboard is uniform on area 32, so H = ln 32)."""
    if name == "checkerboard":
        return math.log(32.0), 0.0
    lp = log_density(name, sample_toy(name, n, seed).double())
    return float(-lp.mean()), float(lp.std() / math.sqrt(n))
