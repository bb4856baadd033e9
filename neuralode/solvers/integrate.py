"""The time-stepping loop: step-size control, fixed grids, stops, dense output, events, traces.

A solve is ``solve(problem, y0, ts)``. It asks the problem's method for a fresh stepper and passes
it explicitly through the loop, so everything that lives for one solve (Newton state, stiffness
watch, the auto switch) dies with it; checkpoint replay starts its own stepper.

The clock lives on the host as Python floats (float64), so the only host sync in an adaptive
step is reading the error norm (one read per attempted step); fixed-grid solves read the state
once, at the end, to check it is finite. Everything here works on one flat state tensor; tuple
states are flattened by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .control import Controller, Norm, Tolerance, initial_step
from .errors import STIFF_HINT, MaxStepsError, NonFiniteError, SolverError, StepSizeUnderflowError, ToleranceError
from .rk import Step, hermite, linear
from .settings import Options
from .stats import SolveStats

Func = Callable[[float, torch.Tensor], torch.Tensor]
DEFAULT_MAX_STEPS = 100_000  # adaptive solves and event searches, unless options['max_num_steps'] says otherwise
EventFn = Callable[[float, torch.Tensor], float]


@dataclass
class Callbacks:
    """torchdiffeq's per-step hooks on ``func``, already adapted to (t float, flat y, dt float)."""

    step: Optional[Callable] = None
    accept: Optional[Callable] = None
    reject: Optional[Callable] = None


@dataclass
class Problem:
    """What the loop needs. ``func(t: float, y)`` already counts NFE and builds the time tensor."""

    func: Func
    method: object  # an immutable method description; ``method.start(self)`` makes the stepper
    tol: Tolerance
    norm: Norm
    opts: Options
    stats: Optional[SolveStats] = None
    backward: bool = False  # the adjoint's backward solve: statistics and messages say so
    autodiff: bool = True  # False when func cannot itself be differentiated (Jacobians by differences)
    callbacks: Optional[Callbacks] = None
    time_dtype: torch.dtype = torch.float64  # what func sees: one-sided evaluations step by its resolution
    # This solve's sink for local error estimates: when a list, every accepted step of an adaptive
    # explicit method appends its ``[scaled error norm, stiffness estimate]``, differentiable through
    # the stages (``SolverSettings.odeint(..., error_estimates=[])``; the error regulariser sums them).
    errors: Optional[list] = None

    def nudge(self, t: float, direction: float) -> float:
        """The next time after ``t`` in ``direction`` that func can tell apart from ``t``."""
        x = torch.tensor(t, dtype=self.time_dtype)
        return float(torch.nextafter(x, torch.tensor(direction * math.inf, dtype=self.time_dtype)))

    @property
    def label(self) -> str:
        return "backward (adjoint) solve" if self.backward else "solve"


@dataclass
class Trace:
    """Accepted steps of a forward solve, with states kept every ``every`` steps (checkpoint mode)."""

    every: int
    steps: List[Tuple[float, float, bool, object]] = field(default_factory=list)  # (t, t_next, onto a jump, tag)
    states: Dict[int, torch.Tensor] = field(default_factory=dict)  # step index -> state at its start


@dataclass
class Result:
    outputs: List[torch.Tensor]
    stepper: object = None
    n_accepted: int = 0
    n_rejected: int = 0
    next_h: Optional[float] = None  # the controller's proposal after the last accepted step (not clipped to a stop)
    event_t: Optional[float] = None
    steps: Optional[List[Step]] = None  # accepted steps, when asked for (dense solutions)


def fixed_grid(t0: float, t1: float, step_size: float):
    """torchdiffeq's grid: t0 + k*step_size, the last point replaced by t1 (so the last step may be
    short). Lazy, so an event search may run on an unbounded grid (t1 = +-inf)."""
    direction = 1.0 if t1 >= t0 else -1.0
    n = math.ceil(abs(t1 - t0) / step_size + 1) if math.isfinite(t1) else math.inf
    k = 0
    while k < n - 1:
        yield t0 + direction * k * step_size
        k += 1
    yield t1


