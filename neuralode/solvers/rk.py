"""One generic explicit Runge-Kutta step and its continuous extension, driven by a tableau.

A method (:class:`ExplicitRK`) is immutable data shared by every solve; each solve asks it for a
fresh :class:`ExplicitStepper` (``method.start(problem)``), which owns what lives for one solve
(here: the stiffness watch). The loop in ``integrate`` talks to every stepper through the same
interface: ``step``, ``error``, ``accepted``, ``end_derivative``, ``interpolate``.

Step sizes arrive as Python floats (the host-side clock), so stage coefficients times h are
scalars folded into ``add_(k, alpha=...)``: no tensor is built for them and nothing syncs here.
Linear combinations accumulate in place; that is autograd-safe because addition saves no inputs.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import StiffnessError
from .settings import ADAPTIVE_OPTIONS, FIXED_OPTIONS, RK_OPTIONS
from .tableau import ButcherTableau

Func = Callable[[float, torch.Tensor], torch.Tensor]

STIFF_COUNT = 15  # stiff estimates (without RESET_COUNT non-stiff ones between) that make a stiff phase
RESET_COUNT = 6
CHECK_EVERY = 8  # while nothing looks stiff, estimate stiffness on every 8th accepted step only


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


def _stages(field: Callable, t: torch.Tensor, h: torch.Tensor, y: torch.Tensor, f0: torch.Tensor,
            c: Tuple[float, ...], a: Tuple[Tuple[float, ...], ...]):
    """An explicit step's stages as one traceable function (``options["compile"]``): the time and
    step are 0-dim tensors and the tableau is constants, so one graph serves every step of every
    solve with the same field and shapes; no host reads, no Python-side state."""
    hy = h.to(y.dtype)
    ks, yi, prev = [f0], y, y
    for ci, row in zip(c, a):
        acc = None
        for coeff, k in zip(row, ks):
            if coeff != 0.0:
                acc = k * coeff if acc is None else acc + k * coeff
        prev, yi = yi, y + hy * acc
        ks.append(field(t + ci * h, yi).to(y.dtype))
    return prev, yi, ks


_COMPILED: dict = {}  # torch.compile backend -> the compiled _stages: a code cache, no solve state


def compiled_stages(backend: str) -> Callable:
    """``torch.compile(_stages)`` for ``backend``, built once per process; ``fullgraph=True`` makes a
    graph break inside a step an error rather than a silent slowdown."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_stages, backend=backend, fullgraph=True, dynamic=False)
    return _COMPILED[backend]


class Step:
    """An attempted step from (t, y) to (t + h, y1), with the stages kept for dense output.
    ``aux``: what a method keeps besides (the stage before the last for the stiffness estimate,
    an implicit method's error vector); ``failed``: an implicit step whose Newton iteration did
    not converge; ``tag``: which sub-method took it (``method="auto"``)."""

    __slots__ = ("t", "h", "y", "y1", "ks", "f1", "aux", "failed", "tag")

    def __init__(self, t: float, h: float, y: torch.Tensor, y1: torch.Tensor, ks: List[torch.Tensor], f1,
                 aux=None, failed: bool = False, tag=None):
        self.t, self.h, self.y, self.y1, self.ks, self.f1 = t, h, y, y1, ks, f1
        self.aux, self.failed, self.tag = aux, failed, tag


def stability_limit(tab: ButcherTableau) -> float:
    """How far the method's stability region reaches along the negative real axis."""
    s = tab.stages
    A = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        A[i + 1, : len(row)] = row
    b, one = np.array(tab.b), np.ones(s)
    x = 0.0
    while x < 50 and abs(1 - (x + 1e-3) * b @ np.linalg.solve(np.eye(s) + (x + 1e-3) * A, one)) <= 1 + 1e-12:
        x += 1e-3
    return x


def _stiff_pair(tab: ButcherTableau) -> Optional[int]:
    """The stage evaluated at c = 1 just before an FSAL last stage (also at c = 1), if any:
    f at two states at t + h gives Hairer's estimate of the dominant eigenvalue."""
    if not tab.fsal or tab.c[-1] != 1.0:
        return None
    j = len(tab.c) - 2
    return j if tab.c[j] == 1.0 else None


