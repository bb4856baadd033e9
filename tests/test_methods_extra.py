"""The Adams methods, the fixed-step implicit Runge-Kutta methods and scipy_solver.

* convergence orders at fixed step sizes against closed-form solutions;
* gradients: gradcheck in float64 (y0, t, parameters), checkpoint and adjoint against direct;
* differential tests against torchdiffeq 0.2.5 (Adams, scipy_solver: the same numbers) and, when a
  rebuild of torchdiffeq master is available, against its implicit solvers;
* failure modes and bad input.

Measured (Cycle problem from solver_problems, float64, T = 2): the implicit methods converge at
orders 1.01, 2.00, 2.00, 3.05, 4.00, 5.01, 6.00, 2.00, 1.98 (implicit_euler .. trbdf2, steps
0.2 .. 0.05); explicit_adams at order 3 with max_order=4 and 4 with max_order=5, implicit_adams
at order 4 with max_order=4 (steps 0.04 .. 0.01).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import neuralode
from neuralode import METHODS, MaxStepsError, SolverError, odeint, record_stats
from neuralode.solvers.adams import BASHFORTH, MOULTON
from neuralode.solvers.implicit_fixed import TABLEAUS as IMPLICIT_TABLEAUS

from solver_problems import Cycle, empirical_order

F32, F64 = torch.float32, torch.float64
IMPLICIT = {"implicit_euler": 1, "implicit_midpoint": 2, "trapezoid": 2, "radauIIA3": 3, "gl4": 4, "radauIIA5": 5,
            "gl6": 6, "sdirk2": 2, "trbdf2": 2}
ADAMS = ("explicit_adams", "implicit_adams", "fixed_adams")
SYMPLECTIC = ("implicit_midpoint", "gl4", "gl6")  # Gauss methods: the backsolve adjoint is the discrete one
NOT_CONVERGED = "Functional iteration did not converge. Solution may be incorrect."


# -- problems ------------------------------------------------------------------------------------------
class Constant(nn.Module):
    """torchdiffeq's test problem: f = a + (y - (a t + b))^5, exact y = a t + b."""

    def __init__(self, dtype=F64):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.2, dtype=dtype))
        self.b = nn.Parameter(torch.tensor(3.0, dtype=dtype))

    def forward(self, t, y):
        return self.a + (y - (self.a * t + self.b)) ** 5


