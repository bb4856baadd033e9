"""Differential tests against torchdiffeq: the same calls on both libraries, compared.

Code written for torchdiffeq must run with neuralode by changing the import. Each test runs the
same inputs through ``torchdiffeq`` (0.2.5, the dev extra) and ``neuralode`` and compares outputs,
gradients, calls made to ``func`` and its callbacks, and raised exception types. Where we differ
on purpose the test says so and bounds the difference:

* adaptive methods use the standard embedded error estimates and continuous extensions (e.g.
  dopri5's 4th-order Dormand-Prince pair and Shampine's dense output), so adaptive results agree
  to the tolerance, not bit for bit; fixed-grid methods agree to roundoff;
* exceptions for bad input are ValueError/TypeError subclasses that are also AssertionErrors,
  so code catching torchdiffeq's asserts still catches them.
"""
from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from torch import nn

import neuralode

torchdiffeq = pytest.importorskip("torchdiffeq")

F32, F64 = torch.float32, torch.float64
LIBS = {"torchdiffeq": torchdiffeq, "neuralode": neuralode}
FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4")
ADAPTIVE = ("adaptive_heun", "fehlberg2", "bosh3", "dopri5", "dopri8")
EPS = {F32: 1e-5, F64: 1e-12}


# -- problems (torchdiffeq's test problems, written for this file) -----------------------------------
class Constant(nn.Module):
    """f = a + (y - (a t + b))^5; exact y = a t + b."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.2)), nn.Parameter(torch.tensor(3.0))

    def forward(self, t, y):
        return self.a + (y - (self.a * t + self.b)) ** 5

    def exact(self, t):
        return self.a * t + self.b


class Linear(nn.Module):
    """f = A y with a fixed antisymmetric A (a rotation); exact via the matrix exponential."""

    def __init__(self, dim=6):
        super().__init__()
        u = torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)) * 0.5
        self.A = nn.Parameter(u - u.T)

    def forward(self, t, y):
        return self.A @ y

    def exact(self, t, y0):
        return torch.stack([torch.linalg.matrix_exp(self.A * ti) @ y0 for ti in t])


class Spiral(nn.Module):
    """torchdiffeq's README spiral, y' = (y^3) A, with an unused submodule (its grads must be 0)."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]]))
        self.unused = nn.Linear(2, 5)

    def forward(self, t, y):
        return (y ** 3) @ self.A


def _problem(dtype, reverse=False, n=10):
    f = Constant().to(dtype)
    t = torch.linspace(1, 8, n, dtype=dtype)
    if reverse:
        t = t.flip(0)
    y0 = f.exact(t[0]).detach().reshape(1)
    return f, y0, t


def _both(fn):
    """(fn(neuralode), fn(torchdiffeq))."""
    return fn(neuralode), fn(torchdiffeq)


# -- the API itself ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense"])
def test_signatures_contain_torchdiffeqs(name):
    """Every parameter of torchdiffeq's entry points exists with the same kind and default;
    ours only add keyword-only parameters."""
    theirs = inspect.signature(getattr(torchdiffeq, name)).parameters
    ours = inspect.signature(getattr(neuralode, name)).parameters
    for p in theirs.values():
        assert p.name in ours, p.name
        q = ours[p.name]
        same_default = q.default == p.default or (p.name == "odeint_interface" and q.default is neuralode.odeint)
        assert q.kind == p.kind and same_default, (p, q)
    for extra in set(ours) - set(theirs):
        assert ours[extra].kind == inspect.Parameter.KEYWORD_ONLY


def test_every_torchdiffeq_method_exists():
    from torchdiffeq._impl.odeint import SOLVERS

    master = {"implicit_euler", "implicit_midpoint", "trapezoid", "radauIIA3", "gl4", "radauIIA5", "gl6", "sdirk2",
              "trbdf2", "tsit5"}
    assert set(SOLVERS) | master <= set(neuralode.METHODS)
    for name in SOLVERS:
        assert neuralode.METHODS[name].adaptive == (name in ADAPTIVE), name