class ExplicitRK:
    """An explicit Runge-Kutta method described by a Butcher tableau."""

    kind = "explicit"
    supports_adjoint_solve = True
    supports_backward_modes = True
    multistep = False

    def __init__(self, tableau: ButcherTableau):
        self.tableau = tableau
        self.name, self.order, self.fsal, self.adaptive = tableau.name, tableau.order, tableau.fsal, tableau.adaptive
        self.controller_order = tableau.controller_order
        self.option_names = ((ADAPTIVE_OPTIONS | FIXED_OPTIONS) if tableau.adaptive else FIXED_OPTIONS) | RK_OPTIONS
        self.stiff_stage = _stiff_pair(tableau)
        self.stiff_limit = 0.98 * stability_limit(tableau) if self.stiff_stage is not None else math.inf

    def start(self, prob, watch: Optional[bool] = None) -> "ExplicitStepper":
        return ExplicitStepper(self, prob, watch)


class ExplicitStepper:
    """One solve's use of an explicit method: the step, its error, and a watch for stiffness."""

    def __init__(self, method: ExplicitRK, prob, watch: Optional[bool] = None):
        self.method, self.tab = method, method.tableau
        self.order, self.controller_order, self.fsal = method.order, method.controller_order, method.fsal
        self.tol, self.norm = prob.tol, prob.norm
        self.watch = method.stiff_stage is not None and prob.opts.stiffness_check and method.adaptive
        self.watch = watch if watch is not None else self.watch
        self.n_stiff = self.n_nonstiff = 0
        self.n_checked = 0
        self.hl = 0.0  # latest |h| * |lambda| estimate (set by ``error`` on the steps it checks)
        backend = prob.opts.compile
        self.compiled = compiled_stages("inductor" if backend is True else backend) if backend else None

    def step(self, func: Func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, tag=None) -> Step:
        tab = self.tab
        out = self._compiled_step(func, t, h, y, f0) if self.compiled is not None else None
        if out is not None:
            prev, yi, ks = out
        else:
            ks = [f0]
            yi = prev = y
            for ci, row in zip(tab.c[1:], tab.a):
                prev, yi = yi, combine(y, h, row, ks)
                ks.append(func(t + ci * h, yi))
        if tab.fsal:  # the last stage was evaluated at y1 itself
            return Step(t, h, y, yi, ks, ks[-1], aux=prev if self.watch else None)
        return Step(t, h, y, combine(y, h, tab.b, ks), ks, None)

    def _compiled_step(self, func: Func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor):
        """The stages through ``compiled_stages``, or None where they cannot go: a wrapped func (jumps,
        perturbation, the adjoint's augmented dynamics, tuple states) runs eagerly, and so does the
        rest of the solve once torch.compile gives up (e.g. a field that counts its own calls is
        recompiled on every step until torch's recompile limit)."""
        if not getattr(func, "compilable", False):
            return None
        import torch._dynamo

        try:
            prev, yi, ks = self.compiled(func.func, func.time(t), func.time(h), y, f0, self.tab.c[1:], self.tab.a)
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as err:
            warnings.warn(f"options['compile']: torch.compile gave up on this field ({str(err).splitlines()[0]}); the "
                          "solve continues eagerly. A field that changes Python state on every call (an NFE counter, "
                          "say) is recompiled on every step: count evaluations with record_stats() instead",
                          RuntimeWarning, stacklevel=4)
            self.compiled = None
            return None
        func.count(len(ks) - 1)
        func.check(ks[-1])
        return prev, yi, ks

    def error_vectors(self, step: Step) -> List[torch.Tensor]:
        """The embedded error estimate(s) h * sum e_i k_i (two for DOP853): new tensors, differentiable
        through the stages unless called under no_grad."""
        tab = self.tab
        errs = [combine(None, step.h, tab.e, step.ks)]
        if tab.e3 is not None:
            errs.append(combine(None, step.h, tab.e3, step.ks))
        return errs

    def error_term(self, step: Step, abs_y: torch.Tensor, abs_y1: torch.Tensor) -> torch.Tensor:
        """``[error, stiffness]`` of an accepted step, differentiable through the stages, for the error
        regulariser: the controller's error ratio (the scale ``atol + rtol * max(|y0|, |y1|)`` held
        constant) and Hairer's stiffness estimate ``|h| ‖f(y1) − f(y_j)‖ / ‖y1 − y_j‖``
        from the two stages at ``t + h`` (0 for a tableau without such a pair)."""
        scale = self.tol.scale(abs_y.detach(), abs_y1.detach())
        error, *e3 = (self.norm(e / scale) for e in self.error_vectors(step))
        if e3:  # DOP853's blend, as in ``error`` (its gradient kept finite where both estimates vanish)
            tiny = torch.finfo(error.dtype).tiny
            error = error * error / (error * error + 0.01 * e3[0] * e3[0]).clamp_min(tiny).sqrt()
        if self.method.stiff_stage is None:
            return torch.stack([error, torch.zeros_like(error)])
        num, den = self.stiffness_norms(step)
        stiffness = abs(step.h) * num / den.clamp_min(torch.finfo(den.dtype).tiny)
        return torch.stack([error, stiffness.to(error.dtype)])

    def stiffness_norms(self, step: Step) -> Tuple[torch.Tensor, torch.Tensor]:
        """``‖f(y1) − f(y_j)‖`` and ``‖y1 − y_j‖`` for the two stages at ``t + h``: their ratio times
        ``|h|`` estimates ``|h|·|λ|`` (Hairer). ``y_j`` is the kept stage, or rebuilt from the stages."""
        j = self.method.stiff_stage
        y_j = step.aux if step.aux is not None else combine(step.y, step.h, self.tab.a[j - 1], step.ks[:j])
        return torch.linalg.vector_norm(step.ks[-1] - step.ks[j]), torch.linalg.vector_norm(step.y1 - y_j)

    def error(self, step: Step, abs_y: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """The error norm (<= 1 accepts) and |y1|, reused as the next step's |y0|: one host read,
        which also carries the stiffness estimate on the steps that check it."""
        with torch.no_grad():
            abs_y1 = step.y1.abs()
            scale = self.tol.scale(abs_y, abs_y1)
            norms = [self.norm(e.div_(scale)) for e in self.error_vectors(step)]
            check = self.watch and (self.n_stiff > 0 or self.n_checked % CHECK_EVERY == 0)
            if check:
                norms.extend(self.stiffness_norms(step))
            values = norms[0].item() if len(norms) == 1 else torch.stack(norms).tolist()
        if check:
            num, den = values[-2:]
            values = values[:-2] if len(values) > 3 else values[0]
            self.hl = abs(step.h) * num / den if den > 0 and math.isfinite(num) else 0.0
        else:
            self.hl = -1.0
        if isinstance(values, list):  # DOP853 blends its 5th- and 3rd-order estimates
            e5, e3 = values
            ratio = 0.0 if e5 == 0.0 else e5 * e5 / math.sqrt(e5 * e5 + 0.01 * e3 * e3)
        else:
            ratio = values
        return ratio, abs_y1

    def observe(self) -> bool:
        """Count the latest stiffness estimate; True once a sustained stiff phase is seen
        (Hairer's DOPRI5 rule: 15 stiff estimates without 6 non-stiff ones between)."""
        self.n_checked += 1
        if self.hl < 0:
            return False
        if self.hl > self.method.stiff_limit:
            self.n_nonstiff = 0
            self.n_stiff += 1
            return self.n_stiff >= STIFF_COUNT
        self.n_nonstiff += 1
        if self.n_nonstiff >= RESET_COUNT:
            self.n_stiff = 0
        return False

    def accepted(self, step: Step, n_steps: int, t_end: float, max_steps: int) -> None:
        """Fail fast when a sustained stiff phase makes the solve hopeless: the steps it needs at
        this step size exceed ``max_num_steps``."""
        if not self.watch or not self.observe() or not math.isfinite(t_end):  # an event search: steps bound it
            return
        t = step.t + step.h
        needed = n_steps + abs(t_end - t) / abs(step.h)
        if needed > max_steps:
            raise StiffnessError(
                f"the problem is stiff: {self.method.name} is limited by stability, not accuracy, at "
                f"t={t:.6g} (h={abs(step.h):.3g}, h*|lambda|={self.hl:.3g}); at this step size it needs about "
                f"{needed:.3g} steps to reach t={t_end:.6g}, more than max_num_steps={max_steps}. "
                "Use method='auto' or method='kvaerno5' (options=dict(stiffness_check=False) turns this check off)."
            )

    def end_derivative(self, func: Func, step: Step) -> torch.Tensor:
        """f(t + h, y1): free for FSAL tableaus, else evaluated once and reused as the next f0."""
        if step.f1 is None:
            step.f1 = func(step.t + step.h, step.y1)
        return step.f1

    def interpolate(self, func: Func, step: Step, t_out: float) -> torch.Tensor:
        """The state at t_out inside the step: the tableau's own extension, else cubic Hermite."""
        tab, h = self.tab, step.h
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


def linear(step: Step, theta: float) -> torch.Tensor:
    """Linear interpolation between the step's ends (torchdiffeq's default on fixed grids)."""
    if theta == 0.0:
        return step.y
    if theta == 1.0:
        return step.y1
    return step.y + theta * (step.y1 - step.y)
