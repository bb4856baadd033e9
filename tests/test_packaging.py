"""`pip install .` (not editable) gives a working ``neuralode-train`` from any directory:
the configs must travel inside the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT, TINY


def test_wheel_ships_configs_and_trains_outside_the_checkout(fake_mnist, tmp_path):
    pytest.importorskip("setuptools", minversion="64")
    src = tmp_path / "src"  # build from a copy: an in-tree build would leave build/ in the checkout
    top_level = {".git", ".venv", "outputs", "data", "build", "dist", ".pytest_cache"}
    shutil.copytree(REPO_ROOT, src, ignore=lambda d, names: [
        n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (d == str(REPO_ROOT) and n in top_level)])
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels,
                    src], check=True)
    (wheel,) = wheels.glob("neuralode-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("config.yaml", "solver/dopri5.yaml", "model/cnf.yaml", "experiment/mnist_paper.yaml",
                   "hydra/launcher/slurm_gpu.yaml"):
        assert f"neuralode/conf/{config}" in names, config

    site = tmp_path / "site"  # dependencies come from this venv; neuralode only from the wheel
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), HYDRA_FULL_ERROR="0")
    where = subprocess.run([sys.executable, "-c", "import neuralode; print(neuralode.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    out = elsewhere / "run"
    res = subprocess.run([site / "bin" / "neuralode-train", f"data_dir={fake_mnist}", f"hydra.run.dir={out}", *TINY],
                         cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout
    assert (out / "checkpoints" / "last.pt").exists() and (out / "metrics.json").exists()
