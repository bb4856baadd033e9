"""Flow matching for ``model=cnf`` (issue 14): the loss and its direction convention, the exact
OT coupling (optimality, budget, DDP global pairing), likelihoods of a trained flow, init_from,
the EMA, and the presets through the real entry point."""

from __future__ import annotations

import itertools
import math
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import compose, scalars, train_here
from neuralode.models import SolverSettings
from neuralode.models.cnf import CNF, CNFBlock, cnf_2d
from neuralode.models.flow_matching import (EMAField, PairingCollate, energy_distance, fm_loss, gaussian_log_density,
                                            ot_permutation, pair_global)

pytest.importorskip("scipy")

TIGHT = SolverSettings(method="dopri5", rtol=1e-9, atol=1e-9, grad="direct")


class LinearFlowField(nn.Module):
    """The exact CNF-time field of the straight paths x_s = (1-s) x0 + s (A x0 + b): in flow-matching
    time v(s, x) = (A - I) x0 + b with x0 = ((1-s) I + s A)^{-1} (x - s b); in CNF time t = 1 - s,
    f(t, x) = -v(1 - t, x). Accepts one t for the batch (solves) or one per sample (the loss)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = (1 - t.reshape(-1)).expand(x.shape[0]).to(x.dtype)
        eye = torch.eye(2, dtype=x.dtype)
        m = (1 - s)[:, None, None] * eye + s[:, None, None] * self.a
        x0 = torch.linalg.solve(m, (x - s[:, None] * self.b).unsqueeze(-1)).squeeze(-1)
        return -(x0 @ (self.a - eye).T + self.b)


@pytest.fixture
def linear_flow():
    a = torch.tensor([[1.5, 0.3], [0.3, 0.6]], dtype=torch.float64)  # symmetric positive definite: paths never cross
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    return a, b


def test_fm_loss_is_zero_for_the_exact_velocity_of_a_linear_flow(linear_flow):
    a, b = linear_flow
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(512, 2, generator=g, dtype=torch.float64)
    x1 = x0 @ a.T + b
    field = LinearFlowField(a, b)
    assert fm_loss(field, x0, x1, generator=g).item() < 1e-20
    assert fm_loss(lambda t, x: torch.zeros_like(x), x0, x1, generator=g).item() > 0.1
    assert fm_loss(lambda t, x: -field(t, x), x0, x1, generator=g).item() > 0.1  # the other direction is wrong


def test_fm_direction_matches_log_prob(linear_flow):
    """The field trained by flow matching, run through the ML CNF's log_prob with our solver, is the
    density of the pushed-forward base: log N(x; b, A Aᵀ) for the linear flow."""
    a, b = linear_flow
    model = CNF([CNFBlock(LinearFlowField(a, b), TIGHT)], (2,))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ a.T + b
    with torch.no_grad():
        log_p = model.log_prob(x)[0]
    torch.testing.assert_close(log_p, gaussian_log_density(x, b, a @ a.T), rtol=0, atol=1e-6)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.invert(z), z @ a.T + b, rtol=0, atol=1e-6)  # sampling: base -> data


def test_ot_coupling_is_an_optimal_permutation():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x0, x1 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g) * 2 + 1
        p = ot_permutation(x0, x1)
        assert sorted(p.tolist()) == list(range(6))
        cost = lambda perm: float(((x0[list(perm)] - x1) ** 2).sum())  # noqa: E731
        best = min(cost(q) for q in itertools.permutations(range(6)))
        assert cost(p.tolist()) == pytest.approx(best, rel=1e-6)
    # images: any trailing shape, paired per sample
    x0, x1 = torch.randn(5, 1, 3, 3, generator=g), torch.randn(5, 1, 3, 3, generator=g)
    assert sorted(ot_permutation(x0, x1).tolist()) == list(range(5))


def test_ot_batch_budget_is_enforced_naming_the_limit(tmp_path):
    with pytest.raises(ValueError, match=r"budget of 4 samples \(model.ot_max_batch=4"):
        ot_permutation(torch.randn(5, 2), torch.randn(5, 2), max_batch=4)
    code = train_here("model=cnf", "model.objective=flow_matching", "model.coupling=exact_ot",
                      "model.ot_max_batch=100", "trainer=smoke", "trainer.batch_size=128", run_dir=tmp_path / "r")
    assert code == 2
    assert "model.ot_max_batch=100" in (tmp_path / "r" / "metrics.json").read_text()


def test_collate_pairs_off_the_training_loop():
    items = [(torch.randn(2),) for _ in range(32)]
    x1, x0 = PairingCollate(exact_ot=True)(items)
    assert x1.shape == x0.shape == (32, 2)
    assert torch.equal(x0, x0[ot_permutation(x0, x1)])  # already optimally paired: the identity is optimal


class ThreadRanks:
    """``neuralode.distributed.Distributed``'s collective (gather) for ranks simulated by threads."""

    def __init__(self, world_size: int):
        self.world_size, self.slots, self.barrier = world_size, [None] * world_size, threading.Barrier(world_size)

    def rank(self, r: int):
        ranks = self

        class Rank:
            enabled, rank, world_size = True, r, ranks.world_size

            def gather(self, obj):
                ranks.slots[r] = obj
                ranks.barrier.wait()
                out = list(ranks.slots)
                ranks.barrier.wait()
                return out

        return Rank()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_pairing_equals_single_process_pairing(world_size):
    """Gather, pair once on rank 0, scatter: each rank's (noise, data) pairs are its rows of the
    single-process pairing of the global batch."""
    g = torch.Generator().manual_seed(0)
    per_rank = 8
    x0 = [torch.randn(per_rank, 2, generator=g) for _ in range(world_size)]
    x1 = [torch.randn(per_rank, 2, generator=g) * 3 for _ in range(world_size)]
    ranks, out = ThreadRanks(world_size), [None] * world_size

    def run(r):
        out[r] = pair_global(x0[r], x1[r], ranks.rank(r))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    all0, all1 = torch.cat(x0), torch.cat(x1)
    single = all0[ot_permutation(all0, all1)]
    assert torch.equal(torch.cat(out), single)
    # and it is not what pairing each rank's share alone gives
    local = torch.cat([x0[r][ot_permutation(x0[r], x1[r])] for r in range(world_size)])
    assert not torch.equal(local, single)