class Rotation(nn.Module):
    """y' = A y with an antisymmetric A (autonomous, linear)."""

    def __init__(self, dim=4, dtype=F64):
        super().__init__()
        u = torch.randn(dim, dim, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.5
        self.A = nn.Parameter((u - u.T).to(dtype))

    def forward(self, t, y):
        return y @ self.A.T


def _field(W, b):
    def f(t, y):
        return torch.tanh(y @ W.T) + b * torch.cos(t)
    return f


def _inputs():
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(2, generator=g, dtype=F64)
    W = torch.randn(2, 2, generator=g, dtype=F64) * 0.8
    b = torch.randn(2, generator=g, dtype=F64) * 0.5
    return [x.clone().requires_grad_(True) for x in (y0, W, b)]


def _options(method, **kw):
    return dict(kw, max_order=5) if method in ADAMS else kw


def _cycle_error(method, h, T=2.0, dtype=F64, **opts):
    cyc = Cycle()
    y = odeint(cyc, cyc.y0(dtype), torch.tensor([0.0, T], dtype=F64), method=method,
               options=dict(step_size=h, **opts), rtol=1e-12, atol=1e-12)
    return float(np.abs(y[-1].double().numpy() - cyc.exact(T)).max())


# -- the registry and the coefficient tables ----------------------------------------------------------
def test_registered_with_torchdiffeqs_names_orders_and_options():
    for name, order in IMPLICIT.items():
        m = METHODS[name]
        assert (m.kind, m.order, m.adaptive, m.multistep) == ("fixed_implicit", order, False, False)
        assert {"max_iters", "step_size", "perturb", "interp"} <= m.option_names
    for name in ADAMS:
        m = METHODS[name]
        assert (m.order, m.adaptive, m.multistep) == (4, False, True)
        assert {"max_order", "max_iters", "step_size"} <= m.option_names
    s = METHODS["scipy_solver"]
    assert (s.kind, s.adaptive) == ("scipy", False) and {"solver", "min_step", "max_step"} <= s.option_names


def test_adams_coefficients_integrate_polynomials_exactly():
    """k-step Bashforth (Moulton) weights reproduce int_0^1 u^q du for q < k on their nodes."""
    assert BASHFORTH[2] == [1.5, -0.5] and MOULTON[2] == [0.5, 0.5]
    assert MOULTON[4] == [9 / 24, 19 / 24, -5 / 24, 1 / 24]
    def exact_to_rounding(weights, nodes, q):  # each weight is off by at most half an ulp
        value = sum(Fraction(w) * x ** q for w, x in zip(weights, nodes))
        bound = sum(abs(w) * abs(x) ** q for w, x in zip(weights, nodes)) * 2.0 ** -52
        return abs(float(value - Fraction(1, q + 1))) <= bound

    for k, beta in BASHFORTH.items():
        assert all(exact_to_rounding(beta, [-j for j in range(k)], q) for q in range(k)), k
    for k, mu in MOULTON.items():
        assert all(exact_to_rounding(mu, [1 - j for j in range(k)], q) for q in range(k)), k


@pytest.mark.parametrize("tab", IMPLICIT_TABLEAUS, ids=lambda t: t.name)
def test_implicit_tableaus_are_consistent(tab):
    """Rows sum to the nodes; the weights integrate polynomials up to the order; gl4 has the
    correct (distinct) Gauss nodes."""
    for ci, row in zip(tab.c, tab.a):
        assert math.isclose(sum(row), ci, abs_tol=1e-15)
    for k in range(1, tab.order + 1):
        assert math.isclose(sum(b * c ** (k - 1) for b, c in zip(tab.b, tab.c)), 1 / k, abs_tol=1e-14)
    if tab.name == "gl4":
        assert tab.c == pytest.approx((0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6), abs=1e-16)


# -- convergence orders -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", IMPLICIT)
def test_implicit_convergence_order(method):
    hs = (0.2, 0.1, 0.05)
    errs = [_cycle_error(method, h) for h in hs]
    order = empirical_order(hs, errs)
    assert abs(order - IMPLICIT[method]) < 0.3, (errs, order)


@pytest.mark.parametrize("method,max_order,order", [("explicit_adams", 4, 3), ("explicit_adams", 5, 4),
                                                    ("implicit_adams", 4, 4), ("fixed_adams", 4, 4)])
def test_adams_convergence_order(method, max_order, order):
    """Order max_order - 1 explicit (max_order with the corrector), capped at 4 by the start-up."""
    hs = (0.04, 0.02, 0.01)
    errs = [_cycle_error(method, h, max_order=max_order, max_iters=20) for h in hs]
    assert abs(empirical_order(hs, errs) - order) < 0.3, errs


@pytest.mark.parametrize("method", IMPLICIT)
def test_implicit_float32_reaches_float64_accuracy(method):
    """Newton converges in float32 too: the error is the method's, not roundoff's."""
    e64, e32 = _cycle_error(method, 0.1, T=1.0), _cycle_error(method, 0.1, T=1.0, dtype=F32)
    assert abs(e32 - e64) < 2e-6 + 0.05 * e64


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_torchdiffeq_master_accuracy_expectations(dtype, reverse):
    """Master's TestSolverError for its implicit solvers: no step_size (steps on t = 1 .. 8),
    float64 t, relative error below 3e-4 on the constant problem and 5e-2 on y' = -0.1 exp(-t/10)."""
    t = torch.linspace(1, 8, 10, dtype=F64)
    t = t.flip(0) if reverse else t
    for method in IMPLICIT:
        f = Constant(dtype)
        exact = (f.a * t + f.b).detach().to(dtype)[:, None]
        y = odeint(f, exact[0], t, method=method)
        assert ((y - exact) / exact).abs().max() < 3e-4, method
        exact = torch.exp(-0.1 * t).to(dtype)[:, None]
        y = odeint(lambda s, y: -0.1 * torch.exp(-0.1 * s) * torch.ones_like(y), exact[0], t, method=method)
        assert ((y - exact) / exact).abs().max() < 5e-2, method


def test_stiff_decay_at_large_steps():
    """y' = -1000 (y - cos t) - sin t: stable and accurate at h = 0.1 (h * lambda = -100)."""
    f = lambda t, y: -1000 * (y - torch.cos(t)) - torch.sin(t)  # noqa: E731
    t = torch.linspace(0, 1, 11, dtype=F64)
    bounds = {"implicit_euler": 1e-4, "radauIIA3": 1e-5, "radauIIA5": 1e-7, "trbdf2": 1e-5, "gl6": 1e-6}
    for method, bound in bounds.items():
        y = odeint(f, torch.ones(1, dtype=F64), t, method=method)
        assert (y[:, 0] - torch.cos(t)).abs().max() < bound, method


# -- gradients --------------------------------------------------------------------------------------------------
GRAD_METHODS = (*IMPLICIT, "explicit_adams", "implicit_adams")


def _solve_grad(method, mode, y0, W, b, step=0.2):
    t = torch.tensor([0.0, 0.2, 0.6], dtype=F64)
    return odeint(_field(W, b), y0, t, method=method, options=_options(method, step_size=step), grad=mode,
                  adjoint_params=(W, b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_gradcheck_direct_y0_and_parameters(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit_adams at rtol 1e-10 in 4 iterations: not converged
        assert torch.autograd.gradcheck(lambda *a: _solve_grad(method, "direct", *a), _inputs(), eps=1e-6,
                                        atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_gradcheck_direct_time_on_the_constant_problem(method):
    """torchdiffeq's gradient test: y0 and every t_i (the grid is t) on a problem the methods
    integrate exactly, where d y(t_i) / d t_i = f is also the discrete derivative."""
    f = Constant()
    t = torch.linspace(1, 4, 4, dtype=F64, requires_grad=True)
    y0 = torch.tensor([3.2], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y0, t: odeint(f, y0, t, method=method), (y0, t))


def _grads(method, mode, step=0.2):
    y0, W, b = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _solve_grad(method, mode, y0, W, b, step)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=F64).view_as(out)
    return torch.autograd.grad((out * weights).sum(), (y0, W, b))


def _rel(a, b):
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("method", IMPLICIT)
def test_checkpoint_gradient_equals_direct(method):
    """Replay re-solves the stage equations to roundoff: the gradient is direct mode's."""
    assert _rel(_grads(method, "checkpoint"), _grads(method, "direct")) < 1e-9


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
def test_adams_checkpoint_gradient_equals_direct(method):
    assert _rel(_grads(method, "checkpoint"), _grads(method, "direct")) < 1e-9


# The backsolve adjoint discretises the continuous adjoint: it differs from the discrete gradient
# by the methods' truncation error (bounds: ~3x the differences measured at h = 0.2), except for the symplectic Gauss
# methods, for which the two coincide.
ADJOINT_BOUNDS = {"implicit_euler": 0.3, "trapezoid": 0.025, "sdirk2": 8e-3, "trbdf2": 0.012, "radauIIA3": 2e-3,
                  "radauIIA5": 1e-6, "explicit_adams": 0.015, "implicit_adams": 1e-3, **{m: 1e-10 for m in SYMPLECTIC}}


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_adjoint_gradient_agrees_with_direct(method):
    assert _rel(_grads(method, "adjoint"), _grads(method, "direct")) < ADJOINT_BOUNDS[method]


def test_matrix_free_and_batched_newton_agree_with_dense():
    """GMRES with Jacobian-vector products (forward and the transposed backward solve) and
    per-row Jacobian blocks give the dense path's solution and gradient."""
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(3, 3, generator=g, dtype=F64) * 0.7).requires_grad_(True)
    y0 = torch.randn(3, 3, generator=g, dtype=F64).requires_grad_(True)  # 3 independent rows
    f = lambda t, y: torch.tanh(y @ W.T) - 0.5 * y  # noqa: E731
    t = torch.tensor([0.0, 0.4], dtype=F64)
    for method in ("gl4", "trbdf2"):
        results = []
        for opts in (dict(linear_solver="dense", batch_jacobian=False),
                     dict(linear_solver="dense", batch_jacobian=True), dict(linear_solver="gmres")):
            y = odeint(f, y0, t, method=method, options=dict(step_size=0.2, **opts))
            results.append((y.detach(), *torch.autograd.grad(y[-1].pow(2).sum(), (y0, W))))
        for other in results[1:]:
            for a, b in zip(other, results[0]):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# -- failure modes and bad input ------------------------------------------------------------------------
def test_newton_failure_raises_solver_error_naming_t_and_step():
    f = lambda t, y: y * y  # noqa: E731  implicit Euler: y1 = 1 + 0.5 y1^2 has no real root
    with pytest.raises(SolverError, match=r"t=0\b.*step 0\.5"):
        odeint(f, torch.ones(1, dtype=F64), torch.tensor([0.0, 0.5], dtype=F64), method="implicit_euler")
    cyc = Cycle()
    with pytest.raises(SolverError, match="did not converge"):
        odeint(cyc, cyc.y0(), torch.tensor([0.0, 1.0], dtype=F64), method="gl6", options=dict(max_iters=1))


def test_implicit_refuses_half_precision_and_complex_states():
    f = lambda t, y: -y  # noqa: E731
    with pytest.raises(TypeError, match="float32 or float64"):
        odeint(f, torch.ones(2, dtype=torch.float16), torch.tensor([0.0, 1.0]), method="radauIIA5")
    with pytest.raises(ValueError, match="complex"):
        odeint(f, torch.ones(2, dtype=torch.complex64), torch.tensor([0.0, 1.0]), method="gl4")


def test_implicit_stepper_refuses_half_precision_in_an_adjoint_solve():
    y0 = torch.ones(2, dtype=torch.float16, requires_grad=True)
    y = odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]), method="rk4", options=dict(step_size=0.25),
               grad="adjoint", adjoint_method="gl4", adjoint_options=dict(step_size=0.25), adjoint_params=())
    with pytest.raises(TypeError, match="float32 or float64"):
        y.sum().backward()


