"""Continuous normalizing flows: change of variables, trace estimators, invertibility,
RNODE regularisers, toy data, and the real entry point with ``model=cnf``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralode.data.toy2d import TOY_NAMES, entropy, log_density, sample_toy, toy_datasets
from neuralode.models import SolverSettings
from neuralode.models.cnf import (CNF, CNFBlock, CNFField, Trace, bits_per_dim, cnf_2d, cnf_image, dequantize_logit,
                                  logit_inverse, standard_normal_logprob)
from neuralode.models.unet import UNetField

TIGHT = SolverSettings(method="dopri5", rtol=1e-9, atol=1e-9, grad="direct")


class Linear(nn.Module):
    """f(t, z) = A z."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, t, z):
        return z @ self.a.T


def linear_block(a, trace="exact", noise="gaussian", t_end=1.0, solver=TIGHT, regularise=False):
    return CNFBlock(Linear(a), solver, trace=trace, noise=noise, time_length=t_end, regularise=regularise)


@pytest.fixture
def a_matrix():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.5


def test_change_of_variables_linear_field_exact(a_matrix):
    t_end = 0.7
    block = linear_block(a_matrix, t_end=t_end, regularise=True)
    z0 = torch.randn(5, 4, dtype=torch.float64)
    z, delta, kinetic, frob = block(z0)
    # Δlogp = ∫ tr A dt = log det exp(A t); the flow itself is exp(A t).
    assert torch.allclose(delta, torch.full_like(delta, t_end * torch.trace(a_matrix).item()), atol=1e-7)
    assert math.isclose(t_end * torch.trace(a_matrix).item(),
                        torch.logdet(torch.linalg.matrix_exp(a_matrix * t_end)).item(), abs_tol=1e-9)
    assert torch.allclose(z, z0 @ torch.linalg.matrix_exp(a_matrix * t_end).T, atol=1e-7)
    # RNODE integrals: ∫‖∂f/∂z‖²_F = t ‖A‖²_F exactly; ∫‖A z(t)‖² by quadrature of the closed form.
    assert torch.allclose(frob, torch.full_like(frob, t_end * a_matrix.pow(2).sum().item()), atol=1e-7)
    ts = torch.linspace(0, t_end, 2001, dtype=torch.float64)
    zt = torch.stack([z0 @ torch.linalg.matrix_exp(a_matrix * s).T for s in ts])
    ke = torch.trapezoid((zt @ a_matrix.T).pow(2).sum(-1), ts, dim=0)
    assert torch.allclose(kinetic, ke, rtol=1e-5)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_matches_exact_in_expectation(a_matrix, noise):
    block = linear_block(a_matrix, trace="hutchinson", noise=noise, solver=SolverSettings(rtol=1e-6, atol=1e-6,
                                                                                          grad="direct"))
    torch.manual_seed(1)
    z0 = torch.randn(1, 4, dtype=torch.float64).expand(4000, 4).contiguous()
    delta = block(z0)[1]  # one independent noise vector per row, held fixed through the solve
    exact = torch.trace(a_matrix).item()
    mean, se = delta.mean().item(), delta.std().item() / math.sqrt(len(delta))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert delta.std() > 0  # it really is an estimate
    if noise == "rademacher":  # εᵀAε = tr A + off-diagonal terms: variance without the diagonal's
        assert delta.std() < (torch.randn(4000, 4, dtype=torch.float64) @ a_matrix
                              * torch.randn(4000, 4, dtype=torch.float64)).sum(1).std() * 1.5


def test_noise_is_fixed_within_one_solve(a_matrix):
    """With a linear field, a fixed ε gives εᵀAε·t exactly; a re-drawn ε would not."""
    block = linear_block(a_matrix, trace="hutchinson", solver=SolverSettings(rtol=1e-9, atol=1e-9, grad="direct"))
    torch.manual_seed(3)
    z = torch.randn(6, 4, dtype=torch.float64)
    delta = block(z)[1]
    torch.manual_seed(3)
    e = torch.randn_like(torch.randn(6, 4, dtype=torch.float64))  # the solve's noise: drawn right after z
    assert torch.allclose(delta, ((e @ a_matrix.T) * e).sum(1), atol=1e-7)


