"""Training end to end on tiny budgets: in-process through the function the entry point calls
(:func:`conftest.train_here`), and through the real entry point where its process is the point
(exit status and console of a bad command line, SIGTERM)."""

from __future__ import annotations

import json
import logging
import shlex
import signal
import subprocess
import time

import pytest
import torch

from conftest import SHARED_MNIST, TINY, events_dir, run_train, scalars, train_cmd, train_here

TAGS = {"train/loss", "train/acc", "test/loss", "test/acc", "nfe/forward", "nfe/backward",
        "nfe/forward_epoch", "nfe/backward_epoch", "time/iter", "time/epoch", "lr"}


@pytest.mark.parametrize("model", ["odenet", "resnet", "rknet"])
def test_training_logs_tags_and_checkpoints(model, fake_mnist, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="neuralode")
    out = tmp_path / "run"
    assert train_here(f"model={model}", f"data_dir={fake_mnist}", *TINY, run_dir=out) == 0
    # TensorBoard names a single run after the model, solver and gradient mode
    grad = "direct" if model == "rknet" else "adjoint"
    assert events_dir(out) == out / "tb" / f"{model}-dopri5-{grad}"
    assert len(list(events_dir(out).glob("events.out.tfevents.*"))) == 1
    logged = scalars(out)
    assert TAGS <= logged.keys(), TAGS - logged.keys()
    assert [s for s, _ in logged["train/loss"]] == [1, 2]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 0, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == model and metrics["status"] == "completed"
    if model == "resnet":
        assert metrics["nfe_forward"] == 0 and metrics["tol_eval"] == []
    else:
        assert metrics["nfe_forward"] > 0
        assert "tol_eval/acc/rtol=0.1" in logged
        # Direct backprop replays the solver's operations: no extra function evaluations.
        assert metrics["grad"] == ("direct" if model == "rknet" else "adjoint")
        assert (metrics["nfe_backward"] > 0) == (model == "odenet")
    assert "epoch 1/1" in caplog.text


def test_eval_every_evaluates_every_nth_epoch_and_the_last(fake_mnist, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="neuralode")
    out = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("trainer.epochs")]
    assert train_here("model=resnet", f"data_dir={fake_mnist}", *tiny, "trainer.epochs=3", "trainer.eval_every=2",
                      run_dir=out) == 0
    logged = scalars(out)
    assert [s for s, _ in logged["train/loss_epoch"]] == [2, 4, 6]
    assert [s for s, _ in logged["test/loss"]] == [4, 6]  # epochs 2 and 3 (the last)
    assert "test: next after epoch 2" in caplog.text
    assert json.loads((out / "metrics.json").read_text())["test_loss"] == logged["test/loss"][-1][1]