@pytest.mark.parametrize("method", [*IMPLICIT, "explicit_adams", "implicit_adams"])
def test_fixed_grid_events_and_perturb(method):
    """Event location on the (cubic) dense output; perturb=True never evaluates f on the grid."""
    f, target = Constant(), 0.2 * 1.7 + 3.0
    t_event, ys = odeint(f, torch.tensor([3.2], dtype=F64), torch.tensor([1.0, 2.0], dtype=F64), method=method,
                         event_fn=lambda t, y: (y - target).sum(), options=dict(step_size=0.05, interp="cubic"))
    assert abs(t_event.item() - 1.7) < 1e-12 and abs(ys[-1].item() - target) < 1e-12
    seen = []

    def g(t, y):
        seen.append(t.item())
        return -y

    odeint(g, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method=method,
           options=dict(step_size=0.5, perturb=True))
    assert not {0.0, 0.5, 1.0} & set(seen)


def test_newton_statistics_are_recorded():
    cyc = Cycle()
    with record_stats() as stats:
        odeint(cyc, cyc.y0(), torch.tensor([0.0, 1.0], dtype=F64), method="radauIIA5", options=dict(step_size=0.1))
    assert stats.n_jac >= 1 and stats.n_newton_iters >= 10 and stats.n_linear_solves >= stats.n_newton_iters
    assert stats.nfe_forward >= 3 * stats.n_newton_iters


