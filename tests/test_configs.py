"""Every option of every config group composes, validates and builds; options of
the image-classifier family (issue 3) also run a forward and backward pass.
Other families (cnf, latent_ode) test their own forward passes."""

from __future__ import annotations

import importlib.resources

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from neuralode import preflight
from neuralode.config import ConfigError, register_configs, validate
from neuralode.models import solver_overrides
from neuralode.tasks import build_task

register_configs()
CONF = importlib.resources.files("neuralode.conf")
GROUPS = ["model", "solver", "dataset", "optim", "trainer", "experiment"]
OPTIONS = [(g, f.name[:-5]) for g in GROUPS for f in sorted(CONF.joinpath(g).iterdir(), key=lambda f: f.name)
           if f.name.endswith(".yaml")]


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    with initialize_config_module("neuralode.conf", version_base="1.3"):
        yield


CLASSIFIERS = ("odenet", "resnet", "rknet")


def cfg_for(*overrides: str):
    cfg = compose("config", overrides=list(overrides))
    if cfg.model.name in CLASSIFIERS and not any(o.startswith("model.width=") for o in overrides):
        cfg.model.width = 8  # tiny and fast
    return cfg


def test_every_group_has_options():
    found = {g for g, _ in OPTIONS}
    assert set(GROUPS) <= found
    solvers = {o for g, o in OPTIONS if g == "solver"}
    assert solvers >= {"euler", "midpoint", "heun2", "heun3", "rk4", "fehlberg2", "adaptive_heun", "bosh3",
                       "dopri5", "tsit5", "dopri8"}


# Options of other families are composed with a partner they validate against.
MODEL_FOR_DATASET = {"TimeSeriesDatasetConf": "latent_ode", "Toy2DDatasetConf": "cnf"}
DATASET_FOR_MODEL = {"latent_ode": "spirals", "rnn": "spirals", "cnf": "8gaussians"}
EXPLICIT_RK = {"euler", "midpoint", "heun2", "heun3", "rk4", "fehlberg2", "adaptive_heun", "bosh3", "dopri5",
               "tsit5", "dopri8"}


def partner(group: str, option: str) -> list[str]:
    if group == "model" and option in DATASET_FOR_MODEL:
        return [f"dataset={DATASET_FOR_MODEL[option]}"]
    if group == "experiment" and option == "cnf_fm_then_ml_checkerboard":
        return ["model.init_from=null"]  # it fine-tunes a finished flow-matching run (tests/test_flow_matching.py)
    if group == "dataset":
        schema = OmegaConf.get_type(compose("config", overrides=[f"dataset={option}"]).dataset).__name__
        if schema in MODEL_FOR_DATASET:
            return [f"model={MODEL_FOR_DATASET[schema]}"]
    return []


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_runs(group, option):
    cfg = cfg_for(f"{group}={option}", *partner(group, option), "rtol=1e-2", "atol=1e-2")
    validate(cfg)
    task = build_task(cfg)
    d = cfg.dataset
    # Forward passes here cover the image classifiers with the explicit RK methods; other
    # families and the implicit solvers test their own (much costlier) forward passes.
    if cfg.model.name not in CLASSIFIERS or "channels" not in d or cfg.solver.method not in EXPLICIT_RK:
        return
    x = torch.randn(2, d.channels, d.image_size, d.image_size)
    loss, metrics = task.loss((x, torch.tensor([0, 1])))
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= metrics["acc"] <= 1.0
    assert all(p.grad is not None for p in task.model.parameters())


@pytest.mark.parametrize("grad, seminorm", [("adjoint", False), ("adjoint", True), ("checkpoint", False)])
def test_gradient_modes_match_direct(grad, seminorm):
    """Each mode's gradient points the same way as direct backprop; NFE are recorded."""
    from neuralode import record_stats

    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("direct", grad):
        torch.manual_seed(1)
        task = build_task(cfg_for(f"solver.grad={mode}", f"solver.seminorm={seminorm}", "rtol=1e-4", "atol=1e-4"))
        with record_stats() as stats:
            task.model(x).square().mean().backward()
        assert stats.nfe_forward > 0
        assert (stats.nfe_backward > 0) == (mode != "direct")
        grads[mode] = torch.cat([p.grad.flatten() for p in task.model.parameters()])
    assert torch.cosine_similarity(grads[grad], grads["direct"], dim=0) > 0.99  # adjoint error scales with the tolerance


