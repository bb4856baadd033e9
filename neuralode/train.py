"""``neuralode-train``: train a model chosen by config, log NFE and the task's metrics.

:func:`train` runs one job through named phases, top to bottom:

1. :func:`configure`: check every value, the solver settings, the device and the output
   directory before any work (a bad one exits 2 naming the key);
2. :func:`set_up`: task, model, data loaders, optimizer;
3. :func:`resume`: restore a checkpoint (``resume=`` or a torchrun restart), refusing one from
   another setup;
4. :func:`train_epoch` then :func:`end_of_epoch`, once per epoch: test metrics, checkpoint,
   stop checks;
5. :func:`tolerance_sweep`: the test set at each ``eval.rtols`` value;
6. :func:`finish`: ``metrics.json``, the HParams table and where to find the results.

SIGINT/SIGTERM are caught for the whole run. Whatever ends a run early becomes one
:class:`Stop` (exit code and one-line reason, see :func:`as_stop`), and ``metrics.json`` then
records the status, the exit code, the reason and the metrics computed so far. Exit codes: 0 done,
2 bad config value, data, resume target, device or output directory, 3 solver failure,
4 non-finite loss, weights or solver state, 128+signal when interrupted (130 SIGINT,
143 SIGTERM), 1 a bug (with its traceback). In a multirun a failed job is recorded and the
sweep goes on; the multirun exits with the first failed job's code.

Off a terminal a progress line replaces the bar every ``trainer.progress_every`` seconds; solver
events (the ``auto`` switch, NFE growth, solver warnings) are logged once and recorded
(:mod:`neuralode.watch`); an interrupted run prints the command that resumes it.

Under ``torchrun`` every rank runs this same script: DDP averages gradients, each rank trains
on its share of the global batch, metrics and NFE are averaged over ranks before rank 0 logs
them (see :mod:`neuralode.distributed`).

The model zoo (``neuralode.tasks``, ``neuralode.models``, torchvision) is imported only when a
run starts, so ``--help`` and ``--cfg job`` stay fast.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shlex
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from neuralode import NonFiniteError, SolverError, ToleranceError, record_stats
from neuralode import preflight
from neuralode.config import ConfigError, chosen_regularizers, register_configs, validate
from neuralode.data import DataError, EpochSampler
from neuralode.distributed import Distributed, mean_over, torchrun_argv
from neuralode.run import CheckpointError, OutputError, Run, duration, rng_state, set_rng_state
from neuralode.watch import SolverWatch

log = logging.getLogger("neuralode.train")
register_configs()


class Stop(Exception):
    """Ends a run early: the exit code, and a one-line reason for the log and metrics.json."""

    def __init__(self, exit_code: int, message: str, status: str = "failed"):
        super().__init__(message)
        self.exit_code, self.status = exit_code, status


@dataclass
class Job:
    """What the phases share: the run's objects and its progress counters."""

    cfg: DictConfig
    dist: Distributed
    run: Run
    device: torch.device
    overrides: Sequence[str] = ()  # the command line of this job, for the resume command
    watch: SolverWatch | None = None
    task: Any = None
    model: torch.nn.Module | None = None
    sampler: EpochSampler | None = None
    train_loader: DataLoader | None = None
    test_loader: DataLoader | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    epoch: int = 0  # epochs completed
    start_batch: int = 0  # batches of the current epoch already done (mid-epoch resume)
    step: int = 0  # optimizer steps taken
    phase: str = "set-up"  # named in solver-failure messages
    history: dict[str, float] = field(default_factory=dict)  # test metrics of the last epoch
    tol_rows: list[dict[str, float]] = field(default_factory=list)
    iter_times: list[float] = field(default_factory=list)
    regularization: Any = None  # neuralode.models.regularize.Regularization when regularizer= chooses one
    nfe_base: float | None = None  # forward+backward NFE per iteration in this process's first epoch
    nfe_warned: int = -1  # the epoch whose NFE-budget warning was logged
    rtol: float | None = None  # tol=auto: the training rtol now (atol keeps its ratio to it)
    train_start: float = 0.0  # time.perf_counter() when the epoch loop started
    train_time: float = 0.0


@dataclass
class Epoch:
    """What one pass over the training set measured, for :func:`end_of_epoch`."""

    sums: dict[str, float]  # per-iteration values summed: loss, nfe_f, nfe_b and the task's metrics
    seen: int  # iterations
    seconds: float
    mem_peak: float  # bytes: the largest per-iteration peak (see ``record_stats(memory=True)``)


# -- the job -------------------------------------------------------------------------------------
def train(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = (), traceback: bool = False,
          name: str | None = None) -> int:
    """Run one job (one rank of it under torchrun) writing into ``run_dir``; return its exit code.
    ``name`` names the run in TensorBoard (default: :func:`run_name`).

    Never raises for a failed run: the reason is logged in one line (with the traceback when
    ``traceback`` is set, or for an unexpected error) and written to ``metrics.json``."""
    dist = Distributed.from_env()
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports progress; other ranks only problems
    # The solver library logs each switch of method="auto"; the run reports the first and counts the rest.
    logging.getLogger("neuralode.solvers").setLevel(logging.WARNING)
    run = Run(run_dir, name or run_name(cfg), progress=cfg.trainer.progress,
              progress_every=cfg.trainer.get("progress_every", 30.0), enabled=dist.is_main)
    job = None
    try:
        with run.stop_on_signals():
            device = configure(cfg, dist, run)
            job = Job(cfg, dist, run, device, overrides=list(overrides), watch=SolverWatch(run, cfg.solver.method))
            dist.init(device)
            set_up(job)
            resume(job)
            start_auto_tol(job)
            job.train_start = time.perf_counter()
            while job.epoch < cfg.trainer.epochs:
                epoch = train_epoch(job)
                if not end_of_epoch(job, epoch):
                    break
            job.train_time = time.perf_counter() - job.train_start
            tolerance_sweep(job)
            finish(job, overrides)
        return 0
    except Exception as e:  # noqa: BLE001  (every failure becomes an exit code and a metrics.json entry)
        stop = as_stop(e, job)
        if stop.exit_code == 1 or traceback:
            log.exception("%s", stop)
        elif stop.status == "interrupted":
            log.warning("%s", stop)
        else:
            log.error("%s", stop)
        record_failure(run, job, cfg, overrides, stop)
        return stop.exit_code
    finally:
        run.write_layout(job.task.primary_metric if job is not None and job.task is not None else None)
        run.close()
        dist.close()