def test_adams_max_order_checks_and_rk4_fallback():
    f, y0, t = Constant(), torch.tensor([3.2], dtype=F64), torch.linspace(1, 8, 6, dtype=F64)
    with pytest.raises(AssertionError, match="max_order must be at most 12"):
        odeint(f, y0, t, method="implicit_adams", options=dict(max_order=13))
    cyc = Cycle()
    with pytest.warns(UserWarning, match="max_order is below 4, so the solver reduces to `rk4`"):
        y = odeint(cyc, cyc.y0(), torch.linspace(0, 1, 5, dtype=F64), method="explicit_adams",
                   options=dict(max_order=3))
    torch.testing.assert_close(y, odeint(cyc, cyc.y0(), torch.linspace(0, 1, 5, dtype=F64), method="rk4"),
                               rtol=1e-14, atol=1e-15)


def test_adams_corrector_warns_when_not_converged_and_supports_complex():
    cyc = Cycle()
    with pytest.warns(UserWarning, match=NOT_CONVERGED):
        odeint(cyc, cyc.y0(), torch.tensor([0.0, 1.0], dtype=F64), method="implicit_adams",
               options=dict(step_size=0.1, max_iters=1), rtol=1e-14, atol=1e-14)
    t = torch.linspace(0, 1, 3, dtype=F64)
    for method in ("explicit_adams", "implicit_adams"):
        y = odeint(lambda t, y: 1j * y, torch.ones(1, dtype=torch.complex128), t, method=method,
                   options=dict(step_size=0.01, max_order=5), rtol=1e-10, atol=1e-12)
        assert (y[:, 0] - torch.exp(1j * t)).abs().max() < 1e-8