# -- forward results -----------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_on_t_matches_to_roundoff(method, dtype, reverse):
    """No step_size: both step on the output times, with the same tableau."""
    f, y0, t = _problem(dtype, reverse)
    f = Linear().to(dtype)
    y0 = torch.linspace(-1, 1, 6, dtype=dtype)
    ours, theirs = neuralode.odeint(f, y0, t / 8, method=method), torchdiffeq.odeint(f, y0, t / 8, method=method)
    torch.testing.assert_close(ours, theirs, rtol=10 * EPS[dtype], atol=10 * EPS[dtype])


@pytest.mark.parametrize("interp", ["linear", "cubic"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_with_step_size_and_interpolation(method, dtype, interp):
    """step_size=0.3 on [0, 1.1]: the same grid (last step short) and the same interpolation."""
    f = Linear().to(dtype)
    y0 = torch.linspace(-1, 1, 6, dtype=dtype)
    t = torch.tensor([0.0, 0.25, 0.5, 0.77, 1.1], dtype=dtype)
    opts = dict(step_size=0.3, interp=interp)
    ours, theirs = _both(lambda lib: lib.odeint(f, y0, t, method=method, options=opts))
    torch.testing.assert_close(ours, theirs, rtol=10 * EPS[dtype], atol=10 * EPS[dtype])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_methods_agree_to_tolerance(method, dtype, reverse):
    f = Linear().to(dtype)
    y0 = torch.linspace(-1, 1, 6, dtype=dtype)
    t = torch.linspace(0, 2, 7, dtype=dtype)
    t = t.flip(0) if reverse else t
    tol = 1e-5 if dtype == F32 else 1e-6 if method in ("adaptive_heun", "fehlberg2") else 1e-9
    ours, theirs = _both(lambda lib: lib.odeint(f, y0, t, rtol=tol, atol=tol, method=method))
    exact = f.exact(t - t[0], y0).detach()
    err_ours, err_theirs = ((y - exact).abs().max().item() for y in (ours, theirs))
    # at least as accurate as torchdiffeq, up to noise at the tolerance level
    assert err_ours <= 2 * err_theirs + 10 * tol, (err_ours, err_theirs)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape


@pytest.mark.parametrize("method", FIXED + ADAPTIVE)
def test_single_output_time_returns_y0(method):
    f, y0, t = _problem(F64)
    ours, theirs = _both(lambda lib: lib.odeint(f, y0, t[:1], method=method))
    assert torch.equal(ours, theirs) and ours.shape == (1, 1)


def test_single_output_time_with_t_requiring_grad():
    f, y0, t = _problem(F64)
    t = t[:1].clone().requires_grad_(True)
    y0 = y0.clone().requires_grad_(True)
    ours = neuralode.odeint(f, y0, t)
    assert torch.equal(ours[0], y0)
    ours.sum().backward()
    assert y0.grad.item() == 1.0


def test_tuple_state_matches_and_returns_views():
    f = Linear().double()
    ya, yb = torch.ones(2, 2, dtype=F64), torch.linspace(0, 1, 2, dtype=F64)
    g = lambda t, s: (f(t, torch.cat([s[0].reshape(-1), s[1]]))[:4].reshape(2, 2), f(t, torch.cat([s[0].reshape(-1), s[1]]))[4:])  # noqa: E731
    t = torch.linspace(0, 1, 4, dtype=F64)
    ours, theirs = _both(lambda lib: lib.odeint(g, (ya, yb), t, method="rk4"))
    for o, th in zip(ours, theirs):
        torch.testing.assert_close(o, th, rtol=1e-12, atol=1e-12)
    assert [o.shape for o in ours] == [th.shape for th in theirs]


def test_tuple_state_gradients_match():
    f = Constant().double()
    y0 = f.exact(torch.tensor(1.0, dtype=F64)).detach().reshape(1)
    t = torch.linspace(1, 8, 5, dtype=F64)

    def grads(lib):
        a, b = y0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        ya, yb = lib.odeint(lambda t, s: (f(t, s[0]), f(t, s[1])), (a, b), t, method="dopri5")
        (ya.sum() + 2 * yb.sum()).backward()
        return a.grad, b.grad

    for o, th in zip(*_both(grads)):
        torch.testing.assert_close(o, th, rtol=1e-6, atol=1e-8)


def test_mixed_dtype_tuple_is_promoted_like_torch_cat():
    ys = _both(lambda lib: lib.odeint(lambda t, s: (-s[0], -s[1]), (torch.ones(1), torch.ones(1, dtype=F64)),
                                     torch.tensor([0.0, 1.0]), method="rk4"))
    assert [[p.dtype for p in y] for y in ys] == [[F64, F64], [F64, F64]]


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5", "bosh3", "dopri8"])
def test_complex_states(method):
    """torchdiffeq solves complex states with real time and a norm on magnitudes; so do we, and
    our gradients (every mode) match finite differences."""
    w = nn.Parameter(torch.tensor(0.9, dtype=F64))
    f = lambda t, y: (1j * w - 0.1) * y  # noqa: E731
    y0 = torch.tensor([1 + 0.5j, -0.3j], dtype=torch.complex128)
    t = torch.linspace(0, 2, 5, dtype=F64)
    opts = dict(step_size=0.01) if method in FIXED else None
    ours, theirs = _both(lambda lib: lib.odeint(f, y0, t, method=method, options=opts, rtol=1e-9, atol=1e-9))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[-1], y0 * torch.exp((0.9j - 0.1) * t[-1]), rtol=1e-5 if method != "euler" else 1e-2,
                               atol=1e-5 if method != "euler" else 1e-2)

    def loss(w_value, grad):
        w.data.fill_(w_value)
        y = neuralode.odeint(f, y0, t, method=method, options=opts, rtol=1e-10, atol=1e-10, grad=grad,
                             adjoint_params=(w,))
        return (y[-1].abs() ** 2).sum() + y[-1].real.sum()

    numeric = (loss(0.9 + 1e-6, "direct").item() - loss(0.9 - 1e-6, "direct").item()) / 2e-6
    for grad in ("direct", "adjoint", "checkpoint"):
        (g,) = torch.autograd.grad(loss(0.9, grad), w)
        # the adjoint solves the continuous adjoint: on a coarse fixed grid it differs from the
        # discrete gradient by the method's own error (1% for Euler at h = 0.01)
        tol = {"euler": 3e-2, "rk4": 1e-4}.get(method, 1e-5) if grad == "adjoint" else 1e-5
        assert abs(g.item() - numeric) < tol * max(1.0, abs(numeric)), (grad, g.item(), numeric)


# -- gradients ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t_grad", [False, True])
@pytest.mark.parametrize("entry", ["odeint", "odeint_adjoint"])
def test_gradients_match(entry, t_grad):
    """y0, t and parameter gradients of the README spiral, ours against theirs (torchdiffeq's
    own comparison of its adjoint with dopri5 backprop uses the same problem)."""
    def grads(lib):
        torch.manual_seed(0)
        f = Spiral()
        y0 = torch.tensor([[2.0, 0.0]], requires_grad=True)
        t = torch.linspace(0.0, 25.0, 10).requires_grad_(t_grad)
        ys = getattr(lib, entry)(f, y0, t)
        ys.backward(torch.rand_like(ys, generator=torch.Generator().manual_seed(1)) * 0.1)
        return y0.grad, t.grad, f.A.grad, f.unused.weight.grad

    (gy, gt, gA, gu), (hy, ht, hA, hu) = _both(grads)
    torch.testing.assert_close(gy, hy, rtol=0, atol=3e-4)
    torch.testing.assert_close(gA, hA, rtol=0, atol=2e-3)
    if t_grad:
        torch.testing.assert_close(gt, ht, rtol=0, atol=2e-4)
    if entry == "odeint_adjoint":  # unused parameters get zero gradients, not None
        assert torch.equal(gu, torch.zeros_like(gu)) and torch.equal(hu, torch.zeros_like(hu))


@pytest.mark.parametrize("method", FIXED + ADAPTIVE)
def test_gradcheck_y0_and_t(method):
    """torchdiffeq's gradcheck of every method on its constant problem (y0 and t)."""
    f, y0, t = _problem(F64)
    y0 = y0.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y0, t: neuralode.odeint(f, y0, t, method=method), (y0, t))