@pytest.mark.parametrize("grad", ["adjoint", "checkpoint"])
@pytest.mark.parametrize("trace", ["hutchinson", "exact"])
@pytest.mark.parametrize("regularise", [False, True])
def test_two_forward_passes_then_one_backward(grad, trace, regularise):
    """Each solve captures its own noise, trace mode and regulariser flag: two log_prob calls
    followed by one backward give exactly the sum of the two gradients taken separately."""
    model = random_2d_cnf(SolverSettings(rtol=1e-7, atol=1e-7, grad=grad), trace=trace, regularise=True)
    x1, x2 = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def loss(x, seed):
        torch.manual_seed(seed)
        log_p, kin, frob = model.log_prob(x, with_regularisers=regularise)
        return -log_p.mean() + (kin.mean() + frob.mean() if regularise else 0.0)

    params = list(model.parameters())
    separate = [torch.autograd.grad(loss(x, seed), params) for x, seed in ((x1, 11), (x2, 12))]
    both = torch.autograd.grad(loss(x1, 11) + loss(x2, 12), params)
    for b, s1, s2 in zip(both, *separate):
        torch.testing.assert_close(b, s1 + s2, rtol=1e-10, atol=1e-10)


def random_2d_cnf(solver, trace="exact", regularise=False, scale=1.0):
    torch.manual_seed(0)
    model = cnf_2d(solver, hidden=(16, 16), activation="tanh", trace=trace, regularise=regularise).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def test_invertibility_sample_then_evaluate():
    model = random_2d_cnf(SolverSettings(rtol=1e-8, atol=1e-8, grad="direct"), scale=2.0)
    g = torch.Generator().manual_seed(0)
    x = model.sample(64, generator=g)
    z0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (x - z0).abs().max() > 1e-2  # the flow is not the identity
    with torch.no_grad():
        z, *_ = model(x)
    assert torch.allclose(z, z0, atol=1e-6)


def test_sampling_solves_the_flow_alone():
    """sample/invert integrate z only: no trace (no input that requires grad reaches the field)
    and no Δlogp in the error norm, so the steps are those of a plain solve of f."""
    model = random_2d_cnf(SolverSettings(rtol=1e-6, atol=1e-6, grad="direct"), scale=2.0)
    net = model.blocks[0].net
    seen = []
    net.register_forward_pre_hook(lambda mod, args: seen.append(args[1].requires_grad))
    z = torch.randn(32, 2, dtype=torch.float64)
    from neuralode import odeint, record_stats
    with torch.no_grad(), record_stats() as st:  # the density solve would enable grad to take its trace
        x = model.invert(z)
    assert seen and not any(seen)
    with torch.no_grad(), record_stats() as plain:
        ref = odeint(lambda t, y: net(t, y), z, torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert torch.equal(x, ref[-1]) and st.nfe_forward == plain.nfe_forward


def test_log_prob_matches_brute_force_jacobian():
    """log p(x) = log N(z(T)) + log|det ∂z(T)/∂x|, with the Jacobian from autograd through the solve."""
    model = random_2d_cnf(SolverSettings(rtol=1e-9, atol=1e-9, grad="direct"), scale=2.0)
    x = torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():
        log_p = model.log_prob(x)[0]
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0][0], x[i])
        z = model(x[i:i + 1])[0].detach()
        expected = standard_normal_logprob(z)[0] + torch.logdet(jac)
        assert abs(log_p[i].item() - expected.item()) < 1e-6


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_gradient_modes_agree(trace):
    grads = {}
    for grad in ("direct", "adjoint", "checkpoint"):
        model = random_2d_cnf(SolverSettings(rtol=1e-8, atol=1e-8, grad=grad), trace=trace, regularise=True)
        x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        torch.manual_seed(5)  # same Hutchinson noise in every mode
        log_p, kin, frob = model.log_prob(x)
        (-log_p.mean() + 0.1 * kin.mean() + 0.1 * frob.mean()).backward()
        grads[grad] = torch.cat([p.grad.flatten() for p in model.parameters()])
    for grad in ("adjoint", "checkpoint"):
        assert torch.allclose(grads[grad], grads["direct"], rtol=1e-4, atol=1e-6), grad