def as_stop(e: Exception, job: Job | None) -> Stop:
    """The exit code and one-line reason of whatever ended the run."""
    if isinstance(e, Stop):
        return e
    if isinstance(e, (ConfigError, DataError, CheckpointError, OutputError)):
        return Stop(2, str(e))
    where = ("before training" if job is None else f"at iteration {job.step + 1}" if job.phase == "training"
             else f"during {job.phase} (after step {job.step})")
    last = f"; last good checkpoint: {_last(job.run)}" if job else ""
    if isinstance(e, ToleranceError):  # a tolerance the state's dtype cannot resolve: a bad value
        return Stop(2, f"rtol={job.cfg.rtol if job else '?'}, atol={job.cfg.atol if job else '?'} cannot be used "
                       f"{where}: {e}; raise rtol/atol (or eval.rtols)")
    if isinstance(e, NonFiniteError):
        return Stop(4, f"non-finite solver state {where}: {e}{last}")
    if isinstance(e, SolverError):
        return Stop(3, f"solver failed {where}: {e}{last}")
    return Stop(1, f"unexpected error {where}: {type(e).__name__}: {e}")


def record_failure(run: Run, job: Job | None, cfg: DictConfig, overrides: Sequence[str], stop: Stop) -> None:
    """metrics.json of a failed or interrupted run: status, exit code, reason, metrics so far."""
    try:
        if job is not None and job.task is not None:
            write_metrics(job, overrides, status=stop.status, exit_code=stop.exit_code, error=str(stop))
        else:
            run.write_json("metrics.json", {"status": stop.status, "exit_code": stop.exit_code, "error": str(stop),
                                            "overrides": list(overrides), **run_keys(cfg)})
    except OutputError as e:  # the failure itself is logged already
        log.warning("%s", e)


# -- 1. configure --------------------------------------------------------------------------------
def configure(cfg: DictConfig, dist: Distributed, run: Run) -> torch.device:
    """Every check that can fail before work starts; returns the device."""
    validate(cfg)
    if cfg.trainer.batch_size % dist.world_size:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch and must be divisible "
                          f"by the {dist.world_size} ranks")
    preflight.check_dataset(cfg)
    preflight.check_solver(cfg)
    preflight.check_device(cfg.device)
    if dist.is_main:
        preflight.check_writable(run.out_dir)
    return dist.device(cfg.device)


# -- 2. set-up -----------------------------------------------------------------------------------
def set_up(job: Job) -> None:
    from neuralode.tasks import build_task  # the model zoo, only once a run starts

    cfg, dist, run = job.cfg, job.dist, job.run
    log.info("output directory: %s", run.out_dir)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    job.task = build_task(cfg)
    job.model = job.task.model.to(job.device)
    set_up_regularizers(job)
    log.info("model %s: %.3fM parameters, device %s", cfg.model.name,
             sum(p.numel() for p in job.model.parameters()) / 1e6, job.device)
    if dist.enabled:
        random.seed(cfg.seed + dist.rank)  # distinct noise per rank (Hutchinson, dequantisation, crops)
        torch.manual_seed(cfg.seed + dist.rank)
        log.info("DDP: %d ranks (%s), %d samples per rank per step", dist.world_size,
                 torch.distributed.get_backend(), cfg.trainer.batch_size // dist.world_size)
    train_set, test_set = job.task.datasets()
    t = cfg.trainer
    shard = dict(rank=dist.rank, world_size=dist.world_size)
    job.sampler = EpochSampler(len(train_set), cfg.seed, **shard)
    collate = getattr(job.task, "collate_fn", None)  # tasks with dict batches (latent_ode) bring their own
    job.train_loader = DataLoader(train_set, t.batch_size // dist.world_size, sampler=job.sampler,
                                  num_workers=t.num_workers, pin_memory=job.device.type == "cuda",
                                  collate_fn=getattr(job.task, "train_collate_fn", None) or collate)
    job.test_loader = DataLoader(test_set, t.eval_batch_size, num_workers=t.num_workers, collate_fn=collate,
                                 sampler=EpochSampler(len(test_set), 0, shuffle=False, equal_shards=False, **shard))
    job.optimizer, job.scheduler = build_optimizer(cfg, job.model)
    check_stop(job)


def build_optimizer(cfg: DictConfig, model: torch.nn.Module):
    o = cfg.optim
    if o.name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(o.milestones), gamma=o.gamma)
    return opt, sched


