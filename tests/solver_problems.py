"""Test problems with known solutions for the solver tests (plain helpers, no pytest fixtures)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

# Theoretical orders of every explicit method in neuralode.METHODS.
ORDERS = {
    "euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4,
    "fehlberg2": 2, "adaptive_heun": 2, "bosh3": 3, "dopri5": 5, "tsit5": 5, "dopri8": 8,
}
FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4")
ADAPTIVE = ("fehlberg2", "adaptive_heun", "bosh3", "dopri5", "tsit5", "dopri8")


class Cycle:
    """A nonlinear, non-autonomous 2-D system with a closed-form solution.

    In polar coordinates r' = r (1 - r^2), theta' = a + b cos(t); in Cartesian form
        x' = x (1 - r^2) - w(t) y,   y' = y (1 - r^2) + w(t) x,   w(t) = a + b cos t,
    so r(t) = 1 / sqrt(1 + (1/r0^2 - 1) e^{-2t}) and theta(t) = a t + b sin t.
    With a = b = 0.5, r0 = 0.2 the errors of all methods (tsit5 and dopri5 included, whose
    leading error constants are small) reach their asymptotic order well above float64 roundoff.
    """

    a, b, r0 = 0.5, 0.5, 0.2

    def __call__(self, t, z):
        x, y = z[..., 0], z[..., 1]
        r2 = x * x + y * y
        w = self.a + self.b * torch.cos(t)
        return torch.stack([x * (1 - r2) - w * y, y * (1 - r2) + w * x], -1)

    def y0(self, dtype=torch.float64):
        return torch.tensor([self.r0, 0.0], dtype=dtype)

    def exact(self, t) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        r = 1 / np.sqrt(1 + (1 / self.r0**2 - 1) * np.exp(-2 * t))
        th = self.a * t + self.b * np.sin(t)
        return np.stack([r * np.cos(th), r * np.sin(th)], -1)


def lorenz(t, u, sigma=10.0, rho=28.0, beta=8.0 / 3.0):
    x, y, z = u.unbind(-1)
    return torch.stack([sigma * (y - x), x * (rho - z) - y, x * y - beta * z], -1)


def lorenz_np(t, u, sigma=10.0, rho=28.0, beta=8.0 / 3.0):
    x, y, z = u
    return [sigma * (y - x), x * (rho - z) - y, x * y - beta * z]


def van_der_pol_np(mu):
    def f(t, u):
        return [u[1], mu * (1 - u[0] ** 2) * u[1] - u[0]]
    return f


def van_der_pol(mu):
    def f(t, u):
        x, v = u.unbind(-1)
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)
    return f


def scipy_reference(f_np, y0, ts, rtol=1e-12, atol=1e-12) -> np.ndarray:
    """The state at every ts[i] from scipy's DOP853 at tight tolerance, shape (len(ts), n)."""
    from scipy.integrate import solve_ivp

    ts = np.asarray(ts, dtype=np.float64)
    sol = solve_ivp(f_np, (ts[0], ts[-1]), np.asarray(y0, dtype=np.float64), method="DOP853", t_eval=ts,
                    rtol=rtol, atol=atol)
    assert sol.success, sol.message
    return sol.y.T


class TanhMLP(nn.Module):
    """A small vector field with parameters, for gradient tests."""

    def __init__(self, dim=2, hidden=8, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(dim, hidden, generator=g, dtype=dtype) / math.sqrt(dim))
        self.b1 = nn.Parameter(torch.randn(hidden, generator=g, dtype=dtype) * 0.1)
        self.w2 = nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=dtype) / math.sqrt(hidden))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1 + self.b1 + 0.5 * torch.sin(t)) @ self.w2


def empirical_order(hs, errs) -> float:
    """Least-squares slope of log(err) against log(h)."""
    return float(np.polyfit(np.log(np.asarray(hs)), np.log(np.asarray(errs)), 1)[0])


class TupleField(nn.Module):
    """A tuple state of two shapes, x: (2,) and v: (2, 1), with parameters in both derivatives."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor([0.7, 1.3], dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(0.2, dtype=torch.float64))

    def forward(self, t, state):
        x, v = state
        return v.reshape(2) * self.k, (-x * self.k - self.c * torch.sin(t) * x ** 2).reshape(2, 1)
