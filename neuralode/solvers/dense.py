"""A continuous solution: ``odeint_dense`` (torchdiffeq's, generalised).

One solve from t0 to t1 keeps its accepted steps and their stages; the returned
:class:`DenseSolution` evaluates the method's own dense output anywhere in [t0, t1]. Evaluations
are differentiable with respect to y0 and the parameters (the steps keep their graph, as in
direct mode), and with respect to the query time (through f at the queried point).
"""
from __future__ import annotations

import bisect
from typing import Callable, Optional

import torch

from .integrate import _interpolator, solve
from .odeint import InputError, Setup, State, check_t
from .settings import SolverSettings


class DenseSolution:
    """y(t) for t in [t0, t1]; call it with a scalar time (0-dim tensor or float) or a 1-D tensor
    of times (results stacked along a leading axis, as ``odeint`` returns them)."""

    def __init__(self, setup: Setup, steps, stepper, t0: float, t1: float):
        self.setup, self.steps, self.t0, self.t1 = setup, steps, t0, t1
        self.direction = 1.0 if t1 >= t0 else -1.0
        self._ends = [self.direction * (s.t + s.h) for s in steps]
        self._interp = _interpolator(setup.prob, stepper)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def __call__(self, t) -> State:
        t = torch.as_tensor(t)
        if t.ndim > 1:
            raise InputError(f"t must be a scalar or a 1-D tensor of times, got shape {tuple(t.shape)}")
        times = t.detach().reshape(-1).double().cpu().tolist()
        lo, hi = sorted((self.t0, self.t1))
        bad = [s for s in times if not lo <= s <= hi]
        if bad:
            raise InputError(f"t={bad[0]:g} lies outside the solved interval [{lo:g}, {hi:g}]")
        flat = torch.stack([self._at(s) for s in times])
        if t.requires_grad:  # dy/dt = f(t, y(t))
            f = torch.stack([self.setup.func.raw(s, y.detach()) for s, y in zip(times, flat)])
            shift = (t.reshape(-1) - t.detach().reshape(-1)).to(flat.dtype).view(-1, *([1] * (flat.ndim - 1)))
            flat = flat + shift * f
        out = self.setup.structure.unflatten(flat, (len(times),))
        if t.ndim == 0:
            return tuple(o[0] for o in out) if isinstance(out, tuple) else out[0]
        return out

    def _at(self, s: float) -> torch.Tensor:
        if s == self.t0 or not self.steps:
            return self.setup.y0
        i = min(bisect.bisect_left(self._ends, self.direction * s), len(self.steps) - 1)
        step = self.steps[i]
        return step.y1 if s == step.t + step.h else self._interp(self.setup.func, step, s)


def odeint_dense(func: Callable, y0: State, t0, t1, *, rtol=1e-7, atol=1e-9, method: Optional[str] = None,
                 options: Optional[dict] = None) -> DenseSolution:
    """Solve from t0 to t1 and return the continuous solution (a callable of t). Any method;
    tuple states and decreasing time work (torchdiffeq's takes dopri5 and a tensor state only)."""
    t0, t1 = torch.as_tensor(t0), torch.as_tensor(t1)
    t = torch.stack([t0.reshape(()), t1.reshape(()).to(t0.dtype)])
    ts = check_t(t)
    settings = SolverSettings(method=method, rtol=rtol, atol=atol, options=options or {})
    setup = Setup(settings, func, y0, ts)
    grid = list(ts) if not setup.method.adaptive and settings.parsed.step_size is None else None
    res = solve(setup.prob, setup.y0, ts, grid=grid, keep_steps=True)
    return DenseSolution(setup, res.steps, res.stepper, ts[0], ts[-1])