def test_adjoint_on_y_independent_field():
    """f = c does not depend on y: dL/dy0 = 1 and dL/dc = T (torchdiffeq works here too)."""
    for lib in LIBS.values():
        c = torch.tensor(0.3, dtype=F64, requires_grad=True)
        y0 = torch.tensor(1.0, dtype=F64, requires_grad=True)
        y = lib.odeint_adjoint(lambda t, y: c * torch.ones_like(y), y0, torch.tensor([0.0, 2.0], dtype=F64),
                               adjoint_params=(c,))
        y[-1].backward()
        assert abs(y0.grad.item() - 1) < 1e-12 and abs(c.grad.item() - 2) < 1e-9


# -- options --------------------------------------------------------------------------------------------
class _Recorder(nn.Module):
    """-x, recording every t it is called at and every callback."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.ts, self.calls = [], []

    def forward(self, t, x):
        self.ts.append(t.item())
        return -self.w * x

    def callback_step(self, t0, y0, dt):
        self.calls.append(("step", round(t0.item(), 6), round(dt.item(), 6)))

    def callback_accept_step(self, t0, y0, dt):
        self.calls.append(("accept", round(t0.item(), 6), round(dt.item(), 6)))

    def callback_reject_step(self, t0, y0, dt):
        self.calls.append(("reject", round(t0.item(), 6), round(dt.item(), 6)))


@pytest.mark.parametrize("perturb", [False, True])
@pytest.mark.parametrize("method", FIXED)
def test_perturb_and_evaluation_times(method, perturb):
    """The times func sees on a fixed grid, with and without perturb (never the grid points
    themselves with perturb, as in torchdiffeq's own test)."""
    seen = []
    for lib in LIBS.values():
        f = _Recorder()
        lib.odeint(f, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), method=method,
                   options=dict(step_size=0.5, perturb=perturb))
        seen.append(f.ts)
    # the same times, up to float32 rounding of the interior stage times (torchdiffeq forms
    # t0 + c*dt in float32, we round the float64 value once)
    assert len(seen[0]) == len(seen[1]) and max(abs(a - b) for a, b in zip(*seen)) < 1e-7
    assert (0.0 in seen[1] and 0.5 in seen[1]) != perturb


