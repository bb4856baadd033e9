"""ESDIRK methods: adaptive, L-stable, stiffly accurate implicit Runge-Kutta for stiff dynamics.

Why an ESDIRK (Kvaerno's 5(4), Kvaerno 2004, BIT 44:489) rather than a Rosenbrock (Rodas) or BDF:

* Its stages need only f and a simplified Newton solve with one matrix I - h*gamma*J for all
  stages (one gamma): the Jacobian and its factorisation are reused across stages *and* steps and
  refreshed only when Newton slows down. Rosenbrock methods need the exact J every step (their
  order depends on it), which is the expensive part in PyTorch, and BDF's variable-order history
  does not fit a one-step interface shared with checkpoint replay and the adjoint.
* The solution is exact for the stage equations up to the Newton tolerance, so a stale or
  approximate J (block-diagonal batches, finite differences, Krylov) costs iterations, never
  accuracy; gradients come from implicit differentiation of each stage equation with exact
  vector-Jacobian products (below), so they do not depend on J either.
* Kvaerno5 is L-stable and stiffly accurate, and so is its embedded 4th-order solution (stage 6,
  also at c = 1): the error estimate y7 - y6 stays meaningful on stiff components, with no
  Radau-style error filtering. Seven stages, the first explicit (FSAL: k1 = f(t, y)).

Dense output: kvaerno5 interpolates with a 4th-order continuous extension built from its stages
(local error O(h^5), against cubic Hermite's O(h^4)); kvaerno3 with cubic Hermite. Note that stage
3 of Kvaerno5 has c = 1.23: f is evaluated slightly beyond t + h, as with every
Kvaerno5 implementation.

State. The method objects are immutable; ``method.start(problem)`` gives each solve its own
:class:`ESDIRKStepper` holding the Newton matrix, its age and the carried contraction rate, with the
solve's tolerances, norm and statistics. Nested solves, threads and the backward passes of other
solves never see it.

Gradients. The Newton iterations run without a graph. When the step is differentiated (direct
mode, checkpoint replay) each stage value is re-attached as Y = Y* + M^-1 R(Y*) with the residual
R = base + h*gamma*f(t_i, Y*) - Y* built with a graph; the custom backward applies the exact
(I - h*gamma*J(Y*))^-T (iterative refinement preconditioned by the cached factorisation, exact
VJPs of f; GMRES for the matrix-free path). That is the exact derivative of the stage solution
(the implicit function theorem), one extra f evaluation per stage in the forward pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch

from .control import rms_norm
from .linalg import DenseNewtonMatrix, KrylovNewtonMatrix, gmres
from .rk import Step, combine, hermite
from .settings import ADAPTIVE_OPTIONS, IMPLICIT_OPTIONS

DENSE_MAX = 256  # largest Jacobian block for the dense path under linear_solver="auto"
KAPPA = 0.01  # Newton stops when the predicted remaining error is below KAPPA (in tolerance units)
MAX_NEWTON = 10
ETA_MIN = 0.05  # floor of the carried contraction estimate: one iteration alone must be small to pass
THETA_REFRESH = 0.2  # a contraction rate above this refreshes J before the next step


@dataclass(frozen=True)
class ESDIRKTableau:
    """a[i] is the full row of stage i (its last entry the diagonal gamma; a[0] = () for the explicit
    first stage); b is the last row (stiffly accurate); the embedded solution is stage ``embedded``."""

    name: str
    order: int
    error_order: int
    gamma: float
    c: Tuple[float, ...]
    a: Tuple[Tuple[float, ...], ...]
    embedded: int
    dense: Tuple[Tuple[float, ...], ...] = ()  # per stage: coefficients of theta^1.. of its dense-output weight
    fsal = True  # the first stage is f(t, y), and stiff accuracy makes the last one f(t + h, y1)


_g = 0.26
KVAERNO5 = ESDIRKTableau(
    "kvaerno5", 5, 4, _g,
    c=(0.0, 0.52, 1.230333209967908, 0.8957659843500759, 0.43639360985864756, 1.0, 1.0),
    a=(
        (),
        (0.26, _g),
        (0.13, 0.84033320996790809, _g),
        (0.22371961478320505, 0.47675532319799699, -0.06470895363112615, _g),
        (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998, _g),
        (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676, _g),
        (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
         0.06962479448202728, _g),
    ),
    embedded=5,
    # A 4th-order continuous extension (Kvaerno5 has none of its own): the weights b_i(theta) are
    # quartics satisfying every order-4 condition for all theta (stage order 2 leaves a 2-parameter
    # family; no 5th-order extension exists), b(1) = b, and the free parameters minimise the
    # order-5 residual over [0, 1]. tests/test_stiff.py checks the conditions.
    dense=(
        (0.9899898844534706, -2.1079071502749787, 1.8017442147547875, -0.5472294371568769),
        (0.0, 0.0, 0.0, 0.0),
        (-0.06395648989332904, 0.6135470198022193, -1.194342827002935, 0.5897832091286601),
        (-0.33549224159405133, -1.8687656015513268, 4.897977495026631, -2.734905919164463),
        (0.05366957511654748, 3.4492446888028576, -4.590751524519061, 1.7177703095898211),
        (0.15409690952466853, -0.06685595106530506, -0.4811114658293716, 0.4634953018520378),
        (0.20169236239268248, -0.01926300571346007, -0.4335158924300453, 0.5110865357508224),
    ),
)

_g3 = 0.4358665215
KVAERNO3 = ESDIRKTableau(  # Kvaerno's 4-stage 3(2) pair: L-stable, stiffly accurate, cheaper at loose tolerances
    "kvaerno3", 3, 2, _g3,
    c=(0.0, 2 * _g3, 1.0, 1.0),
    a=(
        (),
        (_g3, _g3),
        ((-4 * _g3**2 + 6 * _g3 - 1) / (4 * _g3), (-2 * _g3 + 1) / (4 * _g3), _g3),
        ((6 * _g3 - 1) / (12 * _g3), -1 / ((24 * _g3 - 12) * _g3), (-6 * _g3**2 + 6 * _g3 - 1) / (6 * _g3 - 3), _g3),
    ),
    embedded=2,
)


def count_stat(stats, name: str, n: int = 1) -> None:
    """Add ``n`` to a Newton statistic of the solve's stats (none recorded: nothing to do)."""
    if stats is not None:
        setattr(stats, name, getattr(stats, name) + n)


