"""Per-sample stepping (``options=dict(per_sample=True)``): each sample of a batch is solved as if
alone, with its own steps, and gradients in every mode equal direct backprop."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralode import Checkpoint, SolverError, odeint, record_stats

F64 = torch.float64
PS = dict(per_sample=True)


class Field(nn.Module):
    """A small MLP field with a per-sample (vector) time input: rows are independent."""

    def __init__(self, dim=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1, self.l2 = nn.Linear(dim, 16).double(), nn.Linear(16, dim).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.7)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.3 * torch.sin(3 * t))[:, None]


def _alone(f, y0_row, t_row, tol=1e-9, **kw):
    return odeint(lambda t, y: f(t.expand(1), y[None])[0], y0_row, t_row, rtol=tol, atol=tol, **kw)


def _loss_grads(f, y0, t, grad, options, tol, method="dopri5"):
    """Gradients of sum(ys^2) + sum(ys[-1, :, 0]) with respect to y0 and f's parameters."""
    y = y0.clone().requires_grad_(True)
    ys = odeint(f, y, t, rtol=tol, atol=tol, method=method, options=options, grad=grad)
    return torch.autograd.grad((ys ** 2).sum() + ys[-1, :, 0].sum(), (y, *f.parameters()))


def van_der_pol(t, s):
    """Van der Pol with mu carried as a third state column (zero derivative), so rows can be dropped."""
    x, v, mu = s.unbind(-1)
    return torch.stack([v, mu * (1 - x * x) * v - x, torch.zeros_like(mu)], -1)


def _vdp_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(0.1), math.log(20), generator=g))
    return torch.stack([torch.full((n,), 2.0, dtype=F64), torch.zeros(n, dtype=F64), mu], -1)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
@pytest.mark.parametrize("compact", [False, True])
def test_each_sample_as_if_alone(method, compact):
    f = Field()
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    with record_stats() as stats:
        ys = odeint(f, y0, t, rtol=1e-7, atol=1e-7, method=method, options=dict(PS, compact=compact))
    assert ys.shape == (5, 4, 2)
    for b in range(4):
        with record_stats() as alone:
            yb = _alone(f, y0[b], t, tol=1e-7, method=method)
        torch.testing.assert_close(ys[:, b], yb, rtol=1e-11, atol=1e-11)
        assert stats.sample_accepted[b] == alone.n_accepted and stats.sample_rejected[b] == alone.n_rejected


def test_per_sample_time_grids_equal_solving_each_series_alone():
    f = Field()
    y0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    T = torch.stack([torch.linspace(0.0, 1.0, 4, dtype=F64), torch.linspace(0.5, 2.5, 4, dtype=F64),
                     torch.tensor([0.0, 0.3, 0.3, 0.3], dtype=F64)])  # the last row is padded
    ys = odeint(f, y0, T, rtol=1e-9, atol=1e-9, options=PS)
    for b in range(3):
        distinct = torch.unique_consecutive(T[b])
        yb = _alone(f, y0[b], distinct)
        torch.testing.assert_close(ys[: len(distinct), b], yb, rtol=1e-11, atol=1e-11)
        assert torch.equal(ys[len(distinct) - 1:, b], ys[len(distinct) - 1, b].expand(4 - len(distinct) + 1, 2))


@pytest.mark.parametrize("grad", ["checkpoint", Checkpoint(every=3), "adjoint"])
def test_gradients_equal_per_sample_direct_backprop(grad):
    f = Field()
    y0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    t = torch.linspace(0, 2, 6, dtype=F64)

    direct = _loss_grads(f, y0, t, "direct", PS, tol=1e-9)
    other = _loss_grads(f, y0, t, grad, dict(PS, compact=True), tol=1e-9)
    tol = 1e-6 if grad == "adjoint" else 1e-12  # the adjoint's backward solve has its own error
    for a, b in zip(other, direct):
        assert ((a - b).abs().max() / b.abs().max()) < tol