@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_callbacks_same_sequence(method):
    sequences = []
    for lib in LIBS.values():
        f = _Recorder()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            xs = lib.odeint_adjoint(f, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), method=method,
                                    options=dict(step_size=0.1))
        assert any("does not support callbacks" in str(x.message) for x in w)  # accept/reject on a fixed grid
        sequences.append(f.calls)
        assert xs.shape == (2, 2)
    assert sequences[0] == sequences[1] and len(sequences[1]) == 10


@pytest.mark.parametrize("method", ["bosh3", "dopri5"])
def test_adaptive_callbacks_pair_up(method):
    """Every callback_step is followed by exactly one accept or reject, in both passes."""
    class Adj(_Recorder):
        def callback_step_adjoint(self, t0, y0, dt):
            self.calls.append(("step_adj", len(y0)))

        def callback_accept_step_adjoint(self, t0, y0, dt):
            self.calls.append(("accept_adj", len(y0)))

    counts = []
    for lib in LIBS.values():
        f = Adj()
        xs = lib.odeint_adjoint(f, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), method=method)
        xs.sum().backward()
        kinds = [c[0] for c in f.calls]
        assert kinds.count("step") == kinds.count("accept") + kinds.count("reject") > 0
        assert kinds.count("step_adj") >= kinds.count("accept_adj") > 0
        assert {c[1] for c in f.calls if c[0] == "step_adj"} == {4}  # (t, y, adj_y, w)
        counts.append(kinds.count("step"))
    assert counts[1] > 0


