"""Checks a composed config must pass before any work, beyond what :func:`neuralode.config.validate`
decides from the values alone: names owned by a registry (solver methods and options, toy
datasets), the device and the output directory. Each failure is a :class:`ConfigError` that
names the key or path and the fix; ``train.py`` turns it into exit code 2.

Kept apart from ``config.py`` so the schemas stay a leaf that imports no solver, model or data
code; this module imports them only when a run actually starts.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback

from neuralode.config import ConfigError


def check_solver(cfg: Any) -> Any:
    """Build the run's solver settings once, which checks the method, grad mode and every
    option value (``+solver.options.*`` included), and return them."""
    from neuralode import METHODS
    from neuralode.tasks import solver_settings

    s = cfg.solver
    try:
        settings = solver_settings(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{_solver_key(cfg, str(e))}: {e}") from None
    if not METHODS[s.method].adaptive and s.step_size is None and "step_size" not in s.options:
        raise ConfigError(f"solver.method={s.method} is a fixed-step method: set solver.step_size")
    return settings


def _solver_key(cfg: Any, message: str) -> str:
    """The config key a solver-settings error is about: an option it names, else the field."""
    s = cfg.solver
    for prefix, options in (("solver.options", s.options), ("solver.adjoint.options", s.adjoint.options)):
        for name in options:
            if re.search(rf"\b{re.escape(str(name))}\b", message):
                return f"{prefix}.{name}={options[name]!r}"
    for key in ("rtol", "atol", "method"):
        if re.search(rf"\badjoint_{key}\b", message):
            return f"solver.adjoint.{key}={s.adjoint[key]!r}"
    if s.adjoint.method not in (None, s.method) and repr(s.adjoint.method) in message:
        return f"solver.adjoint.method={s.adjoint.method!r}"
    for key in ("step_size", "method", "grad"):
        if re.search(rf"\b{key}\b", message):
            return f"solver.{key}={s[key]!r}"
    for key in ("rtol", "atol"):
        if re.search(rf"\b{key}\b", message):
            return f"{key}={cfg[key]!r}"
    return "solver"


def check_dataset(cfg: Any) -> None:
    """Toy 2-D dataset names come from the generators' registry."""
    d = cfg.dataset
    if d.get("n_train") is not None:
        from neuralode.data.toy2d import TOY_NAMES

        if d.name not in TOY_NAMES:
            raise ConfigError(f"dataset.name={d.name!r} is not one of {', '.join(TOY_NAMES)}")


def check_device(name: str) -> None:
    """A CUDA device that does not exist is a config error, not a crash on the first tensor."""
    if name == "auto" or not name.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
    index = torch.device(name).index
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of them or device=auto")


def check_writable(out_dir: Path, key: str = "hydra.run.dir") -> None:
    """Fail before training, not at the first checkpoint, when the run directory cannot be written."""
    probe = out_dir / f".write_test.{os.getpid()}"  # one per process: torchrun's ranks check at once
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the run directory {out_dir} ({e.strerror or e}); "
                          f"free some space or choose another directory with {key}=...") from None


class OutputDirCheck(Callback):
    """Hydra callback: refuse an unwritable run or sweep directory with exit code 2 and one line,
    before Hydra creates it (where the failure would be a traceback and exit code 1)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        _exit_unless_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        _exit_unless_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _exit_unless_writable(path: Path, key: str) -> None:
    try:
        check_writable(path, key)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
