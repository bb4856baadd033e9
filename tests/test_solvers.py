"""Forward behaviour of the solvers: convergence order, dense output, accuracy against known
solutions and scipy, tolerance scaling, statistics, stops, controllers, dtypes and shapes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuralode import METHODS, odeint, record_stats

from solver_problems import ADAPTIVE, FIXED, ORDERS, Cycle, empirical_order, scipy_reference, van_der_pol, van_der_pol_np

F64 = torch.float64


def test_method_registry_covers_the_spec():
    assert set(ORDERS) <= set(METHODS)
    for name, order in ORDERS.items():
        assert METHODS[name].order == order
        assert METHODS[name].adaptive == (name in ADAPTIVE)


# ---------------------------------------------------------------------------------------------
# Convergence order at fixed steps
# ---------------------------------------------------------------------------------------------

T_CONV = 4.0
# Step counts (h = T/N, N a multiple of 4 so the outputs at 0, 1, .., 4 are step ends), chosen so
# every error lies in the asymptotic range and far above float64 roundoff (smallest ~1e-12).
CONV_N = {1: [100, 200, 400], 2: [24, 48, 96], 3: [32, 64, 128], 4: [32, 64, 128], 5: [48, 64, 96, 128],
          8: [12, 16, 24]}
# Dense output (cubic Hermite, or the method's own extension for dopri5/tsit5/dopri8) is at least
# 4th order locally, so off-grid outputs converge at min(order, 4) or better.
DENSE_T = [0.0, 0.37, math.pi / 2, 2.71, T_CONV - 0.03]


def _fixed_step_errors(method, ts, **options):
    prob = Cycle()
    ns = CONV_N[ORDERS[method]]
    errs = []
    for n in ns:
        y = odeint(prob, prob.y0(), torch.tensor(ts, dtype=F64), method=method,
                   options=dict(step_size=T_CONV / n, **options))
        errs.append(np.abs(y.numpy() - prob.exact(ts)).max())
    return [T_CONV / n for n in ns], errs


@pytest.mark.parametrize("method", list(ORDERS))
def test_convergence_order(method):
    hs, errs = _fixed_step_errors(method, [0.0, 1.0, 2.0, 3.0, 4.0])
    assert min(errs) > 1e-13, f"errors {errs} are too close to roundoff to measure an order"
    order = empirical_order(hs, errs)
    assert abs(order - ORDERS[method]) <= 0.3, f"{method}: empirical order {order:.2f}, errors {errs}"


@pytest.mark.parametrize("method", list(ORDERS))
def test_dense_output_converges(method):
    """Adaptive methods use their own dense output even at a fixed step; fixed-step methods
    interpolate like torchdiffeq: linearly by default (order 2), cubic Hermite with interp="cubic"."""
    options = {} if method in ADAPTIVE else dict(interp="cubic")
    hs, errs = _fixed_step_errors(method, DENSE_T, **options)
    order = empirical_order(hs, errs)
    assert order >= min(ORDERS[method], 4) - 0.3, f"{method}: dense-output order {order:.2f}, errors {errs}"
    if method in FIXED and ORDERS[method] >= 2:
        hs, errs = _fixed_step_errors(method, DENSE_T)
        assert abs(empirical_order(hs, errs) - 2) <= 0.3, f"{method}: linear interpolation should be order 2"


@pytest.mark.parametrize("method", ["bosh3", "dopri5", "tsit5", "dopri8"])
def test_output_times_never_shorten_steps(method):
    prob = Cycle()
    with record_stats() as ends:
        y_ends = odeint(prob, prob.y0(), torch.tensor([0.0, 4.0], dtype=F64), rtol=1e-7, atol=1e-9, method=method)
    ts = torch.linspace(0, 4, 41, dtype=F64)
    with record_stats() as dense:
        y_dense = odeint(prob, prob.y0(), ts, rtol=1e-7, atol=1e-9, method=method)
    assert torch.equal(y_dense[-1], y_ends[-1])  # identical step sequence, bit for bit
    assert dense.n_accepted == ends.n_accepted and dense.n_rejected == ends.n_rejected
    if method in ("dopri5", "tsit5"):  # their interpolants reuse the stages: dense output is free
        assert dense.nfe_forward == ends.nfe_forward
    assert np.abs(y_dense.numpy() - prob.exact(ts.numpy())).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Accuracy against known solutions and scipy
# ---------------------------------------------------------------------------------------------

# Global error / tolerance stays below this multiple. Fehlberg's RK1(2) estimates the error of its
# first-order companion but propagates the second-order solution (as torchdiffeq's fehlberg2 does);
# that estimate's constant is tiny (1/512), so its global error sits at a steady ~150-300x the
# tolerance (measured on the problems below) - still proportional to the tolerance.
MULTIPLE = {"fehlberg2": 1000, "adaptive_heun": 100, "bosh3": 100, "dopri5": 100, "tsit5": 100, "dopri8": 100}
# Tolerances that keep every adaptive method to a few hundred steps.
TOL = {"fehlberg2": 1e-6, "adaptive_heun": 1e-5, "bosh3": 1e-8, "dopri5": 1e-9, "tsit5": 1e-9, "dopri8": 1e-11}


@pytest.mark.parametrize("method", ADAPTIVE)
def test_linear_system_matches_matrix_exponential(method):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 3, generator=g, dtype=F64) * 0.7
    y0 = torch.randn(3, generator=g, dtype=F64)
    ts = torch.linspace(0, 2, 6, dtype=F64)
    tol = TOL[method]
    y = odeint(lambda t, y: A @ y, y0, ts, rtol=tol, atol=tol, method=method)
    exact = torch.stack([torch.linalg.matrix_exp(A * ti) @ y0 for ti in ts])
    err = (y - exact).abs().max().item()
    assert err < MULTIPLE[method] * tol * max(1.0, exact.abs().max().item()), f"{method}: error {err:.2e} at tol {tol:g}"


@pytest.mark.parametrize("method", ADAPTIVE)
def test_exponential_decay_batched_rates(method):
    k = torch.tensor([0.1, 1.0, 3.0], dtype=F64)
    ts = torch.linspace(0, 3, 7, dtype=F64)
    tol = TOL[method]
    y = odeint(lambda t, y: -k * y, torch.ones(3, dtype=F64), ts, rtol=tol, atol=tol, method=method)
    exact = torch.exp(-k * ts[:, None])
    assert (y - exact).abs().max().item() < MULTIPLE[method] * tol


@pytest.mark.parametrize("method", ["bosh3", "dopri5", "tsit5", "dopri8"])
def test_harmonic_oscillator(method):
    w = 2.0

    def f(t, u):
        return torch.stack([u[1], -w * w * u[0]])

    ts = torch.linspace(0, 2 * math.pi, 9, dtype=F64)
    tol = TOL[method]
    y = odeint(f, torch.tensor([1.0, 0.0], dtype=F64), ts, rtol=tol, atol=tol, method=method)
    exact = torch.stack([torch.cos(w * ts), -w * torch.sin(w * ts)], -1)
    assert (y - exact).abs().max().item() < 200 * tol
    # energy is conserved to the tolerance's order
    energy = 0.5 * (y[:, 1] ** 2 + w * w * y[:, 0] ** 2)
    assert (energy - energy[0]).abs().max().item() < 500 * tol


@pytest.mark.parametrize("method", ADAPTIVE)
def test_time_dependent_vector_field(method):
    ts = torch.linspace(0, 5, 11, dtype=F64)
    tol = TOL[method]
    y = odeint(lambda t, y: torch.cos(t) * y, torch.tensor([1.0], dtype=F64), ts, rtol=tol, atol=tol, method=method)
    exact = torch.exp(torch.sin(ts))[:, None]
    assert (y - exact).abs().max().item() < MULTIPLE[method] * tol * exact.max().item()


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_matches_scipy_dop853_on_van_der_pol(method):
    mu = 2.0
    y0 = [2.0, 0.0]
    ts = np.linspace(0, 10, 21)
    ref = scipy_reference(van_der_pol_np(mu), y0, ts)
    y = odeint(van_der_pol(mu), torch.tensor(y0, dtype=F64), torch.tensor(ts), rtol=1e-10, atol=1e-10, method=method)
    err = np.abs(y.numpy() - ref).max()
    assert err < 1e-7, f"{method}: max error {err:.2e} against DOP853"


TOL_LADDER = {
    "fehlberg2": [1e-3, 1e-4, 1e-5], "adaptive_heun": [1e-3, 1e-4, 1e-5], "bosh3": [1e-4, 1e-6, 1e-8],
    "dopri5": [1e-4, 1e-6, 1e-8, 1e-10], "tsit5": [1e-4, 1e-6, 1e-8, 1e-10], "dopri8": [1e-5, 1e-8, 1e-11],
}


@pytest.mark.parametrize("method", ADAPTIVE)
def test_error_falls_with_tolerance_and_stays_within_100x(method):
    prob = Cycle()
    ts = torch.linspace(0, 4, 9, dtype=F64)
    errs, nfes = [], []
    for tol in TOL_LADDER[method]:
        with record_stats() as s:
            y = odeint(prob, prob.y0(), ts, rtol=tol, atol=tol, method=method)
        errs.append(np.abs(y.numpy() - prob.exact(ts.numpy())).max())
        nfes.append(s.nfe_forward)
        assert errs[-1] < MULTIPLE[method] * tol, f"{method}: error {errs[-1]:.2e} at tol {tol:g}"
    assert all(a > b for a, b in zip(errs, errs[1:])), f"{method}: errors {errs} do not fall"
    assert all(a < b for a, b in zip(nfes, nfes[1:])), f"{method}: NFE {nfes} do not grow"


# ---------------------------------------------------------------------------------------------
# Structure: tuple states, decreasing time, single output, dtypes and batch shapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_tuple_state_matches_flat_state(method):
    # harmonic oscillator split into position (2,) and velocity (2, 1)
    def f_tuple(t, state):
        x, v = state
        return v.reshape(2), -4.0 * x.reshape(2, 1)

    def f_flat(t, u):
        return torch.cat([u[2:], -4.0 * u[:2]])

    x0, v0 = torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([[0.0], [1.0]], dtype=F64)
    ts = torch.linspace(0, 1, 5, dtype=F64)
    opts = dict(step_size=0.01) if method == "rk4" else {}
    xs, vs = odeint(f_tuple, (x0, v0), ts, method=method, options=opts)
    # a tuple state's default norm is torchdiffeq's: the max over its tensors of their RMS norms
    rms = lambda r: r.pow(2).mean().sqrt()
    flat_norm = dict(norm=lambda r: torch.maximum(rms(r[:2]), rms(r[2:]))) if method != "rk4" else {}
    flat = odeint(f_flat, torch.cat([x0, v0.reshape(-1)]), ts, method=method, options={**opts, **flat_norm})
    assert xs.shape == (5, 2) and vs.shape == (5, 2, 1)
    torch.testing.assert_close(xs, flat[:, :2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vs.reshape(5, 2), flat[:, 2:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs[:, 0], torch.cos(2 * ts), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["dopri5", "rk4", "dopri8"])
def test_decreasing_time(method):
    opts = dict(step_size=0.01) if method == "rk4" else None
    f = lambda t, y: torch.cos(t) * y
    ts = torch.linspace(0, 3, 7, dtype=F64)
    y_fwd = odeint(f, torch.tensor([1.0], dtype=F64), ts, rtol=1e-10, atol=1e-10, method=method, options=opts)
    ts_back = ts.flip(0)
    y_back = odeint(f, y_fwd[-1], ts_back, rtol=1e-10, atol=1e-10, method=method, options=opts)
    torch.testing.assert_close(y_back.flip(0), y_fwd, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(y_back, torch.exp(torch.sin(ts_back))[:, None], rtol=1e-7, atol=1e-7)


def test_decreasing_time_starting_from_negative_times():
    ts = torch.tensor([0.0, -0.5, -1.0, -2.0], dtype=F64)
    y = odeint(lambda t, y: -y, torch.tensor([1.0], dtype=F64), ts, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[:, 0], torch.exp(-ts), rtol=1e-8, atol=0)


def test_single_output_time_returns_y0():
    y0 = torch.randn(2, 3, dtype=F64)
    with record_stats() as s:
        y = odeint(lambda t, y: -y, y0, torch.tensor([0.5], dtype=F64))
    assert y.shape == (1, 2, 3) and torch.equal(y[0], y0)
    assert s.nfe_forward == 0
    a, b = odeint(lambda t, s: (s[1], -s[0]), (y0[0], y0[1]), torch.tensor([1.0], dtype=F64))
    assert torch.equal(a[0], y0[0]) and torch.equal(b[0], y0[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "rk4"])
def test_dtypes_and_batch_shapes(dtype, method):
    k = torch.linspace(0.5, 2.0, 24, dtype=dtype).reshape(2, 3, 4)
    y0 = torch.ones(2, 3, 4, dtype=dtype)
    ts = torch.linspace(0, 1, 4, dtype=dtype)
    opts = dict(step_size=0.01, interp="cubic") if method == "rk4" else None
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    y = odeint(lambda t, y: -k * y, y0, ts, rtol=tol, atol=tol, method=method, options=opts)
    assert y.shape == (4, 2, 3, 4) and y.dtype == dtype
    exact = torch.exp(-k * ts.reshape(-1, 1, 1, 1))
    assert (y - exact).abs().max().item() < (1e-4 if dtype == torch.float32 else 1e-7)


def test_func_sees_time_as_a_tensor_of_the_state_dtype():
    seen = []

    def f(t, y):
        seen.append((type(t), t.dtype, t.shape))
        return -y

    odeint(f, torch.ones(2, dtype=torch.float32), torch.tensor([0.0, 1.0]))
    assert seen and all(s == (torch.Tensor, torch.float32, torch.Size([])) for s in seen)


def test_time_dtype_option():
    seen = set()

    def f(t, y):
        seen.add(t.dtype)
        return -y

    y = odeint(f, torch.ones(2), torch.tensor([0.0, 1.0]), options=dict(dtype=torch.float64))
    assert seen == {torch.float64} and y.dtype == torch.float32
    assert abs(y[-1, 0].item() - math.exp(-1)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def test_rk4_costs_exactly_four_evaluations_per_step():
    f = lambda t, y: -y
    y0 = torch.ones(3, dtype=F64)
    with record_stats() as s:
        odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4", options=dict(step_size=0.1))
    assert (s.nfe_forward, s.n_accepted, s.n_rejected, s.nfe_backward) == (40, 10, 0, 0)
    # outputs at interior grid points add no evaluations
    with record_stats() as s:
        y = odeint(f, y0, torch.linspace(0, 1, 11, dtype=F64), method="rk4", options=dict(step_size=0.1))
    assert (s.nfe_forward, s.n_accepted) == (40, 10)
    torch.testing.assert_close(y[:, 0], torch.exp(-torch.linspace(0, 1, 11, dtype=F64)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_cost_is_stages_times_steps(method):
    with record_stats() as s:
        odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), method=method,
               options=dict(step_size=0.25))
    assert s.n_accepted == 8
    assert s.nfe_forward == 8 * METHODS[method].tableau.stages


def test_stats_nest_and_sum_over_solves():
    f = lambda t, y: -y
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    with record_stats() as outer:
        with record_stats() as inner:
            odeint(f, torch.ones(1, dtype=F64), ts, method="rk4", options=dict(step_size=0.1))
        odeint(f, torch.ones(1, dtype=F64), ts, method="rk4", options=dict(step_size=0.1))
    assert inner.nfe_forward == 40 and outer.nfe_forward == 80


def test_adaptive_stats_count_rejections():
    with record_stats() as s:
        odeint(van_der_pol(5.0), torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([0.0, 10.0], dtype=F64),
               rtol=1e-6, atol=1e-6)
    assert s.n_accepted > 0 and s.n_rejected > 0
    # dopri5 is FSAL: 6 new evaluations per attempted step, plus the first f and the initial-step probe
    assert s.nfe_forward == 6 * (s.n_accepted + s.n_rejected) + 2


# ---------------------------------------------------------------------------------------------
# Options: step_t, jump_t, controllers, max_step, norm
# ---------------------------------------------------------------------------------------------

def test_step_t_is_stepped_onto():
    times = []

    def f(t, y):
        times.append(float(t))
        return -y

    odeint(f, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), options=dict(step_t=[0.7071]))
    assert min(abs(t - 0.7071) for t in times) < 1e-12
    times.clear()
    odeint(f, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64))
    assert min(abs(t - 0.7071) for t in times) > 1e-9


def _switched(t, y):
    """y' = -y + u(t) with u = 1 before t = 1 and -2 after: a jump in f at t = 1."""
    return -y + (1.0 if float(t) < 1.0 else -2.0)


