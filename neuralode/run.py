"""Every side effect of a training run in one place: logs, TensorBoard,
progress bars and progress lines, checkpoints, ``metrics.json`` and signal handling.

TensorBoard events go to ``<run dir>/tb/<run name>/``, so the runs of a log directory are named
after what tells them apart (a sweep job's overrides, or the model and solver), not ``0/tb``.

``train.py`` only calls this object; under DDP it is constructed with
``enabled=False`` on every rank but 0.

Checkpoints are loaded with ``torch.load(weights_only=True)``: they hold tensors
and plain containers only (the config is stored as plain dicts and strings), so
loading one cannot run code. Checkpoints written before ``format`` 2 pickled the
config's choice enums (``neuralode.config.Grad`` and friends); those, and only
those, are read back as plain strings (:data:`LEGACY_ENUMS`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from tqdm import tqdm

log = logging.getLogger("neuralode")

CKPT_NAME = "checkpoints/last.pt"
CKPT_FORMAT = 2  # 1: the config held pickled enums; 2: plain containers and strings


class CheckpointError(ValueError):
    """A resume target that is missing, unreadable, unsafe or from another setup."""


class OutputError(RuntimeError):
    """The run directory cannot be written (read-only, disk full)."""


def _legacy_enum(value: Any) -> str:
    """Stands in for an enum class of a format-1 checkpoint: the member's value, a string."""
    if not isinstance(value, str):
        raise pickle.UnpicklingError(f"expected a string enum value, got {type(value).__name__}")
    return value


LEGACY_ENUMS = [(_legacy_enum, name) for name in (
    "neuralode.config.Grad", "neuralode.config.Activation", "neuralode.models.cnf.Trace",
    "neuralode.models.cnf.Noise", "neuralode.data.toy2d.Toy2D")]