def test_rknet_is_odenet_with_direct_backprop_and_overridable():
    assert cfg_for("model=rknet").solver.grad == "direct"
    assert cfg_for("model=rknet", "solver=rk4").solver.method == "rk4"
    assert cfg_for("model=rknet", "solver.grad=adjoint").solver.grad == "adjoint"


def test_tolerances_move_together():
    """tol sets both, atol follows rtol (so an rtol sweep changes the solver's work), an explicit atol stays."""
    tols = lambda *o: (cfg_for(*o).rtol, cfg_for(*o).atol)  # noqa: E731
    assert tols() == (1e-3, 1e-3)
    assert tols("tol=1e-5") == (1e-5, 1e-5)
    assert tols("rtol=1e-5") == (1e-5, 1e-5)
    assert tols("rtol=1e-5", "atol=1e-7") == (1e-5, 1e-7)
    assert tols("tol=1e-4", "rtol=1e-6") == (1e-6, 1e-6)
    # latent ODEs keep atol a tenth of rtol, also under a sweep
    assert tols("model=latent_ode") == (1e-3, 1e-4)
    assert tols("model=latent_ode", "rtol=1e-5") == (1e-5, 1e-6)
    assert tols("experiment=spirals_latent_ode_30", "rtol=1e-2") == (1e-2, 1e-3)


def test_rtol_sweep_jobs_differ_in_atol():
    """`-m rtol=1e-2,1e-4` composes two jobs whose atol differ (Hydra's sweeper composes each job like this)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (sweep,) = OverridesParser.create().parse_overrides(["rtol=1e-2,1e-4"])
    jobs = [cfg_for(f"rtol={v}") for v in sweep.sweep_string_iterator()]
    assert [(c.rtol, c.atol) for c in jobs] == [(1e-2, 1e-2), (1e-4, 1e-4)]


@pytest.mark.parametrize("model, expect", [
    ("cnf", dict(dataset="8gaussians", optim="adam", trace="exact", grad="direct")),
    ("latent_ode", dict(dataset="spirals", optim="adam", grad="direct")),
    ("rnn", dict(dataset="spirals", optim="adam")),
    ("odenet", dict(dataset="mnist", optim="sgd")),
])
def test_family_defaults(model, expect):
    cfg = cfg_for(f"model={model}")
    got = dict(dataset=cfg.dataset.name, optim=cfg.optim.name, trace=cfg.model.get("trace"), grad=cfg.solver.grad)
    assert {k: got[k] for k in expect} == expect


def test_family_defaults_follow_the_dataset_and_yield_to_the_command_line():
    images = cfg_for("model=cnf", "dataset=mnist")
    assert (images.model.trace, images.solver.grad, images.rtol) == ("hutchinson", "adjoint", 1e-5)
    mine = cfg_for("model=cnf", "dataset=mnist", "model.trace=exact", "solver.grad=direct", "optim=sgd", "tol=1e-2")
    assert (mine.model.trace, mine.solver.grad, mine.optim.name, mine.rtol) == ("exact", "direct", "sgd", 1e-2)
    assert cfg_for("model=latent_ode", "optim.lr=0.5").optim.lr == 0.5


def test_smoke_caps_any_preset():
    for preset in ("mnist_paper", "spirals_latent_ode_30", "cnf_checkerboard"):
        t = cfg_for(f"experiment={preset}", "trainer=smoke").trainer
        assert (t.epochs, t.limit_batches, t.limit_eval_batches) == (1, 2, 1), preset
    assert cfg_for("experiment=mnist_paper", "trainer=smoke", "trainer.limit_batches=5").trainer.limit_batches == 5


def test_presets():
    paper = cfg_for("experiment=mnist_paper")
    assert list(paper.optim.milestones) == [60, 100, 140] and paper.trainer.epochs == 160
    assert paper.dataset.augment and paper.optim.momentum == 0.9 and paper.trainer.batch_size == 128
    assert cfg_for("solver=rk4").solver.step_size == 0.25


@pytest.mark.parametrize("override", ["rtol=abc", "foo=1", "model.depth=3", "trainer.batch_size=big", "model=foo"])
def test_schema_rejects_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        cfg_for(override)


@pytest.mark.parametrize("override, key", [("rtol=-1", "rtol"), ("atol=0", "atol"), ("trainer.batch_size=0",
                         "trainer.batch_size"), ("solver.grad=sideways", "solver.grad"),
                         ("eval.rtols=[0.1,-1]", "eval.rtols"), ("optim.momentum=-1", "optim.momentum"),
                         ("model.width=0", "model.width"), ("dataset=spirals", "model=odenet classifies images")])
def test_validate_rejects_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        validate(cfg_for(override))


@pytest.mark.parametrize("override, key", [("solver.method=rk5", "solver.method='rk5'"),
                                           ("solver.adjoint.method=foo", "solver.adjoint.method='foo'"),
                                           ("solver.step_size=null", "solver.method=rk4"),
                                           ("+solver.options.max_num_steps=0", "solver.options.max_num_steps=0")])
def test_preflight_rejects_solver_settings(override, key):
    """The solver's own settings type checks names and option values; the error names the config key."""
    overrides = ["solver=rk4"] if override.startswith("solver.step_size") else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        preflight.check_solver(cfg_for(*overrides, override))