@pytest.mark.parametrize("grad", ["checkpoint", "adjoint"])
def test_gradients_with_per_sample_grids_equal_direct(grad):
    """Rows with their own start, end and spacing, one padded by repeating its last time: checkpoint
    replays the loop exactly; the adjoint solves backwards jointly on s = 0, 1, ..., n-1."""
    f = Field()
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    T = torch.stack([torch.linspace(0, 1 + 0.4 * b, 4, dtype=F64) for b in range(3)]
                    + [torch.tensor([0.5, 0.9, 1.6, 1.6], dtype=F64)])
    out = []
    for mode in ("direct", grad):
        y = y0.clone().requires_grad_(True)
        ys = odeint(f, y, T, rtol=1e-10, atol=1e-10, options=PS, grad=mode)
        out.append(torch.autograd.grad((ys ** 2).sum() + ys[2, :, 1].sum(), (y, *f.parameters())))
    tol = 1e-7 if grad == "adjoint" else 1e-12  # the adjoint's backward solve has its own error
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_tuple_state_per_sample():
    def f(t, s):
        z, logp = s
        return -z * (1 + t[:, None]), -z.sum(1)

    y0 = (torch.ones(3, 2, dtype=F64), torch.zeros(3, dtype=F64))
    z, logp = odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-9, atol=1e-9, options=PS)
    torch.testing.assert_close(z[-1], torch.full((3, 2), math.exp(-1.5), dtype=F64), rtol=1e-8, atol=1e-8)
    assert logp.shape == (2, 3)


def test_per_sample_saves_steps_on_a_mixed_batch():
    """Van der Pol with mu from 0.1 to 20: each sample takes the steps it needs."""
    y0 = _vdp_batch(32)
    t = torch.linspace(0, 10, 20, dtype=F64)
    with record_stats() as joint:
        yj = odeint(lambda t, s: van_der_pol(t.expand(len(s)), s), y0, t, rtol=1e-6, atol=1e-6)
    with record_stats() as per:
        yp = odeint(van_der_pol, y0, t, rtol=1e-6, atol=1e-6, options=dict(PS, compact=True))
    mean_steps = per.sample_accepted.double().mean().item()
    assert mean_steps < 0.5 * joint.n_accepted, (mean_steps, joint.n_accepted)
    torch.testing.assert_close(yp, yj, rtol=1e-3, atol=1e-3)  # both within tolerance of the solution


def test_time_gradients_per_sample():
    f = Field()
    y0 = torch.randn(2, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    T = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.9, 1.7]], dtype=F64, requires_grad=True)
    ys = odeint(f, y0, T, rtol=1e-10, atol=1e-10, options=PS)
    (g,) = torch.autograd.grad(ys[-1].sum(), T)
    eps = 1e-6
    for b, j in ((0, 0), (1, 0), (1, 2)):  # a start time, and an output time
        Tp, Tm = T.detach().clone(), T.detach().clone()
        Tp[b, j] += eps
        Tm[b, j] -= eps
        num = (odeint(f, y0, Tp, rtol=1e-10, atol=1e-10, options=PS)[-1].sum()
               - odeint(f, y0, Tm, rtol=1e-10, atol=1e-10, options=PS)[-1].sum()) / (2 * eps)
        assert abs(g[b, j].item() - num.item()) < 1e-5 * max(1.0, abs(num.item())), (b, j)


# -- stiff methods per sample -------------------------------------------------------------------------------
def _stiff_vdp_batch():
    """Van der Pol from mildly (mu = 0.4) to very stiff (mu = 160): one step size would suit none."""
    mu = torch.tensor([0.4, 3.0, 25.0, 160.0], dtype=F64)
    return torch.stack([torch.full_like(mu, 2.0), torch.zeros_like(mu), mu], -1)


