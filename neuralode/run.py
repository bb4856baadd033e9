"""Every side effect of a training run in one place: logs, TensorBoard,
progress bars, checkpoints, ``metrics.json`` and signal handling.

``train.py`` only calls this object, so making side effects rank-0-only under
DDP later is a matter of constructing it with ``enabled=False`` on other ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from tqdm import tqdm

log = logging.getLogger("neuralode")

CKPT_NAME = "checkpoints/last.pt"


class Run:
    def __init__(self, out_dir: str | Path, progress: bool = True, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.show_progress = progress and enabled and sys.stdout.isatty()
        self.stop_signal: int | None = None
        self.ckpt_path = self.out_dir / CKPT_NAME
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tb"))

    # -- logging ---------------------------------------------------------------
    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """Write hparams into this run's own event file (not a sub-run), so the
        jobs of a multirun form one HParams table with one row per job."""
        if not self._writer:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.scalars(metrics, step)
        file_writer = self._writer._get_file_writer()
        for summary in hparams_summary(hparams, metrics):
            file_writer.add_summary(summary)

    def figures(self, task: Any, step: int) -> None:
        """Let the task draw its TensorBoard figures (``Task.log_figures``)."""
        if self._writer:
            task.log_figures(self._writer, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self._writer:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if self.enabled:
            _atomic_write(self.out_dir / name, lambda f: f.write(json.dumps(data, indent=2).encode()))

    @contextlib.contextmanager
    def progress(self, iterable: Iterable, total: int, desc: str) -> Iterator[tqdm]:
        """A tqdm bar (hidden off-terminal); log records are routed around it."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(iterable, total=total, desc=desc, disable=not self.show_progress,
                   file=sys.stdout, dynamic_ncols=True, leave=True)
        with bar, (logging_redirect_tqdm() if self.show_progress else contextlib.nullcontext()):
            yield bar

    # -- checkpoints -----------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically replace ``checkpoints/last.pt``; a crash mid-write keeps the old one."""
        if not self.enabled:
            return
        state = dict(state, rng=rng_state())
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.ckpt_path, lambda f: torch.save(state, f))

    @staticmethod
    def load_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
        """Load a checkpoint from a file or a run directory; restore the RNG states."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / CKPT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {path} (give a run directory or a .pt file)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        set_rng_state(state["rng"])
        return path, state

    # -- signals ---------------------------------------------------------------
    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """Turn the first SIGINT/SIGTERM into ``stop_signal``, so the loop can
        checkpoint and exit cleanly; a second signal acts as usual."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            self.stop_signal = signum
            log.warning("%s received: checkpointing after this iteration (send again to abort)",
                        signal.Signals(signum).name)
            for s, h in previous.items():
                signal.signal(s, h)

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