def test_grid_constructor_forward_and_adjoint():
    """torchdiffeq's grid-constructor test: called with t = [0, 1] forward, [1, 0] backward."""
    for lib in LIBS.values():
        calls = []

        def grid(func, y0, t):
            calls.append(t.tolist())
            return torch.linspace(float(t[0]), float(t[-1]), 11)

        x0 = torch.tensor(1.0, requires_grad=True)
        x1 = lib.odeint_adjoint(lambda t, x: x, x0, torch.tensor([0.0, 1.0]), method="euler",
                                options=dict(grid_constructor=grid), adjoint_params=())
        x1[-1].backward()
        assert abs(x1[-1].item() - 1.1 ** 10) < 1e-6 and abs(x0.grad.item() - 1.1 ** 10) < 1e-6
        assert calls == [[0.0, 1.0], [1.0, 0.0]]


class _Jump:
    def __init__(self):
        self.nfe = 0

    def __call__(self, t, x):
        self.nfe += 1
        return -0.5 * x if t < 0.5 else x ** 2


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", [pytest.param("adaptive_heun", marks=pytest.mark.slow),  # ~12 s of the suite
                                    "fehlberg2", "bosh3", "dopri5", "tsit5"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_jump_t_lowers_nfe(method, dtype, adjoint):
    """torchdiffeq's discontinuity test, run on ours: jump_t costs fewer evaluations than letting
    error control find the jump, forward and backward."""
    solve = neuralode.odeint_adjoint if adjoint else neuralode.odeint
    kw = dict(adjoint_params=()) if adjoint else {}
    x0 = torch.tensor([1.0, 2.0], dtype=dtype, requires_grad=True)
    simple, better = _Jump(), _Jump()
    ys = solve(simple, x0, torch.tensor([0.0, 1.0]), atol=1e-6, method=method, **kw)
    yb = solve(better, x0, torch.tensor([0.0, 1.0]), atol=1e-6, rtol=1e-6, method=method,
               options=dict(jump_t=torch.tensor([0.5])), **kw)
    assert better.nfe < simple.nfe
    if adjoint:
        simple.nfe = better.nfe = 0
        ys.sum().backward()
        yb.sum().backward()
        assert better.nfe < simple.nfe


def test_jump_t_costs_no_more_than_torchdiffeq():
    """dopri5 on the jump problem: our NFE with jump_t within 10% of torchdiffeq's."""
    nfe = []
    for lib in LIBS.values():
        f = _Jump()
        lib.odeint(f, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), atol=1e-6, rtol=1e-6, method="dopri5",
                   options=dict(jump_t=torch.tensor([0.5])))
        nfe.append(f.nfe)
    assert nfe[1] <= 1.1 * nfe[0], nfe


@pytest.mark.parametrize("min_step, max_step", [(0.0, math.inf), (2.0, math.inf), (0.0, 5.0), (2.0, 5.0)])
def test_min_and_max_step(min_step, max_step):
    """torchdiffeq's min/max-step test on ours: steps at min_step are accepted whatever their error."""
    class Counted(Linear):
        nfe = 0

        def forward(self, t, y):
            Counted.nfe += 1
            return super().forward(t, y)

    f = Counted(10).double()
    Counted.nfe = 0
    neuralode.odeint(f, torch.ones(10, dtype=F64), torch.linspace(1, 8, 10, dtype=F64), method="dopri5",
                     options=dict(min_step=min_step, max_step=max_step))
    assert (Counted.nfe < 50) if min_step > 0 else (Counted.nfe > 100)


def test_norm_receives_the_state_structure():
    """A user norm sees a tensor shaped like y0, or the tuple; the same in both libraries."""
    for y0 in (torch.tensor(1.0), (torch.tensor(1.0),), (torch.tensor(1.0), torch.ones(2, 2))):
        seen = []

        def norm(x):
            seen.append(tuple(p.shape for p in x) if isinstance(x, tuple) else x.shape)
            return torch.stack([p.abs().max() for p in x]).max() if isinstance(x, tuple) else x.abs().max()

        f = (lambda t, x: tuple(-p for p in x)) if isinstance(y0, tuple) else (lambda t, x: -x)
        for lib in LIBS.values():
            lib.odeint(f, y0, torch.tensor([0.0, 1.0]), options=dict(norm=norm))
        assert len(set(seen)) == 1, seen