def test_kinetic_energy_falls_with_large_weight():
    from omegaconf import OmegaConf

    from neuralode.tasks.cnf import CNFTask

    cfg = OmegaConf.create(dict(
        model=dict(name="cnf", hidden_dims=[16, 16], num_blocks=1, activation="softplus", trace="exact",
                   noise="gaussian", time_length=1.0, kinetic_weight=10.0, jacobian_weight=1.0, logit_alpha=1e-6,
                   figure_resolution=16, figure_samples=64),
        dataset=dict(name="8gaussians", n_train=256, n_test=64, seed=0),
        solver=dict(method="dopri5", grad="direct", seminorm=False, step_size=None, options={},
                    adjoint=dict(rtol=None, atol=None, method=None, options={})),
        rtol=1e-4, atol=1e-4, data_dir="data"))
    torch.manual_seed(0)
    task = CNFTask(cfg)
    train, _ = task.datasets()
    opt = torch.optim.Adam(task.model.parameters(), lr=1e-2)
    x = train.tensors[0][:128]
    kinetic = []
    for _ in range(8):
        loss, metrics = task.loss((x,))
        assert {"nll", "kinetic", "jacobian"} <= metrics.keys()
        opt.zero_grad()
        loss.backward()
        opt.step()
        kinetic.append(metrics["kinetic"])
    assert kinetic[-1] < 0.5 * kinetic[0], kinetic
    # Figures render as (3, H, W) tensors in [0, 1] without any plotting library.
    figs = task.figures()
    img = figs["figures/density_samples_data"]
    assert img.shape[0] == 3 and img.shape[1] == 16 and img.min() >= 0 and img.max() <= 1


def test_regulariser_integrals_do_not_set_the_step_size():
    """With the exact trace, (z, Δlogp) follow the same ODE with or without the RNODE
    integrals, so the flow norm must give the same steps, results and NFE."""
    from neuralode import record_stats

    torch.manual_seed(0)
    model = cnf_2d(SolverSettings(rtol=1e-6, atol=1e-6, grad="direct"), hidden=(16, 16), regularise=True).double()
    x = sample_toy("8gaussians", 64, 0).double()
    with torch.no_grad():
        with record_stats() as plain:
            lp0, _, _ = model.log_prob(x, with_regularisers=False)
        with record_stats() as regularised:
            lp1, kin, _ = model.log_prob(x, with_regularisers=True)
    assert regularised.nfe_forward == plain.nfe_forward
    assert torch.equal(lp0, lp1) and (kin > 0).all()


def test_dequantize_logit_logdet_and_bits_per_dim():
    x = torch.randint(0, 256, (3, 1, 2, 2)).double() / 255
    g = torch.Generator().manual_seed(0)
    y, logdet = dequantize_logit(x, alpha=1e-6, generator=g)
    u = (torch.round(x * 255) + torch.rand(x.shape, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64)) / 256
    jac = torch.autograd.functional.jacobian(lambda v: torch.logit(1e-6 + (1 - 2e-6) * v), u[0].flatten())
    assert abs(torch.logdet(jac).item() - logdet[0].item()) < 1e-6
    assert torch.allclose(logit_inverse(y), u, atol=1e-9)
    # A uniform density on [0,1)^D is exactly 8 bits/dim on the 256-level grid.
    assert torch.allclose(bits_per_dim(-logdet, logdet, 4), torch.full((3,), 8.0, dtype=torch.float64))


def test_image_cnf_runs_and_is_finite():
    model = cnf_image(SolverSettings(rtol=1e-2, atol=1e-2, grad="adjoint"), (1, 4, 4), hidden=(4,),
                      trace="hutchinson", noise="rademacher", regularise=True)
    y, logdet = dequantize_logit(torch.rand(2, 1, 4, 4))
    log_p, kin, frob = model.log_prob(y)
    bpd = bits_per_dim(log_p, logdet, 16).mean()
    (bpd + kin.mean() + frob.mean()).backward()
    assert torch.isfinite(bpd) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.sample(2).shape == (2, 1, 4, 4)


def _trained_looking_unet(widths=(4, 8), size=7, seed=0):
    """A double-precision U-Net field with its zero-initialised head perturbed (a field that moves)."""
    torch.manual_seed(seed)
    net = UNetField(1, widths).double()
    with torch.no_grad():
        net.head[-1].weight.normal_(0, 0.3)
        net.head[-1].bias.normal_(0, 0.3)
    return net, torch.randn(3, 1, size, size, dtype=torch.float64)


