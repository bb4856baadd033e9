"""Per-sample adaptive stepping: every sample of a batch has its own time, step size, accept or
reject decision and error norm (``options=dict(per_sample=True)``).

The state's leading dimension is the batch. Times live on the device as one float64 entry per
sample, so the loop makes one host read per attempted step for the whole batch (whether any
sample is still running, and how many outputs the step passed), never one per sample.
``func`` receives the times as a tensor of shape ``(batch,)``. Output times are shared (``t`` of
shape ``(n,)``) or per sample (``t`` of shape ``(batch, n)``, each row monotonic in the same
direction; pad a short row by repeating its last time).

Finished samples stop costing evaluations only where the batch may shrink: with
``options["compact"]=True`` the loop drops finished rows from what it hands ``func`` (which must
then treat rows independently and accept any number of them: per-sample parameters belong in
the state, with zero derivative); by default they stay in the batch with a zero step.

Events: ``event_fn(t, y)`` returns one value (or a row of values) per sample, and each sample
stops where its own event fires (torchdiffeq's rules per row: the first sign change of any
component, a root at t0 is the event); the result is ``(event_t, states at [t0, event_t])`` with
``event_t`` of shape ``(batch,)``. The crossing is located by bisection on the step's dense output
for the rows that crossed, the event function seeing the same rows as ``func`` (events add one
host read per attempted step, and one per bisection iteration of a step where a row fired). Every
gradient mode works; the event times carry no gradient (torchdiffeq's ``odeint`` rule).

Methods: the adaptive explicit tableaus (:class:`PerSampleSolve`), the ESDIRKs kvaerno3/kvaerno5
with one Newton system per sample (:class:`PerSampleESDIRK`) and "auto", switching each sample on
its own stiffness estimate (:class:`PerSampleAuto`).

Gradients: direct (through the loop), checkpoint (the loop's decisions are recorded and segments
re-run with them), and the backsolve adjoint, whose backward pass is solved jointly (one step size
for the batch, as torchode found necessary); per-sample grids are mapped onto the shared grid
s = 0, 1, ..., n-1 by a per-row change of time variable on each output interval.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .control import Tolerance
from .errors import STIFF_HINT, MaxStepsError, NonFiniteError, StepSizeUnderflowError
from .implicit import ETA_MIN, KAPPA, MAX_NEWTON, _ImplicitStage, count_stat
from .integrate import DEFAULT_MAX_STEPS
from .linalg import DenseNewtonMatrix

TIME = torch.float64
logger = logging.getLogger("neuralode.solvers")


@dataclass
class LoopState:
    """Everything the loop carries from one iteration to the next (the rows still running)."""

    rows: torch.Tensor  # (m,) indices into the batch of the rows this state holds
    y: torch.Tensor  # (m, D)
    f0: torch.Tensor  # (m, D)
    t: torch.Tensor  # (m,) float64
    h: torch.Tensor  # (m,) float64, the next step to try (magnitude)
    prev: torch.Tensor  # (m,) the last accepted error ratio (PI control)
    out_i: torch.Tensor  # (m,) index of the next output of each row
    abs_y: torch.Tensor  # (m, D) |y| for the error scale
    T: torch.Tensor  # (m, n) the rows' output times (float64); T[:, -1] is where each row ends
    watch: torch.Tensor  # (m, 3) long: method="auto"'s per-row state (implicit now, stiff and non-stiff counts)

    def detached(self) -> "LoopState":
        return LoopState(*(v.detach() for v in self.__dict__.values()))

    def take(self, keep: torch.Tensor) -> "LoopState":
        return LoopState(*(v[keep] for v in self.__dict__.values()))


@dataclass
class Decisions:
    """What an adaptive forward pass decided, per iteration, so a replay repeats it exactly."""

    every: int
    h: List[torch.Tensor] = field(default_factory=list)  # step tried (signed), per row
    accept: List[torch.Tensor] = field(default_factory=list)
    emit: List[int] = field(default_factory=list)  # how many output slots the iteration checked
    keep: List[Optional[torch.Tensor]] = field(default_factory=list)  # compaction after the iteration
    events: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)  # rows fired, where
    watch: List[torch.Tensor] = field(default_factory=list)  # LoopState.watch after the iteration
    states: Dict[int, LoopState] = field(default_factory=dict)


class PerSampleSolve:
    """One per-sample solve: the problem, the stepper's tableau and the batch layout."""

    def __init__(self, prob, method, y0: torch.Tensor, T: torch.Tensor, t_dtype: torch.dtype,
                 call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], norm: Callable):
        self.prob, self.tab = prob, method.tableau
        self.fsal, self.dense = self.tab.fsal, self.tab.dense or None
        self.order = method.controller_order
        self.B, self.D = y0.shape[0], y0[0].numel()
        self.y0 = y0.reshape(self.B, -1)
        self.T = T.to(device=y0.device, dtype=TIME)  # (B, n)
        self.n = T.shape[1]
        self.direction = 1.0 if bool((self.T[:, -1] >= self.T[:, 0]).all()) else -1.0
        self.t_dtype, self.call, self.norm = t_dtype, call, norm
        o = prob.opts
        self.compact = bool(o.compact)
        self.max_steps = o.max_num_steps or DEFAULT_MAX_STEPS
        pi = o.controller == "PI"
        self.pcoeff = o.pcoeff if o.pcoeff is not None else (0.2 if pi else 0.0)
        self.icoeff = o.icoeff if o.icoeff is not None else (0.65 if pi else 1.0)
        self.events: Optional[RowEvents] = None
        self.accepted = torch.zeros(self.B, dtype=torch.long, device=y0.device)
        self.rejected = torch.zeros(self.B, dtype=torch.long, device=y0.device)

    # -- pieces -----------------------------------------------------------------------------
    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.call(t, y)

    def scale(self, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        tol = self.prob.tol
        m = torch.maximum(a, b)
        rtol = tol.rtol if isinstance(tol.rtol, float) else tol.rtol.view(self.B, -1)[rows]
        atol = tol.atol if isinstance(tol.atol, float) else tol.atol.view(self.B, -1)[rows]
        return atol + rtol * m

    def start(self) -> LoopState:
        """f at t0 and Hairer's initial step, per row (one extra evaluation for the batch)."""
        o = self.prob.opts
        rows = torch.arange(self.B, device=self.y0.device)
        t0 = self.T[:, 0].clone()
        y = self.y0
        f0 = self.f(t0, y)
        with torch.no_grad():
            abs_y = y.detach().abs()
            sc = self.scale(rows, abs_y, abs_y)
            d0, d1 = self.norm(y.detach() / sc), self.norm(f0.detach() / sc)
            if o.first_step is not None:
                h = torch.full_like(t0, o.first_step)
            else:
                h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
                h0 = h0.to(TIME).clamp(max=o.max_step)
                f1 = self.f(t0 + self.direction * h0, y.detach() + (self.direction * h0).to(y.dtype)[:, None] * f0.detach())
                d2 = self.norm((f1 - f0.detach()) / sc).to(TIME) / h0
                dmax = torch.maximum(d1.to(TIME), d2)
                h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax) ** (1.0 / (self.order + 1)))
                h = torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, o.max_step))
        zeros = torch.zeros(self.B, dtype=torch.long, device=y.device)
        watch = torch.zeros(self.B, 3, dtype=torch.long, device=y.device)
        return LoopState(rows, y, f0, t0, h, torch.ones_like(h), zeros + 1, abs_y, self.T, watch)

    def _coeffs(self, like: torch.Tensor) -> dict:
        """The tableau as tensors (cached per dtype and device), so a stage is one matmul."""
        key = (like.dtype, like.device)
        if getattr(self, "_coeff_key", None) != key:
            tab = self.tab
            as_t = lambda v: torch.tensor(v, dtype=like.dtype, device=like.device)  # noqa: E731
            self._coeff = {"a": [as_t(row) for row in tab.a], "b": as_t(tab.b), "e": as_t(tab.e),
                           "e3": as_t(tab.e3) if tab.e3 is not None else None,
                           "c": torch.tensor(tab.c, dtype=TIME, device=like.device)}
            self._coeff_key = key
        return self._coeff

    def stages(self, s: LoopState, h: torch.Tensor):
        """One RK step of every row with its own signed step ``h`` (time dtype). Returns y1, the
        stage derivatives stacked as (m, D, stages), f at the end when the tableau has it, and the
        rows whose step failed outright (None: an explicit step cannot)."""
        co = self._coeffs(s.y)
        hy = h.to(s.y.dtype)[:, None]
        times = torch.addcmul(s.t[:, None], h[:, None], co["c"])  # (m, stages)
        ks = [s.f0]
        yi = s.y
        for i, a in enumerate(co["a"], 1):
            yi = torch.addcmul(s.y, hy, torch.stack(ks, -1) @ a)
            ks.append(self.f(times[:, i], yi))
        K = torch.stack(ks, -1)
        y1 = yi if self.fsal else torch.addcmul(s.y, hy, K @ co["b"])
        return y1, K, (ks[-1] if self.fsal else None), None

    def error_ratio(self, s: LoopState, h: torch.Tensor, y1: torch.Tensor, K: torch.Tensor):
        with torch.no_grad():
            co = self._coeffs(y1)
            hy = h.to(y1.dtype)[:, None]
            abs_y1 = y1.detach().abs()
            sc = self.scale(s.rows, s.abs_y, abs_y1)
            Kd = K.detach()
            e5 = self.norm(hy * _weigh(Kd, self.error_weights(s, co)) / sc)
            if co["e3"] is None:
                return e5.to(TIME), abs_y1
            e3 = self.norm(hy * (Kd @ co["e3"]) / sc)
            blend = e5 * e5 / torch.sqrt(e5 * e5 + 0.01 * e3 * e3)
            return torch.where(e5 == 0, e5, blend).to(TIME), abs_y1

    def error_weights(self, s: LoopState, co: dict) -> torch.Tensor:
        """The embedded error's stage weights: one vector, or one row per sample (method="auto")."""
        return co["e"]

    def dense_weights(self, s: LoopState, like: torch.Tensor) -> torch.Tensor:
        """The dense output's (degree, stages) coefficients, or one such matrix per sample."""
        return self._dense_matrix(like)

    def observe(self, s: LoopState, step: torch.Tensor, K: torch.Tensor, accept: torch.Tensor, t_new) -> torch.Tensor:
        """The rows' ``watch`` after an attempted step (only method="auto" keeps one)."""
        return s.watch

    def report(self, stats) -> None:
        stats.sample_accepted, stats.sample_rejected = self.accepted, self.rejected
        stats.n_accepted += int(self.accepted.sum())
        stats.n_rejected += int(self.rejected.sum())

    def factor(self, ratio: torch.Tensor, prev: torch.Tensor, accept: torch.Tensor) -> torch.Tensor:
        o, k = self.prob.opts, self.order + 1
        safe = ratio.clamp_min(1e-300)
        f = o.safety * safe ** (-(self.icoeff + self.pcoeff) / k) * prev ** (self.pcoeff / k)
        f = torch.where(ratio == 0, torch.full_like(f, o.ifactor), f).clamp(o.dfactor, o.ifactor)
        return torch.where(accept, f, f.clamp(max=1.0))

    def interpolate(self, s: LoopState, h: torch.Tensor, K: torch.Tensor, y1, theta: torch.Tensor) -> torch.Tensor:
        """The tableau's dense output at per-row fractions ``theta``: the weights of every stage
        come from one (m, degree) x (degree, stages) product of theta's powers."""
        th = theta.to(s.y.dtype)[:, None]
        hy = h.to(s.y.dtype)[:, None]
        if self.dense is None:  # cubic Hermite from the ends
            f1 = K[..., -1] if self.fsal else self.f(s.t + h, y1)
            t2, t3 = th * th, th * th * th
            out = torch.lerp(s.y, y1, 3 * t2 - 2 * t3)
            return out + hy * ((t3 - 2 * t2 + th) * K[..., 0] + (t3 - t2) * f1)
        if K.shape[-1] < len(self.dense):  # DOP853's extra stages, once per step that needs them
            ks = list(K.unbind(-1))
            for ci, row in zip(self.tab.dense_c, self.tab.dense_a):
                ks.append(self.f(s.t + ci * h, _combine(s.y, hy, row, ks)))
            K = torch.stack(ks, -1)
        C = self.dense_weights(s, s.y)
        P = torch.cumprod(th.expand(-1, C.shape[-2]), 1)  # theta, theta^2, ...
        w = P @ C if C.ndim == 2 else torch.bmm(P[:, None, :], C).squeeze(1)  # (m, stages)
        return torch.addcmul(s.y, hy, torch.bmm(K, w[:, :, None]).squeeze(-1))

    def _dense_matrix(self, like: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_C", None) is None or self._C.dtype != like.dtype:
            self._C = torch.tensor(self.dense, dtype=like.dtype, device=like.device).T.contiguous()
        return self._C

    # -- the loop ------------------------------------------------------------------------------
    def run(self, state: Optional[LoopState] = None, out: Optional[torch.Tensor] = None,
            record: Optional[Decisions] = None, replay: Optional[Decisions] = None, it0: int = 0, it1: int = -1):
        """Iterate from ``state`` (the start when None), writing outputs into ``out`` (n, B, D).
        Adaptive: record the decisions. Replay: iterations it0..it1 with the recorded decisions."""
        s = self.start() if state is None else state
        if out is None:
            out = torch.zeros(self.n, self.B, self.D, dtype=self.y0.dtype, device=self.y0.device)
            out[0] = self.y0
        T, d = self.T, self.direction
        it = it0
        n_bad = torch.zeros_like(s.t, dtype=torch.long)
        while s.rows.numel():
            if replay is not None and it == it1:
                break
            if record is not None and it % record.every == 0:
                record.states[it] = s.detached()
            t_end = s.T[:, -1]
            remaining = (t_end - s.t).abs()
            if replay is None:
                h = torch.minimum(s.h.clamp(self.prob.opts.min_step, self.prob.opts.max_step), remaining)
                h = torch.where(remaining <= h * (1 + 1e-6), remaining, h)
                step = d * h
            else:
                step = replay.h[it]
            y1, K, f1, failed = self.stages(s, step)
            t_new = torch.where(step.abs() == remaining, t_end, s.t + step)
            if replay is None:
                ratio, abs_y1 = self.error_ratio(s, step, y1, K)
                if failed is not None:  # a failed Newton iteration: reject, with the smallest step factor
                    ratio = torch.where(failed, torch.full_like(ratio, 1e30), ratio)
                finite = torch.isfinite(ratio)
                accept = finite & (ratio <= 1.0)
                n_bad = torch.where(finite, torch.zeros_like(n_bad), n_bad + 1)
                fac = self.factor(torch.where(finite, ratio, torch.full_like(ratio, 1e30)), s.prev, accept)
                fac = torch.where(finite, fac, torch.full_like(fac, self.prob.opts.dfactor))
                h_next = (step.abs() * fac)
                prev = torch.where(accept, ratio.clamp_min(1e-4), s.prev)
                fired = self.events.locate(self, s, step, K, accept, y1, t_new) if self.events is not None else None
                watch = self.observe(s, step, K, accept, t_new)
            else:
                accept = replay.accept[it]
                abs_y1, h_next, prev, watch = s.abs_y, s.h, s.prev, replay.watch[it]
                fired = replay.events[it] if self.events is not None else None
            if fired is not None:  # the rows whose event fired end there
                y1, t_new = self.events.end_rows(self, s, step, K, y1, t_new, *fired)
                t_end = s.T[:, -1]
            # outputs passed by accepted rows: one host read for the whole batch decides how many
            idx = s.out_i.clamp(max=self.n - 1)
            n_passed = ((d * (s.T - t_new[:, None]) <= 0).sum(1) - s.out_i).clamp_min(0)
            n_passed = torch.where(accept, n_passed, torch.zeros_like(n_passed))
            if replay is None:
                done_after = accept & (t_new == t_end)
                tiny = ~done_after & (h_next < 16 * torch.finfo(TIME).eps * t_new.abs().clamp_min(1.0))
                checks = torch.stack([n_passed.max().to(TIME), (~done_after).sum().to(TIME),
                                      (n_bad >= 8).any().to(TIME), tiny.any().to(TIME)])
                emit, n_running, bad, tiny = (int(v) for v in checks.tolist())
                self._check(s, it, bad, tiny)
            else:
                emit = replay.emit[it]
            for k in range(emit):
                j = s.out_i + k
                mask = k < n_passed
                jj = j.clamp(max=self.n - 1)
                safe = torch.where(step == 0, torch.ones_like(step), step)  # finished rows: no 0/0 (NaN grads)
                theta = ((s.T.gather(1, jj[:, None]).squeeze(1) - s.t) / safe).clamp(0.0, 1.0)
                val = self.interpolate(s, step, K, y1, theta)
                val = torch.where((theta == 1.0)[:, None], y1, val)
                out = _put(out, jj[mask], s.rows[mask], val[mask])
            if record is not None:
                record.h.append(step.detach())
                record.accept.append(accept)
                record.emit.append(emit)
                record.events.append(fired)
                record.watch.append(watch)
            if replay is None:  # rows that finished earlier (zero steps) count nothing
                live = s.t != t_end
                self.accepted[s.rows] += (accept & live).long()
                self.rejected[s.rows] += (~accept & live).long()
            a = accept[:, None]
            f0 = s.f0 if f1 is None and not bool(accept.any()) else None
            if f0 is None:
                f_end = f1 if f1 is not None else self.f(t_new, y1)
                f0 = torch.where(a, f_end, s.f0)
            s = LoopState(s.rows, torch.where(a, y1, s.y), f0, torch.where(accept, t_new, s.t), h_next, prev,
                          s.out_i + n_passed, torch.where(a, abs_y1, s.abs_y), s.T, watch)
            done = accept & (s.t == t_end) if replay is None else None
            it += 1
            if replay is not None:
                keep = replay.keep[it - 1]
                if keep is not None:
                    s = s.take(keep)
                    n_bad = n_bad[keep]
                continue
            if it > self.max_steps:
                if self.events is not None:
                    raise MaxStepsError(f"{self.prob.label}: the event of {n_running} of {self.B} samples did not "
                                        f"occur within max_num_steps={self.max_steps} steps; check the event "
                                        "function, or raise options['max_num_steps']")
                raise MaxStepsError(f"{self.prob.label}: max_num_steps={self.max_steps} exceeded (per-sample loop, "
                                    f"{n_running} of {self.B} samples still running). " + STIFF_HINT)
            keep = None
            if n_running < s.rows.numel() and (self.compact or n_running == 0):
                keep = (~done).nonzero().squeeze(1)
                s, n_bad = s.take(keep), n_bad[keep]
            elif n_running < s.rows.numel():  # rows that finished keep a zero step
                s.h = torch.where(done, torch.zeros_like(s.h), s.h)
            if record is not None:
                record.keep.append(keep)
            if n_running == 0:
                break
        return out, s, it

    def _check(self, s: LoopState, it: int, bad: int, tiny: int) -> None:
        if bad:
            raise NonFiniteError(f"{self.prob.label}: func returned NaN or Inf for a sample on 8 successive attempts "
                                 f"(per-sample loop, iteration {it}). Check the vector field. " + STIFF_HINT)
        if tiny:
            raise StepSizeUnderflowError(f"{self.prob.label}: step size underflow for a sample (per-sample loop, "
                                         f"iteration {it}). " + STIFF_HINT)


class PerSampleESDIRK(PerSampleSolve):
    """Per-sample ESDIRK (kvaerno3, kvaerno5): each row solves its own stage equations by
    simplified Newton with its own block of the Newton matrix, I - h_b gamma J_b, all blocks
    factorised at once. J is taken at every step's start (d reverse passes for the batch), so a
    checkpoint replay rebuilds it from the recorded state; each row converges, or fails and is
    rejected with a smaller step, on its own. Gradients differentiate each stage's solution
    implicitly, as the joint stepper does (implicit.py)."""

    def _coeffs(self, like: torch.Tensor) -> dict:
        key = (like.dtype, like.device)
        if getattr(self, "_coeff_key", None) != key:
            tab, n = self.tab, len(self.tab.c)
            pad = lambda row: torch.tensor(list(row) + [0.0] * (n - len(row)), dtype=like.dtype, device=like.device)  # noqa: E731
            b = pad(tab.a[-1])  # y1 = the last stage; the embedded solution is another stage
            self._coeff = {"b": b, "e": b - pad(tab.a[tab.embedded]), "e3": None,
                           "c": torch.tensor(tab.c, dtype=TIME, device=like.device)}
            self._coeff_key = key
        return self._coeff

    def count(self, name: str, n: int = 1) -> None:
        count_stat(self.prob.stats, name, n)

    def stages(self, s: LoopState, h: torch.Tensor):
        tab, co = self.tab, self._coeffs(s.y)
        hy = h.to(s.y.dtype)[:, None]
        hg = hy * tab.gamma
        hg_safe = torch.where(hg == 0, torch.ones_like(hg), hg)  # finished rows (zero step): k = 0, not 0/0
        times = torch.addcmul(s.t[:, None], h[:, None], co["c"])
        diff = torch.is_grad_enabled() and (s.y.requires_grad or s.f0.requires_grad)
        yd = s.y.detach()
        mat = DenseNewtonMatrix(batch=True, autodiff=self.prob.autodiff)
        with torch.no_grad():
            mat.update(self.f, s.t, yd, s.f0.detach())
            mat.factor(hg[:, :, None])
            inv_scale = self.scale(s.rows, yd.abs(), yd.abs()).reciprocal()
        self.count("n_jac")
        ks, kd, Y_prev = [s.f0], [s.f0.detach()], yd
        failed = torch.zeros_like(s.t, dtype=torch.bool)
        eta = torch.ones_like(s.t)
        for i in range(1, len(tab.c)):
            row = tab.a[i]
            with torch.no_grad():
                base = _combine(yd, hy, row[:-1], kd)
                Y = Y_prev + ((tab.c[i] - tab.c[i - 1]) * hy) * kd[-1]  # predictor: Euler from the previous stage
                Y, ok, eta = self._newton(times[:, i], base, Y, mat, hg, inv_scale, eta)
                failed |= ~ok
                Y = torch.where(ok[:, None], Y, base)  # a failed row stays finite (its step is rejected)
            if diff:
                with torch.enable_grad():
                    base_g = _combine(s.y, hy, row[:-1], ks)
                    Yr = Y.detach().requires_grad_(True)
                    fY = self.f(times[:, i], Yr)
                    Yg = Y + _ImplicitStage.apply(base_g + hg * fY - Yr, mat, fY, Yr, hg, self)
                    k = (Yg - base_g) / hg_safe
                self.count("n_linear_solves")
                Y = Yg
                kd.append(k.detach())
            else:
                k = (Y - base) / hg_safe
                kd.append(k)
            ks.append(k)
            Y_prev = Y.detach()
        return Y, torch.stack(ks, -1), ks[-1], failed

    def _newton(self, t_i, base, Y, mat, hg, inv_scale, eta):
        """Simplified Newton on every row at once (implicit.py's rules per row): a row stops when
        converged, or fails when it diverges or cannot converge in the iterations left. One host
        read per iteration for the whole batch."""
        eta = eta.clamp_min(ETA_MIN) ** 0.8
        active = torch.ones_like(eta, dtype=torch.bool)
        ok = torch.zeros_like(active)
        dn_old = None
        for it in range(MAX_NEWTON):
            dY = mat.solve(torch.addcmul(base, hg, self.f(t_i, Y)).sub_(Y))
            Y = torch.where(active[:, None], Y + dY, Y)
            dn = self.norm(dY * inv_scale).to(eta.dtype)
            bad = ~torch.isfinite(dn)
            if dn_old is not None:
                theta = torch.where(dn_old > 0, dn / dn_old, torch.zeros_like(dn))
                bad |= theta >= 0.9
                eta = torch.where(active & ~bad, theta / (1.0 - theta.clamp(max=0.9)), eta)
                if it >= 2:
                    bad |= theta.clamp(max=0.9) ** (MAX_NEWTON - 1 - it) / (1.0 - theta.clamp(max=0.9)) * dn > KAPPA
            conv = active & ~bad & ((eta * dn <= KAPPA) | (dn <= 1e-12))
            ok |= conv
            active &= ~(conv | bad)
            self.count("n_newton_iters")
            self.count("n_linear_solves")
            if not bool(active.any()):
                break
            dn_old = dn
        return Y, ok, eta


class PerSampleAuto(PerSampleSolve):
    """method="auto" per sample: every row starts with dopri5 and switches to kvaerno5 for good
    once its own stiffness estimate says so (auto.py's rule, per row and on every accepted step:
    15 estimates of h*|lambda| beyond dopri5's stability limit without 6 below it between). The two
    methods share 7 stages, a degree-4 dense output and the controller's order, so error weights and
    dense output are chosen per row. An iteration with rows of both kinds steps each kind on its own
    rows with ``compact=True`` (func sees subsets of the batch), otherwise both on the whole batch,
    each with a zero step on the other kind's rows."""

    def __init__(self, prob, method, *args):
        super().__init__(prob, method.explicit, *args)
        self.implicit = PerSampleESDIRK(prob, method.implicit, *args)
        self.names = (method.explicit.name, method.implicit.name)
        self.limit, j = method.explicit.stiff_limit, method.explicit.stiff_stage
        tab = self.tab
        self.y1_minus_stage = [b - a for b, a in zip(tab.b, list(tab.a[j - 1]) + [0.0] * len(tab.b))]
        self.switched_at = torch.full((self.B,), math.nan, dtype=TIME, device=self.y0.device)

    def _coeffs(self, like: torch.Tensor) -> dict:
        co = super()._coeffs(like)
        if "stiff" not in co:  # y1 - Y6 as stage weights, for the stiffness estimate
            co["stiff"] = torch.tensor(self.y1_minus_stage, dtype=like.dtype, device=like.device)
        return co

    def stages(self, s: LoopState, h: torch.Tensor):
        imp = s.watch[:, 0] == 1
        n_imp = int(imp.sum())  # one more host read per attempted step
        if n_imp == 0:
            return super().stages(s, h)
        if n_imp == imp.numel():
            return self.implicit.stages(s, h)
        if self.compact:
            ie, ii = (~imp).nonzero().squeeze(1), imp.nonzero().squeeze(1)
            (ye, Ke, fe, _), (yi, Ki, fi, failed) = super().stages(s.take(ie), h[ie]), self.implicit.stages(s.take(ii), h[ii])
            back = torch.argsort(torch.cat([ie, ii]))
            y1, K, f1 = (torch.cat(pair)[back] for pair in ((ye, yi), (Ke, Ki), (fe, fi)))
            return y1, K, f1, torch.cat([torch.zeros_like(ie, dtype=torch.bool), failed])[back]
        zero = torch.zeros_like(h)
        ye, Ke, fe, _ = super().stages(s, torch.where(imp, zero, h))
        yi, Ki, fi, failed = self.implicit.stages(s, torch.where(imp, h, zero))
        m = imp[:, None]
        return torch.where(m, yi, ye), torch.where(m[..., None], Ki, Ke), torch.where(m, fi, fe), failed & imp

    def error_weights(self, s: LoopState, co: dict) -> torch.Tensor:
        return torch.where((s.watch[:, 0] == 1)[:, None], self.implicit._coeffs(co["e"])["e"], co["e"])

    def dense_weights(self, s: LoopState, like: torch.Tensor) -> torch.Tensor:
        C_e, C_i = self._dense_matrix(like), self.implicit._dense_matrix(like)
        return torch.where((s.watch[:, 0] == 1)[:, None, None], C_i, C_e)

    def observe(self, s: LoopState, step: torch.Tensor, K: torch.Tensor, accept: torch.Tensor, t_new) -> torch.Tensor:
        """Hairer's estimate h*|lambda| = |h| ||k7 - k6|| / ||y1 - Y6|| on the explicit rows' accepted steps."""
        from .rk import RESET_COUNT, STIFF_COUNT

        with torch.no_grad():
            Kd = K.detach()
            num = torch.linalg.vector_norm(Kd[..., -1] - Kd[..., -2], dim=1).to(TIME)
            den = torch.linalg.vector_norm(Kd @ self._coeffs(Kd)["stiff"], dim=1).to(TIME)  # ||y1 - Y6|| / |h|
            stiff = (num > self.limit * den) & (den > 0) & torch.isfinite(num)
            seen = (s.watch[:, 0] == 0) & accept & (s.t != s.T[:, -1])
            n_stiff = torch.where(seen & stiff, s.watch[:, 1] + 1, s.watch[:, 1])
            n_non = torch.where(seen, torch.where(stiff, 0, s.watch[:, 2] + 1), s.watch[:, 2])
            n_stiff = torch.where(seen & ~stiff & (n_non >= RESET_COUNT), 0, n_stiff)
            switch = seen & (n_stiff >= STIFF_COUNT)
            self.switched_at[s.rows] = torch.where(switch, t_new, self.switched_at[s.rows])
            return torch.stack([torch.where(switch, 1, s.watch[:, 0]), n_stiff, n_non], 1)

    def report(self, stats) -> None:
        super().report(stats)
        switched = ~torch.isnan(self.switched_at)
        n = int(switched.sum())
        stats.n_switches += n
        if n:
            first = float(self.switched_at[switched].min())
            stats.switched_at = first if math.isnan(stats.switched_at) else min(stats.switched_at, first)
            logger.info("method='auto' (per sample): %d of %d samples switched %s -> %s (the first at t=%.6g)",
                        n, self.B, *self.names, first)


class RowEvents:
    """A per-sample event function: each row's watched value is the minimum of its components,
    each signed to start positive (torchdiffeq's rule, per row); a row fires when it reaches 0."""

    def __init__(self, event_fn: Callable, layout: "BatchLayout", t_dtype: torch.dtype, B: int, device):
        self.event_fn, self.layout, self.t_dtype = event_fn, layout, t_dtype
        self.signs: Optional[torch.Tensor] = None  # (B, k), from the values at t0
        self.t = torch.full((B,), math.nan, dtype=TIME, device=device)  # each row's event time

    def value(self, rows: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            g = torch.as_tensor(self.event_fn(t.to(self.t_dtype), self.layout.unflatten(y.detach())))
            if g.ndim == 0 or g.shape[0] != y.shape[0]:
                from .odeint import InputError

                raise InputError(f"with per-sample stepping event_fn must return one value (or a row of values) per "
                                 f"sample, shape ({y.shape[0]},) or ({y.shape[0]}, k); got {tuple(g.shape)}")
            g = g.reshape(g.shape[0], -1).to(TIME)
            if self.signs is None:
                self.signs = torch.sign(g)
            signs = self.signs[rows]
            signs = torch.where((signs == 0) & (g != 0), torch.sign(g), signs)  # a zero start takes a later sign
            self.signs[rows] = signs
            return (g * signs).amin(1)

    def locate(self, solve: "PerSampleSolve", s: LoopState, step: torch.Tensor, K: torch.Tensor,
               accept: torch.Tensor, y1: torch.Tensor, t_new: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """None unless an accepted step crossed a row's event; then the rows that did and, for each,
        the fraction of the step where it fired: bisection on the step's dense output."""
        cross = accept & (s.t != s.T[:, -1]) & (self.value(s.rows, t_new, y1) <= 0)
        if not bool(cross.any()):
            return None
        lo, hi = torch.zeros_like(s.t), torch.ones_like(s.t)
        span = torch.maximum(s.t.abs(), t_new.abs()).clamp_min(1.0)
        tol = 4 * torch.finfo(TIME).eps * span / step.abs().clamp_min(torch.finfo(TIME).tiny)  # in units of the step
        for _ in range(200):
            if not bool((cross & (hi - lo > tol)).any()):
                break
            mid = torch.where(cross, lo + 0.5 * (hi - lo), torch.zeros_like(lo))
            with torch.no_grad():
                g = self.value(s.rows, s.t + mid * step, solve.interpolate(s, step, K, y1, mid))
            past = cross & (g <= 0)
            hi, lo = torch.where(past, mid, hi), torch.where(cross & ~past, mid, lo)
        return cross, hi

    def end_rows(self, solve: "PerSampleSolve", s: LoopState, step: torch.Tensor, K: torch.Tensor, y1: torch.Tensor,
                 t_new: torch.Tensor, cross: torch.Tensor, theta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """End the rows that fired at their events (a checkpoint replay repeats this with the recorded
        fractions): their last output time becomes the event's; returns the step's end (y1, t_new)
        with those rows moved there, differentiable in the states."""
        t_ev = torch.where(theta == 1.0, t_new, s.t + theta * step)
        y_ev = torch.where((theta == 1.0)[:, None], y1, solve.interpolate(s, step, K, y1, theta))
        # a new tensor, not an in-place write: the loop states recorded for a replay keep theirs
        s.T = torch.cat([s.T[:, :1], torch.where(cross[:, None], t_ev[:, None], s.T[:, 1:])], 1)
        self.t[s.rows[cross]] = t_ev[cross]
        return torch.where(cross[:, None], y_ev, y1), torch.where(cross, t_ev, t_new)


def _weigh(K: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """K (m, D, stages) times stage weights: one vector (stages,), or one per row (m, stages)."""
    return K @ w if w.ndim == 1 else torch.bmm(K, w[:, :, None]).squeeze(-1)


def _combine(y, hy: torch.Tensor, coeffs, ks) -> torch.Tensor:
    """y + h * sum_j c_j k_j with a per-row h of shape (m, 1): one fused multiply-add per term."""
    acc = None
    for c, k in zip(coeffs, ks):
        if c == 0.0:
            continue
        acc = k * c if acc is None else acc.add(k, alpha=c)
    if acc is None:
        return torch.zeros_like(ks[0]) if y is None else y
    return hy * acc if y is None else torch.addcmul(y, hy, acc)


def _put(out: torch.Tensor, j: torch.Tensor, b: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    if not j.numel():
        return out
    if val.requires_grad and not out.requires_grad:
        out = out.clone()
    return out.index_put((j, b), val)


# -- autograd -------------------------------------------------------------------------------------------
class PerSampleCheckpoint(torch.autograd.Function):
    """Checkpointed gradients of a per-sample solve: the forward loop runs without a graph and
    records its decisions; backward re-runs each segment from its stored state with the same
    decisions and differentiates it, last segment first."""

    @staticmethod
    def forward(ctx, solve: PerSampleSolve, every: int, y0: torch.Tensor, *params):
        rec = Decisions(every)
        with torch.no_grad():
            out, _, n_it = solve.run(record=rec)
        ctx.solve, ctx.rec, ctx.n_it = solve, rec, n_it
        ctx.save_for_backward(*params)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        params = ctx.saved_tensors
        solve, rec = ctx.solve, ctx.rec
        starts = sorted(rec.states)
        ends = starts[1:] + [ctx.n_it]
        carry: Optional[List[torch.Tensor]] = None  # grads w.r.t. the next segment's start state
        g_params = [torch.zeros_like(p) for p in params]
        g_y0 = None
        for s0, s1 in reversed(list(zip(starts, ends))):
            st = rec.states[s0]
            with torch.enable_grad():
                y = st.y.clone().requires_grad_(True)
                f0 = st.f0.clone().requires_grad_(True)
                state = LoopState(st.rows, y, f0, st.t, st.h, st.prev, st.out_i, st.abs_y, st.T, st.watch)
                zero = torch.zeros_like(grad_out)
                out, end, _ = solve.run(state, out=zero.clone(), replay=rec, it0=s0, it1=s1)
                tensors, grads = [out], [grad_out]
                if carry is not None and s1 < ctx.n_it:
                    tensors += [end.y, end.f0]
                    grads += carry
                pairs = [(x, g) for x, g in zip(tensors, grads) if x.requires_grad]
                inputs = [y, f0, *params]
                got = torch.autograd.grad([x for x, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True) \
                    if pairs else [None] * len(inputs)
            g_y, g_f0 = got[0], got[1]
            g_params = [acc if d is None else acc + d for acc, d in zip(g_params, got[2:])]
            if s0 == 0:
                g_y0 = _through_start(solve, g_y, g_f0, params, g_params) + grad_out[0]
            carry = [torch.zeros_like(y) if g_y is None else g_y, torch.zeros_like(f0) if g_f0 is None else g_f0]
        return (None, None, g_y0, *g_params)


def _through_start(solve: PerSampleSolve, g_y, g_f0, params, g_params):
    """dL/dy0 from the first segment's (y, f0) gradients: f0 = f(t0, y0)."""
    with torch.enable_grad():
        y0 = solve.y0.detach().requires_grad_(True)
        f0 = solve.f(solve.T[:, 0], y0)
        got = torch.autograd.grad(f0, (y0, *params), g_f0, allow_unused=True) if g_f0 is not None else None
    g = torch.zeros_like(y0) if g_y is None else g_y.clone()
    if got is not None:
        if got[0] is not None:
            g = g + got[0]
        for i, d in enumerate(got[1:]):
            if d is not None:
                g_params[i] += d
    return g


# -- the entry point ---------------------------------------------------------------------------------------
class BatchLayout:
    """A state (a tensor or a tuple of tensors) whose leading dimension is the batch, as (B, D)."""

    def __init__(self, y0):
        from .odeint import InputError

        self.is_tuple = isinstance(y0, tuple)
        parts = y0 if self.is_tuple else (y0,)
        if any(p.ndim == 0 for p in parts) or len({p.shape[0] for p in parts}) != 1:
            raise InputError("per-sample stepping needs a state whose leading dimension is the batch "
                             f"(every tensor of it), got shapes {[tuple(p.shape) for p in parts]}")
        self.B = parts[0].shape[0]
        self.shapes = [p.shape[1:] for p in parts]
        self.sizes = [p[0].numel() for p in parts]

    def flatten(self, y) -> torch.Tensor:
        parts = y if self.is_tuple else (y,)
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1) if self.is_tuple else y.reshape(y.shape[0], -1)

    def unflatten(self, y: torch.Tensor, lead=()):
        """(…, m, D) -> the user's structure with leading dims (…, m)."""
        m = y.shape[-2]
        if not self.is_tuple:
            return y.reshape(*lead, m, *self.shapes[0])
        out, start = [], 0
        for n, shape in zip(self.sizes, self.shapes):
            out.append(y[..., start:start + n].reshape(*lead, m, *shape))
            start += n
        return tuple(out)

    def per_sample_tolerance(self, tol, like: torch.Tensor):
        """A float, or a flat (B*D,) tensor in the per-sample layout."""
        if isinstance(tol, float):
            return tol
        parts = tol if self.is_tuple and isinstance(tol, (tuple, list)) else (tol,) * len(self.shapes)
        full = [torch.broadcast_to(torch.as_tensor(p, dtype=like.real.dtype if like.is_complex() else like.dtype,
                                                   device=like.device), (self.B, *s)) for p, s in zip(parts, self.shapes)]
        return self.flatten(tuple(full) if self.is_tuple else full[0]).reshape(-1)


def _times(t: torch.Tensor, B: int) -> torch.Tensor:
    """Output times as (B, n): a shared 1-D t broadcast, or per-sample rows checked."""
    from .odeint import InputError, check_t

    if t.ndim == 1:
        check_t(t)
        return t.detach().to(TIME).expand(B, -1)
    if t.ndim != 2:
        raise InputError(f"per-sample t must be 1-D (shared) or (batch, n_times), got shape {tuple(t.shape)}")
    if t.shape[0] != B:
        raise InputError(f"t has {t.shape[0]} rows but y0 has a batch of {B}; give one row of times per sample")
    if not t.is_floating_point():
        raise InputError(f"t must be floating point, got {t.dtype}")
    T = t.detach().to(TIME)
    if not bool(torch.isfinite(T).all()):
        raise InputError("t contains NaN or Inf")
    if T.shape[1] > 1:  # each row monotonic (repeated times allowed: they repeat the output), one direction
        d = T[:, 1:] - T[:, :-1]
        inc, dec = (d >= 0).all(1), (d <= 0).all(1)
        ok = inc | dec
        if not bool(ok.all()):
            row = int((~ok).nonzero()[0])
            raise InputError(f"row {row} of t is not monotonic: {T[row].tolist()}")
        if bool(((d > 0).any(1) & ~dec).any()) and bool(((d < 0).any(1) & ~inc).any()):
            raise InputError("every row of t must run in the same direction")
    return T


def solve_per_sample(settings, func, y0, t: torch.Tensor, event_fn=None, adjoint_params=None):
    """``odeint`` with ``options=dict(per_sample=True)``: outputs (n_times, batch, ...)."""
    from .adjoint import BacksolveAdjoint
    from .integrate import Result
    from .methods import get_method
    from .odeint import InputError, Setup, adjoint_params_of, check_y0
    from .settings import Adjoint, Checkpoint, Direct

    check_y0(y0)
    layout = BatchLayout(y0)
    T = _times(t, layout.B)
    grad = settings.grad
    run_T = T
    if event_fn is not None:
        if T.shape[1] != 2:
            raise InputError(f"We require 2 times (per sample) when in event handling mode, but got {T.shape[1]}: "
                             "t[..., 0] is the start and the sign of t[..., 1] - t[..., 0] the direction")
        if t.requires_grad:
            raise InputError("events with per-sample stepping need a t without gradient (the event times carry "
                             "none); detach t, or solve jointly (without per_sample)")
        run_T = torch.stack([T[:, 0], torch.where(T[:, 1] >= T[:, 0], math.inf, -math.inf).to(TIME)], 1)
    params = adjoint_params_of(func, adjoint_params) if not isinstance(grad, Direct) else ()
    B = layout.B
    remap = (t.ndim == 2 or event_fn is not None) and isinstance(grad, Adjoint)
    interval = {}  # the output interval the joint backward solve is on: j, each row's start time and gap
    if remap:
        # One time variable for the whole batch: s = j + (t - T[b, j]) / (T[b, j+1] - T[b, j]) on each
        # row's j-th interval, so the rows' grids (with events: [t0, the row's event time], known once
        # the forward pass has run) become s = 0, 1, ..., n-1 and dy/ds = gap * f.
        def joint(s, y):
            j, start, gap = interval["j"], interval["start"], interval["gap"]
            return _scale_rows(func((start + (s.to(TIME) - j) * gap).to(s.dtype), y), gap)

        joint_ts = tuple(float(j) for j in range(T.shape[1]))
    else:
        joint = lambda s, y: func(s.expand(B), y)  # noqa: E731  (the whole batch at one time: the joint adjoint)
        joint_ts = tuple(float(x) for x in T[0])
    setup = Setup(settings, joint, y0, joint_ts)
    method = get_method(settings.method)
    y_flat = layout.flatten(y0)
    y_dtype = y_flat.dtype
    # the loop's tolerances in the per-sample layout (setup.tol keeps the joint one for the adjoint)
    setup.prob = dataclasses.replace(setup.prob, tol=Tolerance(layout.per_sample_tolerance(setup.tol.rtol if isinstance(
        setup.tol.rtol, float) else settings.rtol, y_flat), layout.per_sample_tolerance(
        setup.tol.atol if isinstance(setup.tol.atol, float) else settings.atol, y_flat)))
    stats = setup.stats
    user_norm = settings.parsed.norm

    def call(s: torch.Tensor, y: torch.Tensor, backward: bool = False) -> torch.Tensor:
        if backward:
            stats.nfe_backward += 1
        else:
            stats.nfe_forward += 1
        out = func(s.to(setup.t_dtype), layout.unflatten(y))
        if layout.is_tuple != isinstance(out, tuple):
            raise InputError("func must return the same structure as y0")
        flat = layout.flatten(out)
        if flat.shape != y.shape:
            raise InputError(f"func returned {flat.shape[1]} values per sample but the state has {y.shape[1]}")
        return flat if flat.dtype == y_dtype else flat.to(y_dtype)

    def norm(x: torch.Tensor) -> torch.Tensor:  # per sample: (m, D) -> (m,)
        if user_norm is not None:
            return torch.as_tensor(user_norm(layout.unflatten(x))).reshape(x.shape[0])
        if not layout.is_tuple:
            return torch.linalg.vector_norm(x, dim=1) / math.sqrt(max(x.shape[1], 1))
        parts, start = [], 0
        for n in layout.sizes:
            parts.append(torch.linalg.vector_norm(x[:, start:start + n], dim=1) / math.sqrt(max(n, 1)))
            start += n
        return torch.stack(parts, 1).amax(1)

    kind = {"implicit": PerSampleESDIRK, "auto": PerSampleAuto}.get(method.kind, PerSampleSolve)
    solve = kind(setup.prob, method, y_flat, run_T, setup.t_dtype, call, norm)
    if event_fn is not None:
        solve.events = events = RowEvents(event_fn, layout, setup.t_dtype, B, y_flat.device)
        at_root = events.value(torch.arange(B, device=y_flat.device), solve.T[:, 0], y_flat) == 0
        solve.T[at_root, 1] = solve.T[at_root, 0]  # torchdiffeq: a root at t0 is the event
        events.t[at_root] = solve.T[at_root, 0]
    y_in = y_flat
    time_grad = t.requires_grad
    if time_grad:  # moving a row's t0 moves its y0 by -f(t0, y0) dt0
        t0 = t[:1] if t.ndim == 1 else t[:, :1]
        with torch.no_grad():
            f_start = call(T[:, 0], y_flat.detach())
        y_in = y_flat + (t0.detach() - t0).to(y_dtype).reshape(-1, 1) * f_start
    solve.y0 = y_in
    if isinstance(grad, Direct):
        out, _, _ = solve.run()
    elif isinstance(grad, Checkpoint):
        out = PerSampleCheckpoint.apply(solve, grad.every, y_in, *params)
    else:
        class _Run:  # the joint backward solve sees a flat state in the usual (part-major) layout
            def __init__(self):
                self.setup, self.ts, self.grid, self.event, self.event_t = setup, setup.ts, None, None, None
                self.out_ts = setup.ts

            @staticmethod
            def select_interval(j: int) -> None:  # once per output interval of the backward pass
                if remap:
                    grid = solve.T if event_fn is None else torch.stack([solve.T[:, 0], solve.events.t], 1)
                    interval.update(j=j, start=grid[:, j], gap=grid[:, j + 1] - grid[:, j])

            def forward(self, y0_joint):
                with torch.no_grad():
                    per, _, it = solve.run()
                res = Result([_to_joint(layout, per[i]) for i in range(per.shape[0])])
                res.n_accepted = it
                return res

        out_joint = BacksolveAdjoint.apply(_Run(), _to_joint(layout, y_in), *params)
        out = torch.stack([_from_joint(layout, o) for o in out_joint])
    solve.report(stats)
    if time_grad and T.shape[1] > 1:
        with torch.no_grad():
            fs = torch.stack([call(T[:, j], out[j].detach()) for j in range(1, T.shape[1])])
        tt = t.expand(B, -1) if t.ndim == 1 else t
        shift = (tt[:, 1:] - tt[:, 1:].detach()).transpose(0, 1).to(y_dtype)[..., None]
        out = torch.cat([out[:1], out[1:] + shift * fs])
    if event_fn is not None:
        return solve.events.t.to(t.dtype), layout.unflatten(out, (2,))
    return layout.unflatten(out, (out.shape[0],))


def _scale_rows(out, gap: torch.Tensor):
    """``out`` (a tensor or a tuple, leading dimension the batch) with row b multiplied by gap[b]."""
    if isinstance(out, tuple):
        return tuple(_scale_rows(o, gap) for o in out)
    return out * gap.to(out.real.dtype if out.is_complex() else out.dtype).view(-1, *([1] * (out.ndim - 1)))


def _to_joint(layout: BatchLayout, y: torch.Tensor) -> torch.Tensor:
    """(B, D) per-sample layout -> the layout of ordinary solves: the user's tensor shape, or the
    flat part-major vector of a tuple state."""
    if not layout.is_tuple:
        return y.reshape(layout.B, *layout.shapes[0])
    parts, start = [], 0
    for n in layout.sizes:
        parts.append(y[:, start:start + n].reshape(-1))
        start += n
    return torch.cat(parts)


def _from_joint(layout: BatchLayout, flat: torch.Tensor) -> torch.Tensor:
    if not layout.is_tuple:
        return flat.reshape(layout.B, -1)
    parts, start = [], 0
    for n in layout.sizes:
        parts.append(flat[start:start + layout.B * n].reshape(layout.B, n))
        start += layout.B * n
    return torch.cat(parts, 1)
