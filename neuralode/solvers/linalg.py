"""Linear algebra for implicit methods: Jacobians, the Newton matrix I - h*gamma*J, and GMRES.

Two back ends share one small interface (``update(func, t, y)`` sets the linearisation point,
``factor(hg)`` prepares I - hg*J, ``solve(r)`` applies its inverse, ``solve_transpose`` the
inverse of its transpose for implicit differentiation):

* :class:`DenseNewtonMatrix` builds J explicitly. For a state of shape ``(B, ...)`` with
  ``batch=True`` it assumes the batch rows do not interact (J block diagonal, one ``d x d`` block
  per row, as in every batched neural ODE) and builds all B blocks with d reverse passes.
  Blocks up to ``INVERSE_MAX`` wide are inverted once per factorisation (a matmul per solve is
  much cheaper than ``lu_solve`` on tiny matrices); larger ones keep ``torch.linalg.lu_factor``
  and reuse it via ``lu_solve``. A wrong block structure or a stale J only slows the simplified
  Newton iteration down: the fixed point (and the implicit-differentiation gradient, which uses
  exact vector-Jacobian products) does not depend on J.
* :class:`KrylovNewtonMatrix` never forms J: GMRES on v -> v - hg * J v with Jacobian-vector
  products from ``torch.func.jvp`` (finite differences if the function cannot be transformed).

Jacobians come from reverse-mode autograd (forward mode for Krylov products). A problem that says
its function cannot be differentiated (``autodiff=False``: the backsolve adjoint's augmented
dynamics call ``torch.autograd.grad`` inside) uses forward differences, which are adequate for a
Newton matrix. A function that fails under autograd for another reason also falls back to
differences, with a warning; out-of-memory errors are never swallowed.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional

import torch

INVERSE_MAX = 32

Func = Callable[[float, torch.Tensor], torch.Tensor]


def _blocks(y: torch.Tensor, batch: bool) -> torch.Tensor:
    """The state as (B, d) (batch) or (1, n)."""
    return y.reshape(y.shape[0], -1) if batch else y.reshape(1, -1)


def _fallback(err: RuntimeError, what: str) -> None:
    """Allow a finite-difference fallback for a function autograd cannot handle, never for OOM."""
    if isinstance(err, torch.OutOfMemoryError):
        raise err
    warnings.warn(f"{what} failed under autograd ({str(err).splitlines()[0][:120]}); "
                  "using finite differences for the Newton matrix", RuntimeWarning, stacklevel=3)


def jacobian(func: Func, t: float, y: torch.Tensor, batch: bool, f_y: Optional[torch.Tensor] = None,
             autodiff: bool = True) -> torch.Tensor:
    """J = df/dy at (t, y) as (B, d, d) blocks (B = 1 unless ``batch``)."""
    if not autodiff:
        return fd_jacobian(func, t, y, batch, f_y)
    yb = _blocks(y.detach(), batch)
    B, d = yb.shape
    try:
        with torch.enable_grad():
            x = yb.clone().requires_grad_(True)
            fx = _blocks(func(t, x.view_as(y)), batch)
            if not fx.requires_grad:  # f does not depend on y (or detaches it): J = 0 up to differences
                return fd_jacobian(func, t, y, batch, f_y)
            eye = torch.eye(d, dtype=y.dtype, device=y.device)
            if d <= 64:
                rows = [torch.autograd.grad(fx, x, eye[i].expand(B, d), retain_graph=i + 1 < d, allow_unused=True)[0]
                        for i in range(d)]
                rows = [torch.zeros_like(yb) if r is None else r for r in rows]
                return torch.stack(rows, dim=1)  # (B, d_out, d_in)
            (rows,) = torch.autograd.grad(fx, x, eye.unsqueeze(1).expand(d, B, d), is_grads_batched=True, allow_unused=True)
            return torch.zeros(B, d, d, dtype=y.dtype, device=y.device) if rows is None else rows.permute(1, 0, 2)
    except RuntimeError as err:
        _fallback(err, "the Jacobian of func")
        return fd_jacobian(func, t, y, batch, f_y)


def fd_jacobian(func: Func, t: float, y: torch.Tensor, batch: bool, f_y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward-difference Jacobian blocks: d extra evaluations (one per column, all blocks at once)."""
    with torch.no_grad():
        yb = _blocks(y, batch)
        B, d = yb.shape
        f0 = _blocks(func(t, y) if f_y is None else f_y, batch)
        eps = math.sqrt(torch.finfo(y.dtype).eps)
        cols = []
        for j in range(d):
            dx = eps * torch.clamp(yb[:, j].abs(), min=1.0)
            x = yb.clone()
            x[:, j] += dx
            cols.append((_blocks(func(t, x.view_as(y)), batch) - f0) / dx.unsqueeze(1))
        return torch.stack(cols, dim=2)