@pytest.mark.parametrize("override, message, code", [
    ("model=foo", "Could not find 'model/foo'", 1),  # Hydra's own composition error
    ("rtol=-1", "rtol=-1.0 must be > 0", 2),
])
def test_bad_command_line_fails_before_work_without_traceback(override, message, code, tmp_path):
    out = tmp_path / "run"
    res = run_train(override, f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == code, res.stdout
    assert message in res.stdout
    assert "Traceback" not in res.stdout
    assert not (out / "tb").exists()


def test_missing_data_names_the_files(tmp_path, caplog):
    code = train_here(f"data_dir={tmp_path / 'empty'}", "dataset.download=false", run_dir=tmp_path / "run")
    assert code == 2
    assert "MNIST/raw/train-images-idx3-ubyte" in caplog.text and str(tmp_path / "empty") in caplog.text


def _family_overrides():
    from test_cnf import CNF_TINY
    from test_latent_ode import TINY_TS

    cnf, ts = ([o for o in tiny if not o.startswith("eval.rtols")] + ["eval.rtols=[0.1,0.01]"]
               for tiny in (CNF_TINY, TINY_TS))
    return {
        "odenet": (["model=odenet", *TINY], "acc"),
        "cnf": (cnf, "nll"),
        "latent_ode-gru": (["model=latent_ode", "dataset=spirals", *ts], "rmse_extrap"),
        "latent_ode-odernn": (["model=latent_ode", "model.encoder=odernn", "dataset=periodic", *ts], "rmse_extrap"),
    }


@pytest.mark.parametrize("family", ["odenet", "cnf", "latent_ode-gru", "latent_ode-odernn"])
def test_tolerance_sweep_for_every_ode_family(family, fake_mnist, tmp_path):
    """eval.rtols re-evaluates the test set at each tolerance for every model that solves an ODE,
    whether in an ODE block, CNF blocks, latent dynamics or an ODE-RNN encoder."""
    overrides, metric = _family_overrides()[family]
    out = tmp_path / "run"
    assert train_here(*overrides, f"data_dir={fake_mnist}", run_dir=out) == 0
    logged = scalars(out)
    rtols = [0.1] if family == "odenet" else [0.1, 0.01]
    for r in rtols:
        assert {f"tol_eval/{metric}/rtol={r:g}", f"tol_eval/nfe_forward/rtol={r:g}"} <= logged.keys(), sorted(logged)
    rows = json.loads((out / "metrics.json").read_text())["tol_eval"]
    assert [row["rtol"] for row in rows] == rtols and all(row["nfe_forward"] > 0 for row in rows)


RESUME = [o for o in TINY if not o.startswith(("trainer.limit_batches", "trainer.epochs"))] + [
    "trainer.limit_batches=12", "eval.rtols=[]"]


@pytest.fixture(scope="module")
def straight_run(fake_mnist, tmp_path_factory):
    """Two uninterrupted epochs: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    assert train_here(f"data_dir={fake_mnist}", "trainer.epochs=2", *RESUME, run_dir=out) == 0
    return out


def assert_same_run(a, b):
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    assert wa["step"] == wb["step"] == 24
    for k, v in wa["model"].items():
        assert torch.equal(v, wb["model"][k]), k
    # Seeded determinism: the second epoch logs identical losses.
    la, lb = dict(scalars(a)["train/loss"]), dict(scalars(b)["train/loss"])
    assert all(la[s] == lb[s] for s in lb if s > 12) and max(lb) == 24


def test_resume_continues_exactly(straight_run, fake_mnist, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert train_here(f"data_dir={fake_mnist}", "trainer.epochs=1", *RESUME, run_dir=first) == 0
    assert train_here(f"data_dir={fake_mnist}", "trainer.epochs=2", f"resume={first}", *RESUME, run_dir=second) == 0
    assert_same_run(straight_run, second)


def test_sigterm_checkpoints_mid_epoch_and_resumes(straight_run, fake_mnist, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    overrides = [f"data_dir={fake_mnist}", "trainer.epochs=2", *RESUME]
    proc = subprocess.Popen(train_cmd(*overrides, f"hydra.run.dir={first}"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and "training: epochs" not in _read(first / "train.log"):
            time.sleep(0.05)
        events = first / "tb"
        while time.time() < deadline and not any(f.stat().st_size > 200 for f in events.rglob("events*")):
            time.sleep(0.05)  # a few iterations were logged
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    # the exact command that resumes the run
    assert f"resume with: {shlex.join(['neuralode-train', *overrides, f'resume={first}'])}" in out, out
    ckpt = torch.load(first / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < ckpt["step"] < 24
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["steps"] == ckpt["step"]
    assert train_here(*overrides, f"resume={first / 'checkpoints' / 'last.pt'}", run_dir=second) == 0
    assert_same_run(straight_run, second)


def _read(path):
    return path.read_text() if path.exists() else ""


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason=f"{SHARED_MNIST} not present")
def test_tiny_run_on_shared_mnist_10k(tmp_path):
    out = tmp_path / "run"
    assert train_here(f"data_dir={SHARED_MNIST}", "dataset.download=false", *TINY, run_dir=out) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