def test_help_and_cfg_job_do_not_import_the_model_zoo(tmp_path):
    """The schemas are a leaf: printing help or the config imports no model, task, torchvision or matplotlib."""
    import subprocess
    import sys

    zoo = ("neuralode.models", "neuralode.tasks", "torchvision", "matplotlib")
    for args, shown in ((["--cfg", "job"], "method: dopri5"), (["--help"], "usage: neuralode-train")):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "neuralode.train", *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and shown in res.stdout, res.stdout + res.stderr
        assert "schema" not in res.stdout and "powered by Hydra" not in res.stdout  # only user-facing groups
        imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()
                    if line.startswith("import time")}
        assert {"neuralode.config", "neuralode.run", "hydra"} <= imported  # the check sees real imports
        assert not {m for m in imported if m.startswith(zoo)}, sorted(m for m in imported if m.startswith(zoo))


def test_test_time_tolerance_override_changes_nfe():
    from neuralode import record_stats

    task = build_task(cfg_for("rtol=1e-4", "atol=1e-4"))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), record_stats() as tight:
        task.model(x)
    with torch.no_grad(), solver_overrides(task.model, rtol=1e-1, atol=1e-1), record_stats() as loose:
        task.model(x)
    assert loose.nfe_forward < tight.nfe_forward
    assert next(m for m in task.model.modules() if hasattr(m, "solver")).solver.rtol == 1e-4


def test_augment_dim_adds_zero_channels():
    base, aug = build_task(cfg_for()), build_task(cfg_for("model.augment_dim=4"))
    n = lambda t: sum(p.numel() for p in t.model.parameters())  # noqa: E731
    assert n(aug) > n(base)
    assert aug.model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_paper_parameter_counts():
    count = lambda *o: sum(p.numel() for p in build_task(cfg_for("model.width=64", *o)).model.parameters())  # noqa
    assert 0.19e6 < count("model=odenet") < 0.25e6
    assert 0.55e6 < count("model=resnet") < 0.65e6


def test_readme_configuration_table_lists_every_option():
    """The README's configuration table names every option of every user-facing group, so it cannot go stale."""
    from pathlib import Path

    from neuralode.train import USER_GROUPS, group_options

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| group | options | what it sets |"):]
    rows = {line.split("|")[1].strip(" `"): line for line in table.split("\n\n")[0].splitlines()[2:]}
    assert set(rows) == set(USER_GROUPS)
    missing = {g: [o for o in group_options(g) if f"`{o}`" not in rows[g].split("|")[2]] for g in USER_GROUPS}
    assert not any(missing.values()), f"README configuration table lacks {missing}"