@pytest.mark.parametrize("method, tol", [("kvaerno5", 1e-7), ("kvaerno3", 1e-5)])
def test_stiff_per_sample_equals_each_sample_alone(method, tol):
    """Each row's Newton solves use its own Jacobian block and step: the result is the sample's own
    solve (to the Newton tolerance: the joint stepper reuses J across steps, this one does not), with
    about the same steps; and it matches scipy's Radau."""
    from scipy.integrate import solve_ivp

    y0, t = _stiff_vdp_batch(), torch.linspace(0, 2, 5, dtype=F64)
    with record_stats() as stats:
        ys = odeint(van_der_pol, y0, t, rtol=tol, atol=tol, method=method, options=PS)
    assert stats.n_jac > 0 and stats.n_newton_iters > 0
    for b in range(4):
        with record_stats() as alone:
            yb = odeint(lambda t, s: van_der_pol(t.expand(1), s[None])[0], y0[b], t, rtol=tol, atol=tol, method=method)
        torch.testing.assert_close(ys[:, b], yb, rtol=20 * tol, atol=20 * tol)
        assert abs(int(stats.sample_accepted[b]) - alone.n_accepted) <= max(2, alone.n_accepted // 10)
        ref = solve_ivp(lambda t, s: van_der_pol(torch.tensor([t]), torch.tensor(s)[None])[0].numpy(), (0, 2),
                        y0[b].numpy(), method="Radau", t_eval=t.numpy(), rtol=1e-10, atol=1e-10).y.T
        assert float((ys[:, b] - torch.tensor(ref)).abs().max()) < 1e3 * tol


def test_stiff_per_sample_saves_steps_over_the_joint_solve():
    y0, t = _stiff_vdp_batch(), torch.linspace(0, 2, 5, dtype=F64)
    with record_stats() as joint:
        odeint(lambda t, s: van_der_pol(t.expand(len(s)), s), y0, t, rtol=1e-6, atol=1e-6, method="kvaerno5")
    with record_stats() as per:
        odeint(van_der_pol, y0, t, rtol=1e-6, atol=1e-6, method="kvaerno5", options=dict(PS, compact=True))
    assert per.sample_accepted.double().mean() < 0.9 * joint.n_accepted


@pytest.mark.parametrize("grad", ["checkpoint", "adjoint"])
def test_stiff_per_sample_gradients_equal_direct_and_each_sample_alone(grad):
    f = Field()
    y0 = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    t = torch.linspace(0, 0.5, 3, dtype=F64)

    direct = _loss_grads(f, y0, t, "direct", PS, tol=1e-8, method="kvaerno5")
    other = _loss_grads(f, y0, t, grad, dict(PS, compact=True), tol=1e-8, method="kvaerno5")
    for a, b in zip(other, direct):  # to tolerance: direct mode's stages carry one more Newton correction
        assert ((a - b).abs().max() / b.abs().max()) < 1e-6
    y1 = y0[1].clone().requires_grad_(True)
    ys = odeint(lambda t, y: f(t.expand(1), y[None])[0], y1, t, rtol=1e-8, atol=1e-8, method="kvaerno5")
    (g1,) = torch.autograd.grad((ys ** 2).sum() + ys[-1, 0], y1)
    torch.testing.assert_close(direct[0][1], g1, rtol=1e-6, atol=1e-8)


def test_stiff_per_sample_events():
    y0 = _balls(3)
    t = torch.tensor([0.0, 10.0], dtype=F64)
    et, ys = odeint(ball, y0, t, event_fn=lambda t, y: y[..., 0], method="kvaerno5", rtol=1e-9, atol=1e-9, options=PS)
    exact = (y0[:, 1] + torch.sqrt(y0[:, 1] ** 2 + 2 * y0[:, 2] * y0[:, 0])) / y0[:, 2]  # h + v t - g t^2 / 2 = 0
    torch.testing.assert_close(et, exact, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ys[1, :, 0], torch.zeros(3, dtype=F64), rtol=0, atol=1e-8)


def test_auto_switches_only_the_stiff_samples():
    """method="auto" per sample: the stiff rows (mu = 300, 1000) switch to kvaerno5, the others stay
    explicit, and every row ends where its own "auto" solve does; the subset (compact) and
    whole-batch paths agree, and checkpoint gradients equal direct ones."""
    mu = torch.tensor([0.4, 3.0, 300.0, 1000.0], dtype=F64)
    y0 = torch.stack([torch.full_like(mu, 2.0), torch.zeros_like(mu), mu], -1)
    t = torch.linspace(0, 3, 4, dtype=F64)
    out = {}
    for compact in (False, True):
        with record_stats() as stats:
            out[compact] = odeint(van_der_pol, y0, t, rtol=1e-6, atol=1e-6, method="auto",
                                  options=dict(PS, compact=compact))
        assert stats.n_switches == 2 and 0 < stats.switched_at < 0.2
    torch.testing.assert_close(out[True], out[False], rtol=1e-12, atol=1e-12)
    for b in range(4):
        with record_stats() as alone:
            yb = odeint(lambda t, s: van_der_pol(t.expand(1), s[None])[0], y0[b], t, rtol=1e-6, atol=1e-6, method="auto")
        assert alone.n_switches == (b >= 2)
        torch.testing.assert_close(out[False][:, b], yb, rtol=1e-8, atol=1e-8)
    grads = []
    for mode in ("direct", "checkpoint"):
        y = y0.clone().requires_grad_(True)
        ys = odeint(van_der_pol, y, t, rtol=1e-6, atol=1e-6, method="auto", options=PS, grad=mode, adjoint_params=())
        grads.append(torch.autograd.grad(ys[-1, :, :2].sum(), y)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(method="rk4"), "per-sample stepping needs an adaptive explicit method"),
    (dict(method="explicit_adams"), "per-sample stepping needs an adaptive explicit method"),
    (dict(method="implicit_euler"), "per-sample stepping needs an adaptive explicit method"),
    (dict(method="kvaerno5", options=dict(PS, linear_solver="gmres")), "one Newton system per sample"),
    (dict(options=dict(PS, step_size=0.1)), "per-sample stepping does not take step_size"),
    (dict(options=dict(compact=True)), "compact applies to per-sample solves"),
])
def test_bad_settings(kw, match):
    options = kw.pop("options", PS)
    with pytest.raises(ValueError, match=match):
        odeint(lambda t, y: -y, torch.ones(3, 2), torch.tensor([0.0, 1.0]), options=options, **kw)