def _newton_tolerances(dtype: torch.dtype) -> Tuple[float, float]:
    """(refinement, GMRES) relative tolerances of the backward linear solves, reachable in ``dtype``."""
    eps = torch.finfo(dtype).eps
    return max(1e-11, 1e3 * eps), max(1e-12, 1e2 * eps)


class _ImplicitStage(torch.autograd.Function):
    """Forward: one more simplified-Newton correction M^-1 R. Backward: the exact (I - hg J(Y*))^-T."""

    @staticmethod
    def forward(ctx, R, mat, fY, Yr, hg, stepper):
        ctx.mat = mat.frozen() if isinstance(mat, DenseNewtonMatrix) else mat
        ctx.fY, ctx.Yr, ctx.hg, ctx.stepper = fY, Yr, hg, stepper
        return mat.solve(R.detach())

    @staticmethod
    def backward(ctx, g):
        mat, fY, Yr, hg, st = ctx.mat, ctx.fY, ctx.Yr, ctx.hg, ctx.stepper
        none = (None,) * 5

        def op_t(lam):  # (I - hg J)^T lam with one exact VJP
            if not fY.requires_grad:  # f does not depend on the state: J = 0
                return lam
            with torch.enable_grad():
                (v,) = torch.autograd.grad(fY, Yr, lam, retain_graph=True, allow_unused=True)
            return lam if v is None else lam - hg * v

        gn = float(torch.linalg.vector_norm(g))
        if gn == 0.0:
            return (torch.zeros_like(g),) + none
        refine_tol, gmres_tol = _newton_tolerances(g.dtype)
        if isinstance(mat, DenseNewtonMatrix):
            lam = mat.solve_transpose(g)
            for _ in range(6):
                res = g - op_t(lam)
                st.count("n_linear_solves")
                if float(torch.linalg.vector_norm(res)) <= refine_tol * gn:
                    return (lam,) + none
                lam = lam + mat.solve_transpose(res)
            # slow refinement (stale J): finish with preconditioned GMRES
            corr = gmres(lambda v: mat.solve_transpose(op_t(v)), mat.solve_transpose(g - op_t(lam)), rtol=gmres_tol, restart=40)
            return (lam + corr,) + none
        return (gmres(op_t, g, rtol=gmres_tol, restart=50, max_restarts=10),) + none