def solve(prob: Problem, y0: torch.Tensor, ts: Sequence[float], *, grid: Optional[Sequence[float]] = None,
          f0: Optional[torch.Tensor] = None, first_step: Optional[float] = None, trace: Optional[Trace] = None,
          event: Optional[EventFn] = None, keep_steps: bool = False) -> Result:
    """Integrate from ts[0] through ts[-1]; return the state at every ts[i]. Fixed-grid solves
    step on ``grid`` (or a grid from ``options['step_size']``); adaptive ones control the step."""
    if prob.method.kind == "scipy":  # scipy's solve_ivp runs the whole solve (no steps, no stepper)
        return Result(prob.method.integrate(prob, y0, ts, event=event))
    res = Result([y0], stepper=prob.method.start(prob), steps=[] if keep_steps else None)
    try:
        if event is not None and event(float(ts[0]), y0) == 0.0:  # torchdiffeq: a root at t0 is the event
            res.event_t = float(ts[0])
            res.outputs.append(y0)
        elif len(ts) > 1:
            fixed = prob.opts.step_size is not None or not prob.method.adaptive or grid is not None
            if fixed:
                _fixed(prob, res, y0, ts, grid, f0, trace, event)
            else:
                _adaptive(prob, res, y0, ts, f0, first_step, trace, event)
    finally:
        if prob.stats is not None:
            if prob.backward:
                prob.stats.n_accepted_backward += res.n_accepted
                prob.stats.n_rejected_backward += res.n_rejected
            else:
                prob.stats.n_accepted += res.n_accepted
                prob.stats.n_rejected += res.n_rejected
    return res


def _interpolator(prob: Problem, stepper):
    """How outputs inside a step are formed: an adaptive method's dense output (also when it runs
    at a fixed step), or on the grid of a fixed-step method torchdiffeq's ``interp``: linear by
    default, cubic Hermite on request."""
    if prob.method.adaptive:
        return stepper.interpolate
    if prob.opts.interp == "cubic":
        return lambda func, step, t_out: hermite(step, stepper.end_derivative(func, step), (t_out - step.t) / step.h)
    return lambda func, step, t_out: linear(step, (t_out - step.t) / step.h)


def _fixed(prob: Problem, res: Result, y: torch.Tensor, ts: Sequence[float], grid, f0, trace, event) -> None:
    stepper, func, o = res.stepper, prob.func, prob.opts
    t0, t_end = float(ts[0]), float(ts[-1])
    if grid is None:
        grid = _grid_for(prob, y, t0, t_end) if o.grid_constructor is not None \
            else fixed_grid(t0, t_end, o.step_size) if o.step_size is not None else ts
    stops, jumps = _stops(o, t0, t_end, 1.0 if t_end > t0 else -1.0)
    points = _with_stops(grid, stops[:-1], 1.0 if t_end > t0 else -1.0)
    direction = 1.0 if t_end > t0 else -1.0
    interp = _interpolator(prob, stepper)
    perturb = o.perturb
    t = next(points)
    if f0 is None:
        f0 = func(prob.nudge(t, direction) if perturb else t, y)
    out_i, n, step, on_jump = 1, 0, None, False
    max_steps = o.max_num_steps or (DEFAULT_MAX_STEPS if event is not None else math.inf)
    g0 = event(t, y) if event is not None else None
    cb = prob.callbacks
    for t_next in points:
        if step is not None:  # f at the start of this step, from the last one (after it, not before it ended)
            f0 = _next_f0(prob, stepper, step, t, direction, fresh=perturb or on_jump)
        n += 1
        if n > max_steps:
            raise MaxStepsError(f"{prob.label}: max_num_steps={max_steps} exceeded at t={t:.6g} on the fixed grid"
                                + (" before the event occurred" if event is not None else "")
                                + "; raise options['max_num_steps'] or use a larger step_size")
        _check_budget(prob, t)
        dt = t_next - t
        if cb is not None and cb.step is not None:
            cb.step(t, y, dt)
        on_jump = t_next in jumps
        step_func = _before_jump(prob, t_next, direction) if on_jump else _perturbed(prob, t, t_next, direction) \
            if perturb else func
        step = stepper.step(step_func, t, dt, y, f0)
        if step.failed:
            raise SolverError(f"{prob.label}: the Newton iteration did not converge at t={t:.6g} with the fixed step "
                              f"{dt:.3g}; use a smaller step_size")
        res.n_accepted += 1
        if trace is not None:
            _record(trace, step, t, t_next, on_jump)
        if res.steps is not None:
            res.steps.append(step)
        stepper.accepted(step, n, t_end, max_steps)
        if event is not None:
            g1 = event(t_next, step.y1)
            if _crossed(g0, g1):
                res.event_t = _locate_event(event, lambda s: interp(step_func, step, s), step, g0, g1)
                res.outputs.append(interp(step_func, step, res.event_t))
                _check_finite(prob, res, [t0, res.event_t])
                return
            g0 = g1
        out_i = _emit(interp, step_func, step, ts, out_i, res.outputs, t_next, direction)
        t, y = t_next, step.y1
    if event is not None:
        raise SolverError(f"{prob.label}: the event did not occur before the end of the grid at t={t:.6g}")
    _check_finite(prob, res, ts)