def _switched_closed_left(t, y):
    """The same field with u(1) = 1: at the jump itself f takes the value from the left."""
    return -y + (1.0 if float(t) <= 1.0 else -2.0)


def _switched_exact(t):
    y1 = 1 - math.exp(-1.0)
    return 1 - math.exp(-t) if t <= 1 else -2 + (y1 + 2) * math.exp(-(t - 1))


@pytest.mark.parametrize("field", [_switched, _switched_closed_left])
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8"])
def test_jump_t_makes_a_discontinuous_field_cheap_and_accurate(field, method):
    """Stages of the step that lands on the jump see f from before it, and f is re-evaluated
    just after it, whichever side the user's f assigns the jump time itself to."""
    ts = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=F64)
    exact = torch.tensor([_switched_exact(t) for t in ts.tolist()], dtype=F64)
    with record_stats() as plain:
        y_plain = odeint(field, torch.zeros(1, dtype=F64), ts, rtol=1e-8, atol=1e-8, method=method)
    with record_stats() as jump:
        y_jump = odeint(field, torch.zeros(1, dtype=F64), ts, rtol=1e-8, atol=1e-8, method=method,
                        options=dict(jump_t=[1.0]))
    err_jump = (y_jump[:, 0] - exact).abs().max().item()
    err_plain = (y_plain[:, 0] - exact).abs().max().item()
    assert err_jump < 1e-7, f"error with jump_t {err_jump:.2e} (without: {err_plain:.2e})"
    assert jump.nfe_forward < plain.nfe_forward
    assert jump.n_rejected < plain.n_rejected


