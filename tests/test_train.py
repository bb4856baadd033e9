"""The real entry point, run as a subprocess with tiny budgets."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from conftest import SHARED_MNIST, TINY, run_train, scalars, train_cmd

TAGS = {"train/loss", "train/acc", "test/loss", "test/acc", "nfe/forward", "nfe/backward",
        "nfe/forward_epoch", "nfe/backward_epoch", "time/iter", "time/epoch", "lr"}


@pytest.mark.parametrize("model", ["odenet", "resnet", "rknet"])
def test_entry_point_logs_tags_and_checkpoints(model, fake_mnist, tmp_path):
    out = tmp_path / "run"
    res = run_train(f"model={model}", f"data_dir={fake_mnist}", f"hydra.run.dir={out}", *TINY, cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    logged = scalars(out)
    assert TAGS <= logged.keys(), TAGS - logged.keys()
    assert [s for s, _ in logged["train/loss"]] == [1, 2]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 0, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == model
    if model == "resnet":
        assert metrics["nfe_forward"] == 0 and metrics["tol_eval"] == []
    else:
        assert metrics["nfe_forward"] > 0
        assert "tol_eval/acc/rtol=0.1" in logged
        # Direct backprop replays the solver's operations: no extra function evaluations.
        assert metrics["grad"] == ("direct" if model == "rknet" else "adjoint")
        assert (metrics["nfe_backward"] > 0) == (model == "odenet")
    assert "epoch 1/1" in (out / "train.log").read_text()


def test_multirun_over_rtol_writes_summary(fake_mnist, tmp_path):
    sweep = tmp_path / "sweep"
    res = run_train("-m", "rtol=0.1,0.001", f"hydra.sweep.dir={sweep}", f"data_dir={fake_mnist}",
                    *[o for o in TINY if not o.startswith("rtol")], cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stdout
    assert len(list(sweep.glob("*/tb/events.out.tfevents.*"))) == 2
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("job,overrides")
    assert {r.split(",")[5] for r in rows[1:]} == {"0.1", "0.001"}
    assert (sweep / "summary.png").stat().st_size > 0


@pytest.mark.parametrize("override, message", [
    ("model=foo", "Could not find 'model/foo'"),
    ("rtol=abc", "could not be converted to Float"),
    ("rtol=-1", "rtol=-1.0 must be > 0"),
    ("trainer.batch_size=0", "trainer.batch_size=0 must be > 0"),
    ("foo=1", "Key 'foo' not in 'Config'"),
])
def test_bad_overrides_fail_before_work(override, message, tmp_path):
    out = tmp_path / "run"
    res = run_train(override, f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode != 0
    assert message in res.stdout
    assert "Traceback" not in res.stdout
    assert not (out / "tb").exists()


def test_missing_data_names_the_files(tmp_path):
    res = run_train(f"data_dir={tmp_path / 'empty'}", "dataset.download=false", f"hydra.run.dir={tmp_path / 'run'}",
                    cwd=tmp_path)
    assert res.returncode == 2
    assert "MNIST/raw/train-images-idx3-ubyte" in res.stdout and str(tmp_path / "empty") in res.stdout
    assert "Traceback" not in res.stdout


RESUME = [o for o in TINY if not o.startswith(("trainer.limit_batches", "trainer.epochs"))] + [
    "trainer.limit_batches=12", "eval.rtols=[]"]


@pytest.fixture(scope="module")
def straight_run(fake_mnist, tmp_path_factory):
    """Two uninterrupted epochs: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    res = run_train(f"data_dir={fake_mnist}", f"hydra.run.dir={out}", "trainer.epochs=2", *RESUME, cwd=out)
    assert res.returncode == 0, res.stdout
    return out


def assert_same_run(a, b):
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=False)
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=False)
    assert wa["step"] == wb["step"] == 24
    for k, v in wa["model"].items():
        assert torch.equal(v, wb["model"][k]), k
    # Seeded determinism: the second epoch logs identical losses.
    la, lb = dict(scalars(a)["train/loss"]), dict(scalars(b)["train/loss"])
    assert all(la[s] == lb[s] for s in lb if s > 12) and max(lb) == 24


def test_resume_continues_exactly(straight_run, fake_mnist, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    res = run_train(f"data_dir={fake_mnist}", f"hydra.run.dir={first}", "trainer.epochs=1", *RESUME, cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    res = run_train(f"data_dir={fake_mnist}", f"hydra.run.dir={second}", "trainer.epochs=2", f"resume={first}",
                    *RESUME, cwd=tmp_path)
    assert res.returncode == 0, res.stdout
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
        while time.time() < deadline and not any(f.stat().st_size > 200 for f in events.glob("events*")):
            time.sleep(0.05)  # a few iterations were logged
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    ckpt = torch.load(first / "checkpoints" / "last.pt", weights_only=False)
    assert 0 < ckpt["step"] < 24
    res = run_train(*overrides, f"hydra.run.dir={second}", f"resume={first / 'checkpoints' / 'last.pt'}",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    assert_same_run(straight_run, second)


def _read(path):
    return path.read_text() if path.exists() else ""


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason=f"{SHARED_MNIST} not present")
def test_tiny_run_on_shared_mnist_10k(tmp_path):
    out = tmp_path / "run"
    res = run_train(f"data_dir={SHARED_MNIST}", f"hydra.run.dir={out}", "dataset.download=false", *TINY, cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