def _adaptive(prob: Problem, res: Result, y0: torch.Tensor, ts: Sequence[float], f0, first_step, trace, event) -> None:
    o, func, stepper = prob.opts, prob.func, res.stepper
    t, t_end = float(ts[0]), float(ts[-1])
    direction = 1.0 if t_end > t else -1.0
    stops, jumps = _stops(o, t, t_end, direction)
    y = y0
    if f0 is None:
        f0 = func(t, y)
    h = first_step or o.first_step or initial_step(func, prob.tol, prob.norm, stepper.controller_order, t, y, f0,
                                                   direction, o.max_step)
    controller = Controller(o, stepper.controller_order)
    abs_y = y.detach().abs()
    # float16 saturates long before float32: a state near its largest value stops moving instead
    # of overflowing, so the solve would crawl to max_num_steps; watch for it (one read per step)
    half = y.dtype in (torch.float16, torch.bfloat16)
    half_max, stalled = torch.finfo(y.dtype).max / 8, 0
    cb = prob.callbacks
    max_steps = o.max_num_steps or DEFAULT_MAX_STEPS
    out_i, stop_i, n_steps, n_nonfinite = 1, 0, 0, 0
    first_bad_t = None  # where func first gave a non-finite error estimate (for the diagnosis)
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
            if first_bad_t is not None:
                raise NonFiniteError(f"{prob.label}: func returned NaN or Inf near t={first_bad_t:.6g} (first seen there; "
                                     f"the step size then collapsed at t={t:.6g}). Check the vector field.")
            raise StepSizeUnderflowError(f"{prob.label}: step size underflow at t={t:.6g}: dt={dt:.3g}. " + STIFF_HINT)
        n_steps += 1
        if n_steps > max_steps:
            if event is not None:
                raise MaxStepsError(f"{prob.label}: the event did not occur within max_num_steps={max_steps} steps "
                                    f"(reached t={t:.6g}); check the event function, or raise options['max_num_steps']")
            raise MaxStepsError(
                f"{prob.label}: max_num_steps={max_steps} exceeded at t={t:.6g} (integrating to {t_end:.6g}, "
                f"dt={dt:.3g}). Raise options['max_num_steps'] if the solve is just long; " + STIFF_HINT
            )
        _check_budget(prob, t)
        on_jump = landing and stop in jumps
        step_func = _before_jump(prob, t_next, direction) if on_jump else func
        if cb is not None and cb.step is not None:
            cb.step(t, y, h)  # as torchdiffeq: the proposal, before it is shortened onto a stop
        step = stepper.step(step_func, t, dt, y, f0)
        if step.failed:  # an implicit method's Newton iteration did not converge
            res.n_rejected += 1
            if cb is not None and cb.reject is not None:
                cb.reject(t, y, dt)
            h = abs(dt) * 0.5
            continue
        ratio, abs_y1 = stepper.error(step, abs_y)
        if not math.isfinite(ratio):
            n_nonfinite += 1
            res.n_rejected += 1
            first_bad_t = t if first_bad_t is None else first_bad_t
            if cb is not None and cb.reject is not None:
                cb.reject(t, y, dt)
            if n_nonfinite >= 8:
                raise NonFiniteError(
                    f"{prob.label}: func returned NaN or Inf in every step tried from t={t:.6g} (8 attempts, down to "
                    f"dt={dt:.3g}; first seen at t={first_bad_t:.6g}). Check the vector field. " + STIFF_HINT
                )
            h = abs(dt) * o.dfactor
            continue
        n_nonfinite = 0
        at_min_step = o.min_step > 0 and abs(dt) <= o.min_step * (1 + 1e-6)  # dt = (t + h) - t may round above h
        if ratio > 1.0 and not at_min_step:  # as torchdiffeq, a step at min_step is accepted whatever its error
            res.n_rejected += 1
            if cb is not None and cb.reject is not None:
                cb.reject(t, y, dt)
            h = abs(dt) * controller.factor(ratio, False)
            continue
        if cb is not None and cb.accept is not None:
            cb.accept(t, y, dt)
        if prob.errors is not None:
            prob.errors.append(stepper.error_term(step, abs_y, abs_y1))
        abs_y = abs_y1
        h = abs(dt) * controller.factor(ratio, True)
        res.next_h = h
        if trace is not None:
            _record(trace, step, t, t_next, on_jump)
        if res.steps is not None:
            res.steps.append(step)
        res.n_accepted += 1
        stepper.accepted(step, n_steps, t_end, max_steps)
        if half:  # half precision saturates or stops moving long before a step-size underflow shows it
            if float(abs_y.max()) > half_max:
                raise NonFiniteError(f"{prob.label}: the state reached {float(abs_y.max()):.4g} at t={t_next:.6g}, near "
                                     f"the largest {str(y.dtype)[6:]} value; solve in float32 or rescale the state")
            stalled = stalled + 1 if torch.equal(step.y1, step.y) else 0
            if stalled >= 50:
                raise ToleranceError(f"{prob.label}: the state stopped changing at t={t_next:.6g}: the steps are below "
                                     f"the resolution of {str(y.dtype)[6:]}; solve in float32")
        if event is not None:
            g1 = event(t_next, step.y1)
            if _crossed(g0, g1):
                res.event_t = _locate_event(event, lambda s: stepper.interpolate(step_func, step, s), step, g0, g1)
                res.outputs.append(stepper.interpolate(step_func, step, res.event_t))
                return
            g0 = g1
        out_i = _emit(stepper.interpolate, step_func, step, ts, out_i, res.outputs, t_next, direction)
        if landing:
            stop_i += 1
            if stop_i == len(stops):
                if event is not None:
                    raise SolverError(f"{prob.label}: the event did not occur before t={t_end:.6g}")
                return
        t, y = t_next, step.y1
        f0 = _next_f0(prob, stepper, step, t, direction, fresh=on_jump)


