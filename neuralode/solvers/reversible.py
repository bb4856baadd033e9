"""Reversible gradients (McCallum & Foster 2024, arXiv 2410.11648): the exact gradient of the
solve in memory that does not grow with the number of steps.

Any explicit Runge-Kutta step Phi_h(t, .) (the method's tableau) becomes algebraically reversible
by carrying a second state z, with z_0 = y_0 and a coupling lambda in (0, 1):

    y_{n+1} = Phi_h(t_n, z_n) + lambda * (y_n - z_n)
    z_{n+1} = z_n + (y_{n+1} - Phi_{-h}(t_{n+1}, y_{n+1}))

Given (y_{n+1}, z_{n+1}) and the step times, the step inverts with two more base steps:

    z_n = z_{n+1} - (y_{n+1} - Phi_{-h}(t_{n+1}, y_{n+1})),   y_n = z_n + (y_{n+1} - Phi_h(t_n, z_n)) / lambda.

So the forward pass keeps only the accepted step times and the states at the output times, and
the backward pass walks the steps last to first: it reconstructs each step's input and takes the
vector-Jacobian product through the two base steps it evaluates anyway. The gradient is that of
this (reversible) solve, exact up to the rounding of the reconstruction, whose error is measured
at every stored output state (the pair is then reset to it) and recorded as
``record_stats().reconstruction_error``.

Cost: a step is two base steps (dopri5: 13 evaluations instead of 6), the backward pass two more
with their vector-Jacobian products; memory is the stored outputs plus one base step's graph.

Stability: the pair has a second, spurious mode. For a mode dy/dt = mu*y with h*mu = x it is
multiplied per step by about lambda*exp(-x), and the reconstruction multiplies rounding errors by
about exp(-x) (the dynamics run backwards) and 1/lambda. Lambda close to 1 keeps the
reconstruction accurate over many steps (lambda^-N = e^10 at N = 10^4 for 0.999); strongly
contracting dynamics (mu*T << -30, e.g. Lorenz beyond T ~ 2) cannot be reconstructed in floating
point by any reversible scheme: the backward pass then reports the error and stops (use
grad="checkpoint"). The forward pass stops too (SolverError) once y - z, the spurious mode, exceeds
min(1e4 tolerances, |y|/2): with the default coupling that happens on Lorenz before t = 1. Output
times are landed on exactly (the steps are never interpolated). Without gradients to compute the
ordinary solve runs. Measured numbers: docs/gradients.md.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from .control import Controller, initial_step
from .errors import MaxStepsError, NonFiniteError, SolverError, StepSizeUnderflowError, STIFF_HINT
from .integrate import DEFAULT_MAX_STEPS
from .rk import Step, combine

CHECKPOINT_HINT = "use grad='checkpoint' (exact, bounded memory) or grad='direct'"
DRIFT_FACTOR = 100  # y - z beyond this many tolerances at an output: the spurious mode has grown (a warning)
DIVERGED, DIVERGED_REL = 1e4, 0.5  # beyond min(this many tolerances, this fraction of |y|): SolverError
GUARD_EVERY = 64  # fixed grids: check the coupled states every this many steps (adaptive: every step)


def _last_nonzero(*rows) -> int:
    return max((i for row in rows if row is not None for i, c in enumerate(row) if c != 0.0), default=0) + 1


class _Stepper:
    """The base method's step Phi, reduced to the stages the weights use (an FSAL stage is
    evaluated only for the error estimate), and the reversible step built from it."""

    def __init__(self, prob, coupling: float):
        self.prob, self.tab, self.coupling = prob, prob.method.tableau, coupling
        self.n_phi = _last_nonzero(self.tab.b)
        self.n_err = _last_nonzero(self.tab.b, self.tab.e, self.tab.e3)
        self.base = prob.method.start(prob, watch=False)  # its error norm (DOP853's blend included)

    def stages(self, func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, n: int) -> List[torch.Tensor]:
        ks = [f0]
        for ci, row in zip(self.tab.c[1:n], self.tab.a):
            ks.append(func(t + ci * h, combine(y, h, row, ks)))
        return ks

    def phi(self, func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        return combine(y, h, self.tab.b, self.stages(func, t, h, y, f0, self.n_phi))

    def error(self, t: float, h: float, z: torch.Tensor, ks: List[torch.Tensor], phi: torch.Tensor) -> float:
        return self.base.error(Step(t, h, z, phi, ks, None), z.abs())[0]

    def increment(self, func, t1: float, t: float, y1: torch.Tensor) -> torch.Tensor:
        """y1 - Phi_{-h}(t1, y1): what the step adds to z."""
        return y1 - self.phi(func, t1, t - t1, y1, func(t1, y1))

    def couple(self, func, t: float, t1: float, y: torch.Tensor, z: torch.Tensor, phi: torch.Tensor):
        y1 = torch.add(phi, y - z, alpha=self.coupling)
        return y1, z + self.increment(func, t1, t, y1)


def _before_jump(prob, t_jump: float, direction: float):
    """func as a step onto a discontinuity sees it: from its own side only (as the other modes)."""
    func, t_in = prob.func, prob.nudge(t_jump, -direction)
    return lambda s, y: func(t_in if direction * (s - t_in) > 0 else s, y)


def _start_f(prob, func, t: float, z: torch.Tensor, direction: float, after_jump: bool) -> torch.Tensor:
    return func(prob.nudge(t, direction), z) if after_jump else func(t, z)


class _Forward:
    """One reversible solve: the outputs (y and z at every output time) and the accepted steps
    ``(t, t_next, onto a jump)``; ``out_steps[i]``: how many steps precede output i."""

    def __init__(self, run, coupling: float):
        self.run, self.prob = run, run.setup.prob
        self.stepper = _Stepper(self.prob, coupling)
        self.steps: List[Tuple[float, float, bool]] = []
        self.ys: List[torch.Tensor] = []
        self.zs: List[torch.Tensor] = []
        self.out_steps: List[int] = []

    def solve(self, y0: torch.Tensor) -> "_Forward":
        ts, o = self.run.ts, self.prob.opts
        self._emit(y0, y0)
        if len(ts) > 1:
            direction = 1.0 if ts[-1] > ts[0] else -1.0
            inside = [s for s in (*ts[1:-1], *o.step_t, *o.jump_t) if direction * (s - ts[0]) > 0 > direction * (s - ts[-1])]
            stops = sorted(set(inside), key=lambda s: direction * s) + [float(ts[-1])]
            if self.run.grid is None:
                self._adaptive(y0, stops, direction)
            else:
                self._fixed(y0, self._points(stops, direction), direction)
        self.prob.stats.n_accepted += len(self.steps)
        self._check_drift()
        return self

    def _check_drift(self) -> None:
        """y - z grows only through the spurious mode, so its size at the outputs measures how far
        the coupled pair strayed (recorded as ``coupling_drift``); error control does not see it."""
        with torch.no_grad():
            gaps = torch.stack([(y - z).abs().max() for y, z in zip(self.ys, self.zs)])
            sizes = torch.stack([y.abs().max() for y in self.ys])
            drift = float((gaps / sizes.clamp_min(torch.finfo(sizes.dtype).tiny)).max())
        stats = self.prob.stats
        stats.coupling_drift = drift if math.isnan(stats.coupling_drift) else _worst(stats.coupling_drift, drift)
        if self.run.setup.settings.adaptive:
            tol = self.prob.tol
            allowed = DRIFT_FACTOR * float(torch.as_tensor(tol.atol).max() + torch.as_tensor(tol.rtol).max() * sizes.max())
            if not float(gaps.max()) <= allowed:
                warnings.warn(
                    f"grad='reversible': the coupled states of {self.prob.method.name} separated by more than {DRIFT_FACTOR}x "
                    "the tolerance, so the solve is less accurate than asked (see record_stats().coupling_drift): the "
                    "dynamics contract faster than the coupling damps. Use grad='checkpoint', or a smaller coupling "
                    "for short solves.", UserWarning, stacklevel=9)

    def _guard(self, y: torch.Tensor, z: torch.Tensor, t: float) -> None:
        """Stop as soon as the spurious mode has grown to a visible part of the solution: the solve
        is then wrong, and left alone it grows until the step size collapses (minutes of work)."""
        with torch.no_grad():
            gap, size = float((y - z).abs().max()), float(y.abs().max())
        tol = self.prob.tol
        allowed = min(DIVERGED * (float(torch.as_tensor(tol.atol).max()) + float(torch.as_tensor(tol.rtol).max()) * size),
                      DIVERGED_REL * size) if self.run.grid is None else DIVERGED_REL * size
        if not gap <= allowed:
            raise SolverError(
                f"{self.prob.label}: grad='reversible' is unstable here: the two coupled states of the reversible "
                f"{self.prob.method.name} separated by {gap:.3g} (the solution's size is {size:.3g}) after "
                f"{len(self.steps)} steps, at t={t:.6g}. The dynamics contract faster than coupling={self.stepper.coupling} "
                "damps the scheme's spurious mode (strongly dissipative or chaotic dynamics, long horizons). "
                "Use grad='checkpoint' (exact, bounded memory), grad='direct', or for short solves a smaller coupling, "
                "e.g. Reversible(coupling=0.9)")

    def _emit(self, y: torch.Tensor, z: torch.Tensor) -> None:
        self.ys.append(y)
        self.zs.append(z)
        self.out_steps.append(len(self.steps))

    def _points(self, stops: Sequence[float], direction: float) -> List[float]:
        """The fixed grid with the stops (output times, step_t, jump_t) in it; a grid point within
        rounding of a stop gives way to it instead of leaving a step of a few ulps."""
        grid, near = self.run.grid, 1e-9 * abs(stops[-1] - self.run.ts[0])
        keep = [g for g in grid[1:-1] if all(abs(g - s) > near for s in stops)]
        return [float(grid[0])] + sorted(set(keep) | set(stops), key=lambda s: direction * s)

    def _take(self, func, t: float, t1: float, on_jump: bool, y, z, phi, stop_is_output: bool):
        y, z = self.stepper.couple(func, t, t1, y, z, phi)
        self.steps.append((t, t1, on_jump))
        if self.run.grid is None or len(self.steps) % GUARD_EVERY == 0:  # adaptive: it synchronises anyway
            self._guard(y, z, t1)
        if stop_is_output:
            self._emit(y, z)
        return y, z

    def _fixed(self, y: torch.Tensor, points: List[float], direction: float) -> None:
        prob, st = self.prob, self.stepper
        outputs, jumps = set(self.run.ts[1:]), set(prob.opts.jump_t)
        max_steps = prob.opts.max_num_steps or math.inf
        cb = prob.callbacks
        t, z, on_jump = points[0], y, False
        for t1 in points[1:]:
            if len(self.steps) >= max_steps:
                raise MaxStepsError(f"{prob.label}: max_num_steps={max_steps} exceeded at t={t:.6g} on the fixed grid; "
                                    "raise options['max_num_steps'] or use a larger step_size")
            _check_budget(prob, t)
            f_z = _start_f(prob, prob.func, t, z, direction, on_jump)
            if cb is not None and cb.step is not None:
                cb.step(t, y, t1 - t)
            on_jump = t1 in jumps
            func = _before_jump(prob, t1, direction) if on_jump else prob.func
            phi = st.phi(func, t, t1 - t, z, f_z)
            y, z = self._take(func, t, t1, on_jump, y, z, phi, t1 in outputs)
            t = t1
        with torch.no_grad():
            if not bool(torch.isfinite(y).all()):
                raise NonFiniteError(f"{prob.label}: the solution became NaN or Inf before t={t:.6g} on the fixed grid; "
                                     "use a smaller step_size or check the vector field")

    def _adaptive(self, y: torch.Tensor, stops: List[float], direction: float) -> None:
        prob, st, o = self.prob, self.stepper, self.prob.opts
        outputs, jumps = set(self.run.ts[1:]), set(o.jump_t)
        t, z = float(self.run.ts[0]), y
        f_z = prob.func(t, z)
        order = prob.method.controller_order
        h = o.first_step or initial_step(prob.func, prob.tol, prob.norm, order, t, z, f_z, direction, o.max_step)
        controller = Controller(o, order)
        max_steps = o.max_num_steps or DEFAULT_MAX_STEPS
        cb = prob.callbacks
        stop_i, attempts, n_nonfinite, n_rejected = 0, 0, 0, 0
        try:
            while True:
                stop = stops[stop_i]
                h = min(max(h, o.min_step), o.max_step)
                landing = abs(stop - t) <= h * (1 + 1e-6)
                t1 = stop if landing else t + direction * h
                dt = t1 - t
                if abs(dt) <= 16 * math.ulp(max(abs(t), abs(t1))):
                    raise StepSizeUnderflowError(f"{prob.label}: step size underflow at t={t:.6g}: dt={dt:.3g}. " + STIFF_HINT)
                attempts += 1
                if attempts > max_steps:
                    raise MaxStepsError(f"{prob.label}: max_num_steps={max_steps} exceeded at t={t:.6g} (integrating to "
                                        f"{stops[-1]:.6g}, dt={dt:.3g}). Raise options['max_num_steps'] if the solve is "
                                        "just long; " + STIFF_HINT)
                _check_budget(prob, t)
                on_jump = landing and stop in jumps
                func = _before_jump(prob, t1, direction) if on_jump else prob.func
                if cb is not None and cb.step is not None:
                    cb.step(t, y, h)
                ks = st.stages(func, t, dt, z, f_z, st.n_err)
                phi = combine(z, dt, st.tab.b, ks)
                ratio = st.error(t, dt, z, ks, phi)
                at_min_step = o.min_step > 0 and abs(dt) <= o.min_step * (1 + 1e-6)
                if not math.isfinite(ratio) or (ratio > 1.0 and not at_min_step):
                    n_rejected += 1
                    if cb is not None and cb.reject is not None:
                        cb.reject(t, y, dt)
                    if not math.isfinite(ratio):
                        n_nonfinite += 1
                        if n_nonfinite >= 8:
                            raise NonFiniteError(f"{prob.label}: func returned NaN or Inf in every step tried from t={t:.6g} "
                                                 f"(8 attempts, down to dt={dt:.3g}). Check the vector field. " + STIFF_HINT)
                        h = abs(dt) * o.dfactor
                    else:
                        h = abs(dt) * controller.factor(ratio, False)
                    continue
                n_nonfinite = 0
                if cb is not None and cb.accept is not None:
                    cb.accept(t, y, dt)
                h = abs(dt) * controller.factor(ratio, True)
                y, z = self._take(func, t, t1, on_jump, y, z, phi, landing and stop in outputs)
                if landing:
                    stop_i += 1
                    if stop_i == len(stops):
                        return
                t = t1
                f_z = _start_f(prob, prob.func, t, z, direction, on_jump)
        finally:
            prob.stats.n_rejected += n_rejected


def _check_budget(prob, t: float) -> None:
    """``options['max_nfe']``, as for the other modes."""
    if prob.opts.max_nfe is not None and prob.stats.nfe_forward >= prob.opts.max_nfe:
        raise MaxStepsError(f"{prob.label}: max_nfe={prob.opts.max_nfe} function evaluations used up at t={t:.6g}; "
                            "raise options['max_nfe'] or loosen the tolerance")


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp_min(torch.finfo(b.real.dtype if b.is_complex() else b.dtype).tiny)
    return float((a - b).abs().max() / scale)


class ReversibleSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, y0: torch.Tensor, *params):
        grad = run.setup.settings.grad
        with torch.no_grad():
            fwd = _Forward(run, grad.coupling).solve(y0)
        ys, zs = torch.stack(fwd.ys), torch.stack(fwd.zs)
        ctx.run, ctx.steps, ctx.out_steps = run, fwd.steps, fwd.out_steps
        ctx.save_for_backward(ys, zs, *params)  # through autograd, so memory watches see them
        return ys

    @staticmethod
    def backward(ctx, grad_ys: torch.Tensor):
        ys, zs, *params = ctx.saved_tensors
        run, steps, out_steps = ctx.run, ctx.steps, ctx.out_steps
        setup, mode = run.setup, run.setup.settings.grad
        prob = setup.replay_problem()  # the forward problem, counting into the backward statistics
        st = _Stepper(prob, mode.coupling)
        lam = mode.coupling
        inputs = None  # (state, *params) of the current vector-Jacobian product
        g = [torch.zeros_like(p) for p in params]
        k = len(out_steps) - 1
        y, z = ys[k], zs[k]
        a_y, a_z = grad_ys[k].clone(), torch.zeros_like(grad_ys[k])
        worst = 0.0

        def vjp(out: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
            grads = torch.autograd.grad(out, inputs, cotangent, allow_unused=True)
            for i, d in enumerate(grads[1:]):
                if d is not None:
                    g[i] += d
            return torch.zeros_like(inputs[0]) if grads[0] is None else grads[0]

        direction = 1.0 if len(steps) == 0 or steps[0][1] > steps[0][0] else -1.0
        for n in range(len(steps) - 1, -1, -1):
            t, t1, on_jump = steps[n]
            func = _before_jump(prob, t1, direction) if on_jump else prob.func
            with torch.enable_grad():
                y1 = y.detach().requires_grad_(True)
                inputs = (y1, *params)
                inc = st.increment(func, t1, t, y1)
            z = (z - inc).detach()
            a_y = a_y + vjp(inc, a_z)
            after_jump = n > 0 and steps[n - 1][2]
            with torch.enable_grad():
                z0 = z.requires_grad_(True)
                inputs = (z0, *params)
                phi = st.phi(func, t, t1 - t, z0, _start_f(prob, prob.func, t, z0, direction, after_jump))
            y = (z + (y - phi) / lam).detach()
            z = z.detach()
            a_z = a_z - lam * a_y + vjp(phi, a_y)
            a_y = lam * a_y
            while k > 0 and out_steps[k - 1] == n:  # back at a stored output: measure the drift, reset, add dL/dy_k
                k -= 1
                err = _worst(_relative_error(y, ys[k]), _relative_error(z, zs[k]))
                worst = _worst(worst, err)
                if mode.max_error is not None and not err <= mode.max_error:
                    _record(setup.stats, worst, len(steps) - n)
                    raise SolverError(
                        f"grad='reversible': the reconstructed state at t={run.ts[k]:.6g} is off by {err:.3g} (relative) "
                        f"after {len(steps) - n} backward steps, more than max_error={mode.max_error:g}: the dynamics contract "
                        f"too strongly (or coupling={lam} is too far from 1) to run backwards in floating point; "
                        + CHECKPOINT_HINT)
                y, z = ys[k], zs[k]
                a_y = a_y + grad_ys[k]
        _record(setup.stats, worst, len(steps))
        return (None, a_y + a_z, *g)


def _worst(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _record(stats, error: float, n_steps: int) -> None:
    stats.n_accepted_backward += n_steps
    first = stats.n_accepted_backward == n_steps and math.isnan(stats.reconstruction_error)
    stats.reconstruction_error = error if first else _worst(stats.reconstruction_error, error)


def solve_reversible(run, y0: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The states at the output times, differentiable by reconstruction (grad=Reversible(...)).
    Without gradients to compute (``torch.no_grad()``, or neither y0 nor a parameter requires
    grad) it is the ordinary solve of the method: the coupled scheme exists only to be reversed."""
    if run.event is not None:
        raise ValueError("grad='reversible' does not support event_fn (the event time is not a step of the reversible "
                         "scheme); " + CHECKPOINT_HINT)
    if not torch.is_grad_enabled() or not any(x.requires_grad for x in (y0, *params)):
        # nothing to differentiate (evaluation): the ordinary solve, more accurate and half the evaluations
        return torch.stack(run.forward(y0).outputs)
    return ReversibleSolve.apply(run, y0, *params)


def unrolled(run, y0: torch.Tensor) -> torch.Tensor:
    """The same reversible solve recorded by autograd op by op (memory grows with the steps): the
    reference the reconstructing backward pass must reproduce."""
    return torch.stack(_Forward(run, run.setup.settings.grad.coupling).solve(y0).ys)