@pytest.mark.parametrize("field", [_switched, _switched_closed_left])
def test_jump_t_with_fixed_steps_and_decreasing_time(field):
    # fixed steps that do not divide the jump: the solver still lands on it
    y = odeint(field, torch.zeros(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), method="rk4",
               options=dict(step_size=0.03, jump_t=[1.0]))
    assert abs(y[-1].item() - _switched_exact(2.0)) < 1e-7
    y2 = torch.tensor([_switched_exact(2.0)], dtype=F64)
    yb = odeint(field, y2, torch.tensor([2.0, 0.0], dtype=F64), rtol=1e-9, atol=1e-9, options=dict(jump_t=[1.0]))
    assert abs(yb[-1].item()) < 1e-7


def test_pi_controller():
    prob = Cycle()
    ts = torch.linspace(0, 4, 5, dtype=F64)
    runs = {}
    for controller in ("I", "PI"):
        with record_stats() as s:
            y = odeint(prob, prob.y0(), ts, rtol=1e-7, atol=1e-7, options=dict(controller=controller))
        runs[controller] = (np.abs(y.numpy() - prob.exact(ts.numpy())).max(), s.n_accepted, y)
        assert runs[controller][0] < 1e-5
    assert not torch.equal(runs["I"][2], runs["PI"][2])  # the option has an effect
    assert 0.5 < runs["PI"][1] / runs["I"][1] < 2.0
    # explicit gains are accepted too
    y = odeint(prob, prob.y0(), ts, rtol=1e-7, atol=1e-7, options=dict(controller="PI", pcoeff=0.1, icoeff=0.3))
    assert np.abs(y.numpy() - prob.exact(ts.numpy())).max() < 1e-5


