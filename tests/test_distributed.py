"""torchrun/DDP on two CPU processes (gloo), and sweeps through Hydra's launcher plugins."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose, run_train, scalars, train_here
from neuralode.data import EpochSampler
from neuralode.distributed import mean_over, torchrun_argv

needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(*overrides: str, cwd: Path, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "neuralode.train", *overrides]
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


# -- pieces ----------------------------------------------------------------------
def test_rank_shards_partition_each_global_batch():
    """Rank r's k-th batch of B/W samples is the r-th share of the single-process k-th batch of B."""
    n, batch, world = 103, 8, 2
    single = list(EpochSampler(n, seed=3))
    shards = [list(EpochSampler(n, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal batch counts, or DDP would hang
    for k in range(len(shards[0]) // (batch // world)):
        ours = sorted(i for s in shards for i in s[k * batch // world:(k + 1) * batch // world])
        assert ours == sorted(single[k * batch:(k + 1) * batch])
    # Resuming mid-epoch skips whole global batches on every rank.
    resumed = [list(EpochSampler(n, seed=3, rank=r, world_size=world)) for r in range(world)]
    for r, s in enumerate(resumed):
        sampler = EpochSampler(n, seed=3, rank=r, world_size=world)
        sampler.set_epoch(0, start=2 * batch)
        assert list(sampler) == s[2 * batch // world:len(list(sampler)) + 2 * batch // world]
    # Evaluation shards keep every sample exactly once.
    ev = [EpochSampler(n, 0, shuffle=False, rank=r, world_size=world, equal_shards=False) for r in range(world)]
    assert sorted(i for s in ev for i in s) == list(range(n)) and sum(map(len, ev)) == n


def test_mean_over_ranks_ignores_keys_a_rank_lacks():
    assert mean_over([{"loss": 1.0, "rmse": 2.0}, {"loss": 3.0}]) == {"loss": 2.0, "rmse": 2.0}


def test_torchrun_argv_agrees_on_one_run_dir_and_quiets_other_ranks():
    env = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc"}
    assert torchrun_argv(["rtol=0.1"], {**env, "RANK": "0"}) == ["rtol=0.1", "hydra.run.dir=outputs/torchrun/abc"]
    assert torchrun_argv(["rtol=0.1"], {**env, "RANK": "1"}) == [
        "rtol=0.1", "hydra.run.dir=outputs/torchrun/abc", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    assert torchrun_argv(["hydra.run.dir=x"], {**env, "RANK": "0"}) == ["hydra.run.dir=x"]
    assert torchrun_argv(["-m", "rtol=1"], {}) == ["-m", "rtol=1"]  # not under torchrun
    for multirun in (["-m", "rtol=0.1,0.01"], ["--multirun"], ["hydra.mode=MULTIRUN"]):
        with pytest.raises(ValueError, match="cannot be combined with torchrun"):
            torchrun_argv(multirun, {**env, "RANK": "1"})


# -- torchrun end to end ----------------------------------------------------------------
@needs_gloo
@pytest.mark.slow  # the fast suite's torchrun launch is test_ddp_step_equals_single_process_step[adjoint]
def test_torchrun_two_cpu_processes(fake_mnist, tmp_path):
    out = tmp_path / "run"
    res = torchrun("model=odenet", "solver.grad=adjoint", f"data_dir={fake_mnist}", f"hydra.run.dir={out}",
                   *TINY, cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    assert "DDP: 2 ranks (gloo), 8 samples per rank per step" in (out / "train.log").read_text()
    assert len(list((out / "tb").rglob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.pt"]
    logged = scalars(out)
    assert [s for s, _ in logged["train/loss"]] == [1, 2]
    assert all(v > 0 for _, v in logged["nfe/backward"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["grad"] == "adjoint"


@needs_gloo
@pytest.mark.slow  # two torchrun launches; the fast suite covers torchrun with the ODE-Net
@pytest.mark.parametrize("family", ["cnf", "latent_ode"])
def test_torchrun_other_model_families(family, tmp_path):
    """CNF (Hutchinson noise per rank, figures on rank 0) and latent ODE (dict batches) under DDP."""
    from test_cnf import CNF_TINY
    from test_latent_ode import TINY_TS

    overrides = ([*CNF_TINY, "model.trace=hutchinson", "model.kinetic_weight=0.1"] if family == "cnf"
                 else ["model=latent_ode", "dataset=spirals", "solver.grad=adjoint", *TINY_TS])
    out = tmp_path / "run"
    res = torchrun(*overrides, f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    logged = scalars(out)
    assert [s for s, _ in logged["train/loss"]] == [1, 2] and "nfe/forward" in logged
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


# A fixed grid makes the solve independent of how the batch is split (an adaptive
# controller's steps depend on the batch it sees), so one DDP step must equal one
# single-process step on the same 16 images up to float32 reduction order.
EQUAL = ["model.width=8", "trainer.batch_size=16", "trainer.limit_batches=1", "trainer.limit_eval_batches=1",
         "trainer.eval_batch_size=16", "trainer.epochs=1", "eval.rtols=[]", "solver=rk4", "solver.step_size=0.25"]


@needs_gloo
@pytest.mark.parametrize("grad", ["adjoint", pytest.param("direct", marks=pytest.mark.slow),
                                  pytest.param("checkpoint", marks=pytest.mark.slow)])
def test_ddp_step_equals_single_process_step(grad, fake_mnist, tmp_path):
    common = [f"solver.grad={grad}", f"data_dir={fake_mnist}", *EQUAL]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert train_here(*common, run_dir=single) == 0
    res = torchrun(*common, f"hydra.run.dir={ddp}", cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    # one run directory for both ranks: rank 0 writes the log, the events file and the checkpoint
    assert "DDP: 2 ranks (gloo), 8 samples per rank per step" in (ddp / "train.log").read_text()
    assert len(list((ddp / "tb").rglob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (ddp / "checkpoints").iterdir()] == ["last.pt"]
    assert json.loads((ddp / "metrics.json").read_text())["grad"] == grad
    a, b = final_params(single), final_params(ddp)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # The logged loss is the mean over ranks, i.e. the global batch's loss.
    (la,), (lb,) = (dict(scalars(d)["train/loss"]).values() for d in (single, ddp))
    assert lb == pytest.approx(la, rel=1e-5)


RESUME = ["model.width=8", "trainer.batch_size=16", "trainer.limit_batches=3", "trainer.limit_eval_batches=1",
          "trainer.eval_batch_size=16", "eval.rtols=[]", "rtol=1e-2", "atol=1e-2"]


@needs_gloo
@pytest.mark.slow  # three torchrun launches
def test_ddp_resume_continues_exactly(fake_mnist, tmp_path):
    common = [f"data_dir={fake_mnist}", *RESUME]
    straight, first, second = tmp_path / "straight", tmp_path / "first", tmp_path / "second"
    for out, extra in ((straight, ["trainer.epochs=2"]), (first, ["trainer.epochs=1"]),
                       (second, ["trainer.epochs=2", f"resume={first}"])):
        res = torchrun(*common, *extra, f"hydra.run.dir={out}", cwd=tmp_path)
        assert res.returncode == 0, res.stdout
    a, b = torch.load(straight / "checkpoints" / "last.pt", weights_only=True), \
        torch.load(second / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and len(b["rng_ranks"]) == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_restarted_torchrun_worker_resumes_from_its_run_dir(fake_mnist, tmp_path, monkeypatch, caplog):
    """torchrun sets TORCHELASTIC_RESTART_COUNT > 0 when it restarts failed workers."""
    out = tmp_path / "run"
    assert train_here(f"data_dir={fake_mnist}", "trainer.epochs=1", *RESUME, run_dir=out) == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    caplog.set_level(logging.INFO, logger="neuralode")
    assert train_here(f"data_dir={fake_mnist}", "trainer.epochs=2", *RESUME, run_dir=out) == 0
    assert f"resumed from {out / 'checkpoints' / 'last.pt'}" in caplog.text
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 6


@pytest.mark.slow  # ~8 s: launches torchrun to see it refuse
@needs_gloo
def test_multirun_under_torchrun_is_refused(tmp_path):
    res = torchrun("-m", "rtol=0.1,0.01", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=300)
    assert res.returncode != 0
    assert "-m/--multirun cannot be combined with torchrun" in res.stdout
    assert not (tmp_path / "sweep").exists()


# -- launchers --------------------------------------------------------------------
def _log_span(run_dir: Path) -> tuple[datetime, datetime]:
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", (run_dir / "train.log").read_text(), re.M)
    parse = lambda s: datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    return parse(stamps[0]), parse(stamps[-1])


@pytest.mark.slow  # ~16 s; the fast suite checks a failing job's sweep with the basic launcher (test_faults)
@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
                    reason="hydra-joblib-launcher not installed (pip install .[launchers])")
def test_joblib_sweep_runs_jobs_in_parallel_and_survives_a_failing_job(fake_mnist, tmp_path):
    sweep = tmp_path / "sweep"
    res = run_train("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "rtol=0.1,0.01,-1",
                    f"hydra.sweep.dir={sweep}", f"data_dir={fake_mnist}",
                    *[o for o in TINY if not o.startswith("rtol")], cwd=tmp_path, timeout=900)
    assert res.returncode == 2, res.stdout  # job 2's invalid rtol
    assert len(list(sweep.glob("[01]/tb/*/events.out.tfevents.*"))) == 2  # the same layout as the basic launcher
    (s0, e0), (s1, e1) = _log_span(sweep / "0"), _log_span(sweep / "1")
    assert s0 < e1 and s1 < e0, "the two jobs did not overlap in time"
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["rtol"], r["status"]) for r in rows] == [("0.1", "completed"), ("0.01", "completed"), ("-1.0", "failed")]
    assert "rtol=-1.0 must be > 0" in rows[2]["error"]


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="hydra-submitit-launcher not installed (pip install .[launchers])")
@pytest.mark.parametrize("launcher, target", [("submitit_slurm", "SlurmLauncher"),
                                              ("slurm_gpu", "SlurmLauncher"),
                                              ("submitit_local", "LocalLauncher")])
def test_submitit_launcher_configs_compose(launcher, target):
    cfg = compose(f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=30", with_hydra=True)
    assert cfg.hydra.launcher._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    assert cfg.hydra.launcher.timeout_min == 30