class Run:
    def __init__(self, out_dir: str | Path, name: str = "run", progress: bool = True, progress_every: float = 30.0,
                 enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.tb_dir = self.out_dir / "tb" / name
        self.enabled = enabled
        on_terminal = sys.stdout.isatty()
        self.show_progress = progress and enabled and on_terminal
        # Off a terminal (a log file, a batch job) the bar is hidden: print a line every so often instead.
        self.progress_every = progress_every if progress and enabled and not on_terminal else 0.0
        self.stop_signal: int | None = None
        self.ckpt_path = self.out_dir / CKPT_NAME
        self._tb = None
        self.tags: set[str] = set()  # scalar tags written so far (the custom-scalars layout names only these)

    @property
    def _writer(self):
        """The TensorBoard writer, created on first use so that a run refused before any
        work leaves no event file."""
        if self._tb is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self._tb = SummaryWriter(str(self.tb_dir))
            except OSError as e:
                raise OutputError(_cannot_write(self.tb_dir, e)) from None
        return self._tb

    # -- logging ---------------------------------------------------------------
    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
                self.tags.add(tag)

    def write_layout(self, primary: str | None) -> None:
        """The TensorBoard custom-scalars dashboard of this run (:func:`layout`), naming only the
        scalar tags it wrote; nothing when it wrote none."""
        if self._tb is not None and self.tags:
            chart = layout(self.tags, primary)
            if chart:
                self._tb.add_custom_scalars(chart)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """Write hparams into this run's own event file (not a sub-run), so the jobs of a
        multirun form one HParams table with one row per job. Only the session records are
        written, not an experiment summary: TensorBoard uses the first experiment summary it
        finds for every run, so a log directory mixing model families would show one family's
        columns; without one it builds the table from all runs' hparams and scalars."""
        if not self._writer:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.scalars(metrics, step)
        file_writer = self._writer._get_file_writer()
        _experiment, session_start, session_end = hparams_summary(hparams, metrics)
        file_writer.add_summary(session_start)
        file_writer.add_summary(session_end)

    def figures(self, task: Any, step: int) -> None:
        """Let the task draw its TensorBoard figures (``Task.log_figures``)."""
        if self._writer:
            task.log_figures(self._writer, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self._writer:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._tb:
            self._tb.flush()

    def close(self) -> None:
        if self._tb:
            self._tb.close()

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """Non-finite floats are written as ``NaN``/``Infinity``, which Python's json reads back."""
        if self.enabled:
            _atomic_write(self.out_dir / name, lambda f: f.write(json.dumps(data, indent=2).encode()))

    @contextlib.contextmanager
    def progress(self, iterable: Iterable, total: int, desc: str) -> Iterator["Progress"]:
        """A tqdm bar on a terminal (log records are routed around it); elsewhere a log line
        every ``progress_every`` seconds."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(iterable, total=total, desc=desc, disable=not self.show_progress,
                   file=sys.stdout, dynamic_ncols=True, leave=True)
        with bar, (logging_redirect_tqdm() if self.show_progress else contextlib.nullcontext()):
            yield Progress(bar, desc, total, self.progress_every)

    # -- checkpoints -----------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically replace ``checkpoints/last.pt``; a crash or a full disk mid-write keeps
        the old one and leaves no temporary file."""
        if not self.enabled:
            return
        state = dict(state, format=CKPT_FORMAT, rng=rng_state())
        _atomic_write(self.ckpt_path, lambda f: torch.save(state, f))

    @staticmethod
    def load_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
        """Read a checkpoint from a file or a run directory, without executing anything in it.
        Raises :class:`CheckpointError` saying what is wrong with the file."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / CKPT_NAME
        if not path.is_file():
            raise CheckpointError(f"resume={path}: no checkpoint there; give a run directory or a .pt file")
        try:
            with torch.serialization.safe_globals(LEGACY_ENUMS):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            reason = _first_line(e.__context__ or e).split(". Please")[0]  # torch wraps the unpickler's reason
            if re.search(r"global|reduce|new object", reason, re.IGNORECASE):
                raise CheckpointError(f"resume={path}: refusing to load it, it holds objects other than tensors "
                                      f"and plain data ({reason}); only resume from checkpoints neuralode-train "
                                      "wrote") from None
            raise CheckpointError(f"resume={path}: cannot read it ({reason}); the file is damaged or not a "
                                  "checkpoint: resume from another run directory or start afresh") from None
        except Exception as e:  # noqa: BLE001  garbage makes the weights-only unpickler fail in many ways
            # (EOFError, KeyError of a memo index, ...); it executes nothing, so any failure is "unreadable"
            reason = f"{type(e).__name__}: {_first_line(e)}" if str(e).strip() else type(e).__name__
            raise CheckpointError(f"resume={path}: cannot read it ({reason}); the file "
                                  "is truncated or not a checkpoint: resume from another run directory or start "
                                  "afresh") from None
        if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "epoch", "step"} <= state.keys():
            raise CheckpointError(f"resume={path}: not a neuralode-train checkpoint (missing model, optimizer, "
                                  "scheduler or counters)")
        fmt = state.get("format", 1)
        if not isinstance(fmt, int) or fmt > CKPT_FORMAT:
            raise CheckpointError(f"resume={path}: checkpoint format {fmt!r} is not one this neuralode reads "
                                  f"(1..{CKPT_FORMAT}); a newer neuralode wrote it, or it is damaged")
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


class Progress:
    """Iterates like the tqdm bar it wraps; :meth:`update` shows the running means on the bar, or
    logs them as one line when ``every`` seconds have passed since the last line (0: never)."""

    def __init__(self, bar: tqdm, desc: str, total: int, every: float):
        self.bar, self.desc, self.total, self.every = bar, desc, total, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.bar)

    def update(self, means: dict[str, float]) -> None:
        self.done += 1
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()}, refresh=False)
        now = time.monotonic()
        if self.every and now - self.last >= self.every:
            self.last = now
            rate = (now - self.start) / self.done
            log.info("%s: batch %d/%d, %s, %.3g s/iter, epoch ends in ~%s", self.desc, self.done, self.total,
                     " ".join(f"{k} {v:.4g}" for k, v in means.items()), rate,
                     duration(rate * (self.total - self.done)))


def layout(tags: set[str], primary: str | None) -> dict[str, dict[str, list]]:
    """The custom-scalars layout (TensorBoard's "Custom Scalars" tab) of a run that wrote ``tags``:
    one chart per question, each line a tag that exists; charts and categories without any are left
    out. ``primary``: the task's primary metric (acc, nll, bpd, rmse_extrap)."""
    p = primary or "loss"
    x_axis = "(x: 100 log10(1/rtol); fixed steps: 100 log2(1/h))"
    wanted = {
        "cost": {
            "NFE per iteration (forward, backward)": ["nfe/forward", "nfe/backward"],
            "NFE per epoch (mean forward, backward; growth over the first epoch)":
                ["nfe/forward_epoch", "nfe/backward_epoch", "nfe/growth"],
            "time per iteration (s), peak memory (bytes)": ["time/iter", "mem/peak"],
        },
        "accuracy": {
            f"{p}: train and test": [f"train/{p}", f"train/{p}_epoch", f"test/{p}"],
            "loss: train and test": ["train/loss", "train/loss_epoch", "test/loss"],
        },
        "tolerance": {
            f"test {p} against the solver tolerance {x_axis}": [f"tol_eval/curve/{p}"],
            f"test forward NFE against the solver tolerance {x_axis}": ["tol_eval/curve/nfe_forward"],
            "ODE validity: metric gap and NFE ratio at 100x tighter tolerances":
                ["validity/metric_gap", "validity/nfe_ratio"],
            "training rtol chosen by tol=auto": ["tol/rtol"],
        },
        "regularizers": {
            "reg/* per iteration": sorted(t for t in tags if t.startswith("reg/")),
        },
    }
    out: dict[str, dict[str, list]] = {}
    for category, charts in wanted.items():
        for title, chart_tags in charts.items():
            present = [t for t in chart_tags if t in tags]
            if present:  # each entry is a regex: escape, and anchor so that it names exactly one tag
                out.setdefault(category, {})[title] = ["Multiline", [f"^{re.escape(t)}$" for t in present]]
    return out


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


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
    """Write to ``<path>.tmp`` and rename it over ``path``; on failure remove the temporary file
    and raise :class:`OutputError`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(_cannot_write(path, e)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cannot_write(path: Path, e: OSError) -> str:
    return (f"cannot write {path} ({e.strerror or e}); free some space or choose a writable run directory "
            "with hydra.run.dir=...")
