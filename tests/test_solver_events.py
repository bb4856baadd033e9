"""odeint_event: a ball dropped from height h0 under gravity g hits the ground at
t* = sqrt(2 h0 / g) with speed sqrt(2 g h0); both, and a chain of bounces, are differentiable."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralode import odeint_event

F64 = torch.float64
G = 9.81
MODES = ("direct", "adjoint", "checkpoint")


def ball(t, s):
    return torch.stack([s[1], torch.full_like(s[1], -G)])


def height(t, s):
    return s[0]


def _drop(h0, grad, **kw):
    y0 = torch.stack([h0, torch.zeros((), dtype=F64)])
    return odeint_event(ball, y0, torch.tensor(0.0, dtype=F64), event_fn=height, rtol=1e-10, atol=1e-10, grad=grad,
                        adjoint_params=(), **kw)


@pytest.mark.parametrize("grad", MODES)
def test_bouncing_ball_event_time_and_gradient(grad):
    h0 = torch.tensor(2.0, dtype=F64, requires_grad=True)
    event_t, sol = _drop(h0, grad)
    assert sol.shape == (2, 2)
    assert torch.equal(sol[0].detach(), torch.tensor([2.0, 0.0], dtype=F64))  # solution holds [t0, event_t]
    assert abs(event_t.item() - math.sqrt(2 * 2.0 / G)) < 1e-9
    assert abs(sol[-1, 0].item()) < 1e-9  # on the ground
    assert abs(sol[-1, 1].item() + math.sqrt(2 * G * 2.0)) < 1e-8  # impact speed
    (dt_dh0,) = torch.autograd.grad(event_t, h0, retain_graph=True)
    assert abs(dt_dh0.item() - 1 / math.sqrt(2 * G * 2.0)) < 1e-7
    # gradient of the event state: dv*/dh0 = -g / sqrt(2 g h0); the height stays 0 at the event
    dv_dh0, dx_dh0 = (torch.autograd.grad(sol[-1, i], h0, retain_graph=True)[0].item() for i in (1, 0))
    assert abs(dv_dh0 + G / math.sqrt(2 * G * 2.0)) < 1e-7
    assert abs(dx_dh0) < 1e-7


class _Gravity(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(g, dtype=F64))

    def forward(self, t, s):
        return torch.stack([s[1], -self.g * torch.ones_like(s[1])])


@pytest.mark.parametrize("grad", MODES)
def test_event_time_gradient_wrt_parameters(grad):
    func = _Gravity(G)
    y0 = torch.tensor([3.0, 0.0], dtype=F64)
    event_t, _ = odeint_event(func, y0, torch.tensor(0.0, dtype=F64), event_fn=height, rtol=1e-10, atol=1e-10,
                              grad=grad)
    (dt_dg,) = torch.autograd.grad(event_t, func.g)
    # t* = sqrt(2 h0 / g): dt*/dg = -t* / (2 g)
    expected = -math.sqrt(2 * 3.0 / G) / (2 * G)
    assert abs(dt_dg.item() - expected) < 1e-7


def test_chain_of_bounces_is_differentiable():
    """Three impacts with restitution e: t3 = t1 + 2 v1 (e + e^2) / g with v1 = sqrt(2 g h0),
    so dt3/dh0 = (1 + 2 e + 2 e^2) / sqrt(2 g h0)."""
    e, h = 0.8, 1.5
    h0 = torch.tensor(h, dtype=F64, requires_grad=True)
    state = torch.stack([h0, torch.zeros((), dtype=F64)])
    t = torch.tensor(0.0, dtype=F64)
    below_ground = lambda t, s: s[0] + 1e-12  # noqa: E731  (a root at t0 would be the event itself)
    for bounce in range(3):
        t, sol = odeint_event(ball, state, t, event_fn=below_ground, rtol=1e-10, atol=1e-10)
        state = torch.stack([torch.zeros((), dtype=F64), -e * sol[-1, 1]])  # restart exactly on the ground
    v1 = math.sqrt(2 * G * h)
    assert abs(t.item() - (math.sqrt(2 * h / G) + 2 * v1 * (e + e * e) / G)) < 1e-8
    (dt_dh0,) = torch.autograd.grad(t, h0)
    assert abs(dt_dh0.item() - (1 + 2 * e + 2 * e * e) / math.sqrt(2 * G * h)) < 1e-6


@pytest.mark.parametrize("grad", MODES)
def test_root_at_the_start_is_the_event(grad):
    """As in torchdiffeq: when the event function is zero at t0, the event is at t0."""
    y0 = torch.tensor([0.0, 3.0], dtype=F64, requires_grad=True)
    event_t, sol = odeint_event(_Gravity(G), y0, torch.tensor(0.5, dtype=F64), event_fn=height, grad=grad)
    assert event_t.item() == 0.5 and torch.equal(sol[0], sol[1])
    sol[-1].sum().backward()
    assert y0.grad is not None and torch.isfinite(y0.grad).all()


def test_reverse_time_event():
    # from the impact, backwards in time, the ball was at rest (v = 0) at t = 0 and height h0
    h = 2.0
    t_hit = math.sqrt(2 * h / G)
    y_hit = torch.tensor([0.0, -math.sqrt(2 * G * h)], dtype=F64)
    event_t, sol = odeint_event(ball, y_hit, torch.tensor(t_hit, dtype=F64), event_fn=lambda t, s: s[1],
                                reverse_time=True, rtol=1e-10, atol=1e-10)
    assert abs(event_t.item()) < 1e-9
    assert abs(sol[-1, 0].item() - h) < 1e-8


def test_event_with_tuple_state():
    def f(t, s):
        x, v = s
        return v, torch.full_like(v, -G)

    h0 = torch.tensor([2.0], dtype=F64, requires_grad=True)
    event_t, (xs, vs) = odeint_event(f, (h0, torch.zeros(1, dtype=F64)), torch.tensor(0.0, dtype=F64),
                                     event_fn=lambda t, s: s[0].sum(), rtol=1e-10, atol=1e-10)
    assert xs.shape == (2, 1) and vs.shape == (2, 1)
    assert abs(event_t.item() - math.sqrt(2 * 2.0 / G)) < 1e-9
    (d,) = torch.autograd.grad(event_t, h0)
    assert abs(d.item() - 1 / math.sqrt(2 * G * 2.0)) < 1e-7