@pytest.mark.parametrize("dtype", [F32, F64])
def test_larger_norm_costs_more(dtype):
    f = Linear().to(dtype)
    nfe = []
    for scale in (1.0, 10.0):
        with neuralode.record_stats() as s:
            neuralode.odeint(f, torch.ones(6, dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype),
                             options=dict(norm=lambda x, k=scale: k * x.abs().max()))
        nfe.append(s.nfe_forward)
    assert nfe[0] <= nfe[1]


# -- the adjoint's norm, as torchdiffeq's tests inspect it ----------------------------------------------
@pytest.mark.parametrize("options", [None, {}, {"norm": "seminorm"}])
@pytest.mark.parametrize("shape", [(), (1,), (2, 2)])
def test_adjoint_norm_on_the_grad_fn(shape, options):
    """torchdiffeq's tests replace ``xs.grad_fn.adjoint_options['norm']`` before backward and check
    what it receives: the tuple (t, y, adj_y, *param_grads) with y shaped like y0."""
    for lib in LIBS.values():
        p1, p2 = torch.rand(7, requires_grad=True), torch.rand((), requires_grad=True)
        xs = lib.odeint_adjoint(lambda t, x: x, torch.full(shape, 1.0), torch.tensor([0.0, 1.0]),
                                adjoint_params=(p1, p2), adjoint_options=options)
        original = xs.grad_fn.adjoint_options["norm"]
        seen = []

        def spy(tup):
            seen.append([x.shape for x in tup])
            out = original(tup)
            t, y, adj_y, g1, g2 = tup
            rms = lambda x: x.pow(2).mean().sqrt()  # noqa: E731
            parts = [t.abs(), rms(y), rms(adj_y)] + ([] if options == {"norm": "seminorm"} else [rms(g1), g2.abs()])
            assert torch.allclose(out, torch.stack(parts).max(), atol=1e-6)
            return out

        xs.grad_fn.adjoint_options["norm"] = spy
        xs.sum().backward()
        assert seen and all(s == [(), shape, shape, (7,), ()] for s in seen), seen


def test_user_adjoint_norm_on_a_tuple_state_sees_the_parts():
    for lib in LIBS.values():
        seen = []
        p = torch.rand(3, requires_grad=True)

        def norm(tup):
            seen.append(len(tup))
            return torch.stack([x.abs().max() for x in tup]).max()

        xs = lib.odeint_adjoint(lambda t, s: (-s[0], -s[1]), (torch.tensor(1.0), torch.ones(2, 2)),
                                torch.tensor([0.0, 1.0]), adjoint_params=(p,), adjoint_options=dict(norm=norm))
        (xs[0].sum() + xs[1].sum()).backward()
        assert set(seen) == {6}  # t, y_a, y_b, adj_a, adj_b, p


@pytest.mark.parametrize("dtype", [F32, F64])
def test_seminorm_saves_backward_evaluations(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 256), nn.Tanh(), nn.Linear(256, 2)).to(dtype)
    f = lambda t, x: net(x) * torch.sin(2 * t)  # noqa: E731
    tol = 1e-6 if dtype == F32 else 1e-8
    nfe = []
    for options in (None, dict(norm="seminorm")):
        with neuralode.record_stats() as s:
            xs = neuralode.odeint_adjoint(f, torch.tensor([1.0, 2.0], dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype),
                                          rtol=tol, atol=tol, adjoint_params=tuple(net.parameters()),
                                          adjoint_options=options)
            xs.sum().backward()
        nfe.append(s.nfe_backward)
    assert nfe[1] <= nfe[0]


# -- events -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("method", ["euler", "rk4", "bosh3", "dopri5", "dopri8"])
def test_event_in_odeint(method, reverse):
    """torchdiffeq's event test: stop where sum(y - y(t_2)) = 0; both libraries, same result."""
    f, y0, t = _problem(F64, reverse)
    target = f.exact(t[2]).detach()
    opts = dict(step_size=0.01, interp="cubic") if method in FIXED else None
    results = _both(lambda lib: lib.odeint(f, y0, t[0:2], event_fn=lambda s, y: (y - target).sum(), method=method,
                                           options=opts))
    tol = 5e-3 if method == "euler" else 1e-4
    for event_t, sol in results:
        assert sol.shape == (2, 1) and event_t.dtype == t.dtype
        assert abs(event_t.item() - t[2].item()) / abs(t[2].item()) < tol
        assert abs(sol[-1].item() - target.item()) / abs(target.item()) < tol


