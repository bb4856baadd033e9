"""Integrate until an event function crosses zero, differentiably (torchdiffeq's ``odeint_event``).

``odeint(..., event_fn=g)`` finds the event time t* without a graph (after every accepted step
the event function is evaluated at the step's end, and a sign change is refined on the step's
dense output) and returns the state there, differentiable at fixed t*. ``odeint_event`` then
attaches the event time's gradient from the implicit function theorem on g(t*, y(t*)) = 0:

    dt*/dtheta = -(dg/dtheta) / (dg/dt + dg/dy . f(t*, y*)),

correcting t* and y(t*) to first order, so the values stay exact and only the derivatives change.
"""
from __future__ import annotations

from typing import Callable

import torch

from .odeint import InputError, Structure, odeint


def odeint_event(func: Callable, y0, t0: torch.Tensor, *, event_fn: Callable, reverse_time: bool = False,
                 odeint_interface: Callable = odeint, **kwargs):
    """Return ``(event_t, solution)``: the first time event_fn(t, y) crosses zero after t0 (before
    it with ``reverse_time``), and the states at ``[t0, event_t]``. ``kwargs`` go to
    ``odeint_interface`` (rtol, atol, method, options, adjoint_*, grad, ...). A vector-valued
    event_fn stops at the first of its components to cross zero."""
    t0 = torch.as_tensor(t0)
    if t0.numel() != 1 or not t0.is_floating_point():
        raise InputError(f"t0 must be a floating-point scalar tensor, got {tuple(t0.shape)} {t0.dtype}")
    t0 = t0.reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)

    # the event time's derivative: c = dg/dt + dg/dy . f at the event, held constant, for the
    # component g of event_fn that fired (the one at zero)
    structure = Structure(y0)
    y_star = tuple(s[-1] for s in solution) if structure.is_tuple else solution[-1]
    t_star = event_t.detach()
    with torch.no_grad():
        which = int(torch.as_tensor(event_fn(t_star, y_star)).reshape(-1).abs().argmin())
    component = lambda t, y: torch.as_tensor(event_fn(t, y)).reshape(-1)[which]  # noqa: E731
    with torch.enable_grad():
        tt = t_star.clone().requires_grad_(True)
        yy = structure.flatten(y_star).detach().requires_grad_(True)
        g = component(tt, structure.unflatten(yy))
        if not g.requires_grad:
            # event_fn is constant in (t, y) at the event, e.g. a terminal guard returning
            # zeros_like(t) past the end (torchdiffeq's examples/learn_physics.py): the event time
            # is a fixed time, so, as in torchdiffeq, it gets no derivative and the state keeps a
            # fixed-time solve's gradients
            return t_star, solution
        dg_dt, dg_dy = torch.autograd.grad(g, (tt, yy), allow_unused=True)
        f = structure.flatten(func(t_star, structure.unflatten(yy.detach()))).detach()
    c = (dg_dy * f).sum() if dg_dy is not None else torch.zeros((), dtype=f.dtype, device=f.device)
    if dg_dt is not None:
        c = c + dg_dt.to(c.dtype)
    if float(c) == 0.0:
        raise InputError("the event function is tangent to the trajectory at the event (dg/dt = 0): "
                         "its time has no well-defined derivative")
    g = component(t_star, y_star)
    event_t = t_star - (g - g.detach()).to(t_star.dtype) / c.detach().to(t_star.dtype)
    shift = (event_t - t_star.detach()).to(f.dtype)
    y_event = structure.flatten(y_star) + shift * f
    start = structure.flatten(tuple(s[0] for s in solution) if structure.is_tuple else solution[0])
    return event_t, structure.unflatten(torch.stack([start, y_event]), (2,))
