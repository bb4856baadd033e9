"""Backsolve adjoint (Chen et al. 2018): O(1) memory in the number of steps.

Backward in time we solve the augmented state [y, a, g] with
    dy/dt = f(t, y),   da/dt = -a^T df/dy,   dg/dt = -a^T df/dtheta,
one vector-Jacobian product per evaluation and no Jacobian ever built. At every output time the
state is reset to the stored forward value and dL/dy(t_i) is added to a. The state is integrated
backwards, which is unstable for chaotic or strongly contracting dynamics: use grad="checkpoint"
there.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from .integrate import Problem, rms_norm, solve


def _rms_parts(parts: Sequence[int]):
    """max over the RMS norms of consecutive slices of the flat augmented ratio."""
    bounds = []
    start = 0
    for n in parts:
        if n:
            bounds.append((start, start + n))
        start += n

    def norm(r: torch.Tensor) -> torch.Tensor:
        return torch.stack([rms_norm(r[a:b]) for a, b in bounds]).max()

    return norm


def adjoint_norm(n_state: int, n_params: int, seminorm: bool):
    """Mixed norm over (y, a, g); the seminorm (Kidger et al. 2021) leaves g out of step control."""
    return _rms_parts([n_state, n_state] if seminorm else [n_state, n_state, n_params])


class BacksolveAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob: Problem, make_adjoint_problem, y0: torch.Tensor, ts: Tuple[float, ...], *params):
        with torch.no_grad():
            ys = torch.stack(solve(prob, y0, ts).outputs)
        ctx.make_adjoint_problem, ctx.ts = make_adjoint_problem, ts
        ctx.save_for_backward(ys, *params)
        return ys

    @staticmethod
    def backward(ctx, grad_ys: torch.Tensor):
        ys, *params = ctx.saved_tensors
        ts = ctx.ts
        shape, n = ys.shape[1:], ys[0].numel()
        sizes = [p.numel() for p in params]
        aug_prob, user_func = ctx.make_adjoint_problem(n, sum(sizes))

        def aug_func(t: float, aug: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                y = aug[:n].view(shape).detach().requires_grad_(True)
                f = user_func(t, y)
                vjp = torch.autograd.grad(f, (y, *params), -aug[n : 2 * n].view(shape), allow_unused=True)
            flat = [f.reshape(-1), vjp[0].reshape(-1)]
            flat += [torch.zeros(s, dtype=ys.dtype, device=ys.device) if v is None else v.reshape(-1) for v, s in zip(vjp[1:], sizes)]
            return torch.cat(flat)

        aug_prob.func = aug_func
        a = grad_ys[-1].reshape(-1)
        g = torch.zeros(sum(sizes), dtype=ys.dtype, device=ys.device)
        h = None
        for i in range(len(ts) - 1, 0, -1):
            res = solve(aug_prob, torch.cat([ys[i].reshape(-1), a, g]), (ts[i], ts[i - 1]), first_step=h)
            h = res.next_h or h  # the proposal, not the last step (that one was clipped to ts[i-1])
            aug = res.outputs[-1]
            a = aug[n : 2 * n] + grad_ys[i - 1].reshape(-1)
            g = aug[2 * n :]
        grads = list(torch.split(g, sizes)) if params else []
        return (None, None, a.view(shape), None, *[gr.view_as(p) for gr, p in zip(grads, params)])