class DenseNewtonMatrix:
    """I - hg*J from an explicit (block-diagonal) Jacobian, factorised once per (J, hg)."""

    kind = "dense"

    def __init__(self, batch: bool, autodiff: bool = True):
        self.batch, self.autodiff = batch, autodiff
        self.J: Optional[torch.Tensor] = None
        self.hg: Optional[float] = None
        self.inv = self.lu = self.piv = None
        self.n_jac = 0

    def update(self, func: Func, t: float, y: torch.Tensor, f_y: Optional[torch.Tensor] = None) -> None:
        self.J = jacobian(func, t, y, self.batch, f_y, self.autodiff)
        self.n_jac += 1
        self.hg = None

    def factor(self, hg: float) -> None:
        J = self.J
        M = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device) - hg * J
        if J.shape[-1] <= INVERSE_MAX:
            self.inv = torch.linalg.inv(M)
            self.inv_t = self.inv.transpose(-1, -2)
        else:
            self.lu, self.piv = torch.linalg.lu_factor(M)
        self.hg = hg

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        if r.ndim == 1 and self.lu is None:
            return torch.mv(self.inv[0], r)
        rb = _blocks(r, self.batch).unsqueeze(-1)
        if self.inv is not None and self.lu is None:
            out = torch.matmul(self.inv, rb)
        else:
            out = torch.linalg.lu_solve(self.lu, self.piv, rb)
        return out.view_as(r)

    def frozen(self) -> "DenseNewtonMatrix":
        """A copy sharing the current factorisation (later ``factor`` calls build new tensors), for backward."""
        out = DenseNewtonMatrix.__new__(DenseNewtonMatrix)
        out.__dict__.update(self.__dict__)
        return out

    def solve_transpose(self, r: torch.Tensor) -> torch.Tensor:
        rb = _blocks(r, self.batch).unsqueeze(-1)
        if self.lu is None:
            out = torch.matmul(self.inv_t, rb)
        else:
            out = torch.linalg.lu_solve(self.lu, self.piv, rb, adjoint=True)
        return out.view_as(r)


def gmres(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, rtol: float = 1e-3,
          restart: int = 30, max_restarts: int = 4) -> torch.Tensor:
    """Restarted GMRES (modified Gram-Schmidt) for a real flat system, x0 = 0. The small
    least-squares problem is solved with Givens rotations on the host in float64, so it behaves
    the same in every dtype; one host read per inner iteration (the new Hessenberg column)."""
    shape = b.shape
    b = b.reshape(-1)
    x = torch.zeros_like(b)
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return x.view(shape)
    r = b
    for _ in range(max_restarts):
        beta = float(torch.linalg.vector_norm(r))
        if beta <= rtol * bnorm:
            break
        V = [r / beta]
        R: List[List[float]] = []  # columns of the rotated (upper-triangular) Hessenberg matrix
        rotations: List[tuple] = []
        g = [beta]  # rotated right-hand side; |g[-1]| is the residual norm
        for k in range(restart):
            w = matvec(V[k].view(shape)).reshape(-1)
            coeffs = []
            for i in range(k + 1):
                hik = torch.dot(V[i], w)
                w = w - hik * V[i]
                coeffs.append(hik)
            coeffs.append(torch.linalg.vector_norm(w))
            col = torch.stack(coeffs).tolist()
            h_next = col[k + 1]
            for i, (c, s_) in enumerate(rotations):
                col[i], col[i + 1] = c * col[i] + s_ * col[i + 1], -s_ * col[i] + c * col[i + 1]
            denom = math.hypot(col[k], col[k + 1])
            c, s_ = (1.0, 0.0) if denom == 0.0 else (col[k] / denom, col[k + 1] / denom)
            col[k] = denom
            rotations.append((c, s_))
            g.append(-s_ * g[k])
            g[k] = c * g[k]
            R.append(col[: k + 1])
            if abs(g[k + 1]) <= rtol * bnorm or h_next <= 1e-14 * bnorm or k + 1 == restart:
                break
            V.append(w / h_next)
        m = len(R)
        coef = [0.0] * m  # back substitution R coef = g
        for i in range(m - 1, -1, -1):
            acc = g[i] - sum(R[j][i] * coef[j] for j in range(i + 1, m))
            coef[i] = acc / R[i][i] if R[i][i] != 0.0 else 0.0
        x = x + torch.stack(V[:m], 1) @ torch.tensor(coef, dtype=b.dtype, device=b.device)
        if abs(g[m]) <= rtol * bnorm:
            break
        r = b - matvec(x.view(shape)).reshape(-1)
    return x.view(shape)


def _jvp():
    """torch.func.jvp; its first use loads decompositions that emit a FutureWarning about
    torch.jit.script from inside PyTorch, which users can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        from torch._decomp import decompositions_for_jvp  # noqa: F401  (the import that warns)
    return torch.func.jvp


class KrylovNewtonMatrix:
    """Matrix-free I - hg*J: GMRES with Jacobian-vector products at the linearisation point."""

    kind = "gmres"

    def __init__(self, autodiff: bool = True, rtol: float = 1e-3):
        self.autodiff, self.rtol = autodiff, rtol
        self.hg: Optional[float] = None
        self.n_jac = 0
        self.func = self.t = self.y = None
        self.n_matvec = 0

    def update(self, func: Func, t: float, y: torch.Tensor, f_y: Optional[torch.Tensor] = None) -> None:
        self.func, self.t, self.y = func, t, y.detach()
        self.f_y = f_y.detach() if f_y is not None else None
        self.n_jac += 1
        self.hg = None
        self._use_fd = not self.autodiff

    def factor(self, hg: float) -> None:
        self.hg = hg

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        self.n_matvec += 1
        if not self._use_fd:
            try:
                return _jvp()(lambda x: self.func(self.t, x), (self.y,), (v,))[1]
            except RuntimeError as err:
                _fallback(err, "a Jacobian-vector product of func")
                self._use_fd = True
        if self.f_y is None:
            self.f_y = self.func(self.t, self.y)
        vn = float(torch.linalg.vector_norm(v))
        if vn == 0.0:
            return torch.zeros_like(v)
        eps = math.sqrt(torch.finfo(v.dtype).eps) * (1.0 + float(torch.linalg.vector_norm(self.y))) / vn
        return (self.func(self.t, self.y + eps * v) - self.f_y) / eps

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        hg = self.hg
        with torch.no_grad():
            return gmres(lambda v: v - hg * self.jvp(v), r, self.rtol)

    def solve_transpose(self, r: torch.Tensor) -> torch.Tensor:  # unused: the backward pass uses exact VJPs
        raise NotImplementedError
