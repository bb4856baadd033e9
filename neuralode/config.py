"""Typed schemas behind the YAML files in ``conf/``: a leaf module that imports nothing
from the solvers, models or data, so ``--help`` and ``--cfg job`` stay cheap.

Hydra merges every YAML file onto one of these dataclasses, so a wrong type
(``rtol=abc``) or an unknown key fails while the config is composed, before any
data is loaded. Choices are plain strings (a checkpoint stores the config as
plain containers, which ``torch.load(weights_only=True)`` accepts); :func:`validate`
checks them and every value a type cannot express (positive tolerances and
batch sizes, model/dataset pairs). Names owned by a registry (solver methods and
options, toy datasets) are checked by :mod:`neuralode.preflight`.

Model and dataset schemas are chosen per option (``schema/model/image_classifier``,
``schema/dataset/image``) rather than fixed in :class:`Config`, so later model families
(cnf, latent_ode) can add their own fields without touching these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# The command line's vocabulary for choices the models and solvers accept as strings.
GRADS = ("direct", "adjoint", "checkpoint")
TRACES = ("exact", "hutchinson")
NOISES = ("gaussian", "rademacher")
ACTIVATIONS = ("softplus", "tanh", "elu", "swish")


@dataclass
class AdjointConf:
    """Settings of the backward solve; ``null`` means 'same as forward'."""

    rtol: Optional[float] = None
    atol: Optional[float] = None
    method: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SolverConf:
    method: str = "dopri5"
    grad: str = "adjoint"  # one of GRADS
    seminorm: bool = False
    step_size: Optional[float] = None
    options: Dict[str, Any] = field(default_factory=dict)
    adjoint: AdjointConf = field(default_factory=AdjointConf)


@dataclass
class ImageClassifierConf:
    """odenet / rknet / resnet: conv downsampling, a feature block, a linear head."""

    name: str = "odenet"
    width: int = 64
    augment_dim: int = 0
    num_blocks: int = 6  # resnet only: residual blocks replacing the ODE block


@dataclass
class ImageDatasetConf:
    name: str = "mnist"
    channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    mean: List[float] = field(default_factory=lambda: [0.1307])
    std: List[float] = field(default_factory=lambda: [0.3081])
    augment: bool = False  # random crop with 4-pixel padding
    download: bool = True


@dataclass
class LatentODEConf:
    """latent_ode / rnn: irregular time series (paper Sec. 5). ``kind`` picks the network,
    ``encoder`` the latent ODE's recognition network."""

    name: str = "latent_ode"
    kind: str = "latent_ode"  # latent_ode | rnn
    encoder: str = "gru"  # gru | odernn
    latent_dim: int = 4
    rec_hidden: int = 25  # encoder GRU / RNN baseline hidden size
    dyn_hidden: int = 20  # latent dynamics MLP width
    dyn_layers: int = 1
    dec_hidden: int = 20
    obs_std: float = 0.1  # sigma of the Gaussian likelihood
    init_logvar: float = -4.0  # initial bias of q(z0)'s log-variance: a narrow start avoids posterior collapse
    kl_weight: float = 1.0
    n_figures: int = 3  # fixed test series drawn to TensorBoard


@dataclass
class TimeSeriesDatasetConf:
    """spirals / periodic, generated from ``seed``; see neuralode.data.timeseries."""

    name: str = "spirals"
    n: int = 1000
    n_obs: int = 30  # observed points per series inside the window
    noise: float = 0.1  # std of the Gaussian noise added to the data
    seed: int = 0
    test_fraction: float = 0.2
    missing_rate: float = 0.0  # fraction of observed values dropped inside observation vectors
    n_interp: Optional[int] = None  # held-out window points per series (null: generator default)
    n_extrap: Optional[int] = None  # held-out future points per series (null: generator default)


@dataclass
class CNFConf:
    """cnf: continuous normalizing flow (FFJORD) with RNODE regularisers; see neuralode.models.cnf."""

    name: str = "cnf"
    hidden_dims: List[int] = field(default_factory=lambda: [64, 64, 64])  # MLP widths (2-D) or conv channels
    num_blocks: int = 1
    activation: str = "softplus"  # one of ACTIVATIONS
    trace: str = "exact"  # exact (one VJP per dimension) | hutchinson
    noise: str = "gaussian"  # Hutchinson noise (gaussian | rademacher), drawn once per solve
    time_length: float = 1.0  # each block integrates t in [0, time_length]
    kinetic_weight: float = 0.0  # RNODE: weight of the integral of |f|^2
    jacobian_weight: float = 0.0  # RNODE: weight of the integral of |df/dz|_F^2
    logit_alpha: float = 1e-6  # images: logit(alpha + (1 - 2 alpha) u)
    figure_resolution: int = 96  # 2-D: pixels per side of the density / histogram panels
    figure_samples: int = 4000  # 2-D: samples drawn for the figure (images: up to 64)


@dataclass
class Toy2DDatasetConf:
    """Toy 2-D densities (neuralode.data.toy2d); train and test sets are drawn from ``seed``."""

    name: str = "8gaussians"  # a generator of neuralode.data.toy2d
    n_train: int = 100_000
    n_test: int = 10_000
    seed: int = 0


@dataclass
class OptimConf:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: List[int] = field(default_factory=list)  # MultiStepLR, in epochs
    gamma: float = 0.1


@dataclass
class TrainerConf:
    epochs: int = 3
    batch_size: int = 128
    eval_batch_size: int = 500
    limit_batches: Optional[int] = None  # train batches per epoch (tiny budgets)
    limit_eval_batches: Optional[int] = None
    max_minutes: Optional[float] = None  # stop after the epoch during which this wall-clock budget runs out
    num_workers: int = 0
    progress: bool = True  # tqdm bar; never shown when stdout is not a terminal


