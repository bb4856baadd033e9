"""Irregularly-sampled time series for the latent ODE (paper Sec. 5.1; Rubanova et al. 2019).

Every series carries its own time points. A series is a dict of tensors over its ``L`` points:

- ``times`` (L,): strictly increasing after construction (see below);
- ``values`` (L, D): the data (noisy); entries that are not observed may hold anything;
- ``obs`` (L, D): 1 where a value is observed and may be used by the encoder and likelihood;
- ``interp`` (L, D): 1 at held-out points inside the observed window (interpolation targets);
- ``extrap`` (L, D): 1 at held-out points after the window (extrapolation targets).

A value missing inside an observation vector is simply a 0 in the masks (``dataset.missing_rate``).

**Unsorted times are sorted, not rejected:** :class:`IrregularSeries` sorts each series by time
(permuting values and masks with it). Repeated times within one series are rejected, as is a
series with no observed value at all, with a :class:`DataError` naming the series.

:func:`collate_series` builds a batch on the sorted union of the batch's times: every tensor
becomes (B, T, ...) on the union grid, with the masks 0 wherever a series has no point.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from neuralode.data.images import DataError

FIELDS = ("values", "obs", "interp", "extrap")


class IrregularSeries(Dataset):
    """A list of irregularly-sampled series, checked and sorted once at construction."""

    def __init__(self, series: Sequence[dict[str, torch.Tensor]], t0: float = 0.0, name: str = "series"):
        self.t0 = float(t0)
        self.series = []
        for i, s in enumerate(series):
            times = torch.as_tensor(s["times"], dtype=torch.float32).reshape(-1)
            values = torch.as_tensor(s["values"], dtype=torch.float32)
            if values.ndim == 1:
                values = values[:, None]
            if values.shape[0] != times.shape[0]:
                raise DataError(f"{name} series {i}: {times.shape[0]} times but {values.shape[0]} value rows")
            masks = {}
            for k in ("obs", "interp", "extrap"):
                m = s.get(k)
                m = torch.zeros_like(values) if m is None else torch.as_tensor(m, dtype=torch.float32)
                masks[k] = m.reshape(values.shape) if m.ndim == values.ndim else m[:, None].expand_as(values).clone()
            if not torch.isfinite(times).all():
                raise DataError(f"{name} series {i}: times contain NaN or Inf")
            order = torch.argsort(times, stable=True)
            times = times[order]
            if times.numel() > 1 and not bool((times[1:] > times[:-1]).all()):
                raise DataError(f"{name} series {i}: repeated time points within one series")
            if times.numel() and times[0] < self.t0:
                raise DataError(f"{name} series {i}: time {times[0].item():g} is before t0={self.t0:g}")
            obs = masks["obs"][order]
            if obs.sum() == 0:
                raise DataError(f"{name} series {i} has no observations (every entry of its obs mask is 0); "
                                "the encoder needs at least one observed value per series")
            vals = values[order]
            # Unobserved, non-target entries may be NaN in the input; store zeros so no NaN reaches a loss.
            used = (obs + masks["interp"][order] + masks["extrap"][order]) > 0
            if not torch.isfinite(vals[used]).all():
                raise DataError(f"{name} series {i}: NaN or Inf at an observed or target entry")
            vals = torch.where(used, vals, torch.zeros_like(vals))
            self.series.append(dict(times=times, values=vals, obs=obs, interp=masks["interp"][order],
                                    extrap=masks["extrap"][order]))
        if not self.series:
            raise DataError(f"{name}: empty dataset")
        dims = {s["values"].shape[1] for s in self.series}
        if len(dims) != 1:
            raise DataError(f"{name}: series have different observation dimensions {sorted(dims)}")
        self.dim = dims.pop()

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.series[i]

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        return collate_series(items, self.t0)


def collate_series(items: list[dict[str, torch.Tensor]], t0: float = 0.0) -> dict[str, Any]:
    """Put a list of series on the sorted union of their times (see the module docstring).

    Returns ``times`` (T,), ``t0`` (float), ``values``/``obs``/``interp``/``extrap`` (B, T, D) and
    ``present`` (B, T): whether the time point belongs to the series.
    """
    if not items:
        raise DataError("empty batch")
    for i, s in enumerate(items):
        if s["obs"].sum() == 0:
            raise DataError(f"batch item {i} has no observations")
    times = torch.unique(torch.cat([s["times"] for s in items]), sorted=True)
    B, T, D = len(items), times.numel(), items[0]["values"].shape[1]
    out = {k: torch.zeros(B, T, D) for k in FIELDS}
    present = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(items):
        idx = torch.searchsorted(times, s["times"])
        present[b, idx] = True
        for k in FIELDS:
            out[k][b, idx] = s[k]
    return dict(times=times, t0=float(t0), present=present, **out)


def with_query_times(item: dict[str, torch.Tensor], query: torch.Tensor) -> dict[str, torch.Tensor]:
    """The series plus extra time points without values or targets (used to draw dense curves)."""
    query = query[~torch.isin(query, item["times"])]
    D = item["values"].shape[1]
    times = torch.cat([item["times"], query])
    order = torch.argsort(times)
    out = {"times": times[order]}
    for k in FIELDS:
        out[k] = torch.cat([item[k], torch.zeros(len(query), D)])[order]
    return out


# -- generators -------------------------------------------------------------------------------------

def _split_points(g: torch.Generator, n_window: int, n_future: int, n_obs: int, n_interp: int, n_extrap: int):
    """Indices (on a grid of n_window + n_future points) of a series' observed, interpolation
    and extrapolation points, chosen at random: this is what makes the sampling irregular."""
    if not 1 <= n_obs <= n_window:
        raise DataError(f"n_obs={n_obs} must be between 1 and the {n_window} points of the observed window")
    perm = torch.randperm(n_window, generator=g)
    obs = perm[:n_obs]
    interp = perm[n_obs:n_obs + n_interp]
    extrap = n_window + torch.randperm(n_future, generator=g)[:min(n_extrap, n_future)]
    return obs, interp, extrap


def _make_series(grid: torch.Tensor, clean: torch.Tensor, noise: float, obs, interp, extrap, missing_rate: float,
                 g: torch.Generator) -> dict[str, torch.Tensor]:
    idx = torch.cat([obs, interp, extrap])
    D = clean.shape[1]
    values = clean[idx] + noise * torch.randn(len(idx), D, generator=g)
    masks = {k: torch.zeros(len(idx), D) for k in ("obs", "interp", "extrap")}
    n1, n2 = len(obs), len(obs) + len(interp)
    masks["obs"][:n1] = 1.0
    if missing_rate > 0 and D > 1:
        drop = torch.rand(n1, D, generator=g) < missing_rate
        drop[torch.arange(n1), torch.randint(0, D, (n1,), generator=g)] = False  # keep >= 1 value per point
        masks["obs"][:n1][drop] = 0.0
    masks["interp"][n1:n2] = 1.0
    masks["extrap"][n2:] = 1.0
    return dict(times=grid[idx], values=values, clean=clean[idx], **masks)


def make_spirals(n: int = 1000, n_obs: int = 30, noise: float = 0.1, seed: int = 0, n_window: int = 200,
                 n_future: int = 100, t_window: float = 4.0, n_interp: int = 20, n_extrap: int = 50,
                 missing_rate: float = 0.0, omega: float = 1.0, growth: float = 0.25) -> list[dict[str, torch.Tensor]]:
    """2-D Archimedean spirals, half counter-clockwise and half clockwise.

    Series ``i`` moves along the Archimedean spiral r = r0 + (growth/ω)(θ - θ0) at angular speed
    ω: θ(t) = θ0 ± ω t, r(t) = r0 + growth t, with θ0 ~ U(0, 2π), r0 ~ U(0.5, 1.5); by default
    ω = 1 rad and growth 0.25 per time unit, the window is [0, 4) (0.64 turn) and the future
    [4, 6) (0.32 turn more). Gaussian noise of std ``noise`` is added to every value. Points live
    on a grid of ``n_window`` + ``n_future`` equally spaced times; each series observes ``n_obs``
    random window points and keeps ``n_interp`` other window points and ``n_extrap`` future
    points as held-out targets.
    """
    g = torch.Generator().manual_seed(seed)
    dt = t_window / n_window
    grid = torch.arange(n_window + n_future, dtype=torch.float64).mul(dt).float()
    b = growth / omega
    out = []
    for i in range(n):
        sign = 1.0 if i % 2 == 0 else -1.0
        theta0 = float(torch.rand((), generator=g)) * 2 * math.pi
        r0 = 0.5 + float(torch.rand((), generator=g))
        theta = theta0 + sign * omega * grid
        r = r0 + b * omega * grid
        clean = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
        idx = _split_points(g, n_window, n_future, n_obs, n_interp, n_extrap)
        out.append(_make_series(grid, clean, noise, *idx, missing_rate, g))
    return out


def make_periodic(n: int = 1000, n_obs: int = 30, noise: float = 0.01, seed: int = 0, n_window: int = 200,
                  n_future: int = 50, t_window: float = 4.0, n_interp: int = 20, n_extrap: int = 25,
                  missing_rate: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """Rubanova's toy: x(t) = sin(2π f t + φ), f ~ U(0.5, 1.0), φ ~ U(0, 2π), 1-D, on [0, 5]
    (observed window [0, 4), future [4, 5]) with irregularly chosen points as for spirals."""
    g = torch.Generator().manual_seed(seed)
    dt = t_window / n_window
    grid = torch.arange(n_window + n_future + 1, dtype=torch.float64).mul(dt).float()
    out = []
    for _ in range(n):
        f = 0.5 + 0.5 * float(torch.rand((), generator=g))
        phi = 2 * math.pi * float(torch.rand((), generator=g))
        clean = torch.sin(2 * math.pi * f * grid + phi)[:, None]
        idx = _split_points(g, n_window, n_future + 1, n_obs, n_interp, n_extrap)
        out.append(_make_series(grid, clean, noise, *idx, missing_rate, g))
    return out


GENERATORS = {"spirals": make_spirals, "periodic": make_periodic}


def timeseries_datasets(name: str, n: int, n_obs: int, noise: float, seed: int, test_fraction: float = 0.2,
                        missing_rate: float = 0.0, **kwargs: Any) -> tuple[IrregularSeries, IrregularSeries]:
    """Generate ``n`` series and split off the last ``test_fraction`` as the test set.
    Generation depends only on ``seed``, so every run sees the same data."""
    if name not in GENERATORS:
        raise DataError(f"unknown time-series dataset {name!r}; known: {', '.join(GENERATORS)}")
    series = GENERATORS[name](n=n, n_obs=n_obs, noise=noise, seed=seed, missing_rate=missing_rate, **kwargs)
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < 1:
        raise DataError(f"dataset.n={n} is too small to split off a test set")
    # Spiral directions alternate with the index, so both splits hold both.
    return IrregularSeries(series[:n - n_test], name=f"{name}/train"), IrregularSeries(series[n - n_test:],
                                                                                       name=f"{name}/test")