def test_max_step_is_respected():
    times = []

    def f(t, y):
        times.append(float(t))
        return -0.01 * y  # smooth and slow: the solver would take one huge step

    with record_stats() as s:
        odeint(f, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), options=dict(max_step=0.05))
    assert s.n_accepted >= 20
    with record_stats() as free:
        odeint(f, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert free.n_accepted < 20


def test_first_step_and_min_step_options():
    y = odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-8, atol=1e-8,
               options=dict(first_step=1e-3, min_step=1e-6, safety=0.8, ifactor=5.0, dfactor=0.3))
    assert abs(y[-1].item() - math.exp(-1)) < 1e-6


def test_custom_norm_is_used():
    calls = []

    def max_norm(r):
        calls.append(r.shape)
        return r.abs().max()

    prob = Cycle()
    ts = torch.tensor([0.0, 4.0], dtype=F64)
    with record_stats() as rms:
        odeint(prob, prob.y0(), ts, rtol=1e-6, atol=1e-6)
    with record_stats() as mx:
        y = odeint(prob, prob.y0(), ts, rtol=1e-6, atol=1e-6, options=dict(norm=max_norm))
    assert calls and all(c == (2,) for c in calls)
    assert mx.n_accepted + mx.n_rejected <= len(calls)
    assert mx.n_accepted >= rms.n_accepted  # max norm >= RMS norm: never fewer steps
    assert np.abs(y.numpy()[-1] - prob.exact(4.0)).max() < 1e-4


