"""The time-stepping loop: step-size control, stops, dense output, and step traces.

The clock lives on the host as Python floats (float64), so the only host sync in an adaptive
step is reading the error norm (one ``.item()``-style read per attempted step); fixed-step
solves never sync. Everything here works on one state tensor; tuple states are flattened
by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import STIFF_HINT, MaxStepsError, NonFiniteError, SolverError, StepSizeUnderflowError
from .stats import SolveStats
from .rk import Step

Norm = Callable[[torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


@dataclass
class Options:
    """Solver options (the ``options=`` dict of ``odeint``)."""

    step_size: Optional[float] = None
    first_step: Optional[float] = None
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    min_step: float = 0.0
    max_step: float = math.inf
    max_num_steps: int = 100_000
    controller: str = "I"
    pcoeff: Optional[float] = None
    icoeff: Optional[float] = None
    norm: Optional[object] = None
    step_t: Sequence[float] = ()
    jump_t: Sequence[float] = ()
    time_dtype: Optional[torch.dtype] = None
    checkpoint_every: int = 1
    linear_solver: str = "auto"  # implicit methods: "auto" | "dense" | "gmres" (matrix-free Newton-Krylov)
    batch_jacobian: Optional[bool] = None  # implicit methods: block-diagonal J over dim 0 (None: when y.ndim >= 2)


@dataclass
class Problem:
    """What the loop needs: ``func(t: float, y)`` already counts NFE and builds the time tensor."""

    func: Callable[[float, torch.Tensor], torch.Tensor]
    method: object  # ExplicitRK or any object with its interface
    rtol: object  # float or tensor broadcastable to the state
    atol: object
    norm: Norm
    opts: Options
    stats: Optional[SolveStats] = None  # accepted/rejected steps are added here
    backward: bool = False


@dataclass
class Trace:
    """Accepted steps of a forward solve, with states kept every ``every`` steps (checkpoint mode)."""

    every: int
    steps: List[Tuple[float, float, bool, object]] = field(default_factory=list)  # (t, t_next, lands on a jump, tag)
    states: Dict[int, torch.Tensor] = field(default_factory=dict)  # step index -> state at its start


@dataclass
class Result:
    outputs: List[torch.Tensor]
    n_accepted: int = 0
    n_rejected: int = 0
    next_h: Optional[float] = None  # the controller's proposal after the last accepted step (not clipped to a stop)
    event_t: Optional[float] = None


EventFn = Callable[[float, torch.Tensor], float]


def _error_scale(prob: Problem, a0: torch.Tensor, a1: torch.Tensor) -> torch.Tensor:
    if isinstance(prob.rtol, float) and isinstance(prob.atol, float):
        return torch.maximum(a0, a1).mul_(prob.rtol).add_(prob.atol)
    return prob.atol + prob.rtol * torch.maximum(a0, a1)


def _error_ratio(prob: Problem, step: Step, abs_y: torch.Tensor) -> Tuple[float, torch.Tensor]:
    """The error norm (<= 1 accepts) and |y1|, reused as the next step's |y0|."""
    with torch.no_grad():
        abs_y1 = step.y1.abs()
        scale = _error_scale(prob, abs_y, abs_y1)
        norms = [prob.norm(e.div_(scale)) for e in prob.method.error_vectors(step)]
        if len(norms) == 1:
            return float(norms[0]), abs_y1
        e5, e3 = torch.stack(norms).tolist()  # DOP853 blends its 5th- and 3rd-order estimates
        if e5 == 0.0:
            return 0.0, abs_y1
        return e5 * e5 / math.sqrt(e5 * e5 + 0.01 * e3 * e3), abs_y1


def initial_step(prob: Problem, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float) -> float:
    """Hairer, Norsett & Wanner (II.4): match an Euler step's error to the tolerance. One NFE."""
    with torch.no_grad():
        scale = _error_scale(prob, y0.abs(), y0.abs())
        d0, d1 = torch.stack([prob.norm(y0 / scale), prob.norm(f0 / scale)]).tolist()
        if not math.isfinite(d1):
            raise NonFiniteError(f"func returned NaN or Inf at the initial point t={t0:.6g}; check the vector field and y0")
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        f1 = prob.func(t0 + direction * h0, y0 + direction * h0 * f0)
        d2 = float(prob.norm((f1 - f0) / scale)) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (prob.method.controller_order + 1))
    return min(100 * h0, h1, prob.opts.max_step)