def _record(trace: Trace, step: Step, t: float, t_next: float, on_jump: bool) -> None:
    if len(trace.steps) % trace.every == 0:
        trace.states[len(trace.steps)] = step.y.detach()
    trace.steps.append((t, t_next, on_jump, step.tag))  # tag: the sub-method of method="auto"


def _check_budget(prob: Problem, t: float) -> None:
    """``options['max_nfe']``: a budget of function evaluations for the solve (both passes)."""
    o, stats = prob.opts, prob.stats
    if o.max_nfe is not None and stats is not None:
        used = stats.nfe_backward if prob.backward else stats.nfe_forward
        if used >= o.max_nfe:
            raise MaxStepsError(f"{prob.label}: max_nfe={o.max_nfe} function evaluations used up at t={t:.6g}; "
                                "raise options['max_nfe'] or loosen the tolerance")


def _check_finite(prob: Problem, res: Result, ts: Sequence[float]) -> None:
    """Fixed grids have no error estimate to notice NaN: check the final state once (one host
    read per solve; NaN and Inf propagate to it), and name the first bad output if it is bad."""
    outs = res.outputs
    with torch.no_grad():
        if bool(torch.isfinite(outs[-1]).all()):
            return
        i = next(k for k, o in enumerate(outs) if not bool(torch.isfinite(o).all()))
    where = f"between t={ts[i - 1]:.6g} and t={ts[i]:.6g}" if 0 < i < len(ts) else f"before t={ts[-1]:.6g}"
    raise NonFiniteError(f"{prob.label}: the solution became NaN or Inf {where} on the fixed grid; "
                         "use a smaller step_size or check the vector field")