# -- 3. resume -----------------------------------------------------------------------------------
def resume(job: Job) -> None:
    """Continue from ``resume=`` or, after a torchrun restart, from this run's own checkpoint."""
    cfg, dist, run = job.cfg, job.dist, job.run
    target = cfg.resume
    if target is None and dist.restart_count > 0 and run.ckpt_path.exists():
        target = str(run.ckpt_path)  # torchrun restarted the workers after a failure
    if target:
        path, state = Run.load_checkpoint(target)
        check_compatible(job, path, state)
        try:
            job.model.load_state_dict(state["model"])
            job.optimizer.load_state_dict(state["optimizer"])
            job.scheduler.load_state_dict(state["scheduler"])
            job.epoch, job.start_batch, job.step = int(state["epoch"]), int(state.get("batch", 0)), int(state["step"])
            job.history = {k: float(v) for k, v in state.get("history", {}).items()}
            ranks = state.get("rng_ranks", [])
            set_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"resume={path}: the checkpoint is damaged ({type(e).__name__}: {e}); "
                                  "resume from another run directory or start afresh") from None
        log.info("resumed from %s at epoch %d, batch %d, step %d", path, job.epoch + 1, job.start_batch, job.step)
    job.task.net = dist.wrap(job.model, job.device)
    t = cfg.trainer
    if job.epoch < t.epochs:
        log.info("training: epochs %d-%d, %d batches per epoch", job.epoch + 1, t.epochs,
                 min(len(job.train_loader), t.limit_batches or len(job.train_loader)))


# Keys whose change makes a checkpoint's weights or optimizer state meaningless for this run.
SETUP_KEYS = ("model", "optim.name", "dataset.name", "dataset.channels", "dataset.image_size",
              "dataset.num_classes")
# Model keys that only change logging or the loss weighting, not the parameters.
FREE_MODEL_KEYS = {"n_figures", "figure_resolution", "figure_samples", "kl_weight", "obs_std", "kinetic_weight",
                   "jacobian_weight", "trace", "noise", "objective", "coupling", "sigma", "ema", "init_from",
                   "ot_max_batch"}


def check_compatible(job: Job, path: Path, state: dict[str, Any]) -> None:
    """Refuse, before training, a checkpoint of another model, width or optimizer, naming the
    keys that differ."""
    config = state.get("config")
    saved = OmegaConf.create(config if isinstance(config, dict) else {})
    here = job.cfg
    differ = []
    for key in SETUP_KEYS:
        a, b = OmegaConf.select(saved, key), OmegaConf.select(here, key)
        if key == "model" and a is not None and b is not None:
            a, b = OmegaConf.to_container(a), OmegaConf.to_container(b)
            differ += [f"model.{k}={a.get(k)!r} there, {b.get(k)!r} here" for k in dict.fromkeys([*a, *b])
                       if k not in FREE_MODEL_KEYS and a.get(k) != b.get(k)]
        elif a is not None and a != b:
            differ.append(f"{key}={a!r} there, {b!r} here")
    mine = {k: tuple(v.shape) for k, v in job.model.state_dict().items()}
    theirs = ({k: tuple(getattr(v, "shape", ())) for k, v in state["model"].items()}
              if isinstance(state["model"], dict) else {})
    if mine != theirs and not differ:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))
        differ.append(f"model parameters differ (first: {diff[0][0]})")
    if differ:
        raise CheckpointError(f"resume={path}: the checkpoint is from another setup ({'; '.join(differ)}); "
                              "resume with the settings it was trained with, or drop resume= to start afresh")


