"""latent_ode / rnn: ELBO pieces, masking, union time grids, bad input, and the real entry point."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import images, scalars, train_here
from neuralode.data import DataError
from neuralode.data.timeseries import IrregularSeries, collate_series, make_periodic, make_spirals
from neuralode.models import SolverSettings
from neuralode.models.latent_ode import LatentODE
from neuralode.tasks.latent_ode import LatentTimeSeries, kl_normal_std_normal


def make_cfg(kind="latent_ode", encoder="gru", grad="direct", rtol=1e-3, atol=1e-4, **data):
    return OmegaConf.create(dict(
        model=dict(name=kind, kind=kind, encoder=encoder, latent_dim=4, rec_hidden=12, dyn_hidden=12, dyn_layers=1,
                   dec_hidden=12, obs_std=0.1, init_logvar=-4.0, kl_weight=1.0, n_figures=2, time_grid="union"),
        dataset=dict(dict(name="spirals", n=16, n_obs=10, noise=0.1, seed=0, test_fraction=0.25, missing_rate=0.3,
                          n_interp=5, n_extrap=8), **data),
        solver=dict(method="dopri5", grad=grad, seminorm=False, step_size=None, options={},
                    adjoint=dict(rtol=None, atol=None, method=None, options={})),
        rtol=rtol, atol=atol))


def make_task(**kw):
    torch.manual_seed(0)
    task = LatentTimeSeries(make_cfg(**kw))
    train, test = task.datasets()
    return task, train, test


# -- ELBO ----------------------------------------------------------------------------------------

def test_kl_matches_hand_computed_value():
    mu = torch.tensor([[1.0, -0.5]])
    logvar = torch.tensor([[math.log(0.25), 0.0]])
    # 0.5 * [(1 + 0.25 - log 0.25 - 1) + (0.25 + 1 - 0 - 1)] = 0.5 * (0.25 + 1.3862944 + 0.25)
    assert kl_normal_std_normal(mu, logvar).item() == pytest.approx(0.9431472, abs=1e-6)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert kl_normal_std_normal(mu, logvar).item() == pytest.approx(torch.distributions.kl_divergence(q, p).sum().item(),
                                                                   rel=1e-6)


def test_loss_is_nll_plus_kl_per_observed_value():
    task, train, _ = make_task()
    task.model.eval()
    batch = train.collate([train[i] for i in range(4)])
    with torch.no_grad():
        loss, metrics = task.loss(batch)
        out = task.model(batch)
    n = batch["obs"].sum()
    r = (batch["values"] - out["pred"]) / 0.1
    nll = ((0.5 * r ** 2 + math.log(0.1) + 0.5 * math.log(2 * math.pi)) * batch["obs"]).sum()
    kl = 0.5 * (out["mu"] ** 2 + out["logvar"].exp() - out["logvar"] - 1).sum()
    assert loss.item() == pytest.approx(((nll + kl) / n).item(), rel=1e-5)
    assert metrics["kl"] == pytest.approx((kl / n).item(), rel=1e-5)


# -- masking -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, encoder", [("latent_ode", "gru"), ("latent_ode", "odernn"), ("rnn", "gru")])
def test_values_at_unobserved_points_change_nothing(kind, encoder):
    task, train, _ = make_task(kind=kind, encoder=encoder)
    task.model.eval()
    batch = train.collate([train[i] for i in range(5)])
    assert (batch["obs"].sum(-1) > 0).any() and ((batch["obs"] == 0) & batch["present"][..., None]).any()
    with torch.no_grad():
        loss, metrics = task.loss(batch)
        nobody = (batch["obs"] + batch["interp"] + batch["extrap"]) == 0  # padding and missing components
        assert ((batch["obs"].sum(-1, keepdim=True) > 0) & nobody).any(), "missing values inside vectors"
        changed = dict(batch, values=torch.where(nobody, torch.full_like(batch["values"], float("nan")), batch["values"]))
        loss2, metrics2 = task.loss(changed)
        assert loss2.item() == loss.item() and metrics2 == metrics
        changed = dict(batch, values=torch.where(nobody, 1e6 * torch.randn_like(batch["values"]), batch["values"]))
        loss3, metrics3 = task.loss(changed)
        assert loss3.item() == loss.item() and metrics3 == metrics
        # Held-out targets are never seen by the model: the loss stays, only their RMSE moves.
        held = (batch["interp"] + batch["extrap"]) > 0
        moved = dict(batch, values=torch.where(held, batch["values"] + 1.0, batch["values"]))
        loss4, metrics4 = task.loss(moved)
        assert loss4.item() == loss.item() and metrics4["rmse_obs"] == metrics["rmse_obs"]
        assert metrics4["rmse_extrap"] != metrics["rmse_extrap"]


# -- union of time grids -------------------------------------------------------------------------

def test_union_grid_gives_each_series_its_own_trajectory():
    torch.manual_seed(0)
    solver = SolverSettings(method="dopri5", rtol=1e-7, atol=1e-8, grad="direct")
    model = LatentODE(2, solver, latent_dim=4, dyn_hidden=16)
    own = [torch.sort(torch.rand(n) * 3).values for n in (5, 9, 3)]
    union = torch.unique(torch.cat(own), sorted=True)
    z0 = torch.randn(3, 4)
    with torch.no_grad():
        together = model.latent_trajectory(z0, union, 0.0)
        for b, t in enumerate(own):
            alone = model.latent_trajectory(z0[b:b + 1], t, 0.0)[0]
            idx = torch.searchsorted(union, t)
            torch.testing.assert_close(together[b, idx], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder", ["gru", "odernn"])
def test_encoder_reads_each_series_alone(encoder):
    """q(z0) of a series does not depend on the other series in its batch (to solver tolerance)."""
    task, train, _ = make_task(encoder=encoder, rtol=1e-7, atol=1e-8)
    items = [train[i] for i in range(4)]
    with torch.no_grad():
        mu, logvar = task.model.encoder(train.collate(items))
        for b, item in enumerate(items):
            mu1, logvar1 = task.model.encoder(train.collate([item]))
            torch.testing.assert_close(mu[b], mu1[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logvar[b], logvar1[0], rtol=1e-5, atol=1e-5)


def test_collate_puts_series_on_the_sorted_union():
    a = dict(times=torch.tensor([0.5, 1.0]), values=torch.ones(2, 1), obs=torch.ones(2, 1))
    b = dict(times=torch.tensor([0.2, 1.0, 2.0]), values=2 * torch.ones(3, 1), obs=torch.tensor([[1.0], [0.0], [1.0]]))
    ds = IrregularSeries([a, b])
    batch = collate_series([ds[0], ds[1]])
    assert batch["times"].tolist() == pytest.approx([0.2, 0.5, 1.0, 2.0])
    assert batch["present"].tolist() == [[False, True, True, False], [True, False, True, True]]
    assert batch["obs"][..., 0].tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]


# -- bad input -----------------------------------------------------------------------------------

def test_unsorted_times_are_sorted():
    s = dict(times=torch.tensor([2.0, 0.5, 1.0]), values=torch.tensor([[2.0], [0.5], [1.0]]),
             obs=torch.tensor([1.0, 1.0, 0.0]), interp=torch.tensor([0.0, 0.0, 1.0]))
    item = IrregularSeries([s])[0]
    assert item["times"].tolist() == [0.5, 1.0, 2.0]
    assert item["values"][:, 0].tolist() == [0.5, 1.0, 2.0]
    assert item["obs"][:, 0].tolist() == [1.0, 0.0, 1.0] and item["interp"][:, 0].tolist() == [0.0, 1.0, 0.0]


def test_series_without_observations_is_a_clear_error():
    good = dict(times=torch.tensor([0.0, 1.0]), values=torch.zeros(2, 2), obs=torch.ones(2, 2))
    empty = dict(times=torch.tensor([0.0, 1.0]), values=torch.zeros(2, 2), obs=torch.zeros(2, 2))
    with pytest.raises(DataError, match="series 1 has no observations"):
        IrregularSeries([good, empty])
    with pytest.raises(DataError, match="batch item 0 has no observations"):
        collate_series([dict(good, obs=torch.zeros(2, 2))])
    with pytest.raises(DataError, match="repeated time"):
        IrregularSeries([dict(good, times=torch.tensor([1.0, 1.0]))])


def test_generators_shapes_and_directions():
    spirals = make_spirals(n=4, n_obs=30, seed=1)
    assert all(int(s["obs"][:, 0].sum()) == 30 and s["values"].shape[1] == 2 for s in spirals)
    # Counter-clockwise (even) and clockwise (odd): the sign of the angular momentum x*vy - y*vx.
    for i, s in enumerate(spirals):
        c = s["clean"][torch.argsort(s["times"])]
        spin = (c[:-1, 0] * (c[1:, 1] - c[:-1, 1]) - c[:-1, 1] * (c[1:, 0] - c[:-1, 0])).sum()
        assert (spin > 0) == (i % 2 == 0)
    periodic = make_periodic(n=3, n_obs=20, seed=1)
    assert all(0 <= float(s["times"].min()) and float(s["times"].max()) <= 5.0 for s in periodic)


def test_bad_timeseries_config_fails_before_work(tmp_path, caplog):
    assert train_here("model=latent_ode", "dataset=spirals", "dataset.n_obs=0", run_dir=tmp_path / "r") == 2
    assert "dataset.n_obs=0 must be > 0" in caplog.text and "Traceback" not in caplog.text


# -- the real entry point --------------------------------------------------------------------------

TINY_TS = ["dataset.n=40", "dataset.n_obs=10", "trainer.batch_size=8", "trainer.eval_batch_size=10",
           "trainer.limit_batches=2", "trainer.limit_eval_batches=1", "trainer.epochs=1", "optim=adam",
           "optim.lr=0.01", "model.rec_hidden=8", "model.dyn_hidden=8", "model.dec_hidden=8", "rtol=1e-2",
           "atol=1e-3", "eval.rtols=[]", "model.n_figures=2"]
TS_TAGS = {"train/loss", "train/nll", "train/rmse_obs", "train/rmse_interp", "train/rmse_extrap", "test/loss",
           "test/rmse_interp", "test/rmse_extrap", "nfe/forward", "nfe/backward", "time/iter", "lr"}


@pytest.mark.parametrize("overrides", [
    ("model=latent_ode", "model.encoder=gru", "solver.grad=adjoint"),
    ("model=latent_ode", "model.encoder=odernn", "solver.grad=direct"),
    ("model=rnn",),
], ids=["latent_ode-gru", "latent_ode-odernn", "rnn"])
def test_entry_point_writes_scalars_and_figure(overrides, tmp_path):
    out = tmp_path / "run"
    dataset = "dataset=periodic" if "odernn" in " ".join(overrides) else "dataset=spirals"
    assert train_here(*overrides, dataset, *TINY_TS, run_dir=out) == 0
    logged = scalars(out)
    assert TS_TAGS <= logged.keys(), TS_TAGS - logged.keys()
    assert "train/acc" not in logged and [s for s, _ in logged["train/loss"]] == [1, 2]
    if overrides[0] == "model=latent_ode":
        assert "train/kl" in logged
    if importlib.util.find_spec("matplotlib"):  # the figure needs the plots extra
        image = images(out)["figures/test_series"][-1]
        assert (image.width, image.height) == (2 * 320, 360)  # model.n_figures=2 panels of 3.2 in at 100 dpi
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["primary_metric"] == "test_rmse_extrap" and metrics["test_primary"] > 0
    if "solver.grad=adjoint" in overrides:
        assert metrics["nfe_backward"] > 0
    assert (out / "checkpoints" / "last.pt").exists()


def test_figure_is_skipped_without_matplotlib(monkeypatch):
    from neuralode import plots

    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    monkeypatch.setattr(plots, "_hinted", False)
    task, _, _ = make_task()
    logged = []
    task.log_figures(SimpleNamespace(add_image=lambda *args: logged.append(args)), step=1)
    assert logged == [] and plots._hinted  # no image, one hint, and training goes on


@pytest.mark.parametrize("encoder", ["gru", "odernn"])
def test_every_gradient_mode_gives_the_same_gradient(encoder):
    grads = {}
    for grad in ("direct", "adjoint", "checkpoint"):
        task, train, _ = make_task(encoder=encoder, grad=grad, rtol=1e-6, atol=1e-7)
        task.model.eval()
        loss, _ = task.loss(train.collate([train[i] for i in range(3)]))
        loss.backward()
        grads[grad] = torch.cat([p.grad.flatten() for p in task.model.parameters()])
    for grad in ("adjoint", "checkpoint"):
        torch.testing.assert_close(grads[grad], grads["direct"], rtol=1e-3, atol=1e-3)