def test_unet_field_starts_as_the_identity_flow():
    """Zero head: f = 0, so log p(x) is the base density and samples are the base draws."""
    model = cnf_image(SolverSettings(rtol=1e-3, atol=1e-3), (1, 8, 8), hidden=(4, 8), field="unet",
                      activation="swish").double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    log_p, _, _ = model.log_prob(x)
    assert torch.allclose(log_p, standard_normal_logprob(x))


def test_unet_field_is_per_sample_and_takes_one_or_many_times():
    """GroupNorm never mixes rows: each sample's velocity equals its velocity solved alone, a scalar t
    equals the same t per sample, and odd sizes (7 -> 4 -> 7) come back at the input's shape."""
    net, x = _trained_looking_unet(size=7)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    f = net(t, x)
    assert f.shape == x.shape
    for i in range(3):
        assert torch.allclose(f[i:i + 1], net(t[i], x[i:i + 1]), atol=1e-12)
    assert torch.allclose(net(torch.tensor(0.5, dtype=torch.float64), x), net(torch.full((3,), 0.5).double(), x))
    assert not torch.allclose(f[0], net(t[1], x[:1])[0])  # the time embedding matters


def test_unet_field_gradients_and_second_derivatives():
    """gradcheck and gradgradcheck in float64: ML training differentiates the Hutchinson trace,
    so the field's vector-Jacobian product must itself be differentiable."""
    net, x = _trained_looking_unet(widths=(2, 4), size=4)
    x = x[:2].requires_grad_(True)
    t = torch.tensor(0.3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: net(t, z), (x,))
    assert torch.autograd.gradgradcheck(lambda z: net(t, z), (x,))


def test_unet_exact_trace_equals_the_jacobian_trace_and_hutchinson_averages_to_it():
    net, x = _trained_looking_unet(widths=(2, 4), size=4)
    t = torch.tensor(0.3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: net(t, z[None])[0], x[0]).reshape(16, 16)
    exact = CNFField(net, Trace.exact, None, False)(t, (x[:1], x.new_zeros(1)))[1]
    assert torch.allclose(exact, torch.trace(jac).reshape(1))
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 2, (4000, 1, 4, 4), generator=g).double() * 2 - 1
    many = x[:1].expand(4000, -1, -1, -1)
    hutch = CNFField(net, Trace.hutchinson, noise, False)(t, (many, many.new_zeros(4000)))[1]
    assert abs(hutch.mean() - torch.trace(jac)) < 4 * hutch.std() / 4000 ** 0.5


# -- toy data ---------------------------------------------------------------------------------
def test_toy_generators_are_seeded_and_distinct():
    for name in TOY_NAMES:
        a, b = sample_toy(name, 100, 0), sample_toy(name, 100, 0)
        assert a.shape == (100, 2) and torch.equal(a, b) and torch.isfinite(a).all()
        assert not torch.equal(a, sample_toy(name, 100, 1))
    train, test = toy_datasets("moons", 50, 20, seed=3)
    assert len(train) == 50 and len(test) == 20 and not torch.equal(train.tensors[0][:20], test.tensors[0])
    with pytest.raises(ValueError, match="valid names: 8gaussians, checkerboard"):
        sample_toy("foo", 10, 0)


def test_toy_entropies():
    h, se = entropy("8gaussians", n=200_000)
    # Slightly below ln 8 + ln(2πe·0.125) = 2.838: the components overlap a little.
    assert 2.81 < h < 2.838 and se < 0.005
    assert entropy("checkerboard") == (math.log(32), 0.0)
    x = sample_toy("checkerboard", 10_000, 0)
    assert torch.isfinite(log_density("checkerboard", x)).all()  # every sample lies on the support


# -- the real entry point ---------------------------------------------------------------------
CNF_TINY = ["model=cnf", "dataset=8gaussians", "model.hidden_dims=[16,16]", "dataset.n_train=256",
            "dataset.n_test=128", "trainer.batch_size=64", "trainer.eval_batch_size=64", "trainer.epochs=1",
            "trainer.limit_batches=2", "trainer.limit_eval_batches=1", "rtol=1e-3", "atol=1e-3",
            "eval.rtols=[1e-2]", "model.figure_resolution=24", "model.figure_samples=200", "optim=adam"]