# -- 4. the epoch loop ---------------------------------------------------------------------------
def train_epoch(job: Job) -> Epoch:
    dist, run, t = job.dist, job.run, job.cfg.trainer
    model, task, optimizer = job.model, job.task, job.optimizer
    job.phase = "training"
    model.train()
    job.sampler.set_epoch(job.epoch, start=job.start_batch * t.batch_size)
    n_batches = len(job.train_loader) + job.start_batch
    if t.limit_batches is not None:
        n_batches = min(n_batches, t.limit_batches)
    sums = {"loss": 0.0, "nfe_f": 0.0, "nfe_b": 0.0}  # + the task's metrics
    seen, mem_peak = 0, 0.0
    epoch_start = time.perf_counter()
    with run.progress(job.train_loader, n_batches - job.start_batch, f"epoch {job.epoch + 1}/{t.epochs}") as bar:
        for i, batch in enumerate(bar, start=job.start_batch):
            if i >= n_batches:
                break
            tic = time.perf_counter()
            batch = to_device(batch, job.device)
            with job.watch.block(job.step + 1, job.phase), record_stats(memory=True) as stats:
                loss, metrics, reg_logs = regularized_loss(job, batch)
                losses = dist.gather(loss.item())  # agree before backward, where DDP syncs
                if not all(map(math.isfinite, losses)):
                    raise Stop(4, f"loss is {losses[0] if len(losses) == 1 else f'{losses} (per rank)'} at "
                                  f"iteration {job.step + 1} (epoch {job.epoch + 1}, batch {i + 1}); stopping. "
                                  f"Last good checkpoint: {_last(run)}; try a smaller optim.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            if hasattr(task, "after_step"):  # e.g. the CNF's EMA of the weights
                task.after_step()
            job.step += 1
            job.watch.solves(stats, job.step, job.phase, training=True)
            local = {"loss": losses[dist.rank], **metrics, "nfe_f": stats.nfe_forward, "nfe_b": stats.nfe_backward,
                     "mem": float(stats.mem_peak),  # bytes: autograd's saved tensors (CPU), allocator peak (CUDA)
                     **{f"reg/{k}": v for k, v in reg_logs.items()}}
            ranks = dist.gather((local, run.stop_signal))
            values = mean_over([v for v, _ in ranks])
            stop = next((s for _, s in ranks if s is not None), None)
            dt = time.perf_counter() - tic
            job.iter_times.append(dt)
            run.scalars({"train/loss": values["loss"], **{f"train/{k}": v for k, v in metrics.items()},
                         "nfe/forward": values["nfe_f"], "nfe/backward": values["nfe_b"], "time/iter": dt,
                         "mem/peak": values["mem"], **{k: v for k, v in values.items() if k.startswith("reg/")}},
                        job.step)
            nfe_guard(job, values["nfe_f"] + values["nfe_b"])
            seen += 1
            mem_peak = max(mem_peak, values["mem"])
            for k in metrics:
                sums.setdefault(k, 0.0)
            for k in sums:
                sums[k] += values.get(k, 0.0)
            bar.update({k: v / seen for k, v in sums.items()})
            if stop is not None:
                checkpoint(job, job.epoch, i + 1)
                run.flush()
                raise interrupted(job, stop)
    return Epoch(sums, seen, time.perf_counter() - epoch_start, mem_peak)


def end_of_epoch(job: Job, epoch: Epoch) -> bool:
    """Test metrics (after every ``trainer.eval_every``-th epoch and the last), logs, checkpoint;
    False when the wall-clock budget says stop."""
    dist, run, t = job.dist, job.run, job.cfg.trainer
    job.phase = f"evaluation after epoch {job.epoch + 1}"
    sums, seen = epoch.sums, epoch.seen
    lr = job.optimizer.param_groups[0]["lr"]
    job.scheduler.step()
    budget = t.get("max_minutes")
    out_of_time = bool(budget) and dist.gather(time.perf_counter() - job.train_start)[0] > 60 * budget
    every = t.get("eval_every", 1)
    test = evaluate(job, t.limit_eval_batches) if out_of_time or (job.epoch + 1) % every == 0 \
        or job.epoch + 1 >= t.epochs else None
    means = {k: v / max(seen, 1) for k, v in sums.items()}
    run.scalars({**{f"train/{k}_epoch": v for k, v in means.items() if k not in ("nfe_f", "nfe_b")},
                 "nfe/forward_epoch": means["nfe_f"], "nfe/backward_epoch": means["nfe_b"],
                 **{f"test/{k}": v for k, v in (test or {}).items()}, "time/epoch": epoch.seconds, "lr": lr}, job.step)
    job.nfe_base = job.nfe_base or (means["nfe_f"] + means["nfe_b"]) or None
    if job.nfe_base:
        run.scalars({"nfe/growth": (means["nfe_f"] + means["nfe_b"]) / job.nfe_base}, job.step)
    job.history = {**job.history, "nfe_forward": means["nfe_f"], "nfe_backward": means["nfe_b"],
                   "time_per_iter": epoch.seconds / max(seen, 1), "mem_peak_mb": epoch.mem_peak / 2**20}
    named = lambda d, skip: " ".join(f"{k} {v:.4f}" for k, v in d.items() if k not in skip)  # noqa: E731
    if test is not None:  # an epoch without evaluation keeps the last evaluated test metrics
        run.figures(job.task, job.step)
        job.history.update({f"test_{k}": v for k, v in test.items() if k != "nfe_forward"})
        job.history.update({**validity_check(job, test), **auto_tol(job, test)})
        tested = f"test loss {test['loss']:.4f} {named(test, ('loss', 'nfe_forward'))}"
    else:
        tested = f"test: next after epoch {min(t.epochs, (job.epoch // every + 1) * every)}"
    log.info("epoch %d/%d: train loss %.4f %s | %s | nfe fwd %.1f bwd %.1f | %.2f s/iter", job.epoch + 1, t.epochs,
             means["loss"], named(means, ("loss", "nfe_f", "nfe_b")), tested, means["nfe_f"], means["nfe_b"],
             job.history["time_per_iter"])
    job.epoch, job.start_batch = job.epoch + 1, 0
    checkpoint(job, job.epoch, 0)
    run.flush()
    check_stop(job)
    if out_of_time:
        log.info("trainer.max_minutes=%g reached after epoch %d; stopping", t.max_minutes, job.epoch)
        return False
    return True


def checkpoint(job: Job, epoch: int, batch: int) -> None:
    """Save the run's state; a collective, so every rank calls it. Non-finite weights are never saved."""
    if not bool(torch.stack([torch.isfinite(p).all() for p in job.model.parameters()]).all()):  # one sync
        raise Stop(4, f"the weights are not finite after step {job.step} (epoch {epoch + (batch > 0)}); stopping "
                      f"without overwriting the last good checkpoint ({_last(job.run)}); try a smaller optim.lr")
    rng_ranks = job.dist.gather(rng_state())
    job.run.save_checkpoint(dict(model=job.model.state_dict(), optimizer=job.optimizer.state_dict(),
                                 scheduler=job.scheduler.state_dict(), epoch=epoch, batch=batch, step=job.step,
                                 history=job.history, rng_ranks=rng_ranks,
                                 config=OmegaConf.to_container(job.cfg, resolve=True, enum_to_str=True)))


def check_stop(job: Job) -> None:
    """Stop here when any rank received SIGINT/SIGTERM (a collective, so ranks stop together)."""
    stop = next((s for s in job.dist.gather(job.run.stop_signal) if s is not None), None)
    if stop is not None:
        raise interrupted(job, stop)


def interrupted(job: Job, signum: int) -> Stop:
    saved = (f"checkpoint {job.run.ckpt_path}; resume with: {resume_command(job)}" if job.run.ckpt_path.exists()
             else "no checkpoint yet")
    return Stop(128 + signum, f"interrupted by {signal.Signals(signum).name} during {job.phase} at step "
                              f"{job.step}; {saved}", status="interrupted")


def resume_command(job: Job) -> str:
    """The command line that continues this run: its own overrides plus ``resume=<run dir>``."""
    launcher = (["torchrun", f"--nproc_per_node={job.dist.world_size}", "-m", "neuralode.train"] if job.dist.enabled
                else ["neuralode-train"])
    kept = [o for o in job.overrides if not o.lstrip("+~").startswith("resume=")]
    return shlex.join([*launcher, *kept, f"resume={job.run.out_dir}"])


@torch.no_grad()
def evaluate(job: Job, limit: int | None) -> dict[str, float]:
    """Sample-weighted mean loss and metrics over the test set (every rank's shard), the standard
    error ``m_se`` of each metric ``m`` the task reports with its mean square ``m_sq``, and the mean
    forward NFE per batch."""
    task, dist, device = job.task, job.dist, job.device
    task.model.eval()
    totals: dict[str, float] = {}
    n = batches = nfe = 0
    for i, batch in enumerate(job.test_loader):
        if limit is not None and i >= limit:
            break
        batch = to_device(batch, device)
        with job.watch.block(job.step, job.phase), record_stats() as stats:
            loss, metrics = task.loss(batch)
        job.watch.solves(stats, job.step, job.phase, training=False)
        size = batch_size(batch)
        for k, v in {"loss": loss.item(), **metrics}.items():
            totals[k] = totals.get(k, 0.0) + v * size
        n += size
        batches += 1
        nfe += stats.nfe_forward
    parts = dist.gather((totals, n, batches, nfe))
    n, batches, nfe = (sum(p[i] for p in parts) for i in (1, 2, 3))
    out = {k: sum(p[0].get(k, 0.0) for p in parts) / max(n, 1) for k in dict.fromkeys(k for p in parts for k in p[0])}
    out["nfe_forward"] = nfe / max(batches, 1)
    for key in [k for k in out if k.endswith("_sq")]:
        mean, mean_sq = out.get(key[:-3]), out.pop(key)
        if mean is not None and n > 1:
            out[key[:-3] + "_se"] = math.sqrt(max(mean_sq - mean * mean, 0.0) / (n - 1))
    return out


# -- regularizers, NFE budget, ODE validity (docs/regularizers.md) --------------------------------
def set_up_regularizers(job: Job) -> None:
    """Hand the model's solves the run's regularizers (``regularizer=``; the CNF's RNODE part is
    the flow's own, see :func:`neuralode.tasks.rnode_weights`)."""
    from neuralode.models.regularize import install
    from neuralode.tasks import regularization

    reg = job.cfg.get("regularizer")
    chosen = chosen_regularizers(job.cfg)
    job.regularization = regularization(job.cfg)
    if job.regularization is not None:
        install(job.model, job.regularization)
    if chosen:
        log.info("regularizer: %s", ", ".join(f"{k} ({', '.join(f'{a}={v:g}' for a, v in reg[k].items())})"
                                             for k in chosen))


def regularized_loss(job: Job, batch: Any) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
    """The task's loss plus the regularizers' penalty, its metrics, and the ``reg/*`` values."""
    reg, task = job.regularization, job.task
    if reg is None:
        loss, metrics = task.loss(batch)
        logs: dict[str, float] = {}
    else:
        with reg.collect():
            loss, metrics = task.loss(batch)
        loss = loss + reg.penalty()
        logs = reg.logs()
    rnode = job.cfg.get("regularizer", {}).get("rnode")
    if rnode is not None and "kinetic" in metrics:  # the CNF's own RNODE integrals (tasks/cnf.py)
        kw, jw = task.kinetic_weight, task.jacobian_weight
        logs.update(rnode=kw * metrics["kinetic"] + jw * metrics["jacobian"], rnode_kinetic=metrics["kinetic"],
                    rnode_jacobian=metrics["jacobian"])
    return loss, metrics, logs


def regularizer_names(cfg: DictConfig) -> str:
    names = chosen_regularizers(cfg)
    return (f"[{','.join(names)}]" if len(names) > 1 else names[0]) if names else "none"


def nfe_guard(job: Job, nfe: float) -> None:
    """``trainer.max_nfe_per_iter``: warn (once per epoch) or stop when an iteration's forward plus
    backward NFE exceeds it."""
    cfg, t = job.cfg, job.cfg.trainer
    limit = t.get("max_nfe_per_iter")
    if limit is None or nfe <= limit:
        return
    rtol = job.rtol or cfg.rtol
    atol = rtol * cfg.atol / cfg.rtol
    message = (f"iteration {job.step} used {nfe:.0f} forward+backward NFE, over trainer.max_nfe_per_iter={limit}: "
               f"the learned dynamics are getting expensive to solve. Remedies: a regularizer (now "
               f"regularizer={regularizer_names(cfg)}; try regularizer=rnode, regularizer=steer, regularizer=error "
               f"or a list such as regularizer=[rnode,steer]), a looser tolerance (now rtol={rtol:g}, "
               f"atol={atol:g}; e.g. tol={rtol * 10:g}), or a larger trainer.max_nfe_per_iter")
    if t.get("nfe_guard", "warn") == "stop":
        raise Stop(3, message + " (trainer.nfe_guard=warn only warns)")
    if job.nfe_warned != job.epoch:
        job.nfe_warned = job.epoch
        log.warning("%s (warned once per epoch; trainer.nfe_guard=stop stops instead)", message)


def validity_check(job: Job, test: dict[str, float]) -> dict[str, float]:
    """``eval.validity``: the test set again at 100x tighter tolerances (``eval.validity_method``,
    by default the run's method, or dopri5 for a fixed-step run); logs ``validity/metric_gap``
    (|primary metric there - here|) and ``validity/nfe_ratio``, and warns when the gap exceeds
    ``eval.validity_threshold``: a model whose metric depends on its solver's error is not a
    valid ODE (Ott et al. 2021). Returns the values for ``metrics.json``."""
    from neuralode.models import solver_overrides, uses_solver
    from neuralode.tasks import solver_settings

    cfg, e = job.cfg, job.cfg.eval
    if not e.get("validity") or not uses_solver(job.model):
        return {}
    settings = solver_settings(cfg)
    method = e.get("validity_method") or (settings.method if settings.adaptive else "dopri5")
    rtol = job.rtol or cfg.rtol  # tol=auto: the current training tolerance
    changes: dict[str, Any] = dict(method=method, rtol=rtol / 100, atol=rtol * cfg.atol / cfg.rtol / 100)
    if settings.parsed.step_size is not None:
        changes["step_size"] = None
    phase, job.phase = job.phase, f"validity check after epoch {job.epoch + 1}"
    with solver_overrides(job.model, **changes):
        tight = evaluate(job, cfg.trainer.limit_eval_batches)
    job.phase = phase
    key = job.task.primary_metric
    gap = abs(tight.get(key, math.nan) - test.get(key, math.nan))
    ratio = tight["nfe_forward"] / test["nfe_forward"] if test.get("nfe_forward") else math.nan
    job.run.scalars({"validity/metric_gap": gap, "validity/nfe_ratio": ratio}, job.step)
    threshold = e.get("validity_threshold", 0.01)
    if not gap <= threshold:
        log.warning("ODE validity: with %s at rtol=%g, atol=%g the test %s moves by %.4g (%.4g -> %.4g), over "
                    "eval.validity_threshold=%g: the model relies on its solver's error rather than on the ODE it "
                    "defines. Train at a tighter tolerance (now rtol=%g) or with an adaptive method, or add a "
                    "regularizer", method, changes["rtol"], changes["atol"], key, gap, test.get(key, math.nan),
                    tight.get(key, math.nan), threshold, rtol)
    else:
        log.info("ODE validity: test %s moves by %.4g at 100x tighter tolerances (%.1fx the forward NFE)", key, gap,
                 ratio)
    return {"validity_gap": gap, "validity_nfe_ratio": ratio}


def start_auto_tol(job: Job) -> None:
    """``tol=auto``: train from the start value (``AUTO_TOL_START``), or after a resume from the
    rtol the checkpointed run had chosen."""
    from neuralode.models import set_solver

    cfg = job.cfg
    if cfg.tol != "auto":
        return
    job.rtol = float(job.history.get("rtol_auto", cfg.rtol))
    set_solver(job.model, rtol=job.rtol, atol=job.rtol * cfg.atol / cfg.rtol)
    log.info("tol=auto: training at rtol=%g; after each epoch it moves to the loosest of 10x, 1x, 0.1x that "
             "stays within eval.validity_threshold=%g of a 100x tighter solve", job.rtol,
             cfg.eval.get("validity_threshold", 0.01))


def next_auto_rtol(rtol: float, metric_at: Any, current: float, threshold: float,
                   bounds: tuple[float, float]) -> tuple[float, dict[float, float]]:
    """The ``tol=auto`` rule. ``metric_at(r)``: the test primary metric at rtol ``r``; ``current``:
    its value at ``rtol``. The reference is the solve at ``rtol/100``; the next training rtol is the
    loosest of ``10*rtol``, ``rtol``, ``rtol/10`` whose metric is within ``threshold`` of the
    reference, or ``rtol/100`` when none is; clipped to ``bounds``. Returns it and the gaps."""
    lo, hi = bounds
    ref = metric_at(rtol / 100)
    gaps: dict[float, float] = {}
    for c in (min(10 * rtol, hi), rtol, rtol / 10):
        if c in gaps:
            continue
        gaps[c] = abs((current if c == rtol else metric_at(c)) - ref)
        if gaps[c] <= threshold:
            return min(max(c, lo), hi), gaps
    return min(max(rtol / 100, lo), hi), gaps


def auto_tol(job: Job, test: dict[str, float]) -> dict[str, float]:
    """``tol=auto`` after an epoch: pick the next training rtol (:func:`next_auto_rtol`), set it on
    the model, log ``tol/rtol``; returns it for ``metrics.json`` (and a resume)."""
    from neuralode.config import AUTO_TOL_RANGE
    from neuralode.models import set_solver, solver_overrides

    cfg = job.cfg
    if cfg.tol != "auto" or job.rtol is None:
        return {}
    ratio, key = cfg.atol / cfg.rtol, job.task.primary_metric
    phase, job.phase = job.phase, f"tol=auto after epoch {job.epoch + 1}"

    def metric_at(r: float) -> float:
        with solver_overrides(job.model, rtol=r, atol=r * ratio):
            return evaluate(job, cfg.trainer.limit_eval_batches).get(key, math.nan)

    threshold = cfg.eval.get("validity_threshold", 0.01)
    new, gaps = next_auto_rtol(job.rtol, metric_at, test.get(key, math.nan), threshold, AUTO_TOL_RANGE)
    job.phase = phase
    log.info("tol=auto: %s gap against rtol=%g: %s -> training rtol %g", key, job.rtol / 100,
             ", ".join(f"{r:g}: {g:.3g}" for r, g in gaps.items()), new)
    job.rtol = new
    set_solver(job.model, rtol=new, atol=new * ratio)
    job.run.scalars({"tol/rtol": new}, job.step)
    return {"rtol_auto": new}


# -- 5. test-time tolerance ----------------------------------------------------------------------
def tolerance_sweep(job: Job) -> None:
    """The test set at each ``eval.rtols`` value (atol scaled alike), for every model that solves
    an ODE anywhere (ODE blocks, CNF blocks, latent dynamics, ODE-RNN encoders). A fixed-step
    solve does the same work at any tolerance, so there the sweep is over ``eval.step_sizes``."""
    from neuralode.models import solver_overrides, uses_solver
    from neuralode.tasks import solver_settings

    cfg = job.cfg
    if not uses_solver(job.model):
        return
    if solver_settings(cfg).adaptive:
        points = [("rtol", r, dict(rtol=r, atol=r * cfg.atol / cfg.rtol)) for r in cfg.eval.rtols]
    else:
        points = [("step_size", h, dict(step_size=h)) for h in cfg.eval.step_sizes]
        if points:
            log.info("solver.method=%s takes fixed steps, so the test-time sweep varies the step size (%s), "
                     "not the tolerance", cfg.solver.method, ", ".join(f"{h:g}" for h in cfg.eval.step_sizes))
    key = job.task.primary_metric  # acc for classifiers, nll / bpd for flows, rmse_extrap for latent ODEs
    for name, value, changes in points:
        job.phase = f"tolerance sweep at {name}={value:g}"
        check_stop(job)
        with solver_overrides(job.model, **changes):
            res = evaluate(job, cfg.trainer.limit_eval_batches)
        metric = res.get(key, float("nan"))
        job.tol_rows.append({name: value, key: metric, "nfe_forward": res["nfe_forward"]})
        job.run.scalars({f"tol_eval/{key}/{name}={value:g}": metric,
                         f"tol_eval/nfe_forward/{name}={value:g}": res["nfe_forward"]}, job.step)
        log.info("test at %s=%g: %s %.4f, forward NFE %.1f", name, value, key, metric, res["nfe_forward"])
    # The same points as one line per quantity (the custom-scalars "tolerance curve" chart): the x axis
    # (TensorBoard's step) is 100*log10(1/rtol), or 100*log2(1/step_size) for fixed-step solvers.
    base = 10 if points and points[0][0] == "rtol" else 2
    for row in sorted(job.tol_rows, key=lambda r: -next(iter(r.values()))):
        x = round(100 * math.log(1 / next(iter(row.values())), base))
        job.run.scalars({f"tol_eval/curve/{key}": row[key], "tol_eval/curve/nfe_forward": row["nfe_forward"]}, x)
    check_stop(job)


# -- 6. finish -----------------------------------------------------------------------------------
def finish(job: Job, overrides: Sequence[str]) -> None:
    """metrics.json and the HParams row, then where the results are. Every family also logs its
    primary metric as ``final/primary`` (its name is the ``primary_metric`` hparam), so runs of
    different families share a column."""
    job.phase = "finish"
    final = final_metrics(job)
    primary = f"test_{job.task.primary_metric}"
    metrics = {f"final/{k}": v for k, v in final.items() if v is not None}
    if final.get(primary) is not None:
        metrics["final/primary"] = final[primary]
    job.run.hparams({**hparams_of(job.cfg), "primary_metric": primary, **job.task.hparams()}, metrics, job.step)
    write_metrics(job, overrides, status="completed", exit_code=0)
    headline = ", ".join(f"{k.removeprefix('test_')} {v:.4g}" for k, v in final.items()
                         if k.startswith("test_") and isinstance(v, float))
    log.info("done: %s | nfe forward %.1f backward %.1f | %d epochs, %d steps in %s",
             headline, final.get("nfe_forward", 0.0), final.get("nfe_backward", 0.0), job.epoch, job.step,
             duration(job.train_time))
    log.info("results: %s (metrics.json, checkpoints/last.pt, tb/)", job.run.out_dir)
    log.info("tensorboard --logdir %s", shlex.quote(str(job.run.out_dir)))


def final_metrics(job: Job) -> dict[str, Any]:
    return dict(job.history, train_time=job.train_time,
                time_per_iter=(sum(job.iter_times) / len(job.iter_times) if job.iter_times
                               else job.history.get("time_per_iter")))


def write_metrics(job: Job, overrides: Sequence[str], status: str, exit_code: int, error: str | None = None) -> None:
    cfg, final = job.cfg, final_metrics(job)
    primary = f"test_{job.task.primary_metric}"
    job.run.write_json("metrics.json", {
        "status": status, "exit_code": exit_code, **({"error": error} if error else {}),
        "primary_metric": primary, "primary_mode": job.task.primary_mode, "test_primary": final.get(primary),
        "overrides": list(overrides), **run_keys(cfg), "epochs": job.epoch, "steps": job.step, **final,
        "tol_eval": job.tol_rows, "solver_events": job.watch.summary(),
    })


def run_keys(cfg: DictConfig) -> dict[str, Any]:
    """What identifies a job in the sweep summary."""
    return {"model": cfg.model.name, "method": cfg.solver.method, "grad": cfg.solver.grad, "rtol": cfg.rtol,
            "atol": cfg.atol, "seed": cfg.seed}


# -- helpers -------------------------------------------------------------------------------------
def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if torch.is_tensor(batch) else batch


def batch_size(batch: Any) -> int:
    """Samples in a batch: a tuple's first tensor, or a dict's first tensor with a batch axis."""
    if isinstance(batch, dict):
        return next(len(v) for v in batch.values() if torch.is_tensor(v) and v.ndim >= 2)
    return len(batch[0])


def run_name(cfg: DictConfig) -> str:
    """TensorBoard's name for a single run: model, solver and gradient mode. Sweep jobs are named
    after their overrides instead (``hydra.job.override_dirname``, see :func:`_hydra_main`)."""
    return f"{cfg.model.name}-{cfg.solver.method}-{cfg.solver.grad}"


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    return {"model": cfg.model.name, "dataset": cfg.dataset.name, "method": cfg.solver.method,
            "grad": cfg.solver.grad, "seminorm": cfg.solver.seminorm, "rtol": cfg.rtol, "atol": cfg.atol,
            "seed": cfg.seed, "batch_size": cfg.trainer.batch_size, "lr": cfg.optim.lr, "epochs": cfg.trainer.epochs,
            "augment_dim": cfg.model.get("augment_dim", 0)}


def _last(run: Run) -> str:
    return str(run.ckpt_path) if run.ckpt_path.exists() else "none (failed before the first epoch ended)"


# -- command line --------------------------------------------------------------------------------
def _config_path() -> str:
    """The installed configs, or the checkout's conf/ when running uninstalled."""
    import importlib.util

    if importlib.util.find_spec("neuralode.conf") is not None:
        return "pkg://neuralode.conf"
    return str(Path(__file__).resolve().parent.parent / "conf")


# The config groups a user picks from (conf/<group>/<option>.yaml); the others (family, final,
# schema) are machinery.
USER_GROUPS = ("model", "solver", "dataset", "optim", "trainer", "regularizer", "experiment")


def group_options(group: str) -> list[str]:
    """The options of a config group, read from the YAML files (no config is composed)."""
    import importlib.resources

    path = _config_path()
    root = importlib.resources.files("neuralode.conf") if path.startswith("pkg://") else Path(path)
    return sorted(f.name.removesuffix(".yaml") for f in root.joinpath(group).iterdir() if f.name.endswith(".yaml"))


def usage() -> str:
    """``neuralode-train --help``."""
    import textwrap

    width = max(map(len, USER_GROUPS))
    groups = "\n".join(textwrap.fill(", ".join(group_options(g)), 100, initial_indent=f"  {g:<{width}}  ",
                                      subsequent_indent=" " * (width + 4)) for g in USER_GROUPS)
    return f"""neuralode-train: train a Neural ODE, a CNF, a latent ODE or a baseline, chosen by config (Hydra).

usage: neuralode-train [-m] [group=option ...] [key=value ...]

Config groups (defaults: model=odenet solver=dopri5 trainer=default; the model family picks its
dataset, optimizer, learning rate, gradient mode and tolerances unless you set them):
{groups}

Keys: tol (rtol and atol together; tol=auto adapts it each epoch), rtol (atol follows), atol, seed,
device, data_dir, resume, eval.rtols, eval.step_sizes, eval.validity, and every field of the groups
(model.width, optim.lr, trainer.epochs, solver.grad, regularizer.rnode.kinetic, ...).
--cfg job prints the composed config.

Examples:
  neuralode-train model=cnf trainer=smoke                   # any model in about a minute
  neuralode-train -m rtol=1e-2,1e-4 solver=dopri5,tsit5     # a sweep: 4 jobs and a summary
  neuralode-train experiment=spirals_latent_ode_30          # a paper recipe

Results go to outputs/<date>/<time>/ (sweeps: outputs/multirun/...); tensorboard --logdir outputs.
Exit codes: 0 done, 2 bad config or data, 3 solver failure, 4 non-finite values, 130/143 interrupted.
Hydra's own flags: --hydra-help. More: README.md."""


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="config")
def _hydra_main(cfg: DictConfig) -> int:
    """One job. A single run exits with the job's code. In a multirun a failed job only returns
    it (its metrics.json records why) so the sweep goes on, except an interrupted one, which
    stops the sweep; :func:`main` turns failed jobs into the multirun's exit code."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    # A sweep job is named in TensorBoard after its overrides, e.g. "rtol=1e-3,solver=tsit5".
    name = hc.job.override_dirname.replace("/", "_")[:200] if hc.mode == RunMode.MULTIRUN else ""
    code = train(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task), name=name or None,
                 traceback=bool(hc.verbose) or os.environ.get("NEURALODE_DEBUG", "") not in ("", "0"))
    if hc.mode == RunMode.MULTIRUN and code not in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return code
    if code:
        if hc.mode == RunMode.MULTIRUN:
            from neuralode.report import write_summary

            write_summary(hc.sweep.dir)
        sys.exit(code)
    return code


def main() -> None:
    """``neuralode-train`` and ``python -m neuralode.train``, also as every rank of a torchrun job."""
    from neuralode import report

    if {"--help", "-h"} & set(sys.argv[1:]):
        print(usage())
        return
    # Third-party deprecation notices a user of the command line cannot act on.
    for category in (FutureWarning, DeprecationWarning):
        for module in ("torch", "torchvision", "tensorboard", "hydra", "omegaconf"):
            warnings.filterwarnings("ignore", category=category, module=module)
    try:
        sys.argv[1:] = torchrun_argv(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()
    if report.sweep_exit_code:
        sys.exit(report.sweep_exit_code)


if __name__ == "__main__":
    main()