def test_several_event_functions_first_wins_and_root_at_start():
    fall = lambda t, s: torch.stack([s[1], -9.81 * torch.ones_like(s[1])])  # noqa: E731
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    both = lambda t, s: torch.stack([s[0] - 5.0, s[0] - 2.0])  # noqa: E731
    for lib in LIBS.values():
        event_t, sol = lib.odeint(fall, y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=both)
        assert abs(sol[-1, 0].item() - 5.0) < 1e-6
        event_t, sol = lib.odeint(fall, y0, torch.tensor([0.5, 1.0], dtype=F64), event_fn=lambda t, s: s[0] - 10.0)
        assert event_t.item() == 0.5 and torch.equal(sol[0], sol[1])


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_odeint_event_gradients_match(interface):
    """Free fall to the ground: d event_t / d(y0, t0, g) from both libraries, and analytic."""
    class Fall(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.tensor(9.8, dtype=F64))

        def forward(self, t, s):
            return torch.stack([s[1], -self.g * torch.ones_like(s[1])])

    out = []
    for lib in LIBS.values():
        f = Fall()
        y0 = torch.tensor([10.0, 0.0], dtype=F64, requires_grad=True)
        t0 = torch.tensor(0.0, dtype=F64, requires_grad=True)
        event_t, _ = lib.odeint_event(f, y0, t0, event_fn=lambda t, s: s[0], odeint_interface=getattr(lib, interface),
                                      rtol=1e-9, atol=1e-9)
        event_t.backward()
        out.append(torch.cat([y0.grad, t0.grad.reshape(1), f.g.grad.reshape(1)]))
    t_star = math.sqrt(2 * 10.0 / 9.8)
    exact = torch.tensor([1 / (9.8 * t_star), t_star / (9.8 * t_star), 1.0, -t_star / (2 * 9.8)], dtype=F64)
    torch.testing.assert_close(out[1], exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-4)


def test_event_function_zero_on_an_interval_stops_where_it_starts():
    """torchdiffeq's examples/learn_physics.py guards its event function with a terminal time:
    ``return zeros_like(t)`` past T. A zero is an event (as a sign change), and a zero that is not
    isolated is located at its start, T, not at the end of the step that first saw it. The guard
    does not depend on (t, y), so the event time carries no gradient and the state keeps the
    gradients of a solve to the fixed time T, as torchdiffeq's ``odeint(..., event_fn=)`` gives
    (its ``odeint_event`` adds a spurious term here, so gradients are checked analytically)."""
    T = 2.5

    def fly(t, s):
        return s[1], -torch.ones_like(s[1])  # thrown upwards: the ground is never reached before T

    def guarded(t, s):
        if t > T:
            return torch.zeros_like(t)
        return s[0] + 100.0

    out = []
    for lib in LIBS.values():
        y0 = (torch.tensor([1.0], dtype=F64, requires_grad=True), torch.tensor([3.0], dtype=F64, requires_grad=True))
        event_t, sol = lib.odeint_event(fly, y0, torch.tensor([0.0], dtype=F64), event_fn=guarded,
                                        rtol=1e-8, atol=1e-8)
        assert abs(event_t.item() - T) < 1e-7, (lib.__name__, event_t.item())
        (sol[0][-1] + 2 * sol[1][-1]).sum().backward()
        out.append((event_t.detach(), sol[0][-1].detach(), y0[0].grad.clone(), y0[1].grad.clone()))
    for ours, theirs in zip(out[0][:2], out[1][:2]):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # pos(T) = 1 + 3T - T^2/2 and d/d(pos0, vel0) of pos(T) + 2 vel(T) = (1, T + 2), at fixed T
    ours = out[list(LIBS).index("neuralode")]
    torch.testing.assert_close(ours[1], torch.tensor([1 + 3 * T - T * T / 2], dtype=F64))
    torch.testing.assert_close(torch.cat(ours[2:]), torch.tensor([1.0, T + 2], dtype=F64))