def test_entry_point_cnf_logs_nll_nfe_and_figure(tmp_path):
    from conftest import images, scalars, train_here

    out = tmp_path / "run"
    assert train_here(*CNF_TINY, run_dir=out) == 0
    logged = scalars(out)
    needed = {"train/nll", "test/nll", "nfe/forward", "nfe/backward", "train/loss", "test/nfe_forward"}
    assert needed <= logged.keys(), needed - logged.keys()
    assert "train/acc" not in logged
    figs = images(out)
    assert "figures/density_samples_data" in figs and figs["figures/density_samples_data"][0].width > 24
    # test/nll and its standard error test/nll_se are those of the per-sample NLLs of the evaluated batch
    from omegaconf import OmegaConf

    from neuralode.run import Run
    from neuralode.tasks import build_task

    _, state = Run.load_checkpoint(out)
    task = build_task(OmegaConf.create(state["config"]))
    task.model.load_state_dict(state["model"])
    task.model.eval()
    x = task.datasets()[1].tensors[0][:64]  # trainer.limit_eval_batches=1 of trainer.eval_batch_size=64
    with torch.no_grad(), task._eval_trace():
        nll = -task.model.log_prob(x)[0]
    assert logged["test/nll"][-1][1] == pytest.approx(nll.mean().item(), rel=1e-4)
    assert logged["test/nll_se"][-1][1] == pytest.approx((nll.std() / 8).item(), rel=1e-3)


def test_entry_point_cnf_regularised_logs_regularisers(tmp_path):
    from conftest import scalars, train_here

    out = tmp_path / "run"
    assert train_here(*CNF_TINY, "model.kinetic_weight=0.1", "model.jacobian_weight=0.1", "model.trace=hutchinson",
                      "model.noise=rademacher", run_dir=out) == 0
    logged = scalars(out)
    assert {"train/kinetic", "train/jacobian", "test/kinetic", "test/jacobian"} <= logged.keys()


def test_unknown_toy_dataset_fails_to_compose_listing_the_choices():
    from hydra.errors import ConfigCompositionException

    from conftest import compose

    with pytest.raises(ConfigCompositionException) as e:
        compose(*CNF_TINY, "dataset=foo")
    assert "8gaussians" in str(e.value.__cause__ or e.value)


@pytest.mark.parametrize("override, message", [
    ("model.trace=foo", "exact, hutchinson"),
    ("model.noise=foo", "gaussian, rademacher"),
    ("dataset.name=foo", "checkerboard"),
])
def test_bad_cnf_options_fail_before_work(override, message, tmp_path, caplog):
    from conftest import train_here

    out = tmp_path / "run"
    assert train_here(*CNF_TINY, override, run_dir=out) == 2
    assert message in caplog.text, caplog.text
    assert not (out / "tb").exists()


# -- config: every cnf option composes, validates and runs a tiny batch ---------------------
CNF_OPTIONS = ([f"dataset={n}" for n in TOY_NAMES]
               + [f"experiment={e}" for e in ("cnf_8gaussians", "cnf_checkerboard", "cnf_mnist_ffjord",
                                               "cnf_mnist_rnode")]
               + ["experiment=cnf_mnist_rnode model.field=unet"])  # ML + RNODE through the adjoint, U-Net field


@pytest.mark.parametrize("option", CNF_OPTIONS)
def test_cnf_options_compose_and_run(option):
    from hydra import compose, initialize_config_module

    from neuralode.config import register_configs, validate
    from neuralode.tasks import build_task

    register_configs()
    with initialize_config_module("neuralode.conf", version_base="1.3"):
        cfg = compose("config", overrides=["model=cnf", *option.split(), "rtol=1e-2", "atol=1e-2",
                                           "model.hidden_dims=[4]"])  # no dataset= of its own: the presets' own
    validate(cfg)
    task = build_task(cfg)
    d = cfg.dataset
    if "channels" in d:  # images: a tiny random batch of the right shape, pixels in [0, 1]
        x = torch.rand(2, d.channels, d.image_size, d.image_size)
        metric = "bpd"
    else:
        x = sample_toy(str(getattr(d.name, "value", d.name)), 4, 0)
        metric = "nll"
    loss, metrics = task.loss((x,))
    loss.backward()
    assert torch.isfinite(loss) and metric in metrics and task.primary_metric == metric
    assert all(p.grad is not None for p in task.model.parameters())