def _grid_for(prob: Problem, y0: torch.Tensor, t0: float, t1: float) -> List[float]:
    """``grid_constructor(func, y0, t)`` for a solve the caller did not grid (the adjoint's backward
    intervals): t is the interval's two ends, in the direction of the solve."""
    t = torch.tensor([t0, t1], dtype=prob.time_dtype, device=y0.device)
    grid = prob.opts.grid_constructor(lambda s, y: prob.func(float(s), y), y0, t)
    g = [float(v) for v in torch.as_tensor(grid).detach().reshape(-1).double().cpu()]
    if len(g) < 2 or g[0] != float(t[0]) or g[-1] != float(t[-1]):
        raise SolverError(f"{prob.label}: grid_constructor must return a grid from {t0:g} to {t1:g}")
    g[0], g[-1] = t0, t1
    return g


def _with_stops(grid, stops: Sequence[float], direction: float):
    """The grid with the stops (step_t, jump_t) inserted where they fall strictly inside a step."""
    it = iter(grid)
    prev = next(it)
    yield prev
    pending = list(stops)
    for t in it:
        while pending and direction * (pending[0] - prev) <= 0:
            pending.pop(0)
        while pending and direction * (pending[0] - t) < 0:
            yield pending.pop(0)
        yield t
        prev = t


def _crossed(g0: float, g1: float) -> bool:
    return (g0 < 0) != (g1 < 0) or g1 == 0.0


def _stops(o: Options, t0: float, t1: float, direction: float) -> Tuple[List[float], set]:
    """Times the solver must land on: step_t, jump_t and the end, in integration order."""
    inside = [s for s in (*o.step_t, *o.jump_t) if direction * (s - t0) > 0 and direction * (t1 - s) > 0]
    stops = sorted(set(inside), key=lambda s: direction * s) + [t1]
    return stops, set(o.jump_t)


def _locate_event(event: EventFn, interp: Callable[[float], torch.Tensor], step: Step, g0: float, g1: float) -> float:
    """The first time inside the step where event(t, y(t)) leaves g0's sign, on the dense output.

    As in torchdiffeq a zero counts as having left it, and a zero need not be isolated (an event
    function may return 0 on a whole interval, e.g. a terminal guard past the last time of
    interest): the bracket [lo, hi] keeps lo strictly on g0's side and hi at or past the event;
    Illinois false position narrows it while g(hi) != 0, bisection while g(hi) == 0."""
    lo, hi, glo, ghi = step.t, step.t + step.h, g0, g1
    before = g0 > 0
    moved = 0  # +1: hi moved last, -1: lo moved last (Illinois halves the stale end's value)
    for _ in range(200):
        if abs(hi - lo) <= 4 * math.ulp(max(abs(lo), abs(hi))):
            break
        c = lo + 0.5 * (hi - lo) if ghi == 0.0 else hi - ghi * (hi - lo) / (ghi - glo)
        if not (min(lo, hi) < c < max(lo, hi)):
            c = lo + 0.5 * (hi - lo)
        gc = event(c, interp(c))
        if gc == 0.0 or (gc > 0) != before:
            hi, ghi = c, gc
            if moved == 1:
                glo /= 2
            moved = 1
        else:
            lo, glo = c, gc
            if moved == -1:
                ghi /= 2
            moved = -1
    return hi