# -- scipy_solver ----------------------------------------------------------------------------------------------
def test_scipy_solver_values_nfe_and_no_gradients():
    """func runs under no_grad with t in y's dtype; outputs never require grad; NFE is counted."""
    seen = []

    def f(t, y):
        seen.append((t.dtype, torch.is_grad_enabled()))
        return torch.stack([y[1], -y[0]])

    y0 = torch.tensor([1.0, 0.0], requires_grad=True)
    t = torch.linspace(0, 2, 5, dtype=F64)
    with record_stats() as stats:
        y = odeint(f, y0, t, method="scipy_solver", options=dict(solver="DOP853"), rtol=1e-6, atol=1e-8)
    assert not y.requires_grad and y.dtype == F32 and y.shape == (5, 2)
    assert set(seen) == {(F32, False)} and stats.nfe_forward == len(seen)
    torch.testing.assert_close(y[:, 0], torch.cos(t).float(), rtol=1e-5, atol=1e-5)
    back = odeint(f, y[-1].detach(), t.flip(0), method="scipy_solver", rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(back[-1], y0.detach(), rtol=1e-5, atol=1e-5)
    n = len(seen)
    assert torch.equal(odeint(f, y0, t[:1], method="scipy_solver"), y0.detach()[None]) and len(seen) == n


def test_scipy_solver_tuple_state_with_per_component_tolerances():
    f = lambda t, y: (-y[0], -2 * y[1])  # noqa: E731
    y0 = (torch.ones(2, dtype=F64), torch.ones(3, dtype=F64))
    a, b = odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64), method="scipy_solver", rtol=(1e-10, 1e-8),
                  atol=(1e-12, 1e-10), options=dict(solver="RK45"))
    torch.testing.assert_close(a[-1], torch.full((2,), math.exp(-1), dtype=F64), rtol=1e-8, atol=0)
    torch.testing.assert_close(b[-1], torch.full((3,), math.exp(-2), dtype=F64), rtol=1e-6, atol=0)