class ESDIRK:
    """An adaptive ESDIRK method (immutable); ``start`` gives a solve its own stepper."""

    kind = "implicit"
    adaptive = True
    fsal = True
    supports_adjoint_solve = True
    supports_backward_modes = True
    multistep = False
    option_names = ADAPTIVE_OPTIONS | IMPLICIT_OPTIONS | {"step_size"}

    def __init__(self, tableau: ESDIRKTableau):
        self.tableau = tableau
        self.name, self.order = tableau.name, tableau.order
        self.controller_order = min(tableau.order, tableau.error_order)

    def start(self, prob) -> "ESDIRKStepper":
        return ESDIRKStepper(self, prob)


class ESDIRKStepper:
    """One solve's Newton state: the Newton matrix (J and its factorisation), its age, the carried
    contraction rate, and the solve's tolerances, norm, options and statistics."""

    def __init__(self, method: ESDIRK, prob):
        self.method, self.tab = method, method.tableau
        self.order, self.controller_order, self.fsal = method.order, method.controller_order, True
        self.tol, self.norm, self.stats = prob.tol, prob.norm, prob.stats
        self.linear_solver = prob.opts.linear_solver
        self.batch_jacobian = prob.opts.batch_jacobian
        self.autodiff = prob.autodiff
        self.mat = None
        self.need_jac = True
        self.jac_age = 0
        self.eta = 1.0

    def matrix(self, y: torch.Tensor):
        if self.mat is None:
            batch = self.batch_jacobian if self.batch_jacobian is not None else y.ndim >= 2
            block = y[0].numel() if batch else y.numel()
            kind = self.linear_solver
            if kind == "auto":
                kind = "dense" if block <= DENSE_MAX else "gmres"
            self.mat = DenseNewtonMatrix(batch, self.autodiff) if kind == "dense" else KrylovNewtonMatrix(self.autodiff)
        return self.mat

    def count(self, name: str, n: int = 1) -> None:
        count_stat(self.stats, name, n)

    # -- the step -------------------------------------------------------------------------------------
    def step(self, func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, tag=None) -> Step:
        diff = torch.is_grad_enabled() and (y.requires_grad or f0.requires_grad)
        hg = h * self.tab.gamma
        mat = self.matrix(y)
        out = None
        for _ in range(2):
            if self.need_jac:
                with torch.no_grad():
                    mat.update(func, t, y.detach(), f0.detach())
                self.count("n_jac")
                self.need_jac, self.jac_age = False, 0
            if mat.hg is None or (mat.hg != hg and (mat.kind == "gmres" or abs(hg / mat.hg - 1) > 0.2 or y[0].numel() <= 32)):
                mat.factor(hg)
            out = self._stages(func, t, h, y, f0, mat, diff)
            if out is not None or self.jac_age == 0:
                break
            self.need_jac = True  # Newton failed with an old J: refresh it and retry once at the same h
        if out is None:
            self.need_jac = self.jac_age > 0
            self.eta = 1.0
            return Step(t, h, y, y, [f0], None, failed=True, tag=tag)
        self.jac_age += 1
        ks, Ys, Yd = out
        with torch.no_grad():
            err = Yd[-1] - Yd[self.tab.embedded]
        return Step(t, h, y, Ys[-1], ks, ks[-1], aux=err, tag=tag)

    def _stages(self, func, t, h, y, f0, mat, diff: bool):
        tab = self.tab
        hg = h * tab.gamma
        with torch.no_grad():
            yd = y.detach()
            inv_scale = self.tol.scale(yd.abs()).reciprocal_()
            rms = 1.0 / math.sqrt(max(yd.numel(), 1)) if self.norm is rms_norm else 0.0
            ks: List[torch.Tensor] = [f0]
            kd: List[torch.Tensor] = [f0.detach()]
            Ys: List[torch.Tensor] = [y]
            Yd: List[torch.Tensor] = [yd]
            eta, theta_max, iters = max(self.eta, ETA_MIN) ** 0.8, 0.0, 0
        for i in range(1, len(tab.c)):
            row, ti = tab.a[i], t + tab.c[i] * h
            with torch.no_grad():
                base = yd.clone()
                for aij, k in zip(row[:-1], kd):
                    if aij != 0.0:
                        base.add_(k, alpha=h * aij)
                Y = torch.add(Yd[-1], kd[-1], alpha=(tab.c[i] - tab.c[i - 1]) * h)  # predictor: Euler from the previous stage
                dn_old, converged = None, False
                for it in range(MAX_NEWTON):
                    dY = mat.solve(torch.add(base, func(ti, Y), alpha=hg).sub_(Y))
                    Y.add_(dY)
                    iters += 1
                    dn = float(torch.linalg.vector_norm(dY.mul_(inv_scale))) * rms if rms else float(self.norm(dY.mul_(inv_scale)))
                    if not math.isfinite(dn):
                        break
                    if dn_old is not None:
                        theta = dn / dn_old if dn_old > 0 else 0.0
                        theta_max = max(theta_max, theta)
                        if theta >= 0.9:
                            break
                        eta = theta / (1.0 - theta)
                        if it >= 2 and theta ** (MAX_NEWTON - 1 - it) / (1.0 - theta) * dn > KAPPA:
                            break  # will not converge in the iterations left
                    if eta * dn <= KAPPA or dn <= 1e-12:
                        converged = True
                        break
                    dn_old = dn
                self.count("n_newton_iters", it + 1)
                self.count("n_linear_solves", it + 1)
                if not converged:
                    self.eta = 1.0
                    return None
            if diff:
                with torch.enable_grad():
                    base_g = y
                    for aij, k in zip(row[:-1], ks):
                        if aij != 0.0:
                            base_g = base_g + (h * aij) * k
                    Yr = Y.detach().requires_grad_(True)
                    fY = func(ti, Yr)
                    R = base_g + hg * fY - Yr
                    Yg = Y + _ImplicitStage.apply(R, mat, fY, Yr, hg, self)
                    k = (Yg - base_g) / hg
                self.count("n_linear_solves")
                Ys.append(Yg)
                ks.append(k)
                with torch.no_grad():
                    kd.append(k.detach())
                    Yd.append(Yg.detach())
            else:
                with torch.no_grad():
                    k = (Y - base) / hg
                Ys.append(Y)
                Yd.append(Y)
                ks.append(k)
                kd.append(k)
        self.eta = eta
        if theta_max > THETA_REFRESH:
            self.need_jac = True
        return ks, Ys, Yd

    # -- the rest of the interface -----------------------------------------------------------------------
    def error(self, step: Step, abs_y: torch.Tensor) -> Tuple[float, torch.Tensor]:
        with torch.no_grad():
            abs_y1 = step.y1.abs()
            return float(self.norm(step.aux / self.tol.scale(abs_y, abs_y1))), abs_y1

    def accepted(self, step: Step, n_steps: int, t_end: float, max_steps: int) -> None:
        pass

    @staticmethod
    def end_derivative(func, step: Step) -> torch.Tensor:
        return step.f1

    def interpolate(self, func, step: Step, t_out: float) -> torch.Tensor:
        """The tableau's continuous extension from the stages (kvaerno5), else cubic Hermite."""
        theta = (t_out - step.t) / step.h
        if not self.tab.dense:
            return hermite(step, step.f1, theta)
        weights = [sum(c * theta ** (k + 1) for k, c in enumerate(row)) for row in self.tab.dense]
        return combine(step.y, step.h, weights, step.ks)


IMPLICIT_METHODS = {"kvaerno5": ESDIRK(KVAERNO5), "kvaerno3": ESDIRK(KVAERNO3)}