def test_bad_time_grids_name_the_row_and_sizes():
    y0 = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"row 1 of t is not monotonic"):
        odeint(lambda t, y: -y, y0, torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 1.0]]), options=PS)
    with pytest.raises(ValueError, match=r"t has 3 rows but y0 has a batch of 2"):
        odeint(lambda t, y: -y, y0, torch.zeros(3, 2), options=PS)
    with pytest.raises(ValueError, match="leading dimension is the batch"):
        odeint(lambda t, y: -y, torch.tensor(1.0), torch.tensor([0.0, 1.0]), options=PS)


@pytest.mark.parametrize("encoder, method", [("gru", "dopri5"), ("odernn", "dopri5"), ("gru", "kvaerno5")])
def test_latent_ode_per_sample_grids_match_the_union_grid(encoder, method, monkeypatch):
    """The latent ODE on a batch of spirals: per-sample grids give the union grid's posterior and
    predictions (to the solver tolerance) at every series' own times; the ODE-RNN encoder's flows
    step per sample too."""
    import neuralode.solvers.per_sample as per_sample
    from neuralode.data.timeseries import collate_series, timeseries_datasets
    from neuralode.models.latent_ode import LatentODE
    from neuralode.solvers import SolverSettings

    train, _ = timeseries_datasets("spirals", n=20, n_obs=10, noise=0.1, seed=0, test_fraction=0.5, missing_rate=0.3)
    batch = collate_series([train[i] for i in range(8)], train.t0)
    settings = SolverSettings(method=method, rtol=1e-6, atol=1e-7)
    calls = []
    solve = per_sample.solve_per_sample
    monkeypatch.setattr(per_sample, "solve_per_sample", lambda *a, **k: calls.append(a[3].shape) or solve(*a, **k))
    out = {}
    for grid in ("union", "per_sample"):
        torch.manual_seed(0)
        model = LatentODE(2, settings, latent_dim=4, encoder=encoder, time_grid=grid).eval()
        with torch.no_grad():
            out[grid] = model(batch)
    n_flows = len(calls) - 1  # one per-sample solve is the trajectory; the rest are the encoder's flows
    assert n_flows == (0 if encoder == "gru" else int((batch["obs"].sum(-1) > 0).sum(1).max()))
    present = batch["present"][..., None]
    torch.testing.assert_close(out["per_sample"]["mu"], out["union"]["mu"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["per_sample"]["pred"] * present, out["union"]["pred"] * present, rtol=1e-4, atol=1e-4)


# -- events per sample ----------------------------------------------------------------------------
def _balls(n=5):
    """Falling balls, one gravity per sample carried in the state (zero derivative): y = (h, v, g)."""
    g = torch.linspace(0.5, 2.0, n, dtype=F64)
    return torch.stack([torch.linspace(1.0, 3.0, n, dtype=F64), torch.linspace(-0.5, 0.5, n, dtype=F64), g], -1)


def ball(t, y):
    return torch.stack([y[..., 1], -y[..., 2], torch.zeros_like(y[..., 2])], -1)


def ground_or_apex(t, y):
    """Two components: the ground (h = 0), and the apex for balls thrown upwards (v = 0)."""
    return torch.stack([y[..., 0], y[..., 1] - 1e3 * (y[..., 1] <= 0)], -1)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("event", [lambda t, y: y[..., 0], ground_or_apex])
def test_events_per_sample_equal_each_sample_alone(method, compact, event):
    y0 = _balls()
    t = torch.tensor([0.0, 10.0], dtype=F64)
    et, ys = odeint(ball, y0, t, event_fn=event, method=method, rtol=1e-9, atol=1e-9, options=dict(PS, compact=compact))
    assert et.shape == (5,) and ys.shape == (2, 5, 3) and torch.equal(ys[0], y0)
    for b in range(5):
        e1, y1 = odeint(ball, y0[b], t, event_fn=lambda t, y: event(t, y[None])[0], method=method, rtol=1e-9, atol=1e-9)
        assert abs(float(e1) - float(et[b])) < 1e-12 * max(1.0, float(e1))
        torch.testing.assert_close(ys[1, b], y1[1], rtol=1e-9, atol=1e-11)


def test_event_rows_with_their_own_start_a_root_at_t0_and_gradients():
    y0 = _balls(4)
    y0[1, 0] = 0.0  # on the ground at t0: torchdiffeq's rule makes t0 the event
    T = torch.tensor([[0.0, 5.0], [0.0, 5.0], [0.5, 5.0], [1.0, 5.0]], dtype=F64)
    y = y0.clone().requires_grad_(True)
    et, ys = odeint(ball, y, T, event_fn=lambda t, y: y[..., 0], rtol=1e-10, atol=1e-10, options=PS)
    assert float(et[1]) == 0.0 and torch.equal(ys[1, 1].detach(), y0[1])
    (g_ps,) = torch.autograd.grad(ys[1].square().sum(), y)
    for mode in ("checkpoint", Checkpoint(every=2), "adjoint"):  # the same through a replay, and jointly backwards
        y2 = y0.clone().requires_grad_(True)
        et2, ys2 = odeint(ball, y2, T, event_fn=lambda t, y: y[..., 0], rtol=1e-10, atol=1e-10, options=PS, grad=mode,
                          adjoint_params=())
        assert torch.equal(et2, et) and torch.equal(ys2.detach(), ys.detach())
        (g2,) = torch.autograd.grad(ys2[1].square().sum(), y2)
        torch.testing.assert_close(g2, g_ps, rtol=1e-7 if mode == "adjoint" else 1e-12, atol=1e-9)
    for b in range(4):
        yb = y0[b].clone().requires_grad_(True)
        e1, y1 = odeint(ball, yb, T[b], event_fn=lambda t, y: y[0], rtol=1e-10, atol=1e-10)
        assert abs(float(e1) - float(et[b])) < 1e-12
        (g1,) = torch.autograd.grad(y1[1].square().sum(), yb)  # the event time carries no gradient, as jointly
        torch.testing.assert_close(g_ps[b], g1, rtol=1e-8, atol=1e-10)


def test_bad_event_settings_per_sample():
    y0, t = _balls(3), torch.tensor([0.0, 1.0], dtype=F64)
    ground = lambda t, y: y[..., 0]  # noqa: E731
    with pytest.raises(ValueError, match="need a t without gradient"):
        odeint(ball, y0, t.clone().requires_grad_(True), event_fn=ground, options=PS)
    with pytest.raises(ValueError, match="2 times"):
        odeint(ball, y0, torch.tensor([0.0, 1.0, 2.0], dtype=F64), event_fn=ground, options=PS)
    with pytest.raises(ValueError, match=r"one value \(or a row of values\) per sample"):
        odeint(ball, y0, t, event_fn=lambda t, y: y[..., 0].sum(), options=PS)
    with pytest.raises(SolverError, match="did not occur within max_num_steps=50"):
        odeint(ball, y0, t, event_fn=lambda t, y: y[..., 2], options=dict(PS, max_num_steps=50))


def test_latent_ode_per_sample_grids_with_the_adjoint_match_union_gradients():
    """model.time_grid=per_sample with grad=adjoint: the same loss gradients as the union grid."""
    from neuralode.data.timeseries import collate_series, timeseries_datasets
    from neuralode.models.latent_ode import LatentODE
    from neuralode.solvers import SolverSettings

    train, _ = timeseries_datasets("spirals", n=12, n_obs=8, noise=0.1, seed=1, test_fraction=0.5, missing_rate=0.3)
    batch = collate_series([train[i] for i in range(6)], train.t0)
    grads = {}
    for grid, grad in (("union", "direct"), ("per_sample", "adjoint")):
        torch.manual_seed(0)
        settings = SolverSettings(method="dopri5", rtol=1e-10, atol=1e-10, grad=grad)
        model = LatentODE(2, settings, latent_dim=4, time_grid=grid).double().eval()
        b = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        pred = model(b)["pred"]
        g = torch.autograd.grad((pred * b["present"][..., None]).square().sum(), list(model.parameters()))
        grads[grid] = torch.cat([x.reshape(-1) for x in g])
    assert (grads["per_sample"] - grads["union"]).abs().max() < 1e-6 * grads["union"].abs().max()
