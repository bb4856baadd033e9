"""Integrate until an event function crosses zero, differentiably (torchdiffeq's ``odeint_event``).

The event time t* is located without a graph: after every accepted step the event function is
evaluated at the step's end (one host sync per step), and a sign change is refined on the step's
dense output. Gradients then come from the implicit function theorem on g(t*, y(t*)) = 0:

    dt*/dtheta = -(dg/dtheta) / (dg/dt + dg/dy . f(t*, y*)),

which we attach by re-solving to the (detached) t* with any gradient mode and correcting t* and
y(t*) to first order, so the values stay exact and only the derivatives change.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .integrate import solve
from .odeint import State, make_problem, odeint


def odeint_event(func: Callable, y0: State, t0: torch.Tensor, *, event_fn: Callable, reverse_time: bool = False,
                 odeint_interface: Callable = odeint, **kwargs):
    """Return ``(event_t, solution)``: the first time event_fn(t, y) crosses zero after t0, and
    the states at ``[t0, event_t]``. ``kwargs`` go to ``odeint_interface`` (rtol, atol, method,
    options, grad, ...)."""
    t0 = torch.as_tensor(t0)
    if t0.numel() != 1 or not t0.is_floating_point():
        raise ValueError(f"t0 must be a floating-point scalar tensor, got {tuple(t0.shape)} {t0.dtype}")
    search = {k: kwargs[k] for k in ("rtol", "atol", "method", "options") if k in kwargs}
    prob, structure, y0_flat, _ = make_problem(func, y0, search.get("rtol", 1e-7), search.get("atol", 1e-9),
                                                search.get("method"), search.get("options"))
    t_start = float(t0.detach())

    def event(t: float, y: torch.Tensor) -> float:
        return float(event_fn(torch.full((), t, dtype=t0.dtype, device=y.device), structure.unflatten(y)))

    with torch.no_grad():
        res = solve(prob, y0_flat.detach(), (t_start, -math.inf if reverse_time else math.inf), event=event)
    t_star = torch.tensor(res.event_t, dtype=t0.dtype, device=t0.device)

    solution = odeint_interface(func, y0, torch.stack([t0.reshape(()), t_star]), **kwargs)
    y_star = tuple(s[-1] for s in solution) if structure.is_tuple else solution[-1]
    with torch.enable_grad():  # c = dg/dt + dg/dy . f at the event, held constant
        tt = t_star.clone().requires_grad_(True)
        yy = structure.flatten(y_star).detach().requires_grad_(True)
        g = event_fn(tt, structure.unflatten(yy))
        dg_dt, dg_dy = torch.autograd.grad(g, (tt, yy), allow_unused=True)
        f = structure.flatten(func(t_star, structure.unflatten(yy.detach()))).detach()
    c = (dg_dy * f).sum() if dg_dy is not None else torch.zeros((), dtype=f.dtype, device=f.device)
    if dg_dt is not None:
        c = c + dg_dt.to(c.dtype)
    if float(c) == 0.0:
        raise ValueError("the event function is tangent to the trajectory at the event (dg/dt = 0): "
                         "its time has no well-defined derivative")
    g = event_fn(t_star, y_star)
    event_t = t_star - (g - g.detach()).to(t_star.dtype) / c.detach().to(t_star.dtype)
    shift = (event_t - t_star.detach()).to(f.dtype)
    y_event = structure.flatten(y_star) + shift * f
    start = structure.flatten(tuple(s[0] for s in solution) if structure.is_tuple else solution[0])
    return event_t, structure.unflatten(torch.stack([start, y_event]), (2,))
