"""Fault injection for the runner (issue 13): every failure ends with its documented exit code,
a one-line reason naming the key or path, no traceback, and the files a user needs afterwards.

Most cases call the training function in-process (the exit code it returns is the one the
entry point exits with); subprocesses are used where the entry point itself is the point:
the exit status and console of a user error, and sweeps."""

from __future__ import annotations

import csv
import errno
import importlib.util
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_train, scalars, train_here
from neuralode.run import CKPT_FORMAT, Run

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# Two epochs of two batches, no tolerance sweep: enough for a checkpoint to resume from.
SHORT = [o for o in TINY if not o.startswith("eval.rtols")] + ["eval.rtols=[]"]


@pytest.fixture(scope="module")
def finished_run(fake_mnist, tmp_path_factory) -> Path:
    """A completed tiny odenet run with its checkpoint."""
    out = tmp_path_factory.mktemp("finished")
    assert train_here(f"data_dir={fake_mnist}", *SHORT, run_dir=out) == 0
    return out


def errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def assert_one_line_error(caplog, *fragments: str) -> None:
    """Exactly one error record, without traceback, containing every fragment."""
    (record,) = errors(caplog)
    message = record.getMessage()
    assert record.exc_info is None and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# -- 1. checkpoints cannot execute code ------------------------------------------------------------