class _Controller:
    """Integral (I) or proportional-integral (PI) step-size control on the error norm."""

    def __init__(self, prob: Problem):
        o = prob.opts
        pi = o.controller == "PI"
        self.pcoeff = o.pcoeff if o.pcoeff is not None else (0.2 if pi else 0.0)
        self.icoeff = o.icoeff if o.icoeff is not None else (0.65 if pi else 1.0)
        self.k = prob.method.controller_order + 1
        self.o = o
        self.prev_ratio = 1.0

    def factor(self, ratio: float, accepted: bool) -> float:
        o = self.o
        if ratio == 0.0:
            f = o.ifactor
        else:
            f = o.safety * ratio ** (-(self.icoeff + self.pcoeff) / self.k) * self.prev_ratio ** (self.pcoeff / self.k)
        f = min(o.ifactor, max(o.dfactor, f))
        if accepted:
            self.prev_ratio = max(ratio, 1e-4)
            return f
        return min(1.0, f)


def _stops(prob: Problem, t0: float, t1: float, direction: float) -> Tuple[List[float], set]:
    """Times the solver must land on: step_t, jump_t and the end, in integration order."""
    inside = [float(s) for s in (*prob.opts.step_t, *prob.opts.jump_t) if direction * (s - t0) > 0 and direction * (t1 - s) > 0]
    stops = sorted(set(inside), key=lambda s: direction * s) + [t1]
    return stops, {float(s) for s in prob.opts.jump_t}


def solve(prob: Problem, y0: torch.Tensor, ts: Sequence[float], **kwargs) -> Result:
    """Integrate from ts[0] through ts[-1]; return the state at every ts[i]."""
    res = Result([y0])
    try:
        _solve(prob, y0, ts, res, **kwargs)
    finally:
        if prob.stats is not None:
            if prob.backward:
                prob.stats.n_accepted_backward += res.n_accepted
                prob.stats.n_rejected_backward += res.n_rejected
            else:
                prob.stats.n_accepted += res.n_accepted
                prob.stats.n_rejected += res.n_rejected
    return res


def _solve(
    prob: Problem,
    y0: torch.Tensor,
    ts: Sequence[float],
    res: Result,
    *,
    f0: Optional[torch.Tensor] = None,
    first_step: Optional[float] = None,
    trace: Optional[Trace] = None,
    event: Optional[EventFn] = None,
) -> None:
    o, method, func = prob.opts, prob.method, prob.func
    if hasattr(method, "bind"):  # implicit methods keep per-solve Newton state (tolerances, Jacobian)
        method.bind(prob)
    t, t_end = float(ts[0]), float(ts[-1])
    if len(ts) == 1:
        return
    direction = 1.0 if t_end > t else -1.0
    stops, jumps = _stops(prob, t, t_end, direction)
    fixed = o.step_size is not None
    y = y0
    if f0 is None:
        f0 = func(t, y)
    if fixed:
        h = o.step_size
    else:
        h = first_step or o.first_step or initial_step(prob, t, y, f0, direction)
        controller = _Controller(prob)
        abs_y = y.detach().abs()
    out_i, stop_i, n_steps, n_nonfinite = 1, 0, 0, 0
    g0 = event(t, y) if event is not None else None
    while True:
        stop = stops[stop_i]
        h = min(max(h, o.min_step), o.max_step)
        landing = abs(stop - t) <= h * (1 + 1e-6)
        t_next = stop if landing else t + direction * h
        if not landing and out_i < len(ts) and abs(ts[out_i] - t_next) <= 1e-9 * h:
            t_next = float(ts[out_i])  # an output time the step reaches up to float drift: land on it exactly
        dt = t_next - t
        if abs(dt) <= 16 * math.ulp(max(abs(t), abs(t_next))):
            raise StepSizeUnderflowError(f"step size underflow at t={t:.6g}: dt={dt:.3g}. " + STIFF_HINT)
        n_steps += 1
        if n_steps > o.max_num_steps:
            raise MaxStepsError(
                f"max_num_steps={o.max_num_steps} exceeded at t={t:.6g} (integrating to {t_end:.6g}, dt={dt:.3g}). "
                "Raise options['max_num_steps'] if the solve is just long; " + STIFF_HINT
            )
        on_jump = landing and stop in jumps
        step_func = _before_jump(func, t_next, direction) if on_jump else func
        step = method.step(step_func, t, dt, y, f0)
        if getattr(step, "failed", False):  # an implicit method's Newton iteration did not converge
            if fixed:
                raise SolverError(f"Newton iteration did not converge at t={t:.6g} with the fixed step {dt:.3g}; use a smaller step_size")
            res.n_rejected += 1
            h = abs(dt) * 0.5
            continue
        if not fixed:
            ratio, abs_y1 = _error_ratio(prob, step, abs_y)
            if not math.isfinite(ratio):
                n_nonfinite += 1
                res.n_rejected += 1
                if n_nonfinite >= 8:
                    raise NonFiniteError(
                        f"non-finite error estimate at t={t:.6g} with dt={dt:.3g} (the vector field returned "
                        "NaN/Inf on 8 successive attempts). " + STIFF_HINT
                    )
                h = abs(dt) * o.dfactor
                continue
            n_nonfinite = 0
            if ratio > 1.0:
                res.n_rejected += 1
                if o.min_step > 0 and abs(dt) <= o.min_step * (1 + 1e-6):  # dt = (t + h) - t may round above h
                    raise StepSizeUnderflowError(
                        f"error control needs a step below min_step={o.min_step:g} at t={t:.6g}. " + STIFF_HINT
                    )
                h = abs(dt) * controller.factor(ratio, False)
                continue
            abs_y = abs_y1
            h = abs(dt) * controller.factor(ratio, True)
            res.next_h = h
        if trace is not None:
            if len(trace.steps) % trace.every == 0:
                trace.states[len(trace.steps)] = y.detach()
            trace.steps.append((t, t_next, on_jump, getattr(step, "tag", None)))  # tag: the sub-method of method="auto"
        res.n_accepted += 1
        if event is not None:
            g1 = event(t_next, step.y1)
            if (g0 < 0) != (g1 < 0) or g1 == 0.0:
                res.event_t = _locate_event(prob, step, event, g0, g1)
                res.outputs.append(method.interpolate(func, step, res.event_t))
                return
            g0 = g1
        out_i = _emit(method, step_func, step, ts, out_i, res.outputs, t_next, direction)
        if landing:
            stop_i += 1
            if stop_i == len(stops):
                return
        t, y = t_next, step.y1
        f0 = _next_f0(method, func, step, t, direction, on_jump)