def test_odeint_adjoint_event_time_is_an_output():
    """torchdiffeq's adjoint event test: event_t.backward() and y.sum().backward() both run."""
    f, y0, t = _problem(F64)
    target = f.exact(t[-1]).detach()
    for lib in LIBS.values():
        y0_ = y0.clone().requires_grad_(True)
        event_t, y = lib.odeint_adjoint(f, y0_, t[0:2], event_fn=lambda s, y: (y - target).sum(), method="dopri5")
        assert abs(event_t.item() - t[-1].item()) < 1e-4 * t[-1].item()
        event_t.backward(retain_graph=True)
        y.sum().backward()
        assert y0_.grad is not None


# -- dense output ---------------------------------------------------------------------------------------
def test_odeint_dense_matches_at_scalar_times():
    f = Linear().double()
    y0 = torch.linspace(-1, 1, 6, dtype=F64)
    t0, t1 = torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64)
    ours, theirs = _both(lambda lib: lib.odeint_dense(f, y0, t0, t1))
    for s in (0.0, 0.3, 1.234, 2.0):
        ts = torch.tensor(s, dtype=F64)
        torch.testing.assert_close(ours(ts), theirs(ts), rtol=1e-7, atol=1e-7)
    many = ours(torch.linspace(0, 2, 9, dtype=F64))
    torch.testing.assert_close(many, f.exact(torch.linspace(0, 2, 9, dtype=F64), y0).detach(), rtol=1e-6, atol=1e-6)


# -- errors ------------------------------------------------------------------------------------------------
def _raised(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001  (the type is what is compared)
        return e
    return None


BAD = {
    "t not a tensor": dict(t=[0.0, 1.0]),
    "t 2-D": dict(t=torch.zeros(2, 2)),
    "t integer": dict(t=torch.tensor([0, 1])),
    "t not monotonic": dict(t=torch.tensor([0.0, 1.0, 0.5])),
    "t repeated": dict(t=torch.tensor([0.0, 0.0])),
    "unknown method": dict(method="rk45"),
    "y0 a list": dict(y0=[torch.ones(1)]),
    "rtol requires grad": dict(rtol=torch.tensor(1e-3, requires_grad=True)),
    "step_size with grid_constructor": dict(method="euler", options=dict(step_size=0.1,
                                                                      grid_constructor=lambda f, y, t: t)),
    "duplicate step_t and jump_t": dict(options=dict(step_t=torch.tensor([0.5]), jump_t=torch.tensor([0.5]))),
    "events need len(t) == 2": dict(t=torch.tensor([0.0, 0.5, 1.0]), event_fn=lambda t, y: y.sum()),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_torchdiffeqs_exception_type(case):
    kw = dict(y0=torch.ones(1), t=torch.tensor([0.0, 1.0]))
    kw.update(BAD[case])
    y0, t = kw.pop("y0"), kw.pop("t")
    f = lambda s, y: -y  # noqa: E731
    theirs = _raised(lambda: torchdiffeq.odeint(f, y0, t, **kw))
    ours = _raised(lambda: neuralode.odeint(f, y0, t, **kw))
    assert theirs is not None and ours is not None, (theirs, ours)
    assert isinstance(ours, type(theirs)), (type(ours), type(theirs), ours)


def test_adjoint_errors_match():
    f = lambda t, y: -y  # noqa: E731
    y0, t = torch.ones(1), torch.tensor([0.0, 1.0])
    for call in (lambda lib: lib.odeint_adjoint(f, y0, t),  # not a module, no adjoint_params
                 lambda lib: lib.odeint_adjoint(nn.Linear(1, 1), y0, t, method="dopri5", adjoint_method="bosh3",
                                                options=dict(first_step=0.1))):
        theirs, ours = _raised(lambda: call(torchdiffeq)), _raised(lambda: call(neuralode))
        assert isinstance(theirs, ValueError) and isinstance(ours, ValueError)


def test_max_num_steps_is_an_assertion_error_in_both():
    f = lambda t, y: -y  # noqa: E731
    for lib in LIBS.values():
        with pytest.raises(AssertionError):
            lib.odeint(f, torch.ones(1), torch.tensor([0.0, 100.0]), options=dict(max_num_steps=3))