@pytest.mark.slow  # 8-22 s on one busy core
def test_nll_of_a_briefly_trained_flow_matches_the_gaussian_density():
    """OT-CFM on N(m, LLᵀ) for 600 steps; the exact-trace log-likelihood through dopri5 at 1e-5
    matches the analytic density: mean NLL within 0.05 nats, mean |Δ log p| below 0.15 nats on
    held-out samples (the flow is linear in x for Gaussian-to-Gaussian, so a small MLP learns it fast).
    Typical values: 0.005 and 0.05 nats."""
    torch.manual_seed(0)
    mean, chol = torch.tensor([1.0, -0.5]), torch.tensor([[0.8, 0.0], [0.3, 0.5]])
    model = cnf_2d(SolverSettings(rtol=1e-5, atol=1e-5, grad="direct"), hidden=[32, 32])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for it in range(600):
        if it == 400:
            opt.param_groups[0]["lr"] = 1e-3
        x1 = mean + torch.randn(256, 2, generator=g) @ chol.T
        x0 = torch.randn(256, 2, generator=g)
        x0 = x0[ot_permutation(x0, x1)]
        loss = fm_loss(lambda t, x: model(x, t=t), x0, x1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = mean + torch.randn(1000, 2, generator=g) @ chol.T
    with torch.no_grad():
        log_p = model.log_prob(x)[0].double()
    true = gaussian_log_density(x, mean, chol @ chol.T)
    assert abs(log_p.mean() - true.mean()) < 0.05, (log_p.mean(), true.mean())
    assert (log_p - true).abs().mean() < 0.15


def test_ema_field_averages_and_evaluates_the_average():
    net = nn.Linear(2, 2)
    ema = EMAField(lambda_net(net), decay=0.5)
    assert not list(ema.shadow.parameters()) and len(list(ema.parameters())) == 2
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.shadow.inner.weight.clone()
    ema.update()  # warm-up: min(0.5, 1/10) -> moves 90% of the way
    torch.testing.assert_close(ema.shadow.inner.weight, before + 0.9 * (net.weight - before))
    ema.eval()
    x = torch.randn(3, 2)
    torch.testing.assert_close(ema(torch.zeros(()), x), x @ ema.shadow.inner.weight.T + ema.shadow.inner.bias)


class lambda_net(nn.Module):  # noqa: N801  (a field f(t, x) = net(x))
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, t, x):
        return self.inner(x)


def test_energy_distance_is_zero_for_equal_samples_and_positive_otherwise():
    x = torch.randn(200, 2)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(x, x + 3) > 1.0


SMALL = ["model.hidden_dims=[16,16]", "eval.rtols=[1e-2]", "tol=1e-3", "dataset.n_train=2000", "dataset.n_test=600"]


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory) -> Path:
    """A finished flow-matching smoke run (EMA on, to exercise the average's export)."""
    d = tmp_path_factory.mktemp("fm") / "run"
    assert train_here("experiment=cnf_fm_checkerboard", "trainer=smoke", "model.ema=0.9", *SMALL, run_dir=d) == 0
    return d


def test_init_from_loads_the_flow_matching_weights(fm_run):
    from neuralode.run import Run
    from neuralode.tasks import build_task

    task = build_task(compose("experiment=cnf_fm_then_ml_checkerboard", *SMALL, f"model.init_from={fm_run}"))
    _, state = Run.load_checkpoint(fm_run)
    mine = task.model.state_dict()
    shadow = {k.replace(".net.shadow.", ".net."): v for k, v in state["model"].items() if ".net.shadow." in k}
    assert shadow and set(shadow) == set(mine)
    for k, v in shadow.items():  # the EMA average, not the last optimised weights
        assert torch.equal(mine[k], v), k
    assert task.objective == "ml" and task.kinetic_weight == 0.05