def _locate_event(prob: Problem, step: Step, event: EventFn, g0: float, g1: float) -> float:
    """The zero of event(t, y(t)) inside the step, on the dense output (Illinois false position)."""
    a, b, ga, gb = step.t, step.t + step.h, g0, g1
    side = 0
    for _ in range(60):
        if gb == 0.0 or abs(b - a) <= 4 * math.ulp(max(abs(a), abs(b))):
            break
        c = b - gb * (b - a) / (gb - ga)
        gc = event(c, prob.method.interpolate(prob.func, step, c))
        if (gc < 0) == (gb < 0):
            b, gb = c, gc
            if side == -1:
                ga /= 2
            side = -1
        else:
            a, ga, b, gb = b, gb, c, gc
            side = 1
    return b


def _before_jump(func, t_jump: float, direction: float):
    """``func`` for a step that lands on a discontinuity: stages at (or past) the jump are evaluated
    at the last float before it, so the step sees f from its own side only (as torchdiffeq does)."""
    t_in = math.nextafter(t_jump, -direction * math.inf)
    return lambda s, y: func(t_in if direction * (s - t_jump) >= 0 else s, y)


def _next_f0(method, func, step: Step, t_next: float, direction: float, on_jump: bool) -> torch.Tensor:
    """f at the start of the next step: reused from this step, or re-evaluated just past a jump."""
    if on_jump:
        return func(math.nextafter(t_next, direction * math.inf), step.y1)
    return method.end_derivative(func, step)


def _emit(method, func, step: Step, ts: Sequence[float], i: int, outputs: List[torch.Tensor], t_next: float,
          direction: float) -> int:
    """Append the outputs that fall in (t, t_next]; the step itself is never shortened for them.
    ``func`` is the one the step used, so a step onto a jump interpolates from its own side."""
    while i < len(ts) and direction * (ts[i] - t_next) <= 0:
        outputs.append(step.y1 if ts[i] == t_next else method.interpolate(func, step, ts[i]))
        i += 1
    return i


def replay(prob: Problem, y: torch.Tensor, steps: Sequence[Tuple[float, float, bool, object]], ts: Sequence[float]) -> List[torch.Tensor]:
    """Re-run recorded steps exactly (no error control) and return the outputs at ``ts`` among them
    followed by the final state. Checkpointed gradients use it to rebuild one segment's graph."""
    func, method = prob.func, prob.method
    if hasattr(method, "bind"):
        method.bind(prob)
    direction = 1.0 if steps[0][1] > steps[0][0] else -1.0
    outputs: List[torch.Tensor] = []
    i = 0
    f0 = func(steps[0][0], y)
    for n, (t, t_next, on_jump, *tag) in enumerate(steps):
        step_func = _before_jump(func, t_next, direction) if on_jump else func
        if tag and tag[0] is not None:
            step = method.step(step_func, t, t_next - t, y, f0, tag=tag[0])
        else:
            step = method.step(step_func, t, t_next - t, y, f0)
        i = _emit(method, step_func, step, ts, i, outputs, t_next, direction)
        y = step.y1
        if n + 1 < len(steps):
            f0 = _next_f0(method, func, step, t_next, direction, on_jump)
    return outputs + [y]
