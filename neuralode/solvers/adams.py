"""torchdiffeq's fixed-grid Adams methods: ``explicit_adams`` (Adams-Bashforth) and
``implicit_adams`` / ``fixed_adams`` (Adams-Bashforth predictor, Adams-Moulton corrector).

The schedule is torchdiffeq's, so solutions agree with it to roundoff:

* every step starts from f0 = f(t0, y0); the history holds the f0 of past steps, newest first,
  at most ``max_order - 1`` of them;
* while the history (with this step's f0) is shorter than 3, the step is the 3/8-rule RK4 seeded
  with f0, so the first two steps are RK4 and the order then ramps 3, 4, ... up to
  ``max_order - 1`` (11 by default, whose stability region is tiny: keep max_order low, e.g. 4-6,
  on anything but very smooth, non-stiff dynamics);
* the corrector iterates ``max_iters`` times at most, stopping once the *increment* stops moving
  in the solve's tolerance (atol + rtol * max(|dy_old|, |dy|), max norm). When it does not
  converge it warns and forgets the oldest history entry. The corrector's f at t1 is not kept:
  the next step evaluates f at its own start, as torchdiffeq does (same NFE).

The history lives in the solve's stepper and is updated in ``accepted`` (so a step that is only
tried leaves it alone); a checkpoint replay starts a fresh stepper and rebuilds it, which is why
these methods are ``multistep`` (the replay is one segment from y0).

Coefficients are exact: each is the integral over [t_n, t_n+1] of a Lagrange basis polynomial on
equally spaced nodes, computed in rational arithmetic and rounded once to float64.
"""
from __future__ import annotations

import collections
import warnings
from fractions import Fraction
from typing import List, Sequence

import torch

from .rk import Step
from .settings import ADAMS_OPTIONS, FIXED_OPTIONS

MAX_ORDER = 12
MIN_ORDER = 4  # below this the method never leaves its RK4 start
MAX_ITERS = 4
NOT_CONVERGED = "Functional iteration did not converge. Solution may be incorrect."


def _integral_weights(nodes: Sequence[int]) -> List[float]:
    """int_0^1 l_j(u) du for the Lagrange basis l_j on ``nodes`` (in units of h from t_n)."""
    weights = []
    for j, xj in enumerate(nodes):
        poly = [Fraction(1)]  # coefficients, constant first
        for m, xm in enumerate(nodes):
            if m == j:
                continue
            scale = Fraction(1, xj - xm)
            shifted = [Fraction(0)] + poly  # u * poly
            poly = [(a - xm * b) * scale for a, b in zip(shifted, poly + [Fraction(0)])]
        weights.append(float(sum(c / (k + 1) for k, c in enumerate(poly))))
    return weights


# BASHFORTH[k]: the k-step explicit weights on f_n, f_n-1, ..., f_n-k+1 (order k).
BASHFORTH = {k: _integral_weights([-m for m in range(k)]) for k in range(1, MAX_ORDER)}
# MOULTON[k]: the weights on f_n+1, f_n, ..., f_n-k+2 (k points, order k).
MOULTON = {k: _integral_weights([1] + [-m for m in range(k - 1)]) for k in range(2, MAX_ORDER + 1)}


def rk4_start(func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
    """The 3/8-rule RK4 step seeded with f0, returning dy. It is the ``rk4`` tableau, grouped as
    torchdiffeq groups it so that the start-up (and with it the whole solve) rounds identically."""
    k2 = func(t + h * (1 / 3), y + h * f0 * (1 / 3))
    k3 = func(t + h * (2 / 3), y + h * (k2 - f0 * (1 / 3)))
    k4 = func(t + h, y + h * (f0 - k2 + k3))
    return (f0 + 3 * (k2 + k3) + k4) * h * 0.125


class Adams:
    """A fixed-grid Adams method (immutable); ``start`` gives a solve its own history."""

    kind = "explicit"  # only f evaluations, no Newton solve: complex and half-precision states are fine
    adaptive = False
    fsal = False
    order = 4  # torchdiffeq's declared order (its RK4 start and the AB3 step bound it)
    controller_order = 4
    supports_adjoint_solve = True
    supports_backward_modes = True
    multistep = True
    option_names = FIXED_OPTIONS | ADAMS_OPTIONS

    def __init__(self, name: str, implicit: bool):
        self.name, self.implicit = name, implicit

    def start(self, prob) -> "AdamsStepper":
        return AdamsStepper(self, prob)


class AdamsStepper:
    """One solve's derivative history and tolerance."""

    def __init__(self, method: Adams, prob):
        o = prob.opts
        max_order = MAX_ORDER if o.max_order is None else o.max_order
        if max_order > MAX_ORDER:
            from .odeint import InputError  # deferred: odeint imports the method registry

            raise InputError(f"max_order must be at most {MAX_ORDER}, got {max_order}")
        if max_order < MIN_ORDER:
            warnings.warn(f"max_order is below {MIN_ORDER}, so the solver reduces to `rk4`.", UserWarning, stacklevel=2)
        self.method, self.implicit = method, method.implicit
        self.order, self.controller_order, self.fsal = method.order, method.controller_order, False
        self.max_order = max_order
        self.max_iters = MAX_ITERS if o.max_iters is None else o.max_iters
        self.tol = prob.tol
        self.history: collections.deque = collections.deque(maxlen=max(max_order - 1, 0))

    def step(self, func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, tag=None) -> Step:
        fs = [f0, *self.history]
        order = min(len(fs), self.max_order - 1)
        if order < MIN_ORDER - 1:
            return Step(t, h, y, y + rk4_start(func, t, h, y, f0), [f0], None, aux=False)
        # Adams-Bashforth predictor, summed newest first as torchdiffeq does (identical rounding)
        beta = BASHFORTH[order]
        dy = fs[0] * (h * beta[0])
        for b, f in zip(beta[1:order], fs[1:order]):
            dy = dy + f * (h * b)
        drop_oldest = False
        if self.implicit:
            mu = MOULTON[order + 1]
            delta = fs[0] * mu[1]
            for m, f in zip(mu[2:], fs[1:order]):
                delta = delta + f * m
            delta = delta * h
            converged = False
            for _ in range(self.max_iters):
                dy_old = dy
                dy = func(t + h, y + dy) * (h * mu[0]) + delta
                with torch.no_grad():
                    scale = self.tol.scale(dy_old.abs(), dy.abs())
                    converged = bool(((dy_old - dy).abs() / scale).max() < 1)
                if converged:
                    break
            if not converged:
                warnings.warn(NOT_CONVERGED, UserWarning, stacklevel=2)
                drop_oldest = True
        return Step(t, h, y, y + dy, [f0], None, aux=drop_oldest)

    def accepted(self, step: Step, n_steps: int, t_end: float, max_steps: int) -> None:
        self.history.appendleft(step.ks[0])
        if step.aux and self.history:
            self.history.pop()

    @staticmethod
    def end_derivative(func, step: Step) -> torch.Tensor:
        """f(t1, y1), which is the next step's f0 (one evaluation per step, as in torchdiffeq)."""
        if step.f1 is None:
            step.f1 = func(step.t + step.h, step.y1)
        return step.f1


ADAMS_METHODS = {
    "explicit_adams": Adams("explicit_adams", implicit=False),
    "implicit_adams": Adams("implicit_adams", implicit=True),
    "fixed_adams": Adams("fixed_adams", implicit=True),
}
