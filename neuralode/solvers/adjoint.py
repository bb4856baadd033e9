"""Backsolve adjoint (Chen et al. 2018): O(1) memory in the number of steps.

Backward in time we solve the augmented state [y, a, g] with
    dy/dt = f(t, y),   da/dt = -a^T df/dy,   dg/dt = -a^T df/dtheta,
one vector-Jacobian product per evaluation and no Jacobian ever built, separately on every
interval between output times. At every output time the state is reset to the stored forward
value and dL/dy(t_i) is added to a. The state is integrated backwards, which is unstable for
chaotic or strongly contracting dynamics: use grad="checkpoint" there.

As in torchdiffeq, the autograd node exposes ``adjoint_options`` (its ``"norm"`` is read when the
backward pass runs), ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_method``, ``func``, ``shapes``,
``t_requires_grad`` and ``event_mode``. The error norm of the backward solve sees the augmented
state as torchdiffeq lays it out, ``(t, y, a, *param_grads)``: by default the max of the forward
norm of y and of a and of each parameter gradient's RMS; the seminorm (Kidger et al. 2021) leaves
the parameter gradients out; a user callable gets that tuple (with y and a split into their parts
for tuple states). y and a keep the forward solve's per-component tolerances.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Sequence

import torch

from .control import Tolerance, rms_norm
from .errors import MaxStepsError, SolverError
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
        return torch.cat([base, base, base.min().reshape(1).expand(n_params)])

    return Tolerance(part(rtol, fwd.rtol), part(atol, fwd.atol))


class AugLayout:
    """Splits the flat augmented state [y, a, g] into torchdiffeq's tuple (t, y, a, *param_grads):
    y and a in y0's shape (flat for tuple states), each gradient in its parameter's shape."""

    is_tuple = True

    def __init__(self, setup, params: Sequence[torch.Tensor]):
        self.n = setup.y0.numel()
        self.y_shape = setup.y0.shape
        self.param_shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.zero = torch.zeros((), dtype=setup.t_dtype, device=setup.y0.device)

    def unflatten(self, r: torch.Tensor):
        n = self.n
        grads, start = [], 2 * n
        for size, shape in zip(self.sizes, self.param_shapes):
            grads.append(r[start:start + size].view(shape))
            start += size
        return (self.zero, r[:n].view(self.y_shape), r[n:2 * n].view(self.y_shape), *grads)


def adjoint_norm(setup, mode: str, user: Callable = None) -> Callable:
    """The backward solve's norm of the tuple (t, y, a, *param_grads)."""
    state_norm = setup.norm
    if mode == "user":
        structure = setup.structure
        if not structure.is_tuple:
            return user

        def split(tup):
            t, y, a, *grads = tup
            return user((t, *structure.unflatten(y), *structure.unflatten(a), *grads))

        return split

    def norm(tup):
        t, y, a, *grads = tup
        parts = [t.abs(), state_norm(y.reshape(-1)), state_norm(a.reshape(-1))]
        if mode == "default":
            parts += [rms_norm(g) for g in grads]
        return torch.stack([torch.as_tensor(p, dtype=t.dtype, device=t.device) for p in parts]).max()

    return norm


def make_adjoint_problem(setup, layout: AugLayout, norm: Callable) -> Problem:
    """The backward solve's problem; its func is set per backward pass (it closes over the grads)."""
    from .odeint import _callbacks  # the adjoint callbacks see (t, (t, y, a, *param grads), dt)

    settings = setup.settings
    g = settings.grad
    method = get_method(g.method or settings.method)
    tol = _aug_tolerance(setup.tol, g.rtol, g.atol, sum(layout.sizes))
    flat_norm = lambda r: torch.as_tensor(norm(layout.unflatten(r)))  # noqa: E731  (read at backward time)
    return Problem(None, method, tol, flat_norm, settings.adjoint_parsed, setup.stats, backward=True,
                   autodiff=False, callbacks=_callbacks(setup.user_func, layout, setup.func.time, "_adjoint"),
                   time_dtype=setup.t_dtype)


