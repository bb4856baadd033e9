"""One generic explicit Runge-Kutta step and its continuous extension, driven by a tableau.

Step sizes arrive as Python floats (the host-side clock), so stage coefficients times h are
scalars folded into ``add_(k, alpha=...)``: no tensor is built for them and nothing syncs here.
Linear combinations accumulate in place; that is autograd-safe because addition saves no inputs.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from .tableau import ButcherTableau

Func = Callable[[float, torch.Tensor], torch.Tensor]


def combine(y: Optional[torch.Tensor], h: float, coeffs: Sequence[float], ks: Sequence[torch.Tensor]) -> torch.Tensor:
    """y + h * sum_j coeffs[j] * ks[j]; with y None, just the weighted sum."""
    out = y
    for c, k in zip(coeffs, ks):
        if c == 0.0:
            continue
        if out is y:
            out = torch.mul(k, h * c) if y is None else torch.add(y, k, alpha=h * c)
        else:
            out.add_(k, alpha=h * c)
    return torch.zeros_like(ks[0]) if out is None else out


class Step:
    """An attempted step from (t, y) to (t + h, y1), with the stages kept for dense output."""

    __slots__ = ("t", "h", "y", "y1", "ks", "f1")

    def __init__(self, t: float, h: float, y: torch.Tensor, y1: torch.Tensor, ks: List[torch.Tensor], f1):
        self.t, self.h, self.y, self.y1, self.ks, self.f1 = t, h, y, y1, ks, f1


class ExplicitRK:
    """A step method driven by a Butcher tableau. The loop in ``integrate`` talks to any method
    through this interface (``step``, ``error_vectors``, ``end_derivative``, ``interpolate``,
    ``order``, ``controller_order``, ``adaptive``, ``fsal``), so implicit methods plug in alongside."""

    def __init__(self, tableau: ButcherTableau):
        self.tableau = tableau
        self.name, self.order, self.fsal, self.adaptive = tableau.name, tableau.order, tableau.fsal, tableau.adaptive
        self.controller_order = tableau.controller_order

    def step(self, func: Func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor) -> Step:
        tab = self.tableau
        ks = [f0]
        yi = y
        for ci, row in zip(tab.c[1:], tab.a):
            yi = combine(y, h, row, ks)
            ks.append(func(t + ci * h, yi))
        if tab.fsal:  # the last stage was evaluated at y1 itself
            return Step(t, h, y, yi, ks, ks[-1])
        return Step(t, h, y, combine(y, h, tab.b, ks), ks, None)

    def error_vectors(self, step: Step) -> List[torch.Tensor]:
        """The embedded error estimate(s) h * sum e_i k_i (two for DOP853). Call under no_grad."""
        tab = self.tableau
        errs = [combine(None, step.h, tab.e, step.ks)]
        if tab.e3 is not None:
            errs.append(combine(None, step.h, tab.e3, step.ks))
        return errs

    @staticmethod
    def end_derivative(func: Func, step: Step) -> torch.Tensor:
        """f(t + h, y1): free for FSAL tableaus, else evaluated once and reused as the next f0."""
        if step.f1 is None:
            step.f1 = func(step.t + step.h, step.y1)
        return step.f1

    def interpolate(self, func: Func, step: Step, t_out: float) -> torch.Tensor:
        """The state at t_out inside the step: the tableau's own extension, else cubic Hermite."""
        tab, h = self.tableau, step.h
        theta = (t_out - step.t) / h
        if tab.dense is None:
            return hermite(step, self.end_derivative(func, step), theta)
        ks = step.ks
        if len(ks) < len(tab.dense):  # extra stages (DOP853), once per step that needs them
            for ci, row in zip(tab.dense_c, tab.dense_a):
                ks.append(func(step.t + ci * h, combine(step.y, h, row, ks)))
        weights = []
        for poly in tab.dense:
            w, p = 0.0, theta
            for coeff in poly:
                w += coeff * p
                p *= theta
            weights.append(w)
        return combine(step.y, h, weights, ks)


def hermite(step: Step, f1: torch.Tensor, theta: float) -> torch.Tensor:
    """Cubic Hermite interpolation from y, y1 and the derivatives at both ends."""
    t2, t3 = theta * theta, theta * theta * theta
    out = torch.lerp(step.y, step.y1, 3 * t2 - 2 * t3)
    return combine(out, step.h, (t3 - 2 * t2 + theta, t3 - t2), (step.ks[0], f1))
