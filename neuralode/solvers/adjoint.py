"""Backsolve adjoint (Chen et al. 2018): O(1) memory in the number of steps.

Backward in time we solve the augmented state [y, a, g] with
    dy/dt = f(t, y),   da/dt = -a^T df/dy,   dg/dt = -a^T df/dtheta,
one vector-Jacobian product per evaluation and no Jacobian ever built. At every output time the
state is reset to the stored forward value and dL/dy(t_i) is added to a. The state is integrated
backwards, which is unstable for chaotic or strongly contracting dynamics: use grad="checkpoint"
there.

Error control of the backward solve follows torchdiffeq: the max of the forward norm of y, of a,
and of each parameter gradient's RMS; the seminorm (Kidger et al. 2021) leaves the parameter
gradients out; a callable ``norm`` gets ``(t, y, a, *param_grads)`` as torchdiffeq passes it. y
and a keep the forward solve's per-component tolerances.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .control import Tolerance, rms_norm
from .integrate import Problem, solve
from .methods import get_method


def _aug_tolerance(fwd: Tolerance, rtol, atol, n_params: int) -> Tolerance:
    """[y, a] keep the forward tolerances (or the adjoint's own); the parameter gradients take the
    adjoint's, else the forward scalar (the smallest component of a per-component tolerance)."""
    def part(adj, forward):
        if adj is not None and not isinstance(adj, torch.Tensor):
            return float(adj)
        base = forward if adj is None else adj
        if isinstance(base, float):
            return base
        base = base.reshape(-1)
        g = base.min().reshape(1).expand(n_params)
        return torch.cat([base, base, g])

    return Tolerance(part(rtol, fwd.rtol), part(atol, fwd.atol))


def _aug_norm(setup, opts, n: int, sizes: Sequence[int]):
    state_norm = setup.norm
    param_bounds, start = [], 2 * n
    for s in sizes:
        param_bounds.append((start, start + s))
        start += s
    user = opts.norm
    if callable(user):
        structure = setup.structure
        zero = torch.zeros((), dtype=setup.y0.real.dtype if setup.y0.is_complex() else setup.y0.dtype)

        def norm(r: torch.Tensor) -> torch.Tensor:
            y, a = r[:n], r[n:2 * n]
            ys = structure.unflatten(y) if structure.is_tuple else (y,)
            adj = structure.unflatten(a) if structure.is_tuple else (a,)
            return torch.as_tensor(user((zero.to(r.device), *ys, *adj, *[r[i:j] for i, j in param_bounds])))

        return norm
    seminorm = user == "seminorm"

    def norm(r: torch.Tensor) -> torch.Tensor:
        parts = [state_norm(r[:n]), state_norm(r[n:2 * n])]
        if not seminorm:
            parts += [rms_norm(r[i:j]) for i, j in param_bounds if j > i]
        return torch.stack(parts).max()

    return norm


def make_adjoint_problem(setup, sizes: Sequence[int]) -> Problem:
    """The backward solve's problem; its func is set per backward pass (it closes over the grads)."""
    settings = setup.settings
    g = settings.grad
    method = get_method(g.method or settings.method)
    opts = settings.adjoint_parsed
    n = setup.y0.numel()
    tol = _aug_tolerance(setup.tol, g.rtol, g.atol, sum(sizes))
    from .odeint import _callbacks  # the adjoint callbacks see (t, (y, a, *param grads), dt)

    class _AugStructure:
        is_tuple = True

        @staticmethod
        def unflatten(r):
            return (r[:n], r[n:2 * n], *torch.split(r[2 * n:], list(sizes)))

    return Problem(None, method, tol, _aug_norm(setup, opts, n, sizes), opts, setup.stats, backward=True,
                   autodiff=False, callbacks=_callbacks(setup.user_func, _AugStructure, setup.func.time, "_adjoint"))


class BacksolveAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, y0: torch.Tensor, *params):
        with torch.no_grad():
            ys = torch.stack(run.forward(y0).outputs)
        ctx.run = run
        ctx.save_for_backward(ys, *params)
        return ys

    @staticmethod
    def backward(ctx, grad_ys: torch.Tensor):
        ys, *params = ctx.saved_tensors
        run = ctx.run
        ts = run.out_ts
        setup = run.setup
        shape, n = ys.shape[1:], ys[0].numel()
        sizes = [p.numel() for p in params]
        prob = make_adjoint_problem(setup, sizes)
        user_func = setup.make_func(True)

        def aug_func(t: float, aug: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                y = aug[:n].view(shape).detach().requires_grad_(True)
                f = user_func(t, y)
                if f.requires_grad:
                    vjp = torch.autograd.grad(f, (y, *params), -aug[n: 2 * n].view(shape), allow_unused=True)
                else:  # f depends on neither y nor the parameters
                    vjp = (None,) * (1 + len(params))
            flat = [f.detach().reshape(-1), torch.zeros_like(aug[:n]) if vjp[0] is None else vjp[0].reshape(-1)]
            flat += [torch.zeros(s, dtype=ys.dtype, device=ys.device) if v is None else v.reshape(-1)
                     for v, s in zip(vjp[1:], sizes)]
            return torch.cat(flat)

        prob.func = aug_func
        a = grad_ys[-1].reshape(-1)
        g = torch.zeros(sum(sizes), dtype=ys.dtype, device=ys.device)
        h = None
        for i in range(len(ts) - 1, 0, -1):
            res = solve(prob, torch.cat([ys[i].reshape(-1), a, g]), (ts[i], ts[i - 1]), first_step=h)
            h = res.next_h or h  # the proposal, not the last step (that one was clipped to ts[i-1])
            aug = res.outputs[-1]
            a = aug[n: 2 * n] + grad_ys[i - 1].reshape(-1)
            g = aug[2 * n:]
        grads = list(torch.split(g, sizes)) if params else []
        return (None, a.view(shape), *[gr.view_as(p) for gr, p in zip(grads, params)])