def test_custom_norm_receives_tuple_states():
    seen = []

    def norm(parts):
        seen.append(isinstance(parts, tuple) and [p.shape for p in parts])
        return max(p.abs().max() for p in parts)

    odeint(lambda t, s: (-s[0], -2 * s[1]), (torch.ones(2, dtype=F64), torch.ones(3, 1, dtype=F64)),
           torch.tensor([0.0, 1.0], dtype=F64), options=dict(norm=norm))
    assert seen and all(s == [torch.Size([2]), torch.Size([3, 1])] for s in seen)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_methods_accept_a_fixed_step(method):
    with record_stats() as s:
        y = odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method=method,
                   options=dict(step_size=0.125))
    assert s.n_accepted == 8 and s.n_rejected == 0
    assert abs(y[-1].item() - math.exp(-1)) < 1e-2


def test_per_component_tolerances():
    # a tensor atol broadcast over the state: the loose component does not force small steps
    f = lambda t, y: torch.stack([-y[0], -y[1]])
    y0 = torch.ones(2, dtype=F64)
    ts = torch.tensor([0.0, 5.0], dtype=F64)
    with record_stats() as tight:
        odeint(f, y0, ts, rtol=1e-10, atol=1e-10)
    with record_stats() as mixed:
        y = odeint(f, y0, ts, rtol=torch.tensor([1e-10, 1e-3], dtype=F64), atol=torch.tensor([1e-10, 1e-3], dtype=F64))
    assert mixed.nfe_forward <= tight.nfe_forward
    assert abs(y[-1, 0].item() - math.exp(-5)) < 1e-8
