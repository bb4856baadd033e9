"""Every figure the project draws: the sweep summary (tolerance curves, Pareto fronts), the latent
ODE test series and the CNF heat maps, as (3, H, W) image tensors for TensorBoard or PNG files.

Plots with axes use matplotlib's object API (a ``Figure`` drawn by the Agg canvas, never
``pyplot``): no global state, so any thread may draw, and readable axes, ticks and legends that
hand-drawn raster code cannot match at reasonable cost. matplotlib is the optional ``plots`` extra
because training does not need it; it is imported only when a plot is drawn (``--help`` stays
fast), and without it those figures are skipped with one log line per process. The CNF figures are
pixel data (2-D histograms, a density on a grid), so they stay tensor code and need no extra.
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

log = logging.getLogger("neuralode.plots")

HINT = "figures skipped: pip install 'neuralode[plots]' (matplotlib)"
_hinted = False  # the hint is logged once per process


def _figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` (inches at 100 dpi), or None without matplotlib (hint logged once)."""
    global _hinted
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _hinted:
            _hinted = True
            log.warning(HINT)
        return None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def render(fig: Any) -> torch.Tensor:
    """The figure's pixels as a (3, H, W) uint8 RGB tensor (``SummaryWriter.add_image`` takes it as is)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = torch.from_numpy(np.array(canvas.buffer_rgba()))
    return rgba[..., :3].permute(2, 0, 1).contiguous()


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) uint8 image, the same pixels TensorBoard gets."""
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return Path(path)


def _log_x_if_spread(ax: Any, xs: Sequence[float]) -> None:
    """Log x axis when the positive values span a decade or more (NFE, seconds, tolerances)."""
    if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")


# -- the sweep summary ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """A completed sweep job with a finite primary metric, as the summary plots see it."""

    label: str  # the overrides that set it apart from the sweep's other jobs
    group: str  # "model method grad": one colour, one tolerance curve
    metric_name: str  # e.g. "test_acc"
    mode: str  # "max" or "min": which way the metric is better
    metric: float
    rtol: float | None
    nfe_forward: float | None
    nfe_backward: float | None
    seconds: float | None  # training wall time, or seconds per iteration (the caller's label says which)


