"""grad="reversible" (McCallum & Foster 2024): the reconstructing backward pass gives the gradient
of the reversible forward solve (the same solve recorded op by op by autograd, ``unrolled``), its
limits (contracting dynamics: clear errors, reconstruction error reported), memory that does not
grow with the number of steps, bad input, and the runner.

Measured (float64, this machine): gradients agree with ``unrolled`` to ~1e-15 relative for every
method below. Lorenz (1, 1, 1), dopri5, rtol=atol=1e-8: with the default coupling 0.999 the coupled
states separate by 1e-4 of |y| before t = 1 and the forward pass stops (SolverError); with
coupling=0.9 T = 1 works (reconstruction error 5e-9, gradient within 1e-5 of checkpoint's), and
beyond T ~ 2 no coupling works: the reconstruction runs a volume-contracting system
(e^{-13.7 t}) backwards, so rounding errors grow past float64 and the backward pass stops with a
SolverError (the reconstructed state is NaN at T = 5 and T = 10).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralode import Checkpoint, Reversible, SolverError, SolverSettings, odeint, record_stats
from neuralode.solvers.odeint import Run, Setup, _grid, check_t
from neuralode.solvers.reversible import unrolled

from conftest import TINY, scalars, train_here
from solver_problems import TupleField, lorenz

F64 = torch.float64
METHODS = [("dopri5", {}), ("tsit5", {}), ("bosh3", {}), ("dopri8", {}),
           ("rk4", {"step_size": 0.05}), ("dopri5", {"step_size": 0.1}), ("midpoint", {"step_size": 0.1})]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(2, 2, generator=g, dtype=F64) * 0.8).requires_grad_(True)
    b = (torch.randn(2, generator=g, dtype=F64) * 0.5).requires_grad_(True)
    y0 = torch.randn(2, generator=g, dtype=F64).requires_grad_(True)
    v = torch.randn(3, 2, generator=g, dtype=F64)  # loss = <v, ys>

    def f(t, y):
        return torch.tanh(y @ W.T) + b * torch.cos(t)
    return f, y0, W, b, v


def _unrolled(settings, func, y0, t):
    """The reversible solve with autograd recording every operation (what solve_ivp would run)."""
    ts = check_t(t)
    setup = Setup(settings, func, y0, ts)
    return unrolled(Run(setup, ts, _grid(setup, t, ts), None), setup.y0), setup


@pytest.mark.parametrize("method,options", METHODS, ids=[f"{m}{'-fixed' if o else ''}" for m, o in METHODS])
def test_gradient_equals_backprop_through_the_same_solve(method, options):
    f, y0, W, b, v = _problem()
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    s = SolverSettings(method=method, rtol=1e-6, atol=1e-8, options=options, grad="reversible")
    with record_stats() as stats:
        ys = s.odeint(f, y0, t, adjoint_params=(W, b))
        got = torch.autograd.grad((ys * v).sum(), (y0, W, b))
    ref_ys, _ = _unrolled(s, f, y0, t)
    ref = torch.autograd.grad((ref_ys * v).sum(), (y0, W, b))
    assert torch.equal(ys, ref_ys)  # the same forward solve
    for a, r in zip(got, ref):
        assert _rel(a, r) < 1e-8
    assert stats.reconstruction_error < 1e-12  # 0 or a few ulps: nothing contracts here
    assert 0 <= stats.coupling_drift < 1e-3 and stats.n_accepted_backward == stats.n_accepted


def test_time_gradient():
    """t gets dL/dt_i = <dL/dy_i, f(t_i, y_i)> at the outputs and -<a_0, f(t0, y0)> at t0, a_0 the
    gradient reaching y0 through the solve (as in every mode: exact for the ODE, for the solve up to
    its tolerance)."""
    f, y0, W, b, v = _problem()
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64, requires_grad=True)
    ys = odeint(f, y0, t, rtol=1e-9, atol=1e-9, grad="reversible", adjoint_params=(W, b))
    g_y0, g_t = torch.autograd.grad((ys * v).sum(), (y0, t))
    with torch.no_grad():
        fs = torch.stack([f(ti, yi) for ti, yi in zip(t, ys)])
        expect = (v * fs).sum(-1)
        expect[0] = -((g_y0 - v[0]) * fs[0]).sum()  # the output y(t0) = y0 does not move with t0
    assert _rel(g_t, expect) < 1e-8
    y0d = y0.detach().requires_grad_(True)
    td = t.detach().requires_grad_(True)
    yd = odeint(f, y0d, td, rtol=1e-9, atol=1e-9, grad="direct")
    assert _rel(g_t, torch.autograd.grad((yd * v).sum(), td)[0]) < 1e-5  # direct differentiates its own steps


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.1}), ("dopri5", {})])
def test_gradcheck(method, options):
    f0, y0, W, b, _ = _problem(1)

    def fn(y0, W, b):
        def f(t, y):
            return torch.tanh(y @ W.T) + b * torch.cos(t)
        return odeint(f, y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), rtol=1e-10, atol=1e-10, method=method,
                      options=options, grad="reversible", adjoint_params=(W, b))

    assert torch.autograd.gradcheck(fn, (y0, W, b), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_tuple_state():
    t = torch.linspace(0, 2, 3, dtype=F64)
    func = TupleField()
    x0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    v0 = torch.tensor([[0.2], [0.4]], dtype=F64, requires_grad=True)
    xs, vs = odeint(func, (x0, v0), t, rtol=1e-8, atol=1e-8, method="tsit5", grad="reversible")
    assert xs.shape == (3, 2) and vs.shape == (3, 2, 1)
    inputs = [x0, v0, func.k, func.c]
    got = torch.autograd.grad((xs[-1] ** 2).sum() + vs[1:].sum() * 0.5, inputs)
    flat, setup = _unrolled(SolverSettings(method="tsit5", rtol=1e-8, atol=1e-8, grad="reversible"), func, (x0, v0), t)
    rx, rv = setup.structure.unflatten(flat, (3,))
    ref = torch.autograd.grad((rx[-1] ** 2).sum() + rv[1:].sum() * 0.5, inputs)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and _rel(a, r) < 1e-8


def test_without_gradients_it_is_the_ordinary_solve():
    f, y0, W, b, _ = _problem()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad(), record_stats() as stats:
        ys = odeint(f, y0, t, grad="reversible", adjoint_params=(W, b))
        ref = odeint(f, y0, t, grad="direct")
    assert torch.equal(ys, ref) and math.isnan(stats.coupling_drift)


# -- contracting dynamics: Lorenz --------------------------------------------------------------------

LORENZ_V = torch.tensor([0.3, -0.5, 0.8], dtype=F64)


def _lorenz(T, grad):
    y0 = torch.ones(3, dtype=F64, requires_grad=True)
    with record_stats() as stats:
        yT = odeint(lorenz, y0, torch.tensor([0.0, T], dtype=F64), rtol=1e-8, atol=1e-8, grad=grad, adjoint_params=())
        g = torch.autograd.grad(yT[-1] @ LORENZ_V, y0)[0]
    return g, stats


def test_lorenz_default_coupling_stops_in_the_forward_pass():
    """T = 10 at rtol=1e-8: the spurious mode grows by ~lambda*e^{0.2} a step (Lorenz contracts at
    ~-22 along its stable direction); the solve stops early with the alternatives named."""
    with pytest.raises(SolverError, match=r"unstable.*grad='checkpoint'.*coupling"):
        _lorenz(10.0, "reversible")


def test_lorenz_short_horizon_reconstruction_error_is_reported_and_bounded():
    g, stats = _lorenz(1.0, Reversible(coupling=0.9))
    ref, _ = _lorenz(1.0, Checkpoint())
    print(f"Lorenz T=1 coupling 0.9: reconstruction error {stats.reconstruction_error:.2e}, "
          f"drift {stats.coupling_drift:.2e}, gradient vs checkpoint {_rel(g, ref):.2e}")
    assert 0 < stats.reconstruction_error < 1e-6
    assert _rel(g, ref) < 1e-4


@pytest.mark.parametrize("T", [2.0, pytest.param(10.0, marks=pytest.mark.slow)])
def test_lorenz_long_horizon_reconstruction_fails_clearly(T):
    """With a coupling that keeps the forward pass stable, running Lorenz backwards amplifies
    rounding errors by ~e^{14.6 T}: the backward pass reports it and stops."""
    expected = r"reconstructed state at t=0 is off by .*grad='checkpoint'"
    with record_stats() as stats, pytest.raises(SolverError, match=expected):
        _lorenz(T, Reversible(coupling=0.5))
    assert not stats.reconstruction_error <= 1e-3  # NaN or large: recorded, not hidden


# -- memory ------------------------------------------------------------------------------------------

class _MLP(nn.Module):
    def __init__(self, d=8, h=16):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y)))


def _peak(grad, n_steps, method="midpoint"):
    torch.manual_seed(0)
    func, y0 = _MLP(), torch.randn(4, 8, requires_grad=True)
    with record_stats(memory=True) as stats:
        ys = odeint(func, y0, torch.tensor([0.0, 1.0]), method=method, options=dict(step_size=1 / n_steps), grad=grad)
        ys[-1].sum().backward()
    assert stats.mem_source in ("autograd", "cuda") and stats.n_accepted == n_steps
    return stats.mem_peak


@pytest.mark.parametrize("few,many", [(10, 200), pytest.param(100, 10_000, marks=pytest.mark.slow)])
def test_memory_does_not_grow_with_steps(few, many):
    """Extra memory (bytes autograd holds for backward) of an MLP field: constant for reversible,
    proportional to the steps for direct."""
    rev = _peak("reversible", many) / _peak("reversible", few)
    direct = _peak("direct", many) / _peak("direct", few)
    print(f"{few} -> {many} steps: reversible x{rev:.2f}, direct x{direct:.1f}")
    assert rev < 1.5
    assert direct > 0.5 * many / few


# -- bad input ---------------------------------------------------------------------------------------

def test_implicit_method_is_refused_with_alternatives():
    with pytest.raises(ValueError, match=r"explicit Runge-Kutta.*grad='checkpoint'"):
        SolverSettings(method="kvaerno5", grad="reversible")


def test_per_sample_stepping_is_refused_with_alternatives():
    with pytest.raises(ValueError, match=r"per_sample.*grad='checkpoint'"):
        SolverSettings(method="dopri5", options=dict(per_sample=True), grad="reversible")


def test_events_are_refused_with_alternatives():
    y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=r"event_fn.*grad='checkpoint'"):
        odeint(lambda t, y: -y, y0, torch.tensor([0.0, 5.0], dtype=F64), grad="reversible", adjoint_params=(),
               event_fn=lambda t, y: y[0] - 0.5)


@pytest.mark.parametrize("coupling", [1, 1.0, 0, 0.0, -0.5, 1.5])
def test_bad_coupling(coupling):
    with pytest.raises(ValueError, match=r"Reversible\(coupling=.*0\.999"):
        Reversible(coupling=coupling)


# -- runner ------------------------------------------------------------------------------------------

def test_runner_trains_with_reversible_and_logs_peak_memory(fake_mnist, tmp_path):
    out = tmp_path / "run"
    assert train_here("model=odenet", f"data_dir={fake_mnist}", "solver.grad=reversible", "trainer=smoke", *TINY,
                      run_dir=out) == 0
    tags = scalars(out)
    peaks = [v for _, v in tags["mem/peak"]]
    assert len(peaks) == 2 and all(v > 0 for v in peaks)
    assert all(v > 0 for _, v in tags["nfe/backward"])
