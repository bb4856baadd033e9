"""Data-parallel training under ``torchrun``, on torch.distributed's own engine.

torchrun starts one process per rank and describes the job in environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, TORCHELASTIC_RUN_ID, ...).
:class:`Distributed` reads them once. A plain ``python`` run gets a single-rank
instance whose collectives return their input, so ``train.py`` has one code path.

Gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel`.
Our adjoint and checkpoint backward passes return parameter gradients from an
``autograd.Function`` (they call ``torch.autograd.grad``, never ``.backward()``),
so DDP's gradient hooks fire exactly once per parameter, in every gradient mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    run_id: str | None = None  # torchrun's rendezvous id: all ranks (and elastic restarts) share it
    restart_count: int = 0  # > 0 when torchrun restarted the workers after a failure

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Distributed:
        env = os.environ if env is None else env
        return cls(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                   local_rank=int(env.get("LOCAL_RANK", 0)), run_id=env.get("TORCHELASTIC_RUN_ID"),
                   restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 owns every side effect: output directory, logs, TensorBoard, checkpoints, progress bar."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """``auto`` is CUDA when available, else CPU; under torchrun a bare ``cuda`` means this rank's GPU."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if self.enabled and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        return device

    # -- process group ---------------------------------------------------------
    def init(self, device: torch.device) -> None:
        """Join the process group: NCCL for CUDA, gloo for CPU."""
        if not self.enabled or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP around ``model`` (which keeps its own parameters; DDP broadcasts rank 0's at start)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    # -- collectives (identity on one rank) ------------------------------------
    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def mean_over(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over the ranks that report the key (ranks hold equal shares of the batch)."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}


def torchrun_argv(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Hydra overrides that make the ranks of one torchrun job agree on one run directory
    and keep Hydra's own files (``.hydra/``, the job log) on rank 0.

    Raises ``ValueError`` for a multirun: every rank would launch the whole sweep."""
    d = Distributed.from_env(env)
    if not d.enabled:
        return argv
    if any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in argv):
        raise ValueError(
            "-m/--multirun cannot be combined with torchrun: every rank would run the whole sweep. "
            "Sweep without torchrun through a Hydra launcher (-m hydra/launcher=joblib, submitit_slurm or "
            "slurm_gpu: one process per job), or start one torchrun job per setting.")
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        extra.append(f"hydra.run.dir=outputs/torchrun/{d.run_id or 'none'}")
    if not d.is_main:
        extra.append("hydra.output_subdir=null")
        if not any(a.startswith("hydra/job_logging=") for a in argv):
            extra.append("hydra/job_logging=stdout")
    return [*argv, *extra]