@dataclass
class EvalConf:
    """Test-time tolerance sweep after training; atol is scaled like rtol."""

    rtols: List[float] = field(default_factory=list)


@dataclass
class Config:
    model: Any = MISSING
    dataset: Any = MISSING
    solver: SolverConf = MISSING
    optim: OptimConf = MISSING
    trainer: TrainerConf = MISSING
    eval: EvalConf = field(default_factory=EvalConf)
    rtol: float = 1e-3
    atol: float = 1e-3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data_dir: str = "data"
    resume: Optional[str] = None  # run directory or checkpoint file


class ConfigError(ValueError):
    """A config value that composes but makes no sense; raised before any work."""


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    # Kept out of the selectable groups, so `model=<name>` lists only real models.
    for group, name, node in (("solver", "solver", SolverConf), ("model", "image_classifier", ImageClassifierConf),
                              ("dataset", "image", ImageDatasetConf), ("optim", "optim", OptimConf),
                              ("model", "latent_ode", LatentODEConf), ("dataset", "timeseries", TimeSeriesDatasetConf),
                              ("model", "cnf", CNFConf), ("dataset", "toy2d", Toy2DDatasetConf),
                              ("trainer", "trainer", TrainerConf)):
        cs.store(group=f"schema/{group}", name=name, node=node)


def validate(cfg) -> None:
    """Check what the values alone decide; raise :class:`ConfigError` naming every bad key."""
    problems = []

    def positive(key: str, value) -> None:
        if value is not None and not value > 0:
            problems.append(f"{key}={value} must be > 0")

    def non_negative(key: str, value) -> None:
        if value is not None and not value >= 0:
            problems.append(f"{key}={value} must be >= 0")

    def one_of(key: str, value, choices) -> None:
        if value not in choices:
            problems.append(f"{key}={value!r} is not one of {', '.join(choices)}")

    positive("rtol", cfg.rtol)
    positive("atol", cfg.atol)
    for r in cfg.eval.rtols:
        positive("eval.rtols[]", r)
    t = cfg.trainer
    positive("trainer.batch_size", t.batch_size)
    positive("trainer.eval_batch_size", t.eval_batch_size)
    positive("trainer.limit_batches", t.limit_batches)
    positive("trainer.limit_eval_batches", t.limit_eval_batches)
    positive("trainer.max_minutes", t.get("max_minutes"))
    non_negative("trainer.epochs", t.epochs)
    non_negative("trainer.num_workers", t.num_workers)
    o = cfg.optim
    one_of("optim.name", o.name, ("sgd", "adam"))
    positive("optim.lr", o.lr)
    positive("optim.gamma", o.gamma)
    non_negative("optim.momentum", o.momentum)
    non_negative("optim.weight_decay", o.weight_decay)
    for e in o.milestones:
        non_negative("optim.milestones[]", e)
    s = cfg.solver
    one_of("solver.grad", s.grad, GRADS)
    positive("solver.step_size", s.step_size)
    positive("solver.adjoint.rtol", s.adjoint.rtol)
    positive("solver.adjoint.atol", s.adjoint.atol)
    m, d = cfg.model, cfg.dataset
    image_data = d.get("channels") is not None
    if m.get("width") is not None:  # odenet / rknet / resnet
        positive("model.width", m.width)
        non_negative("model.augment_dim", m.augment_dim)
        positive("model.num_blocks", m.num_blocks)
        if not image_data:
            problems.append(f"model={m.name} classifies images: use dataset=mnist or dataset=cifar10, "
                            f"not dataset={d.name}")
    if m.get("kind") is not None:  # latent_ode / rnn
        one_of("model.kind", m.kind, ("latent_ode", "rnn"))
        one_of("model.encoder", m.encoder, ("gru", "odernn"))
        positive("model.obs_std", m.obs_std)
        if d.get("n_obs") is None:
            problems.append(f"model={m.name} needs a time-series dataset (spirals, periodic), not dataset={d.name}")
        for key in ("latent_dim", "rec_hidden", "dyn_hidden", "dec_hidden", "dyn_layers"):
            positive(f"model.{key}", m[key])
    if m.name == "cnf":
        one_of("model.trace", m.trace, TRACES)
        one_of("model.noise", m.noise, NOISES)
        one_of("model.activation", m.activation, ACTIVATIONS)
        positive("model.time_length", m.time_length)
        positive("model.num_blocks", m.num_blocks)
        positive("model.figure_resolution", m.figure_resolution)
        positive("model.figure_samples", m.figure_samples)
        for h in m.hidden_dims:
            positive("model.hidden_dims[]", h)
        non_negative("model.kinetic_weight", m.kinetic_weight)
        non_negative("model.jacobian_weight", m.jacobian_weight)
        if not image_data and d.get("n_train") is None:
            problems.append(f"model=cnf needs a toy 2-D dataset (e.g. dataset=8gaussians) or an image dataset "
                            f"(mnist, cifar10), not dataset={d.name}")
    if d.get("n_train") is not None:  # toy 2-D
        positive("dataset.n_train", d.n_train)
        positive("dataset.n_test", d.n_test)
    if d.get("n_obs") is not None:  # time series
        positive("dataset.n_obs", d.n_obs)
        positive("dataset.n", d.n)
        non_negative("dataset.noise", d.noise)
        if not 0 < d.test_fraction < 1:
            problems.append(f"dataset.test_fraction={d.test_fraction} must be in (0, 1)")
        if not 0 <= d.missing_rate < 1:
            problems.append(f"dataset.missing_rate={d.missing_rate} must be in [0, 1)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        problems.append(f"device={cfg.device!r} is not one of auto, cpu, cuda, cuda:N")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