def test_scipy_solver_refusals_and_failures(monkeypatch):
    f = lambda t, y: -y  # noqa: E731
    y0, t = torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    for grad in ("adjoint", "checkpoint"):
        with pytest.raises(ValueError, match="scipy_solver"):
            odeint(f, y0, t, method="scipy_solver", grad=grad, adjoint_params=())
    with pytest.raises(ValueError):
        odeint(f, y0, t, method="scipy_solver", event_fn=lambda t, y: y[0] - 0.5)

    class WithCallback(nn.Module):
        def forward(self, t, y):
            return -y

        def callback_step(self, t0, y0, dt):
            pass

    with pytest.warns(UserWarning, match="Solver 'scipy_solver' does not support callbacks"):
        odeint(WithCallback(), y0, t, method="scipy_solver")
    with pytest.raises(SolverError, match="scipy_solver .RK45. failed near t="):  # y' = y^2 blows up at t = 1
        odeint(lambda t, y: y * y, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
               method="scipy_solver", options=dict(solver="RK45"))
    with pytest.raises(MaxStepsError, match="max_nfe=20"):
        odeint(f, y0, torch.tensor([0.0, 100.0], dtype=F64), method="scipy_solver", options=dict(max_nfe=20))
    with pytest.raises(ValueError, match="complex"):  # LSODA integrates real states only
        odeint(lambda t, y: 1j * y, torch.ones(1, dtype=torch.complex128), t, method="scipy_solver")
    monkeypatch.setitem(sys.modules, "scipy.integrate", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        odeint(f, y0, t, method="scipy_solver")


def test_scipy_solver_complex_state():
    t = torch.linspace(0, 1, 3, dtype=F64)
    y = odeint(lambda t, y: 1j * y, torch.ones(1, dtype=torch.complex128), t, method="scipy_solver",
               options=dict(solver="RK45"), rtol=1e-10, atol=1e-12)
    assert (y[:, 0] - torch.exp(1j * t)).abs().max() < 1e-8


def test_scipy_solver_outputs_do_not_require_grad_for_t():
    t = torch.linspace(0, 1, 3, dtype=F64, requires_grad=True)
    assert not odeint(lambda t, y: -y, torch.ones(1, dtype=F64), t, method="scipy_solver").requires_grad


# -- differential tests against torchdiffeq 0.2.5 ------------------------------------------------------
def _run_both(tdq, method, make, dtype, reverse, options, **kw):
    """(outputs, NFE, warning messages) of torchdiffeq and neuralode on the same call."""
    out = []
    for lib in (tdq, neuralode):
        f, y0, t = make(dtype, reverse)
        calls = []

        def g(s, y, f=f, calls=calls):
            calls.append(s)
            return f(s, y)

        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = lib.odeint(g, y0, t, method=method, options=dict(options), **kw)
        msgs = sorted(str(m.message) for m in w if str(m.message).startswith(("Functional iteration", "max_order")))
        out.append((y.detach(), len(calls), msgs))
    return out


def _constant(dtype, reverse=False):
    f = Constant(dtype)
    t = torch.linspace(1, 8, 10, dtype=dtype)
    t = t.flip(0) if reverse else t
    return f, (f.a * t[0] + f.b).detach().reshape(1), t


def _rotation(dtype, reverse=False):
    t = torch.linspace(0, 2, 5, dtype=dtype)
    return Rotation(dtype=dtype), torch.linspace(-1, 1, 4, dtype=dtype), t.flip(0) if reverse else t


def _cycle(dtype, reverse=False):
    cyc = Cycle()
    t = torch.linspace(0, 3, 7, dtype=dtype)
    return cyc, cyc.y0(dtype), t.flip(0) if reverse else t


ADAMS_CASES = [
    (_constant, {}, {}),
    (_constant, {}, dict(rtol=1e-3, atol=1e-4)),
    (_rotation, dict(step_size=0.05, max_order=6), {}),
    (_cycle, dict(step_size=0.05, max_order=5), dict(rtol=1e-3, atol=1e-4)),
    (_cycle, dict(step_size=0.1, max_order=8), {}),  # the corrector does not converge on two steps
    (_cycle, dict(step_size=0.2, max_order=2), {}),  # RK4 only
]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
def test_adams_matches_torchdiffeq(method, dtype, reverse):
    """The same numbers (to roundoff; bit for bit in practice), NFE and warnings."""
    tdq = pytest.importorskip("torchdiffeq")
    for make, options, kw in ADAMS_CASES:
        (a, na, wa), (b, nb, wb) = _run_both(tdq, method, make, dtype, reverse, options, **kw)
        torch.testing.assert_close(b, a, rtol=1e-13 if dtype == F64 else 1e-6, atol=0)
        assert (nb, wb) == (na, wa), (make.__name__, options)


def test_adams_tables_and_option_checks_match_torchdiffeq():
    tdq = pytest.importorskip("torchdiffeq")
    from torchdiffeq._impl import fixed_adams as ref

    for k, beta in BASHFORTH.items():
        assert beta == [c / ref._DIVISOR[k] for c in ref._BASHFORTH_COEFFICIENTS[k]], k
    for k, mu in MOULTON.items():
        assert mu == [c / ref._DIVISOR[k] for c in ref._MOULTON_COEFFICIENTS[k]], k
    f, y0, t = _constant(F64)
    for lib in (tdq, neuralode):
        with pytest.raises(AssertionError, match="max_order must be at most 12"):
            lib.odeint(f, y0, t, method="explicit_adams", options=dict(max_order=13))
        with pytest.warns(UserWarning, match="max_order is below 4, so the solver reduces to `rk4`."):
            lib.odeint(f, y0, t, method="implicit_adams", options=dict(max_order=3))


SCIPY_SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")


@pytest.mark.parametrize("dtype,reverse", [(F64, False), (F32, True)])
@pytest.mark.parametrize("solver", SCIPY_SOLVERS)
def test_scipy_solver_matches_torchdiffeq(solver, dtype, reverse):
    """Identical outputs and NFE, except two deliberate differences that only LSODA shows:
    torchdiffeq hands func a time rounded to float32 whenever scipy passes t as a Python float
    (LSODA does; it matters for non-autonomous f), and it asks for the outputs at float32 times
    when t is float32, which makes LSODA evaluate its interpolant in float32."""
    tdq = pytest.importorskip("torchdiffeq")
    pytest.importorskip("scipy")
    for make in (_rotation, _constant):
        (a, na, _), (b, nb, _) = _run_both(tdq, "scipy_solver", make, dtype, reverse, dict(solver=solver))
        if solver == "LSODA" and (make is _constant or dtype == F32):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b) and na == nb, make.__name__


