"""What a new user meets first: every model family runs with its own defaults and nothing but
``trainer=smoke``, a preset under ``trainer=smoke`` is a smoke run, a fixed-step solver's test-time
sweep varies the step size, and the end of a run says where the results are."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import events_dir, scalars, train_here

PRIMARY = {"odenet": "acc", "resnet": "acc", "rknet": "acc", "cnf": "nll", "latent_ode": "rmse_extrap",
           "rnn": "rmse_extrap"}


@pytest.mark.parametrize("model", ["odenet", "cnf", "latent_ode", "rnn"])
def test_every_family_runs_with_its_defaults(model, fake_mnist, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="neuralode")
    data = [f"data_dir={fake_mnist}"] if model == "odenet" else []
    out = tmp_path / "run"
    assert train_here(f"model={model}", "trainer=smoke", *data, run_dir=out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    key = f"test_{PRIMARY[model]}"
    assert metrics["status"] == "completed" and metrics["primary_metric"] == key
    assert metrics["test_primary"] is not None and metrics["test_primary"] == metrics[key]
    assert isinstance(metrics["solver_events"], list)
    logged = scalars(out)
    assert logged["final/primary"][-1][1] == pytest.approx(metrics[key])
    peaks = [v for _, v in logged["mem/peak"]]  # one epoch: the summary's memory column is its largest peak
    assert min(peaks) > 0 and metrics["mem_peak_mb"] == pytest.approx(max(peaks) / 2**20)
    assert f"results: {out}" in caplog.text and f"tensorboard --logdir {out}" in caplog.text


def test_preset_under_smoke_is_a_smoke_run(tmp_path):
    out = tmp_path / "run"
    assert train_here("experiment=spirals_latent_ode_30", "trainer=smoke", "eval.rtols=[]", run_dir=out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["epochs"], metrics["steps"]) == (1, 2)


def test_fixed_step_sweep_varies_the_step_size(tmp_path):
    out = tmp_path / "run"
    assert train_here("model=latent_ode", "trainer=smoke", "solver=rk4", "solver.step_size=0.5",
                      "eval.step_sizes=[0.5,0.25]", run_dir=out) == 0
    rows = json.loads((out / "metrics.json").read_text())["tol_eval"]
    assert [r["step_size"] for r in rows] == [0.5, 0.25]
    assert rows[1]["nfe_forward"] > rows[0]["nfe_forward"]  # a tolerance would not have changed the work
    assert events_dir(out).name == "latent_ode-rk4-direct"
    assert "tol_eval/nfe_forward/step_size=0.25" in scalars(out)


def test_latent_ode_per_sample_time_grid_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    assert train_here("model=latent_ode", "trainer=smoke", "model.time_grid=per_sample", "eval.rtols=[]",
                      run_dir=out) == 0
    assert json.loads((out / "metrics.json").read_text())["test_primary"] is not None


class _FakeRun:
    def __init__(self):
        self.logged, self.texts = {}, []

    def scalars(self, values, step):
        for k, v in values.items():
            self.logged.setdefault(k, []).append((step, v))

    def text(self, tag, text, step):
        self.texts.append((tag, step, text))


def test_solver_events_are_logged_once_counted_and_recorded(caplog):
    """The auto switch (time and iteration), tenfold NFE growth and the library's warnings reach
    TensorBoard and metrics.json; each kind is logged once and counted after that."""
    import warnings
    from types import SimpleNamespace

    from neuralode.watch import SolverWatch

    run = _FakeRun()
    watch = SolverWatch(run, "auto")
    quiet = SimpleNamespace(n_switches=0, switched_at=float("nan"), nfe_forward=20)
    switched = SimpleNamespace(n_switches=1, switched_at=0.25, nfe_forward=20)
    for step in range(1, 6):
        watch.solves(quiet, step, "training", training=True)
    watch.solves(switched, 6, "training", training=True)
    watch.solves(switched, 7, "training", training=True)
    watch.solves(SimpleNamespace(n_switches=0, switched_at=float("nan"), nfe_forward=400), 8, "training", training=True)
    from neuralode.solvers import settings as solver_settings_module

    with watch.block(9, "evaluation"):
        warnings.warn_explicit("solver trouble", UserWarning, solver_settings_module.__file__, 1)
    events = {e["event"]: e for e in watch.summary()}
    assert events["auto_switch"]["step"] == 6 and events["auto_switch"]["t"] == 0.25
    assert events["auto_switch"]["count"] == 2 and events["auto_switch"]["switches"] == 2
    assert events["nfe_growth"]["step"] == 8 and events["nfe_growth"]["baseline"] == 20
    assert events["warning"]["message"] == "solver trouble" and events["warning"]["phase"] == "evaluation"
    assert run.logged["solver/switched_at"] == [(6, 0.25), (7, 0.25)]
    assert [step for _, step, _ in run.texts] == [6, 8, 9]  # each kind once
    assert caplog.text.count("solver=auto switched") == 1


def test_progress_lines_when_stdout_is_not_a_terminal(caplog):
    from tqdm import tqdm

    from neuralode.run import Progress

    caplog.set_level(logging.INFO, logger="neuralode")
    progress = Progress(tqdm(range(3), disable=True), "epoch 1/1", 3, every=1e-9)
    for _ in progress:
        progress.update({"loss": 0.5})
    assert caplog.text.count("epoch 1/1: batch") == 3 and "loss 0.5" in caplog.text and "epoch ends in" in caplog.text
