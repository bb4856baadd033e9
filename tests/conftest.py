"""Shared fixtures: tiny MNIST files in torchvision's raw layout, and helpers that run
training in-process (:func:`train_here`, the function the entry point calls) or through
the real ``neuralode-train`` entry point in a subprocess (:func:`run_train`, for exit
codes, signals, sweeps and torchrun)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread, in this process and in the runs it starts: the tests' models are tiny
# (extra threads only add synchronisation), and the suite's parallel subprocesses (torchrun ranks,
# joblib jobs) would otherwise oversubscribe the cores, which slows small ops by 10x or more on a
# busy machine. NEURALODE_TEST_THREADS=<n> changes it.
THREADS = os.environ.setdefault("NEURALODE_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", THREADS)
torch.set_num_threads(int(THREADS))

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist-10k"

# Small and fast: width-8 ODE-Net, batches of 16, one eval batch, loose solve.
TINY = ["model.width=8", "trainer.batch_size=16", "trainer.eval_batch_size=32", "trainer.limit_batches=2",
        "trainer.limit_eval_batches=1", "trainer.epochs=1", "rtol=1e-2", "atol=1e-2", "eval.rtols=[0.1]"]


def write_idx_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write random digits in MNIST's idx format under ``root/MNIST/raw``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28)
                                                         + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.numpy().tobytes())
    return root


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory) -> Path:
    return write_idx_mnist(tmp_path_factory.mktemp("data"), n_train=640, n_test=64)


def compose(*overrides: str, with_hydra: bool = False):
    """The config ``neuralode-train <overrides>`` would run with; ``with_hydra`` keeps the
    ``hydra`` node (and allows overriding it)."""
    from hydra import compose as hydra_compose, initialize_config_module

    from neuralode.config import register_configs

    register_configs()
    with initialize_config_module("neuralode.conf", version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=with_hydra)


def train_here(*overrides: str, run_dir: Path, traceback: bool = False) -> int:
    """Run one job in this process, as the entry point would with ``hydra.run.dir=run_dir``;
    return its exit code."""
    from neuralode.train import train

    return train(compose(*overrides), run_dir, overrides, traceback=traceback)


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "neuralode.train", *overrides]


def run_train(*overrides: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the entry point to completion; stdout and stderr are merged."""
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    return subprocess.run(train_cmd(*overrides), cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def events_dir(run_dir: Path) -> Path:
    """The run's TensorBoard run directory, ``<run dir>/tb/<run name>`` (exactly one)."""
    (found,) = {p.parent for p in (run_dir / "tb").rglob("events.out.tfevents.*")}
    return found


def _events(run_dir: Path, kind: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events_dir(run_dir)), size_guidance={kind: 0})
    acc.Reload()
    return acc


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of the run's events files: tag -> [(step, value)]."""
    acc = _events(run_dir, "scalars")
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def images(run_dir: Path) -> dict[str, list]:
    """All image series of the run's events files: tag -> [image events]."""
    acc = _events(run_dir, "images")
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}
