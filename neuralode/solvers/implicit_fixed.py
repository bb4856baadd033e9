"""Fixed-step implicit Runge-Kutta methods with torchdiffeq master's names and tableaus:
``implicit_euler``, ``implicit_midpoint``, ``radauIIA3``, ``gl4``, ``radauIIA5``, ``gl6`` (fully
implicit: all stages solved as one coupled system) and ``trapezoid``, ``sdirk2``, ``trbdf2``
(diagonally implicit: one stage at a time; a first stage at c = 0 with a zero row is explicit and
reuses f0).

Stage equations. With increments Z_i = Y_i - y the stages solve
    R(Z) = B + h (A (x) I) F(Z) - Z = 0,   F_j = f(t + c_j h, y + Z_j),
(B = 0 for a coupled system; for a DIRK stage, B = h sum_{j<i} a_ij K_j and A = [a_ii]; the
DIRK tableaus here are stiffly accurate, so y1 is their last stage). They are
solved by simplified Newton with M = I - h (A (x) J), J = df/dy at a step start: dense Jacobian
blocks and an LU (or inverse) of M for small states (``linear_solver="auto"``: blocks up to
``DENSE_MAX``), else matrix-free GMRES with Jacobian-vector products (``linalg``). J is kept
across steps and refreshed when Newton slows down or fails (then the step is retried once with a
fresh J). torchdiffeq's Broyden iteration with an absolute 1e-8 / 1e-6 residual test is not used.

Convergence. These are fixed-step methods: their error is set by h, and rtol/atol (which
torchdiffeq ignores for fixed grids) must not limit it. So Newton runs until the last increment
is within ``ULPS`` units of roundoff of the state (relative to each component and to the state's
size), far below any truncation error. Where roundoff stalls it short of that (ill-conditioned M)
an increment within 100 times that, or below 1 % of the solve's tolerance (atol + rtol * |y|),
is accepted. A step whose
Newton iteration diverges or uses up ``max_iters`` (default 100) iterations is marked failed and
the loop raises a ``SolverError`` naming t and the step (torchdiffeq only warns and continues).

The solution uses no extra evaluations of f: y1 = y + sum_j d_j Z_j with d = b^T A^-1 (y1 = Y_s
for stiffly accurate tableaus), which also keeps stiff components from amplifying the Newton
error. For stiffly accurate methods f(t1, y1) is the last stage's slope, reused as the next f0.

Gradients. The Newton iterations run without a graph. When the step is differentiated (direct
mode, checkpoint replay) the converged Z* is re-attached as Z = Z* + M^-1 R(Z*) with R built with
a graph; the backward solves the exact transposed system (I - h (A (x) I) diag(J(Y_j)))^T
lambda = g with exact vector-Jacobian products of f at the stages (refinement preconditioned by M,
GMRES when that is slow or matrix-free). That is the implicit-function derivative of the stage
solution, so direct and checkpoint gradients are the exact derivative of the computed solution
(whatever J was used). As the adjoint method these steppers solve the augmented system with
finite-difference Jacobians and need no graph.

Deliberate difference from torchdiffeq master: ``gl4`` uses the correct Gauss-Legendre nodes
c = 1/2 -+ sqrt(3)/6. Master gives both stages the node 1/2 - sqrt(3)/6 (a typo), which loses the
method's order on non-autonomous problems; on autonomous ones the two agree. Also unlike master,
stages at c = 1 are evaluated at t1 itself (not one float before it), as every other method here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .implicit import DENSE_MAX, _newton_tolerances
from .linalg import INVERSE_MAX, KrylovNewtonMatrix, gmres, jacobian
from .rk import Step
from .settings import FIXED_OPTIONS, IMPLICIT_OPTIONS

MAX_ITERS = 100
ULPS = 10  # Newton stops once an increment is this many units of roundoff of the state
THETA_REFRESH = 0.1  # a contraction rate above this refreshes J before the next step
STALLED = 0.5  # increments shrinking slower than this have reached roundoff (or J is poor)


@dataclass(frozen=True)
class ImplicitTableau:
    """Full s x s matrix ``a``; ``diagonal``: lower triangular, solved stage by stage."""

    name: str
    order: int
    c: Tuple[float, ...]
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    diagonal: bool = False

    @property
    def stiffly_accurate(self) -> bool:
        return self.c[-1] == 1.0 and self.b == self.a[-1]


_s2, _s3, _s6, _s15 = math.sqrt(2), math.sqrt(3), math.sqrt(6), math.sqrt(15)
_g = 1 - _s2 / 2  # sdirk2's and trbdf2's diagonal (2 - sqrt 2) / 2
_radau5 = (
    (11 / 45 - 7 * _s6 / 360, 37 / 225 - 169 * _s6 / 1800, -2 / 225 + _s6 / 75),
    (37 / 225 + 169 * _s6 / 1800, 11 / 45 + 7 * _s6 / 360, -2 / 225 - _s6 / 75),
    (4 / 9 - _s6 / 36, 4 / 9 + _s6 / 36, 1 / 9),
)
TABLEAUS = (
    ImplicitTableau("implicit_euler", 1, c=(1.0,), a=((1.0,),), b=(1.0,)),
    ImplicitTableau("implicit_midpoint", 2, c=(0.5,), a=((0.5,),), b=(1.0,)),
    ImplicitTableau("trapezoid", 2, c=(0.0, 1.0), a=((0.0, 0.0), (0.5, 0.5)), b=(0.5, 0.5), diagonal=True),
    ImplicitTableau("radauIIA3", 3, c=(1 / 3, 1.0), a=((5 / 12, -1 / 12), (0.75, 0.25)), b=(0.75, 0.25)),
    ImplicitTableau("gl4", 4, c=(0.5 - _s3 / 6, 0.5 + _s3 / 6), a=((0.25, 0.25 - _s3 / 6), (0.25 + _s3 / 6, 0.25)),
                    b=(0.5, 0.5)),
    ImplicitTableau("radauIIA5", 5, c=(0.4 - _s6 / 10, 0.4 + _s6 / 10, 1.0), a=_radau5, b=_radau5[-1]),
    ImplicitTableau("gl6", 6, c=(0.5 - _s15 / 10, 0.5, 0.5 + _s15 / 10),
                    a=((5 / 36, 2 / 9 - _s15 / 15, 5 / 36 - _s15 / 30),
                       (5 / 36 + _s15 / 24, 2 / 9, 5 / 36 - _s15 / 24),
                       (5 / 36 + _s15 / 30, 2 / 9 + _s15 / 15, 5 / 36)),
                    b=(5 / 18, 4 / 9, 5 / 18)),
    ImplicitTableau("sdirk2", 2, c=(_g, 1.0), a=((_g, 0.0), (1 - _g, _g)), b=(1 - _g, _g), diagonal=True),
    ImplicitTableau("trbdf2", 2, c=(0.0, 2 * _g, 1.0), a=((0.0, 0.0, 0.0), (_g, _g, 0.0), (_s2 / 4, _s2 / 4, _g)),
                    b=(_s2 / 4, _s2 / 4, _g), diagonal=True),
)


def _mix(m: Sequence[Sequence[float]], F: torch.Tensor) -> torch.Tensor:
    """(m (x) I) F for a small coefficient matrix m and stacked stages F of shape (s, ...)."""
    return torch.stack([sum(c * F[j] for j, c in enumerate(row) if c != 0.0) for row in m])


class _StageOperator:
    """M = I - (hA (x) J) for one coefficient matrix hA: dense (factorised once) or matrix-free."""

    def __init__(self, hA: Sequence[Sequence[float]], lin, batch: bool, like: torch.Tensor):
        self.hA, self.lin, self.batch = hA, lin, batch
        self.shape = like.shape
        self.s = len(hA)
        self.inv = self.lu = None
        self.singular = False
        if isinstance(lin, KrylovNewtonMatrix):
            return
        J = lin  # (B, d, d)
        Bn, d = J.shape[0], J.shape[-1]
        m = torch.tensor(hA, dtype=J.dtype, device=J.device)
        M = -(m[None, :, None, :, None] * J[:, None, :, None, :]).reshape(Bn, self.s * d, self.s * d)
        M.diagonal(dim1=-2, dim2=-1).add_(1.0)
        if self.s * d <= INVERSE_MAX:
            self.inv, info = torch.linalg.inv_ex(M)
        else:
            self.lu, self.piv, info = torch.linalg.lu_factor_ex(M)
        self.singular = bool(info.any())  # h * lambda hit an eigenvalue of A^-1: no Newton step exists

    @property
    def dense(self) -> bool:
        return not isinstance(self.lin, KrylovNewtonMatrix)

    def _blocks(self, r: torch.Tensor) -> torch.Tensor:
        """(s, *shape) -> (B, s*d, 1) in the layout of M."""
        s = self.s
        rb = r.reshape(s, self.shape[0], -1) if self.batch else r.reshape(s, 1, -1)
        return rb.transpose(0, 1).reshape(rb.shape[1], -1, 1)

    def _unblocks(self, x: torch.Tensor) -> torch.Tensor:
        Bn = x.shape[0]
        return x.reshape(Bn, self.s, -1).transpose(0, 1).reshape(self.s, *self.shape)

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        if not self.dense:
            lin, hA = self.lin, self.hA
            return gmres(lambda v: v - _mix(hA, torch.stack([lin.jvp(vj) for vj in v])), r, lin.rtol)
        if self.inv is not None and not self.batch:  # one small block: a matrix-vector product
            return torch.mv(self.inv[0], r.reshape(-1)).view(r.shape)
        rb = self._blocks(r)
        out = self.inv @ rb if self.inv is not None else torch.linalg.lu_solve(self.lu, self.piv, rb)
        return self._unblocks(out)

    def solve_transpose(self, r: torch.Tensor) -> torch.Tensor:
        rb = self._blocks(r)
        if self.inv is not None:
            out = self.inv.transpose(-1, -2) @ rb
        else:
            out = torch.linalg.lu_solve(self.lu, self.piv, rb, adjoint=True)
        return self._unblocks(out)


class _StageSolution(torch.autograd.Function):
    """Forward: one more Newton correction M^-1 R (of roundoff size). Backward: the exact
    N^-T g, N = I - (hA (x) I) diag(J(Y_j)) = -dR/dZ, with exact VJPs of the stage evaluations."""

    @staticmethod
    def forward(ctx, R, op, F, Zr, stepper):
        ctx.op, ctx.F, ctx.Zr, ctx.stepper = op, F, Zr, stepper
        return op.solve(R.detach())

    @staticmethod
    def backward(ctx, g):
        op, F, Zr, st = ctx.op, ctx.F, ctx.Zr, ctx.stepper
        hA_t = [list(col) for col in zip(*op.hA)]
        none = (None,) * 4

        def op_t(lam):  # N^T lam = lam - diag(J_j^T) (hA^T (x) I) lam
            if not F.requires_grad:  # f does not depend on the state: J = 0
                return lam
            with torch.enable_grad():
                (v,) = torch.autograd.grad(F, Zr, _mix(hA_t, lam), retain_graph=True, allow_unused=True)
            return lam if v is None else lam - v

        gn = float(torch.linalg.vector_norm(g))
        if gn == 0.0:
            return (torch.zeros_like(g),) + none
        refine_tol, gmres_tol = _newton_tolerances(g.dtype)
        st.count("n_linear_solves")
        if not op.dense:
            return (gmres(op_t, g, rtol=gmres_tol, restart=50, max_restarts=10),) + none
        lam = op.solve_transpose(g)
        for _ in range(6):
            res = g - op_t(lam)
            if float(torch.linalg.vector_norm(res)) <= refine_tol * gn:
                return (lam,) + none
            lam = lam + op.solve_transpose(res)
        # slow refinement (M from a J away from the stages): finish with preconditioned GMRES
        corr = gmres(lambda v: op.solve_transpose(op_t(v)), op.solve_transpose(g - op_t(lam)), rtol=gmres_tol,
                     restart=40)
        return (lam + corr,) + none


class FixedImplicit:
    """A fixed-step implicit Runge-Kutta method (immutable); ``start`` gives a solve its stepper."""

    kind = "fixed_implicit"
    adaptive = False
    supports_adjoint_solve = True
    supports_backward_modes = True
    multistep = False
    option_names = FIXED_OPTIONS | IMPLICIT_OPTIONS | {"max_iters"}

    def __init__(self, tableau: ImplicitTableau):
        self.tableau = tableau
        self.name, self.order = tableau.name, tableau.order
        self.controller_order = tableau.order
        self.fsal = tableau.stiffly_accurate
        self.d = self.k_last = None
        if not tableau.diagonal:  # y1 = y + sum_j d_j Z_j (d = b A^-1), and the slopes are A^-1 Z / h
            ainv = np.linalg.inv(np.array(tableau.a, dtype=np.float64))
            self.d = tuple(float(x) for x in np.array(tableau.b) @ ainv)
            self.k_last = tuple(float(x) for x in ainv[-1])

    def start(self, prob) -> "FixedImplicitStepper":
        return FixedImplicitStepper(self, prob)


class FixedImplicitStepper:
    """One solve's Newton state: the Jacobian (or Krylov linearisation), the factorised stage
    operators for the step sizes in use, and the solve's tolerance and statistics."""

    def __init__(self, method: FixedImplicit, prob):
        o = prob.opts
        self.method, self.tab = method, method.tableau
        self.order, self.controller_order, self.fsal = method.order, method.controller_order, method.fsal
        self.tol, self.stats, self.autodiff = prob.tol, prob.stats, prob.autodiff
        self.max_iters = MAX_ITERS if o.max_iters is None else o.max_iters
        self.linear_solver, self.batch_jacobian = o.linear_solver, o.batch_jacobian
        self.lin = None  # dense J blocks (B, d, d), or a KrylovNewtonMatrix
        self.kind: Optional[str] = None  # "dense" or "gmres", chosen at the first step
        self.batch = False
        self.ops = {}  # hA -> _StageOperator, for the current lin
        self.need_jac = True
        self.jac_age = 0

    def count(self, name: str, n: int = 1) -> None:
        if self.stats is not None:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def _linearise(self, func, t: float, y: torch.Tensor, f0: torch.Tensor) -> None:
        if self.kind is None:
            if y.dtype not in (torch.float32, torch.float64):  # e.g. a backward solve with adjoint_method=this
                raise TypeError(f"method {self.method.name!r} solves its stage equations in float32 or float64 only, "
                                f"got a {y.dtype} state; cast y0 with .float() or .double()")
            self.batch = self.batch_jacobian if self.batch_jacobian is not None else y.ndim >= 2
            block = y[0].numel() if self.batch else y.numel()
            self.kind = self.linear_solver
            if self.kind == "auto":
                self.kind = "dense" if block <= DENSE_MAX else "gmres"
        with torch.no_grad():
            if self.kind == "gmres":
                if self.lin is None:
                    self.lin = KrylovNewtonMatrix(self.autodiff)
                self.lin.update(func, t, y.detach(), f0.detach())
            else:
                self.lin = jacobian(func, t, y.detach(), self.batch, f0.detach(), self.autodiff)
        self.count("n_jac")
        self.ops, self.need_jac, self.jac_age = {}, False, 0

    def _operator(self, hA: Tuple[Tuple[float, ...], ...], y: torch.Tensor) -> _StageOperator:
        op = self.ops.get(hA)
        if op is None:
            op = self.ops[hA] = _StageOperator(hA, self.lin, self.batch, y)
        return op

    # -- the step ---------------------------------------------------------------------------------------
    def step(self, func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, tag=None) -> Step:
        diff = torch.is_grad_enabled() and (y.requires_grad or f0.requires_grad)
        out = None
        for _ in range(2):
            if self.need_jac:
                self._linearise(func, t, y, f0)
            out = self._stages(func, t, h, y, f0, diff)
            if out is not None or self.jac_age == 0:
                break
            self.need_jac = True  # Newton failed with an old J: refresh it and retry once
        if out is None:
            self.need_jac = True
            return Step(t, h, y, y, [f0], None, failed=True, tag=tag)
        self.jac_age += 1
        y1, f1 = out
        return Step(t, h, y, y1, [f0], f1, tag=tag)

    def _stages(self, func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, diff: bool):
        """(y1, f1 or None), or None when Newton failed."""
        tab, method = self.tab, self.method
        s = len(tab.c)
        if not tab.diagonal:
            hA = tuple(tuple(h * a for a in row) for row in tab.a)
            with torch.no_grad():
                Z0 = torch.stack([f0.detach() * (h * ci) for ci in tab.c])
            Z = self._solve(func, [t + ci * h for ci in tab.c], y, hA, None, Z0, diff)
            if Z is None:
                return None
            y1 = y + Z[-1] if tab.stiffly_accurate else y + _mix([method.d], Z)[0]
            f1 = _mix([method.k_last], Z)[0] / h if tab.stiffly_accurate else None
            return y1, f1
        ks: List[torch.Tensor] = []
        Z = None
        for i in range(s):
            row, aii = tab.a[i], tab.a[i][i]
            if aii == 0.0:  # the explicit first stage (c = 0, zero row)
                ks.append(f0)
                continue
            terms = [k * (h * a) for k, a in zip(ks, row[:i]) if a != 0.0]
            B = sum(terms) if terms else None
            with torch.no_grad():
                Z0 = (ks[-1] if ks else f0).detach() * (h * aii)
                Z0 = (Z0 if B is None else Z0 + B.detach())[None]
            Z = self._solve(func, [t + tab.c[i] * h], y, ((h * aii,),), None if B is None else B[None], Z0, diff)
            if Z is None:
                return None
            ks.append((Z[0] if B is None else Z[0] - B) / (h * aii))
        return y + Z[0], ks[-1]

    def _solve(self, func, times: Sequence[float], y: torch.Tensor, hA, B: Optional[torch.Tensor], Z: torch.Tensor,
               diff: bool) -> Optional[torch.Tensor]:
        """Z solving B + (hA (x) I) F(Z) - Z = 0 (None if Newton fails), re-attached to the graph
        of y, B and func's parameters when ``diff``."""
        op = self._operator(hA, y)
        if op.singular:
            return None
        s = len(times)
        with torch.no_grad():
            yd = y.detach()
            Bd = None if B is None else B.detach()
            # error weights, from the predicted stages (their magnitude is all that matters)
            ya, Ya = yd.reshape(-1).abs(), (yd + Z).reshape(s, -1).abs()
            w_tol = self.tol.scale(ya, Ya)
            big = torch.maximum(ya, Ya)
            w_ulp = big.add(big.max()).mul_(ULPS * torch.finfo(yd.dtype).eps).add_(torch.finfo(yd.dtype).tiny)
            dn_old, theta_max, converged = None, 0.0, False
            for it in range(1, self.max_iters + 1):
                F = torch.stack([func(tj, yd + Z[j]) for j, tj in enumerate(times)])
                R = _mix(hA, F) - Z
                if Bd is not None:
                    R += Bd
                dZ = op.solve(R)
                Z = Z + dZ
                dza = dZ.reshape(s, -1).abs_()
                dn = float((dza / w_ulp).max())
                if not math.isfinite(dn):
                    break
                if dn <= 1.0:
                    converged = True
                    break
                if dn_old is not None:
                    theta = dn / dn_old
                    theta_max = max(theta_max, theta)
                    if theta < STALLED and theta / (1.0 - theta) * dn <= 1.0:
                        converged = True  # the error left after this update (~ the next increment) is below ULPS
                        break
                    if theta >= STALLED and (dn <= 100.0 or float((dza / w_tol).max()) <= 0.01):
                        converged = True  # roundoff floor: the increments no longer shrink
                        break
                    if theta > 2.0:
                        break  # diverging
                dn_old = dn
            self.count("n_newton_iters", it)
            self.count("n_linear_solves", it)
        if theta_max > THETA_REFRESH:
            self.need_jac = True
        if not converged:
            return None
        if not diff:
            return Z
        with torch.enable_grad():
            Zr = Z.detach().requires_grad_(True)
            F = torch.stack([func(tj, y + Zr[j]) for j, tj in enumerate(times)])
            R = _mix(hA, F) - Zr
            if B is not None:
                R = R + B
            return Z + _StageSolution.apply(R, op, F, Zr, self)

    # -- the rest of the interface -------------------------------------------------------------------------
    def accepted(self, step: Step, n_steps: int, t_end: float, max_steps: int) -> None:
        pass

    @staticmethod
    def end_derivative(func, step: Step) -> torch.Tensor:
        """f(t1, y1): the last stage's slope for stiffly accurate tableaus, else one evaluation."""
        if step.f1 is None:
            step.f1 = func(step.t + step.h, step.y1)
        return step.f1


FIXED_IMPLICIT_METHODS = {tab.name: FixedImplicit(tab) for tab in TABLEAUS}