BACKWARD_STEP_FACTOR = 10  # a backward solve this many times longer than the forward one has diverged
UNSTABLE_HINT = ("the backsolve adjoint re-integrates the state backwards in time, which is unstable for strongly "
                 "contracting (stiff) or chaotic dynamics; use grad='checkpoint' (exact, bounded memory)")


class BacksolveAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, y0: torch.Tensor, *params):
        with torch.no_grad():
            res = run.forward(y0)
            ys = torch.stack(res.outputs)
        ctx.forward_steps = res.n_accepted + res.n_rejected
        setup, g = run.setup, run.setup.settings.grad
        user = setup.settings.adjoint_parsed.norm
        mode = "user" if callable(user) else "seminorm" if user == "seminorm" else "default"
        ctx.run = run
        ctx.adjoint_options = {**setup.settings.adjoint_options(), "norm": adjoint_norm(setup, mode, user)}
        ctx.adjoint_rtol = g.rtol if g.rtol is not None else setup.settings.rtol
        ctx.adjoint_atol = g.atol if g.atol is not None else setup.settings.atol
        ctx.adjoint_method = g.method or setup.settings.method
        ctx.func, ctx.event_mode = setup.user_func, run.event is not None
        ctx.shapes = setup.structure.shapes if setup.structure.is_tuple else None
        ctx.t_requires_grad = False  # time gradients are attached outside this node
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
        layout = AugLayout(setup, params)
        prob = make_adjoint_problem(setup, layout, lambda tup: ctx.adjoint_options["norm"](tup))
        user_func = setup.make_func(True)

        def aug_func(t: float, aug: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                y = aug[:n].view(shape).detach().requires_grad_(True)
                f = user_func(t, y)
                if f.requires_grad:
                    vjp = torch.autograd.grad(f, (y, *params), -aug[n: 2 * n].view(shape), allow_unused=True)
                else:  # f depends on neither y nor the parameters
                    vjp = (None,) * (1 + len(params))
            flat: List[torch.Tensor] = [f.detach().reshape(-1),
                                        torch.zeros_like(aug[:n]) if vjp[0] is None else vjp[0].reshape(-1)]
            flat += [torch.zeros(s, dtype=aug.dtype, device=aug.device) if v is None else v.reshape(-1).to(aug.dtype)
                     for v, s in zip(vjp[1:], sizes)]
            return torch.cat(flat)

        prob.func = aug_func
        # fail fast when the backward solve diverges instead of crawling to max_num_steps
        budget = BACKWARD_STEP_FACTOR * ctx.forward_steps + 200
        capped = prob.opts.max_num_steps is None or prob.opts.max_num_steps > budget
        if capped:
            prob.opts = dataclasses.replace(prob.opts, max_num_steps=budget)
        a = grad_ys[-1].reshape(-1)
        g = torch.zeros(sum(sizes), dtype=ys.dtype, device=ys.device)
        h = None
        select_interval = getattr(run, "select_interval", None)  # per-sample grids: the field depends on it
        for i in range(len(ts) - 1, 0, -1):
            if select_interval is not None:
                select_interval(i - 1)
            if ts[i] != ts[i - 1]:  # an event at t0 leaves nothing to integrate
                try:
                    res = solve(prob, torch.cat([ys[i].reshape(-1), a, g]), (ts[i], ts[i - 1]), first_step=h)
                except MaxStepsError as e:
                    if not capped:
                        raise
                    raise MaxStepsError(f"backward (adjoint) solve: stopped after {budget} steps, {BACKWARD_STEP_FACTOR}x "
                                        f"the forward solve's {ctx.forward_steps}: it is diverging; "
                                        + UNSTABLE_HINT) from None
                except SolverError as e:
                    raise type(e)(f"{e} ({UNSTABLE_HINT})") from None
                h = res.next_h or h  # the proposal, not the last step (that one was clipped to ts[i-1])
                aug = res.outputs[-1]
                a, g = aug[n: 2 * n], aug[2 * n:]
            a = a + grad_ys[i - 1].reshape(-1)
        grads = list(torch.split(g, sizes)) if params else []
        grads = [gr.real if not p.is_complex() and gr.is_complex() else gr for gr, p in zip(grads, params)]
        return (None, a.view(shape), *[gr.view_as(p) for gr, p in zip(grads, params)])