def _before_jump(prob: Problem, t_jump: float, direction: float) -> Func:
    """``func`` for a step that lands on a discontinuity: stages at (or past) the jump are evaluated
    at the last time before it that func can resolve (in its time dtype), so the step sees f from
    its own side only (as torchdiffeq does)."""
    func, t_in = prob.func, prob.nudge(t_jump, -direction)
    return lambda s, y: func(t_in if direction * (s - t_in) > 0 else s, y)


def _perturbed(prob: Problem, t0: float, t1: float, direction: float) -> Func:
    """``options['perturb']`` on fixed grids: the step sees f strictly inside (t0, t1), evaluating
    the stages at its ends one representable time inwards (torchdiffeq's Perturb.NEXT / PREV)."""
    func, inside0, inside1 = prob.func, prob.nudge(t0, direction), prob.nudge(t1, -direction)
    near = 4 * math.ulp(max(abs(t0), abs(t1)))  # t0 + 1.0*(t1 - t0) may round to a neighbour of t1
    return lambda s, y: func(inside0 if direction * (s - t0) <= 0 else inside1 if direction * (s - t1) >= -near else s, y)


def _next_f0(prob: Problem, stepper, step: Step, t_next: float, direction: float, fresh: bool) -> torch.Tensor:
    """f at the start of the next step: reused from this step, or re-evaluated just past t_next
    (after a jump, or on a perturbed grid where the step saw f only from inside)."""
    if fresh:
        return prob.func(prob.nudge(t_next, direction), step.y1)
    return stepper.end_derivative(prob.func, step)


def _emit(interp, func: Func, step: Step, ts: Sequence[float], i: int, outputs: List[torch.Tensor], t_next: float,
          direction: float) -> int:
    """Append the outputs that fall in (t, t_next]; the step itself is never shortened for them.
    ``func`` is the one the step used, so a step onto a jump interpolates from its own side."""
    while i < len(ts) and direction * (ts[i] - t_next) <= 0:
        outputs.append(step.y1 if ts[i] == t_next else interp(func, step, ts[i]))
        i += 1
    return i


def replay(prob: Problem, y: torch.Tensor, steps: Sequence[Tuple[float, float, bool, object]],
           ts: Sequence[float], errors: Optional[list] = None) -> List[torch.Tensor]:
    """Re-run recorded steps exactly (no error control) with a fresh stepper and return the outputs
    at ``ts`` among them followed by the final state. Checkpointed gradients rebuild one segment's
    graph with it; ``errors`` collects the steps' error terms again (as ``Problem.errors``)."""
    func = prob.func
    stepper = prob.method.start(prob)
    interp = _interpolator(prob, stepper)
    direction = 1.0 if steps[0][1] > steps[0][0] else -1.0
    perturb = prob.opts.perturb and (prob.opts.step_size is not None or not prob.method.adaptive)
    outputs: List[torch.Tensor] = []
    i = 0
    t_first = steps[0][0]
    f0 = func(prob.nudge(t_first, direction) if perturb else t_first, y)
    for n, (t, t_next, on_jump, tag) in enumerate(steps):
        if on_jump:
            step_func = _before_jump(prob, t_next, direction)
        else:
            step_func = _perturbed(prob, t, t_next, direction) if perturb else func
        step = stepper.step(step_func, t, t_next - t, y, f0, tag=tag)
        if step.failed:
            raise SolverError(f"checkpoint replay: the Newton iteration did not converge at t={t:.6g} (dt={t_next - t:.3g}) "
                              "where the forward solve did; use grad='direct' or a tighter tolerance for this problem")
        stepper.accepted(step, n + 1, steps[-1][1], math.inf)  # multistep methods keep their history
        if errors is not None:  # the forward pass's error scale: |state| at the step's start and end
            errors.append(stepper.error_term(step, step.y.detach().abs(), step.y1.detach().abs()))
        i = _emit(interp, step_func, step, ts, i, outputs, t_next, direction)
        y = step.y1
        if n + 1 < len(steps):
            f0 = _next_f0(prob, stepper, step, t_next, direction, fresh=on_jump or perturb)
    return outputs + [y]
