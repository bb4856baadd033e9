"""Issue 17: the ``regularizer`` group (RNODE, STEER), the NFE budget, the ODE-validity check and
the custom-scalars dashboard. See docs/regularizers.md."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

from conftest import TINY, compose, events_dir, scalars, train_here
from neuralode.config import ERROR_METHODS, STIFFNESS_METHODS, ConfigError, validate
from neuralode.models import ODEBlock
from neuralode.models.regularize import Regularization, RegularizedSettings, install
from neuralode.solvers import SolverSettings

F64 = torch.float64


def _solve(reg: Regularization, func, y0, T=1.0, **kw):
    s = RegularizedSettings(method="dopri5", rtol=1e-10, atol=1e-10, regularization=reg, **kw)
    t = torch.tensor([0.0, T], dtype=y0.dtype)
    with reg.collect():
        y = s.odeint(func, y0, t)
    return y, reg


# -- RNODE ---------------------------------------------------------------------------------------
def test_rnode_integrals_of_a_linear_field_match_their_closed_form():
    """dy/dt = a*y (diagonal): ∫‖f‖² = Σ a_i y0_i² (e^{2 a_i T} - 1) / 2; ∫‖∂f/∂y‖²_F = T Σ a_i²
    (Hutchinson: exact in expectation, checked over a large batch)."""
    torch.manual_seed(0)
    a = torch.tensor([0.5, -1.0, 0.2], dtype=F64)
    y0 = torch.randn(5000, 3, dtype=F64)
    T = 1.5
    y, reg = _solve(Regularization(kinetic=1.0, jacobian=1.0), lambda t, y: a * y, y0, T)
    assert torch.allclose(y[-1], y0 * torch.exp(a * T), rtol=1e-8)  # the state itself is untouched
    kinetic = (a * y0.pow(2) * (torch.exp(2 * a * T) - 1) / 2).sum(1).mean()
    assert float(reg.kinetic[0].detach()) == pytest.approx(float(kinetic), rel=1e-7)
    assert float(reg.jacobian[0].detach()) == pytest.approx(T * float(a.pow(2).sum()), rel=0.05)
    logs = reg.logs()
    assert logs["rnode"] == pytest.approx(logs["rnode_kinetic"] + logs["rnode_jacobian"])


@pytest.mark.parametrize("grad", ["direct", "adjoint"])
def test_rnode_penalty_gradient_matches_finite_differences(grad):
    torch.manual_seed(0)
    lin = nn.Linear(2, 2, bias=False).to(F64)
    y0 = torch.randn(4, 2, dtype=F64)

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, t, y):
            return torch.tanh(self.lin(y))

    def penalty():
        torch.manual_seed(1)  # the same Hutchinson noise in every evaluation
        reg = Regularization(kinetic=1.0, jacobian=0.5)
        y, reg = _solve(reg, Field(), y0, grad=grad)
        return reg.penalty() + y[-1].sum()

    (g,) = torch.autograd.grad(penalty(), lin.weight)
    fd = torch.zeros_like(g)
    eps = 1e-6
    with torch.no_grad():
        for idx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
            w = lin.weight[idx].item()
            lin.weight[idx] = w + eps
            up = float(penalty())
            lin.weight[idx] = w - eps
            down = float(penalty())
            lin.weight[idx] = w
            fd[idx] = (up - down) / (2 * eps)
    assert torch.allclose(g, fd, rtol=1e-5, atol=1e-7), (g, fd)


def test_weight_zero_leaves_training_bit_identical(fake_mnist, tmp_path):
    data = [f"data_dir={fake_mnist}", "dataset.download=false", "solver.grad=direct"]
    assert train_here(*TINY, *data, run_dir=tmp_path / "none") == 0
    assert train_here(*TINY, *data, "regularizer=[rnode,steer,error]", "regularizer.rnode.kinetic=0",
                      "regularizer.rnode.jacobian=0", "regularizer.steer.b=0", "regularizer.error.weight=0",
                      run_dir=tmp_path / "zero") == 0
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True)["model"] for d in ("none", "zero"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("none", "zero"))
    assert ma["test_loss"] == mb["test_loss"] and ma["nfe_forward"] == mb["nfe_forward"]


# -- error estimates ---------------------------------------------------------------------------
def test_error_estimates_are_the_same_and_differentiable_in_direct_and_checkpoint_modes():
    torch.manual_seed(0)
    lin = nn.Linear(2, 2).to(F64)

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, t, y):
            return 2 * torch.tanh(self.lin(y))

    y0 = torch.randn(3, 2, dtype=F64)
    out = {}
    for grad in ("direct", "checkpoint"):
        reg = Regularization(error=1.0, stiffness=0.5)
        s = RegularizedSettings(method="dopri5", rtol=1e-4, atol=1e-4, grad=grad, regularization=reg)
        with reg.collect():
            y = s.odeint(Field(), y0, torch.tensor([0.0, 2.0], dtype=F64))
        penalty = reg.penalty()
        out[grad] = (penalty.item(), torch.autograd.grad(penalty + y[-1].sum(), lin.weight)[0])
        logs = reg.logs()
        assert logs["error"] + logs["stiffness"] == pytest.approx(penalty.item()) and logs["stiffness_sum"] > 0
    assert out["direct"][0] == pytest.approx(out["checkpoint"][0], rel=1e-12)
    assert torch.allclose(out["direct"][1], out["checkpoint"][1], rtol=1e-9)
    with pytest.raises(ValueError, match="grad='direct' or grad='checkpoint'"):
        SolverSettings(grad="adjoint").odeint(Field(), y0, torch.tensor([0.0, 1.0], dtype=F64), error_estimates=[])


@pytest.mark.parametrize("method", ERROR_METHODS)
def test_error_term_is_the_controllers_ratio_and_stiffness_estimate(method):
    """What the regulariser differentiates is what the step-size controller decided on (DOP853's
    blend of two estimates included) and what method="auto" watches."""
    from neuralode.solvers.odeint import Setup, check_t

    y0 = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=F64)
    setup = Setup(SolverSettings(method=method, rtol=1e-3, atol=1e-3),
                  lambda t, y: torch.stack([y[:, 1], -3 * torch.sin(y[:, 0])], 1), y0, check_t(torch.tensor([0.0, 1.0])))
    stepper = setup.prob.method.start(setup.prob)
    step = stepper.step(setup.prob.func, 0.0, 0.3, setup.y0, setup.prob.func(0.0, setup.y0))
    ratio, abs_y1 = stepper.error(step, setup.y0.abs())
    error, stiffness = stepper.error_term(step, setup.y0.abs(), abs_y1).tolist()
    assert error == pytest.approx(ratio, rel=1e-12)
    assert stiffness == (pytest.approx(stepper.hl, rel=1e-12) if method in STIFFNESS_METHODS else 0.0)


@pytest.mark.parametrize("grad", ["direct", "checkpoint"])
def test_stiffness_estimates_of_a_linear_field_sum_to_lambda_times_T(grad):
    """dy/dt = λ y: f(y1) - f(y_j) = λ (y1 - y_j), so each step's estimate is exactly |h| |λ|, their sum
    |λ| T whatever the steps, and its derivative in λ (steps held fixed) is -T for λ < 0."""
    lam = nn.Parameter(torch.tensor(-3.0, dtype=F64))
    T = 2.0
    reg = Regularization(stiffness=1.0)
    s = RegularizedSettings(method="tsit5", rtol=1e-6, atol=1e-6, grad=grad, regularization=reg)
    with reg.collect():
        s.odeint(lambda t, y: lam * y, torch.ones(4, 3, dtype=F64), torch.tensor([0.0, T], dtype=F64),
                 adjoint_params=(lam,))
    penalty = reg.penalty()
    assert float(penalty) == pytest.approx(3.0 * T, rel=1e-10)
    assert reg.logs()["stiffness_sum"] == pytest.approx(3.0 * T, rel=1e-10) and "error" not in reg.logs()
    (g,) = torch.autograd.grad(penalty, lam)
    assert float(g) == pytest.approx(-T, rel=1e-10)


# -- STEER ---------------------------------------------------------------------------------------
def test_steer_samples_end_times_in_range_and_evaluation_uses_T():
    """dy/dt = 1, so y(end) - y(0) is the duration the solve ran."""

    class One(nn.Module):
        def forward(self, t, y):
            return torch.ones_like(y)

    b = 0.3
    block = ODEBlock(One(), SolverSettings(rtol=1e-6, atol=1e-6))
    reg = Regularization(steer_b=b)
    assert install(block, reg) == 1
    x = torch.zeros(2, 3)
    durations = []
    for _ in range(200):
        with reg.collect():
            durations.append(float(block(x)[0, 0]))
        assert reg.logs()["steer"] == pytest.approx(durations[-1], abs=1e-5)
    assert all(1 - b - 1e-5 <= d <= 1 + b + 1e-5 for d in durations)
    assert max(durations) - min(durations) > b  # they do vary over the range
    assert float(block(x)[0, 0]) == pytest.approx(1.0, abs=1e-6)  # outside training: the end time T


# -- the runner: validity check, NFE budget, dashboard ------------------------------------------
CNF_TOY = ["model=cnf", "dataset=8gaussians", "dataset.n_train=1024", "dataset.n_test=256", "model.hidden_dims=[16,16]",
           "trainer.batch_size=128", "trainer.eval_batch_size=256", "trainer.limit_batches=20", "trainer.epochs=1",
           "optim.lr=0.02", "eval.validity=true", "eval.rtols=[1e-2,1e-3]", "eval.step_sizes=[0.5,0.25]",
           "model.figure_samples=200", "model.figure_resolution=16"]


@pytest.fixture(scope="module")
def validity_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("validity")
    codes = {"euler": train_here(*CNF_TOY, "solver=euler", "solver.step_size=1.0", run_dir=root / "euler"),
             "tight": train_here(*CNF_TOY, "tol=1e-5", "regularizer=[rnode,steer]", run_dir=root / "tight")}
    assert codes == {"euler": 0, "tight": 0}
    return {k: root / k for k in codes}


def test_validity_check_flags_one_step_euler_and_passes_a_tight_solve(validity_runs, caplog):
    m = {k: json.loads((d / "metrics.json").read_text()) for k, d in validity_runs.items()}
    threshold = compose().eval.validity_threshold
    assert m["euler"]["validity_gap"] > threshold  # a 1-step Euler flow is not its ODE's flow
    assert m["tight"]["validity_gap"] < threshold / 10
    for d in validity_runs.values():
        logged = scalars(d)
        assert {"validity/metric_gap", "validity/nfe_ratio", "nfe/growth"} <= logged.keys()
    assert m["euler"]["validity_nfe_ratio"] > 1
    logged = scalars(validity_runs["tight"])
    assert {"reg/rnode", "reg/rnode_kinetic", "reg/rnode_jacobian", "reg/steer"} <= logged.keys()
    assert all(1 - 0.5 <= v <= 1 + 0.5 for _, v in logged["reg/steer"])


def _layout(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(events_dir(run_dir)), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(event.tensor_proto).item())
    return layout


@pytest.mark.parametrize("run", ["euler", "tight"])
def test_custom_scalars_layout_names_only_tags_that_exist(validity_runs, run):
    layout = _layout(validity_runs[run])
    logged = scalars(validity_runs[run])
    charts = {c.title: [re.sub(r"\\(.)", r"\1", t.strip("^$")) for t in c.multiline.tag]
              for cat in layout.category for c in cat.chart}
    named = [t for tags in charts.values() for t in tags]
    assert named and set(named) <= logged.keys(), set(named) - logged.keys()
    for tag in ("nfe/forward", "nfe/backward", "train/nll", "test/nll", "validity/metric_gap", "time/iter",
                "tol_eval/curve/nll", "tol_eval/curve/nfe_forward"):
        assert tag in named
    assert ("reg/rnode" in named) == (run == "tight")
    curve = [s for s, _ in logged["tol_eval/curve/nll"]]  # one line over the sweep, x increasing
    assert curve == sorted(curve) and len(curve) == 2


def test_nfe_budget_stops_naming_the_remedies(fake_mnist, tmp_path):
    code = train_here(*TINY, f"data_dir={fake_mnist}", "dataset.download=false", "trainer.max_nfe_per_iter=5",
                      "trainer.nfe_guard=stop", run_dir=tmp_path)
    assert code == 3
    error = json.loads((tmp_path / "metrics.json").read_text())["error"]
    for needle in ("trainer.max_nfe_per_iter=5", "regularizer=rnode", "regularizer=steer", "rtol=0.01",
                   "trainer.nfe_guard=warn"):
        assert needle in error, error


# -- config-time errors --------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["regularizer=rnode", "regularizer.rnode.kinetic=-0.1"], "regularizer.rnode.kinetic=-0.1 must be >= 0"),
    (["regularizer=rnode", "regularizer.rnode.jacobian=-1"], "regularizer.rnode.jacobian=-1.0 must be >= 0"),
    (["regularizer=steer", "regularizer.steer.b=1.0"], "regularizer.steer.b=1.0 must be < T=1"),
    (["regularizer=steer", "model=cnf", "model.time_length=0.5", "regularizer.steer.b=0.6"],
     "regularizer.steer.b=0.6 must be < T=0.5"),
    (["regularizer=steer", "model=latent_ode"], "use model.encoder=odernn"),
    (["regularizer=rnode", "model=resnet"], "model=resnet solves no ODE"),
    (["regularizer=rnode", "model=cnf", "model.kinetic_weight=0.1"], "not both"),
    (["regularizer=error"], "use solver.grad=checkpoint (bounded memory) or solver.grad=direct"),  # odenet: adjoint
    (["regularizer=error", "solver.grad=direct", "solver=rk4"], "needs an adaptive explicit method"),
    (["regularizer=error", "regularizer.error.weight=-1"], "regularizer.error.weight=-1.0 must be >= 0"),
    (["regularizer=error", "regularizer.error.stiffness=-1"], "regularizer.error.stiffness=-1.0 must be >= 0"),
    (["regularizer=error", "solver.grad=direct", "solver=bosh3", "regularizer.error.stiffness=0.1"],
     "set regularizer.error.stiffness=0 or solver=dopri5"),
    (["trainer.nfe_guard=halt"], "trainer.nfe_guard='halt' is not one of warn, stop"),
    (["trainer.max_nfe_per_iter=0"], "trainer.max_nfe_per_iter=0 must be > 0"),
])
def test_config_errors_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(*overrides))


def test_regularizer_group_composes_and_maps_onto_the_cnf_weights():
    from neuralode.tasks import regularization, rnode_weights

    cfg = compose("regularizer=[rnode,steer]", "regularizer.steer.b=0.25")
    assert cfg.regularizer.rnode.kinetic == 0.01 and cfg.regularizer.steer.b == 0.25
    validate(cfg)
    reg = regularization(cfg)
    assert (reg.kinetic_weight, reg.jacobian_weight, reg.steer_b) == (0.01, 0.01, 0.25)
    assert regularization(compose()) is None
    cnf = compose("model=cnf", "regularizer=rnode", "regularizer.rnode.kinetic=0.3")
    assert rnode_weights(cnf) == (0.3, 0.01)  # the CNF's own RNODE integrals, not a second copy
    assert regularization(cnf) is None
    assert rnode_weights(compose("model=cnf", "model.kinetic_weight=0.2")) == (0.2, 0.0)


@pytest.mark.slow  # about 10 s on a busy core
def test_rnode_and_steer_train_every_family(tmp_path):
    """latent ODE (ODE-RNN encoder, so STEER has solves to act on) with both regularizers, from config."""
    code = train_here("model=latent_ode", "model.encoder=odernn", "regularizer=[rnode,steer,error]", "dataset.n=40",
                      "trainer.batch_size=8", "trainer.eval_batch_size=8", "trainer.limit_batches=2",
                      "trainer.limit_eval_batches=1", "trainer.epochs=1", "eval.rtols=[]", "tol=1e-2",
                      "model.n_figures=1", run_dir=tmp_path)
    assert code == 0
    logged = scalars(tmp_path)
    assert {"reg/rnode", "reg/steer", "reg/error"} <= logged.keys()
    assert all(math.isfinite(v) for _, v in logged["reg/rnode"])


# -- tol=auto ------------------------------------------------------------------------------------
def test_auto_tol_rule_converges_to_the_loosest_valid_decade():
    """A metric whose error grows linearly with the tolerance, m(r) = 1 + 5 r: against the reference
    at r/100 a candidate c is valid while 5 (c - r/100) <= 0.01, so the loosest valid decade is 1e-3
    (1e-2 is not). From the loose start (1e-1) the rule reaches it in one epoch and stays there;
    from a too-tight start it loosens a decade per epoch."""
    from neuralode.config import AUTO_TOL_RANGE, AUTO_TOL_START
    from neuralode.train import next_auto_rtol

    metric = lambda r: 1 + 5 * r  # noqa: E731
    for start, path in ((AUTO_TOL_START, [1e-3, 1e-3, 1e-3]), (1e-6, [1e-5, 1e-4, 1e-3, 1e-3])):
        r, seen = start, []
        for _ in path:
            r, _ = next_auto_rtol(r, metric, metric(r), 0.01, AUTO_TOL_RANGE)
            seen.append(r)
        assert seen == pytest.approx(path, rel=1e-9)


@pytest.mark.slow  # about 10-20 s on a busy core
def test_auto_tol_trains_from_the_command_line(tmp_path):
    overrides = [o for o in CNF_TOY if not o.startswith(("trainer.limit_batches", "trainer.epochs", "eval.rtols"))]
    code = train_here(*overrides, "trainer.limit_batches=3", "trainer.epochs=2", "eval.rtols=[]", "tol=auto",
                      run_dir=tmp_path)
    assert code == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    logged = scalars(tmp_path)
    assert len(logged["tol/rtol"]) == 2 and m["rtol_auto"] == logged["tol/rtol"][-1][1]
    assert 1e-7 <= m["rtol_auto"] <= 0.5
    assert "tol/rtol" in [t.strip("^$").replace("\\", "") for c in _layout(tmp_path).category for ch in c.chart
                          for t in ch.multiline.tag]


@pytest.mark.parametrize("overrides, message", [
    (["tol=auto", "solver=euler"], "tol=auto tunes an adaptive solver's tolerance, but solver=euler"),
    (["tol=auto", "solver=dopri5", "solver.step_size=0.1"], "with solver.step_size=0.1 takes fixed steps"),
    (["tol=abc"], "tol='abc' must be a number or auto"),
])
def test_auto_tol_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(*overrides))