# -- torchdiffeq master's implicit solvers (a local rebuild, when available) ---------------------------------
MASTER = os.environ.get("TORCHDIFFEQ_MASTER", "/tmp/tdq_master")
_MASTER_SCRIPT = """
import json, warnings, torch
import torchdiffeq
u = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
A = u - u.T
out = {}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for m in %r:
        y = torchdiffeq.odeint(lambda t, y: y @ A.T, torch.linspace(-1, 1, 4, dtype=torch.float64),
                               torch.linspace(0, 2, 5, dtype=torch.float64), method=m, options=dict(step_size=0.1))
        out[m] = y.tolist()
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(MASTER, "torchdiffeq")),
                    reason="no torchdiffeq master rebuild (set TORCHDIFFEQ_MASTER)")
def test_implicit_methods_match_torchdiffeq_master():
    """Same tableaus: agreement to master's Broyden tolerance (absolute 1e-8 on the residual)."""
    env = dict(os.environ, PYTHONPATH=MASTER)
    run = subprocess.run([sys.executable, "-c", _MASTER_SCRIPT % (list(IMPLICIT),)], env=env, capture_output=True,
                         text=True, check=True)
    ref = json.loads(run.stdout)
    f, y0, t = _rotation(F64)
    for method in IMPLICIT:
        y = odeint(f, y0, t, method=method, options=dict(step_size=0.1))
        torch.testing.assert_close(y.detach(), torch.tensor(ref[method], dtype=F64), rtol=0, atol=1e-7)
