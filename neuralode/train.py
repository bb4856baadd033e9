"""``neuralode-train``: train a model chosen by config, log NFE and accuracy.

Reads top to bottom: validate config, build task and data, optionally resume,
train with per-epoch evaluation and checkpoints, then evaluate the test set at
several tolerances and write the final metrics. All side effects go through
:class:`neuralode.run.Run`.

Under ``torchrun`` every rank runs this same script: DDP averages gradients,
each rank trains on its share of the global batch, metrics and NFE are averaged
over ranks before rank 0 logs them (see :mod:`neuralode.distributed`).

Exit codes: 0 done, 2 bad config or missing data, 3 solver failure,
4 non-finite loss, 128+signal when interrupted (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from neuralode.config import ConfigError, register_configs, validate
from neuralode.data import DataError, EpochSampler
from neuralode.distributed import Distributed, mean_over, torchrun_argv
from neuralode.models import ODEBlock, solver_overrides
from neuralode.run import Run, rng_state, set_rng_state
from neuralode.tasks import Task, build_task

log = logging.getLogger("neuralode.train")
register_configs()


class TrainingStopped(Exception):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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


def build_optimizer(cfg: DictConfig, model: torch.nn.Module):
    o = cfg.optim
    if o.name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(o.milestones), gamma=o.gamma)
    return opt, sched


@torch.no_grad()
def evaluate(task: Task, loader: DataLoader, limit: int | None, device: torch.device,
             dist: Distributed) -> dict[str, float]:
    """Sample-weighted mean loss and metrics over the test set (every rank's shard), plus
    mean forward NFE per batch."""
    from neuralode import record_stats

    task.model.eval()
    totals: dict[str, float] = {}
    n = batches = nfe = 0
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        batch = to_device(batch, device)
        with record_stats() as stats:
            loss, metrics = task.loss(batch)
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
    return out


def train(cfg: DictConfig) -> int:
    """Run one job (one rank of it under torchrun); return its exit code."""
    try:
        validate(cfg)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    dist = Distributed.from_env()
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports progress; other ranks only problems
    if cfg.trainer.batch_size % dist.world_size:
        log.error("trainer.batch_size=%d is the global batch and must be divisible by the %d ranks",
                  cfg.trainer.batch_size, dist.world_size)
        return 2
    device = dist.device(cfg.device)
    dist.init(device)
    try:
        return fit(cfg, dist, device)
    finally:
        dist.close()


def fit(cfg: DictConfig, dist: Distributed, device: torch.device) -> int:
    from neuralode import SolverError, record_stats

    # -- set-up ----------------------------------------------------------------
    hydra_cfg = HydraConfig.get()
    run = Run(hydra_cfg.runtime.output_dir, progress=cfg.trainer.progress, enabled=dist.is_main)
    log.info("output directory: %s", run.out_dir)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    task = build_task(cfg)
    model = task.model.to(device)
    log.info("model %s: %.3fM parameters, device %s", cfg.model.name,
             sum(p.numel() for p in model.parameters()) / 1e6, device)
    if dist.enabled:
        random.seed(cfg.seed + dist.rank)  # distinct noise per rank (Hutchinson, dequantisation, crops)
        torch.manual_seed(cfg.seed + dist.rank)
        log.info("DDP: %d ranks (%s), %d samples per rank per step", dist.world_size,
                 torch.distributed.get_backend(), cfg.trainer.batch_size // dist.world_size)
    try:
        train_set, test_set = task.datasets()
    except DataError as e:
        log.error("%s", e)
        return 2
    t = cfg.trainer
    shard = dict(rank=dist.rank, world_size=dist.world_size)
    sampler = EpochSampler(len(train_set), cfg.seed, **shard)
    collate = getattr(task, "collate_fn", None)  # tasks with dict batches (latent_ode) bring their own
    train_loader = DataLoader(train_set, t.batch_size // dist.world_size, sampler=sampler,
                              num_workers=t.num_workers, pin_memory=device.type == "cuda", collate_fn=collate)
    test_loader = DataLoader(test_set, t.eval_batch_size, num_workers=t.num_workers, collate_fn=collate,
                             sampler=EpochSampler(len(test_set), 0, shuffle=False, equal_shards=False, **shard))
    optimizer, scheduler = build_optimizer(cfg, model)

    epoch, start_batch, step = 0, 0, 0
    resume = cfg.resume
    if resume is None and dist.restart_count > 0 and run.ckpt_path.exists():
        resume = str(run.ckpt_path)  # torchrun restarted the workers after a failure
    if resume:
        path, state = Run.load_checkpoint(resume)
        if len(state.get("rng_ranks", [])) == dist.world_size:
            set_rng_state(state["rng_ranks"][dist.rank])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        log.info("resumed from %s at epoch %d, batch %d, step %d", path, epoch + 1, start_batch, step)
    task.net = dist.wrap(model, device)

    def checkpoint(epoch: int, batch: int) -> None:
        rng_ranks = dist.gather(rng_state())  # a collective: every rank calls checkpoint()
        run.save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                 scheduler=scheduler.state_dict(), epoch=epoch, batch=batch, step=step,
                                 rng_ranks=rng_ranks, config=OmegaConf.to_container(cfg, resolve=True)))

    def stop_signal() -> int | None:
        """The first signal any rank received, so all ranks stop at the same point."""
        return next((s for s in dist.gather(run.stop_signal) if s is not None), None)

    # -- training --------------------------------------------------------------
    history: dict[str, float] = {}
    iter_times: list[float] = []
    train_start = time.perf_counter()
    try:
        with run.stop_on_signals():
            log.info("training: epochs %d-%d, %d batches per epoch", epoch + 1, t.epochs,
                     min(len(train_loader), t.limit_batches or len(train_loader)))
            while epoch < t.epochs:
                model.train()
                sampler.set_epoch(epoch, start=start_batch * t.batch_size)
                n_batches = len(train_loader) + start_batch
                if t.limit_batches is not None:
                    n_batches = min(n_batches, t.limit_batches)
                sums = {"loss": 0.0, "nfe_f": 0.0, "nfe_b": 0.0}  # + the task's metrics
                seen = 0
                epoch_start = time.perf_counter()
                with run.progress(train_loader, n_batches - start_batch, f"epoch {epoch + 1}/{t.epochs}") as bar:
                    for i, batch in enumerate(bar, start=start_batch):
                        if i >= n_batches:
                            break
                        tic = time.perf_counter()
                        batch = to_device(batch, device)
                        with record_stats() as stats:
                            loss, metrics = task.loss(batch)
                            losses = dist.gather(loss.item())  # agree before backward, where DDP syncs
                            if not all(map(math.isfinite, losses)):
                                raise TrainingStopped(
                                    f"loss is {losses[0] if len(losses) == 1 else f'{losses} (per rank)'} at "
                                    f"iteration {step + 1} (epoch {epoch + 1}, batch {i + 1}); stopping", 4)
                            optimizer.zero_grad(set_to_none=True)
                            loss.backward()
                        optimizer.step()
                        step += 1
                        local = {"loss": losses[dist.rank], **metrics,
                                 "nfe_f": stats.nfe_forward, "nfe_b": stats.nfe_backward}
                        ranks = dist.gather((local, run.stop_signal))
                        values = mean_over([v for v, _ in ranks])
                        stop = next((s for _, s in ranks if s is not None), None)
                        dt = time.perf_counter() - tic
                        iter_times.append(dt)
                        run.scalars({"train/loss": values["loss"], **{f"train/{k}": v for k, v in metrics.items()},
                                     "nfe/forward": values["nfe_f"], "nfe/backward": values["nfe_b"],
                                     "time/iter": dt}, step)
                        seen += 1
                        for k in metrics:
                            sums.setdefault(k, 0.0)
                        for k in sums:
                            sums[k] += values.get(k, 0.0)
                        bar.set_postfix({k: f"{v / seen:.3g}" for k, v in sums.items()}, refresh=False)
                        if stop is not None:
                            checkpoint(epoch, i + 1)
                            log.warning("interrupted at step %d; checkpoint %s", step, run.ckpt_path)
                            run.flush()
                            return 128 + stop

                epoch_time = time.perf_counter() - epoch_start
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                test = evaluate(task, test_loader, t.limit_eval_batches, device, dist)
                means = {k: v / max(seen, 1) for k, v in sums.items()}
                run.scalars({**{f"train/{k}_epoch": v for k, v in means.items() if k not in ("nfe_f", "nfe_b")},
                             "nfe/forward_epoch": means["nfe_f"], "nfe/backward_epoch": means["nfe_b"],
                             **{f"test/{k}": v for k, v in test.items()},
                             "time/epoch": epoch_time, "lr": lr}, step)
                run.figures(task, step)
                history = {**{f"test_{k}": v for k, v in test.items() if k != "nfe_forward"},
                           "nfe_forward": means["nfe_f"], "nfe_backward": means["nfe_b"],
                           "time_per_iter": epoch_time / max(seen, 1)}
                named = lambda d, skip: " ".join(f"{k} {v:.4f}" for k, v in d.items() if k not in skip)
                log.info("epoch %d/%d: train loss %.4f %s | test loss %.4f %s | nfe fwd %.1f bwd %.1f | %.2f s/iter",
                         epoch + 1, t.epochs, means["loss"], named(means, ("loss", "nfe_f", "nfe_b")), test["loss"],
                         named(test, ("loss", "nfe_forward")), means["nfe_f"], means["nfe_b"],
                         history["time_per_iter"])
                epoch, start_batch = epoch + 1, 0
                checkpoint(epoch, 0)
                run.flush()
                stop = stop_signal()
                if stop is not None:
                    return 128 + stop
                if t.get("max_minutes") and dist.gather(time.perf_counter() - train_start)[0] > 60 * t.max_minutes:
                    log.info("trainer.max_minutes=%g reached after epoch %d; stopping", t.max_minutes, epoch)
                    break
    except SolverError as e:
        log.error("solver failed at step %d: %s. Last good checkpoint: %s", step + 1, e, _last(run))
        return 3
    except TrainingStopped as e:
        log.error("%s. Last good checkpoint: %s", e, _last(run))
        return e.exit_code
    train_time = time.perf_counter() - train_start

    # -- test-time tolerance ---------------------------------------------------
    tol_rows = []
    if any(isinstance(m, ODEBlock) for m in model.modules()):
        for r in cfg.eval.rtols:
            with solver_overrides(model, rtol=r, atol=r * cfg.atol / cfg.rtol):
                res = evaluate(task, test_loader, t.limit_eval_batches, device, dist)
            key = task.primary_metric  # acc for classifiers, nll / bpd for flows, ...
            tol_rows.append({"rtol": r, key: res.get(key, 0.0), "nfe_forward": res["nfe_forward"]})
            run.scalars({f"tol_eval/{key}/rtol={r:g}": res.get(key, 0.0),
                         f"tol_eval/nfe_forward/rtol={r:g}": res["nfe_forward"]}, step)
            log.info("test at rtol=%g: %s %.4f, forward NFE %.1f", r, key, res.get(key, 0.0), res["nfe_forward"])

    # -- final metrics ---------------------------------------------------------
    final = dict(history, train_time=train_time,
                 time_per_iter=sum(iter_times) / len(iter_times) if iter_times else history.get("time_per_iter"))
    run.hparams({**hparams_of(cfg), **task.hparams()},
                {f"final/{k}": v for k, v in final.items() if v is not None}, step)
    primary = f"test_{task.primary_metric}"
    run.write_json("metrics.json", {
        "primary_metric": primary, "primary_mode": task.primary_mode, "test_primary": final.get(primary),
        "overrides": list(hydra_cfg.overrides.task), "model": cfg.model.name, "method": cfg.solver.method,
        "grad": str(getattr(cfg.solver.grad, "value", cfg.solver.grad)), "rtol": cfg.rtol, "atol": cfg.atol,
        "seed": cfg.seed, "epochs": epoch, "steps": step, **final, "tol_eval": tol_rows,
    })
    run.close()
    return 0


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    return {"model": cfg.model.name, "dataset": str(getattr(cfg.dataset.name, "value", cfg.dataset.name)),
            "method": cfg.solver.method,
            "grad": str(getattr(cfg.solver.grad, "value", cfg.solver.grad)), "seminorm": cfg.solver.seminorm,
            "rtol": cfg.rtol, "atol": cfg.atol, "seed": cfg.seed, "batch_size": cfg.trainer.batch_size,
            "lr": cfg.optim.lr, "epochs": cfg.trainer.epochs, "augment_dim": cfg.model.get("augment_dim", 0)}


def _last(run: Run) -> str:
    return str(run.ckpt_path) if run.ckpt_path.exists() else "none (failed before the first epoch ended)"


def _config_path() -> str:
    """The installed configs, or the checkout's conf/ when running uninstalled."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("neuralode.conf") is not None:
        return "pkg://neuralode.conf"
    return str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    code = train(cfg)
    if code:
        sys.exit(code)


def main() -> None:
    """``neuralode-train`` and ``python -m neuralode.train``, also as every rank of a torchrun job."""
    try:
        sys.argv[1:] = torchrun_argv(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