def pareto_front(cost: Sequence[float], metric: Sequence[float], mode: str = "max") -> list[int]:
    """Indices of the non-dominated points, by increasing cost: no other point costs at most as
    much with a metric at least as good (higher for ``mode="max"``, lower for ``"min"``) and is
    strictly better in one of them. Exact duplicates are all kept. Values must be finite."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = 1.0 if mode == "max" else -1.0
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -sign * metric[i]))
    front: list[int] = []
    for i in order:
        if not front or sign * metric[i] > sign * metric[front[-1]]:
            front.append(i)
        elif (cost[i], metric[i]) == (cost[front[-1]], metric[front[-1]]):
            front.append(i)
    return front


def _groups(jobs: Sequence[Job]) -> list[tuple[str, str, list[Job]]]:
    """(colour, group, its jobs) for each (model, method, grad), in a stable order."""
    by: dict[str, list[Job]] = {}
    for j in jobs:
        by.setdefault(j.group, []).append(j)
    return [(f"C{i % 10}", g, js) for i, (g, js) in enumerate(sorted(by.items()))]


def _metric_label(jobs: Sequence[Job]) -> str:
    names = sorted({j.metric_name.removeprefix("test_") for j in jobs})
    better = {"higher" if j.mode == "max" else "lower" for j in jobs}
    return f"test {' / '.join(names)}" + (f" ({better.pop()} is better)" if len(better) == 1 else "")


def tolerance_curves(jobs: Sequence[Job]) -> torch.Tensor | None:
    """Two panels against rtol, tighter to the right: the primary test metric, and forward (solid)
    and backward (dashed) NFE per iteration; one colour per (model, method, grad). None when no job
    has an rtol or matplotlib is missing."""
    jobs = [j for j in jobs if j.rtol is not None and j.rtol > 0]
    fig = _figure(11, 4.4) if jobs else None
    if fig is None:
        return None
    from matplotlib.lines import Line2D

    acc, nfe = fig.subplots(1, 2)
    nan = float("nan")
    for color, group, js in _groups(jobs):
        js = sorted(js, key=lambda j: j.rtol)
        rtol = [j.rtol for j in js]
        acc.plot(rtol, [j.metric for j in js], "o-", color=color, label=group)
        nfe.plot(rtol, [nan if j.nfe_forward is None else j.nfe_forward for j in js], "o-", color=color)
        nfe.plot(rtol, [nan if j.nfe_backward is None else j.nfe_backward for j in js], "s--", color=color)
    for ax in (acc, nfe):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("rtol (tighter →)")
        ax.grid(alpha=0.3)
    acc.set_ylabel(_metric_label(jobs))
    acc.set_title("primary test metric against the tolerance")
    acc.legend(fontsize="small", title="model method grad", title_fontsize="small")
    nfe.set_ylabel("NFE per iteration")
    nfe.set_title("cost against the tolerance")
    nfe.legend(handles=[Line2D([], [], color="k", marker="o", label="forward"),
                        Line2D([], [], color="k", marker="s", linestyle="--", label="backward")], fontsize="small")
    return render(fig)


def pareto(jobs: Sequence[Job], seconds_label: str = "training wall time (s)") -> torch.Tensor | None:
    """Two panels: the primary test metric against forward NFE per iteration and against
    ``seconds``, one labelled point per job, the non-dominated front (:func:`pareto_front`, per
    metric) as a step line. None when there is no job or matplotlib is missing."""
    fig = _figure(12, 5) if jobs else None
    if fig is None:
        return None
    panels = fig.subplots(1, 2, sharey=True)
    for ax, key, xlabel in ((panels[0], "nfe_forward", "forward NFE per iteration"),
                            (panels[1], "seconds", seconds_label)):
        have = [j for j in jobs if getattr(j, key) is not None]
        for color, group, js in _groups(have):
            ax.scatter([getattr(j, key) for j in js], [j.metric for j in js], color=color, label=group, zorder=3)
        xs = [getattr(j, key) for j in have]
        mid = (min(xs) + max(xs)) / 2 if xs else 0.0
        for j in have:  # labels wrapped, and pointing inwards so they stay on their panel
            right = getattr(j, key) > mid
            ax.annotate(textwrap.fill(j.label, 36), (getattr(j, key), j.metric), textcoords="offset points",
                        xytext=(-4 if right else 4, 4), ha="right" if right else "left", fontsize=7, alpha=0.8)
        for i, name in enumerate(sorted({j.metric_name for j in have})):
            js = [j for j in have if j.metric_name == name]
            front = [js[k] for k in pareto_front([getattr(j, key) for j in js], [j.metric for j in js], js[0].mode)]
            ax.step([getattr(j, key) for j in front], [j.metric for j in front], where="post", color="k",
                    alpha=0.6, label="non-dominated" if i == 0 else None)
        if not have:
            ax.text(0.5, 0.5, "no job recorded it", transform=ax.transAxes, ha="center", color="0.4")
        _log_x_if_spread(ax, [getattr(j, key) for j in have])
        ax.margins(x=0.12, y=0.08)  # room for the labels
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    panels[0].set_ylabel(_metric_label(jobs))
    panels[0].set_title("primary metric against solver cost")
    panels[1].set_title("primary metric against time")
    panels[0].legend(fontsize="small")
    return render(fig)


# -- latent ODE test series -------------------------------------------------------------------------
SERIES_STYLE = {"observed": dict(color="k", marker="o", s=14),
                "interpolation": dict(color="tab:cyan", marker="^", s=18),
                "extrapolation": dict(color="tab:purple", marker="v", s=18)}


def series_figure(panels: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor | None:
    """Side by side, one panel per series: the observed points, the held-out interpolation and
    extrapolation targets, and the model's dense curve, green inside the observed window and orange
    after it. Each panel maps ``observed``, ``interpolation``, ``extrapolation`` and ``model`` to
    (times (L,), values (L, D)); 2-D values are drawn as a path (same scale on both axes), 1-D
    against time. None without matplotlib."""
    fig = _figure(3.2 * len(panels), 3.6)
    if fig is None:
        return None
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for k, (ax, p) in enumerate(zip(axes, panels)):
        path = p["observed"][1].shape[1] == 2
        t, v = p["model"]
        window_end = float(p["observed"][0].max())
        inside = t <= window_end
        after = t >= (t[inside].max() if inside.any() else t.min())  # joined to the window's curve
        ax.plot(*_xy(t[inside], v[inside], path), color="tab:green", label="model, observed window")
        ax.plot(*_xy(t[after], v[after], path), color="tab:orange", label="model, extrapolation")
        for name, style in SERIES_STYLE.items():
            t, v = p[name]
            if len(t):
                ax.scatter(*_xy(t, v, path), label=name, zorder=3, **style)
        if path:
            ax.set_aspect("equal", adjustable="datalim")
        else:
            ax.axvline(window_end, color="0.6", linestyle=":")
            ax.set_xlabel("time")
        ax.set_title(f"test series {k + 1}", fontsize="medium")
        ax.tick_params(labelsize="small")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=5, fontsize="small")
    return render(fig)


def _xy(t: torch.Tensor, v: torch.Tensor, path: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (v[:, 0], v[:, 1]) if path else (t, v[:, 0])


# -- CNF heat maps (tensor code: the figures are pixel grids) ----------------------------------------
# A perceptually ordered colormap (dark violet -> blue -> teal -> green -> yellow), linear between anchors.
_ANCHORS = torch.tensor([[0.267, 0.005, 0.329], [0.283, 0.141, 0.458], [0.254, 0.265, 0.530],
                         [0.207, 0.372, 0.553], [0.164, 0.471, 0.558], [0.128, 0.567, 0.551],
                         [0.135, 0.659, 0.518], [0.267, 0.749, 0.441], [0.478, 0.821, 0.318],
                         [0.741, 0.873, 0.150], [0.993, 0.906, 0.144]])


def colormap(values: torch.Tensor) -> torch.Tensor:
    """Map an (H, W) tensor with values in [0, 1] to a (3, H, W) RGB image."""
    v = values.clamp(0, 1) * (len(_ANCHORS) - 1)
    lo = v.floor().long().clamp(max=len(_ANCHORS) - 2)
    w = (v - lo).unsqueeze(-1)
    rgb = _ANCHORS[lo] * (1 - w) + _ANCHORS[lo + 1] * w
    return rgb.permute(2, 0, 1).contiguous()


def histogram_image(points: torch.Tensor, resolution: int, extent: float) -> torch.Tensor:
    """A (3, R, R) image of the points' 2-D histogram over [-extent, extent]^2 (y axis up)."""
    p = points.detach().cpu().double()
    idx = ((p + extent) / (2 * extent) * resolution).floor().long()
    keep = ((idx >= 0) & (idx < resolution)).all(1)
    idx = idx[keep]
    counts = torch.zeros(resolution * resolution, dtype=torch.float64)
    cells = (resolution - 1 - idx[:, 1]) * resolution + idx[:, 0]
    counts.index_add_(0, cells, torch.ones(len(idx), dtype=torch.float64))
    counts = counts.view(resolution, resolution)
    return colormap((counts / counts.max().clamp(min=1)).float())


def side_by_side(*panels: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """Panels of equal height in a row, separated by white columns."""
    sep = torch.ones(3, panels[0].shape[1], gap)
    out = [panels[0]]
    for p in panels[1:]:
        out += [sep, p]
    return torch.cat(out, 2)