def test_init_from_refuses_another_architecture(fm_run, tmp_path):
    from neuralode.run import CheckpointError
    from neuralode.tasks import build_task

    cfg = compose("experiment=cnf_fm_then_ml_checkerboard", *SMALL, "model.hidden_dims=[16,8]",
                  f"model.init_from={fm_run}")
    with pytest.raises(CheckpointError, match=r"shapes differ: blocks\.0\.net\.layers\.1\.linear\.weight"):
        build_task(cfg)
    code = train_here("experiment=cnf_fm_then_ml_checkerboard", "trainer=smoke", *SMALL, "model.hidden_dims=[16,16,16]",
                      f"model.init_from={fm_run}", run_dir=tmp_path / "r")
    assert code == 2
    assert "missing there: blocks.0.net.layers.3" in (tmp_path / "r" / "metrics.json").read_text()
    code = train_here("experiment=cnf_fm_then_ml_checkerboard", "trainer=smoke", *SMALL,
                      f"model.init_from={tmp_path / 'nowhere'}", run_dir=tmp_path / "r2")
    assert code == 2
    assert "model.init_from=" in (tmp_path / "r2" / "metrics.json").read_text()


@pytest.mark.parametrize("override, message", [
    ("model.objective=flowmatching", "model.objective='flowmatching' is not one of ml, flow_matching"),
    ("model.coupling=ot", "model.coupling='ot' is not one of independent, exact_ot"),
    ("model.sigma=-0.1", "model.sigma=-0.1 must be >= 0"),
    ("model.num_blocks=2", "set model.num_blocks=1"),
    ("model.ema=1.5", "model.ema=1.5 must be in [0, 1)"),
    ("model.field=resnet", "model.field='resnet' is not one of conv, unet"),
    ("model.field=unet", "model.field=unet is an image field; dataset=8gaussians is 2-D"),
])
def test_bad_flow_matching_options_fail_at_config_time(override, message, tmp_path):
    from neuralode.config import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(compose("experiment=cnf_fm_8gaussians", override))
    assert message in str(e.value)


def test_flow_matching_needs_a_density_dataset():
    from neuralode.config import ConfigError, validate

    cfg = compose("model=cnf", "model.objective=flow_matching", "dataset=spirals")
    with pytest.raises(ConfigError, match="model.objective=flow_matching needs a density dataset"):
        validate(cfg)


def test_preset_fm_8gaussians_runs_and_logs_like_the_ml_cnf(tmp_path):
    d = tmp_path / "r"
    assert train_here("experiment=cnf_fm_8gaussians", "trainer=smoke", *SMALL, run_dir=d) == 0
    tags = scalars(d)
    for tag in ("test/nll", "test/nfe_forward", "tol_eval/nll/rtol=0.01", "train/fm_loss",
                "samples/nfe/dopri5_tol=1e-05", "samples/nfe/tsit5_tol=0.001", "samples/energy_distance/euler_1",
                "samples/energy_distance/euler_8", "samples/energy_distance/dopri5_tol=1e-05",
                "samples/energy_distance/data_floor", "final/primary"):
        assert tag in tags, tag
    assert tags["nfe/forward"][-1][1] == 0  # no solve during training
    assert math.isfinite(tags["test/nll"][-1][1])


def test_presets_fm_checkerboard_then_ml_chain(fm_run, tmp_path):
    """cnf_fm_checkerboard ran in the fixture; the ML+RNODE fine-tune chains on it."""
    d = tmp_path / "ml"
    assert train_here("experiment=cnf_fm_then_ml_checkerboard", "trainer=smoke", *SMALL,
                      f"model.init_from={fm_run}", run_dir=d) == 0
    tags = scalars(d)
    assert "train/kinetic" in tags and "samples/nfe/dopri5_tol=1e-05" in tags
    assert tags["nfe/forward"][-1][1] > 0  # ML: solves during training


@pytest.mark.parametrize("field", ["unet", "conv"])
def test_preset_fm_mnist_runs(field, fake_mnist, tmp_path):
    d = tmp_path / "r"
    assert train_here("experiment=cnf_fm_mnist", "trainer=smoke", f"data_dir={fake_mnist}", "tol=1e-2",
                      "eval.rtols=[0.1]", f"model.field={field}", "model.hidden_dims=[8,8]", "model.figure_samples=4",
                      run_dir=d) == 0
    tags = scalars(d)
    assert "test/bpd" in tags and "samples/nfe/dopri5_tol=0.001" in tags and "train/fm_loss" in tags


@pytest.mark.slow  # a torchrun launch (two processes)
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_exact_ot_pairs_the_global_batch(tmp_path):
    """Two CPU ranks: the collate only draws noise, the loss pairs the global batch of 32 once."""
    from test_distributed import torchrun

    out = tmp_path / "run"
    res = torchrun("experiment=cnf_fm_8gaussians", "trainer=smoke", "trainer.batch_size=32", *SMALL,
                   f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    logged = scalars(out)
    assert [s for s, _ in logged["train/fm_loss"]] == [1, 2] and math.isfinite(logged["test/nll"][-1][1])