class Payload:
    """Unpickling this creates ``path``: proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoint_is_plain_data(finished_run):
    state = torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == CKPT_FORMAT and state["config"]["solver"]["grad"] == "adjoint"
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 2)
    assert state["history"]["test_acc"] >= 0


@pytest.mark.parametrize("how", ["resume", "torchrun_restart"])
def test_malicious_checkpoint_is_refused_without_running(how, finished_run, fake_mnist, tmp_path, caplog,
                                                         monkeypatch):
    marker = tmp_path / "pwned"
    state = torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)
    out = tmp_path / "run"
    evil = out / "checkpoints" / "last.pt"
    evil.parent.mkdir(parents=True)
    torch.save({**state, "extra": Payload(marker)}, evil)
    if how == "resume":
        code = train_here(f"data_dir={fake_mnist}", *SHORT, f"resume={evil}", run_dir=tmp_path / "other")
    else:  # torchrun restarted the workers: they resume from the run's own checkpoint
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        code = train_here(f"data_dir={fake_mnist}", *SHORT, run_dir=out)
    assert code == 2
    assert not marker.exists()
    assert_one_line_error(caplog, f"resume={evil}", "refusing to load it")


class Grad(str, __import__("enum").Enum):
    """What format-1 checkpoints pickled as ``neuralode.config.Grad``."""

    adjoint = "adjoint"


def test_format_1_checkpoint_is_migrated(finished_run, fake_mnist, tmp_path, monkeypatch):
    import neuralode.config

    state = torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)
    del state["format"]
    state["config"]["solver"]["grad"] = Grad.adjoint
    monkeypatch.setattr(neuralode.config, "Grad", Grad, raising=False)  # where pickle finds the class
    Grad.__module__, Grad.__qualname__ = "neuralode.config", "Grad"
    old = tmp_path / "old.pt"
    torch.save(state, old)
    monkeypatch.delattr(neuralode.config, "Grad")
    _, loaded = Run.load_checkpoint(old)
    assert loaded["config"]["solver"]["grad"] == "adjoint" and type(loaded["config"]["solver"]["grad"]) is str
    out = tmp_path / "run"
    assert train_here(f"data_dir={fake_mnist}", *SHORT, "trainer.epochs=2", f"resume={old}", run_dir=out) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("case, overrides, fragments", [
    ("missing", [], ["no checkpoint there"]),
    ("corrupt", [], ["cannot read it"]),
    ("bad memo", [], ["cannot read it (KeyError"]),
    ("truncated", [], ["cannot read it"]),
    ("other width", ["model.width=16"], ["model.width=8 there, 16 here"]),
    ("other model", ["model=resnet"], ["model.name='odenet' there, 'resnet' here"]),
    ("sgd to adam", ["optim=adam"], ["optim.name='sgd' there, 'adam' here"]),
])
def test_bad_resume_target_is_refused_before_training(case, overrides, fragments, finished_run, fake_mnist,
                                                      tmp_path, caplog):
    target = finished_run / "checkpoints" / "last.pt"
    if case == "missing":
        target = tmp_path / "nowhere"
    elif case == "corrupt":
        target = tmp_path / "corrupt.pt"
        target.write_bytes(os.urandom(4096))
    elif case == "bad memo":  # a pickle that fetches memo entry 239, which it never stored
        target = tmp_path / "memo.pt"
        target.write_bytes(b"\x80\x02h\xef.")
    elif case == "truncated":
        target = _truncated(finished_run / "checkpoints" / "last.pt", tmp_path / "truncated.pt")
    out = tmp_path / "run"
    code = train_here(f"data_dir={fake_mnist}", *SHORT, *overrides, f"resume={target}", run_dir=out)
    assert code == 2
    assert_one_line_error(caplog, f"resume={target}", *fragments)
    assert not (out / "tb").exists()  # refused before any training was logged
    assert json.loads((out / "metrics.json").read_text())["exit_code"] == 2


# -- 2. sweeps finish ------------------------------------------------------------------------------
def test_sweep_with_a_failing_job_runs_every_job_and_names_the_failure(fake_mnist, tmp_path):
    sweep = tmp_path / "sweep"
    res = run_train("-m", "rtol=0.1,-1,0.05", f"hydra.sweep.dir={sweep}", f"data_dir={fake_mnist}",
                    *[o for o in SHORT if not o.startswith(("rtol", "atol"))], cwd=tmp_path, timeout=900)
    assert res.returncode == 2, res.stdout  # the first failed job's exit code
    assert "Traceback" not in res.stdout
    status = {j: json.loads((sweep / j / "metrics.json").read_text()) for j in ("0", "1", "2")}
    assert [status[j]["status"] for j in ("0", "1", "2")] == ["completed", "failed", "completed"]
    assert status["1"]["exit_code"] == 2 and "rtol=-1.0 must be > 0" in status["1"]["error"]
    # TensorBoard names each job after its overrides; atol followed each job's rtol
    assert len(list(sweep.glob("0/tb/*rtol=0.1*/events.out.tfevents.*"))) == 1, list(sweep.rglob("events*"))
    assert len(list(sweep.glob("2/tb/*rtol=0.05*/events.out.tfevents.*"))) == 1 and not (sweep / "1" / "tb").exists()
    assert (status["0"]["atol"], status["2"]["atol"]) == (0.1, 0.05)
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["status"], r["rtol"]) for r in rows] == [("0", "completed", "0.1"), ("1", "failed", "-1.0"),
                                                                  ("2", "completed", "0.05")]
    if HAVE_MATPLOTLIB:  # the figures need the plots extra; the failed job is left out of them
        assert (sweep / "summary.png").stat().st_size > 0 and (sweep / "pareto.png").stat().st_size > 0
    md = (sweep / "summary.md").read_text()
    assert "1 of 3 jobs did not complete" in md and "job 1 (failed, exit code 2): invalid config: rtol=-1.0" in md


# -- 3. every exit code holds ------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["odenet", "rknet", "resnet"])
def test_divergence_exits_4(model, fake_mnist, tmp_path, caplog):
    out = tmp_path / "run"
    code = train_here(f"model={model}", f"data_dir={fake_mnist}", *SHORT, "optim.lr=1e30", run_dir=out)
    assert code == 4
    assert_one_line_error(caplog)
    assert not (out / "checkpoints" / "last.pt").exists()  # no non-finite weights were saved
    assert json.loads((out / "metrics.json").read_text())["exit_code"] == 4


def test_solver_failure_exits_3(fake_mnist, tmp_path, caplog):
    out = tmp_path / "run"
    code = train_here(f"data_dir={fake_mnist}", *SHORT, "+solver.options.max_num_steps=1", run_dir=out)
    assert code == 3
    assert_one_line_error(caplog, "solver failed at iteration 1", "last good checkpoint: none")


BAD_VALUES = [
    ("optim.momentum=-0.5", "optim.momentum=-0.5 must be >= 0"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0 must be >= 0"),
    ("trainer.num_workers=-1", "trainer.num_workers=-1 must be >= 0"),
    ("trainer.eval_every=0", "trainer.eval_every=0 must be > 0"),
    ("model.width=0", "model.width=0 must be > 0"),
    ("dataset=spirals", "model=odenet classifies images: use dataset=mnist or dataset=cifar10"),
    ("solver.grad=sideways", "solver.grad='sideways' is not one of direct, adjoint, checkpoint"),
    ("solver.method=rk5", "solver.method='rk5': unknown method 'rk5'"),
    ("+solver.options.max_num_steps=-3", "solver.options.max_num_steps=-3"),
    ("+solver.options.bogus=1", "solver.options.bogus=1"),
    ("+solver.options.safety=2.0", "solver.options.safety=2.0"),
    ("device=gpu", "device='gpu' is not one of auto, cpu, cuda, cuda:N"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_exits_2_naming_the_key(override, message, fake_mnist, tmp_path, caplog):
    out = tmp_path / "run"
    assert train_here(f"data_dir={fake_mnist}", *SHORT, override, run_dir=out) == 2
    assert_one_line_error(caplog, message)
    assert not (out / "tb").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_exits_2(fake_mnist, tmp_path, caplog):
    assert train_here(f"data_dir={fake_mnist}", *SHORT, "device=cuda", run_dir=tmp_path / "run") == 2
    assert_one_line_error(caplog, "device=cuda: CUDA is not available", "device=cpu")


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "unreadable"])
def test_damaged_mnist_exits_2_naming_the_file(damage, fake_mnist, tmp_path, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fake_mnist, data)
    images = data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:5000])
    elif damage == "garbage header":
        images.write_bytes(os.urandom(64) + images.read_bytes()[64:])
    else:  # a directory where the file should be: unreadable even for root
        images.unlink()
        images.mkdir()
    assert train_here(f"data_dir={data}", *SHORT, run_dir=tmp_path / "run") == 2
    assert_one_line_error(caplog, str(data / "MNIST" / "raw"))


def test_unwritable_run_dir_exits_2_before_work(fake_mnist, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert train_here(f"data_dir={fake_mnist}", *SHORT, run_dir=blocker / "run") == 2
    assert_one_line_error(caplog, f"cannot write to the run directory {blocker / 'run'}", "hydra.run.dir")


def test_entry_point_refuses_an_unwritable_run_dir_before_hydra_creates_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = run_train(f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stdout
    assert f"cannot write to the run directory {blocker / 'run'} (Not a directory)" in res.stdout


def test_disk_full_keeps_the_last_good_checkpoint_and_no_temporary_file(fake_mnist, tmp_path, caplog,
                                                                          monkeypatch):
    import neuralode.run

    real_save, calls = torch.save, []

    def save_then_disk_full(obj, f):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f)
        f.write(b"partial checkpoint bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(neuralode.run.torch, "save", save_then_disk_full)
    out = tmp_path / "run"
    assert train_here(f"data_dir={fake_mnist}", *SHORT, "trainer.epochs=2", run_dir=out) == 2
    assert_one_line_error(caplog, f"cannot write {out / 'checkpoints' / 'last.pt'}", "No space left on device")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.pt"]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1


def test_debug_flag_adds_the_traceback(fake_mnist, tmp_path, caplog):
    assert train_here(f"data_dir={fake_mnist}", *SHORT, "model.width=0", run_dir=tmp_path / "run",
                      traceback=True) == 2
    (record,) = errors(caplog)
    assert record.exc_info is not None


@pytest.mark.slow  # ~17 s, two CLI runs; fast: test_debug_flag_adds_the_traceback, test_train's bad command lines
def test_entry_point_user_error_is_one_line_exit_2_and_verbose_adds_the_traceback(fake_mnist, tmp_path):
    bad = ["resume=/nonexistent/run", f"data_dir={fake_mnist}", *SHORT]
    res = run_train(*bad, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2, res.stdout
    assert "resume=/nonexistent/run: no checkpoint there" in res.stdout and "Traceback" not in res.stdout
    res = run_train(*bad, "hydra.verbose=true", f"hydra.run.dir={tmp_path / 'verbose'}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" in res.stdout


# -- 7. signals cover the whole run ----------------------------------------------------------------
def test_sigterm_during_tolerance_sweep_writes_metrics_and_resumes(fake_mnist, tmp_path, monkeypatch):
    import neuralode.train

    real_evaluate, calls = neuralode.train.evaluate, []

    def evaluate_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first evaluation of the sweep (the first was the epoch's)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(neuralode.train, "evaluate", evaluate_then_sigterm)
    rtols = ["eval.rtols=[0.1,0.05,0.02]"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert train_here(f"data_dir={fake_mnist}", *SHORT, *rtols, run_dir=first) == 128 + signal.SIGTERM
    m = json.loads((first / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["exit_code"] == 143
    assert m["test_primary"] is not None and m["steps"] == 2 and [r["rtol"] for r in m["tol_eval"]] == [0.1]
    monkeypatch.setattr(neuralode.train, "evaluate", real_evaluate)
    assert train_here(f"data_dir={fake_mnist}", *SHORT, *rtols, f"resume={first}", run_dir=second) == 0
    r = json.loads((second / "metrics.json").read_text())
    assert r["status"] == "completed" and r["test_primary"] == m["test_primary"]
    assert [row["rtol"] for row in r["tol_eval"]] == [0.1, 0.05, 0.02]
    assert "tol_eval/acc/rtol=0.02" in scalars(second)


# -- 10. neuralode-report survives bad job directories ---------------------------------------------
def test_report_lists_nan_corrupt_and_missing_metrics(tmp_path, capsys):
    from neuralode.report import main

    sweep = tmp_path / "sweep"
    good = {"status": "completed", "model": "odenet", "method": "dopri5", "grad": "adjoint", "rtol": 0.1,
            "atol": 0.1, "test_acc": 0.9, "primary_metric": "test_acc", "test_primary": 0.9, "nfe_forward": 14.0,
            "nfe_backward": 20.0, "overrides": ["rtol=0.1"]}
    for job, text in (("0", json.dumps(good)), ("1", json.dumps({**good, "rtol": 0.01, "test_primary": float("nan"),
                                                                  "overrides": ["rtol=0.01"]})),
                      ("2", '{"status": "completed", "test_'), ("3", None)):
        (sweep / job / ".hydra").mkdir(parents=True)
        if text is not None:
            (sweep / job / "metrics.json").write_text(text)
    assert main([str(sweep)]) == 0
    rows = {r["job"]: r for r in csv.DictReader(open(sweep / "summary.csv"))}
    assert rows["0"]["status"] == "completed" and rows["1"]["test_primary"] == "nan"
    assert rows["2"]["status"] == "failed" and "unreadable metrics.json" in rows["2"]["error"]
    assert rows["3"]["status"] == "failed" and "no metrics.json" in rows["3"]["error"]
    out = capsys.readouterr().out
    assert "2 of 4 jobs did not complete" in out
    if HAVE_MATPLOTLIB:  # only job 0 is plotted: NaN, unreadable and missing metrics are left out
        assert (sweep / "summary.png").stat().st_size > 0 and (sweep / "pareto.png").stat().st_size > 0
