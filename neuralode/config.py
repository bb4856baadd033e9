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
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# The command line's vocabulary for choices the models and solvers accept as strings.
GRADS = ("direct", "adjoint", "checkpoint", "reversible")
TRACES = ("exact", "hutchinson")
NOISES = ("gaussian", "rademacher")
ACTIVATIONS = ("softplus", "tanh", "elu", "swish")
FIELDS = ("conv", "unet")
OBJECTIVES = ("ml", "flow_matching")
COUPLINGS = ("independent", "exact_ot")
NFE_GUARDS = ("warn", "stop")
REGULARIZERS = ("rnode", "steer", "error")
# Adaptive explicit Runge-Kutta methods: the ones with an embedded error estimate per accepted step.
ERROR_METHODS = ("dopri5", "tsit5", "bosh3", "dopri8", "fehlberg2", "adaptive_heun")
ADAPTIVE_METHODS = ERROR_METHODS + ("kvaerno3", "kvaerno5", "auto")
# ... and those with two stages at t + h, which give the stiffness estimate (regularizer.error.stiffness).
STIFFNESS_METHODS = ("dopri5", "tsit5", "dopri8")
# tol=auto (docs/regularizers.md): training starts at this rtol and moves by decades after each epoch.
AUTO_TOL_START = 1e-1
AUTO_TOL_RANGE = (1e-7, 0.5)


def tol_start(value: Any) -> float:
    """``${tol_start:${tol}}``: the rtol a run starts with: ``tol`` itself, or for ``tol=auto``
    :data:`AUTO_TOL_START`."""
    if str(value) == "auto":
        return AUTO_TOL_START
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"tol={value!r} must be a number or auto") from None


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
    # union: solve the batch on the sorted union of its series' times; per_sample: every series on
    # its own times with its own steps (adaptive one-step methods, stiff ones included; others use the union)
    time_grid: str = "union"


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
    hidden_dims: List[int] = field(default_factory=lambda: [64, 64, 64])  # MLP widths (2-D), conv channels, U-Net level widths
    field: str = "conv"  # images: conv (FFJORD's 3x3 conv stack) | unet (a small U-Net, neuralode.models.unet)
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
    # Flow matching (issue 14; neuralode.models.flow_matching, docs/flow_matching.md):
    objective: str = "ml"  # ml (maximum likelihood through the solver) | flow_matching (no solve in training)
    coupling: str = "independent"  # flow matching: independent | exact_ot (minibatch OT, needs scipy)
    sigma: float = 0.0  # flow matching: std of the Gaussian smoothing of the path
    ema: Optional[float] = None  # EMA decay of the weights used for evaluation; 0: off; null: 0.999 for FM on images
    init_from: Optional[str] = None  # run dir or .pt: start from its weights (e.g. FM, then ML fine-tuning)
    ot_max_batch: int = 2048  # exact_ot: largest (global) batch the O(n^3) assignment accepts


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
    eval_every: int = 1  # evaluate the test set (and draw figures) after every N-th epoch and after the last
    num_workers: int = 0
    progress: bool = True  # tqdm bar; never shown when stdout is not a terminal
    progress_every: float = 30.0  # stdout not a terminal: a progress line every this many seconds (0: none)
    # NFE budget (docs/regularizers.md): forward+backward evaluations of one training iteration
    max_nfe_per_iter: Optional[int] = None  # null: no budget
    nfe_guard: str = "warn"  # warn (once per epoch) | stop (exit 3) when an iteration exceeds the budget


@dataclass
class EvalConf:
    """Test-time sweep after training: adaptive solvers at each rtol (atol scaled alike),
    fixed-step solvers at each step size (a tolerance would not change their work)."""

    rtols: List[float] = field(default_factory=list)
    step_sizes: List[float] = field(default_factory=list)
    # ODE-validity check after every epoch (docs/regularizers.md): the test set again at 100x tighter
    # tolerances (fixed-step runs: an adaptive method at rtol/100), the gap of the primary metric
    validity: bool = False
    validity_threshold: float = 0.01  # warn when |metric(tight) - metric(run's solver)| exceeds this
    validity_method: Optional[str] = None  # method of the tight solve (null: the run's, dopri5 for fixed-step runs)


@dataclass
class RNODEConf:
    """RNODE (Finlay et al. 2020): weights of the integrated kinetic energy and Jacobian Frobenius norm."""

    kinetic: float = 0.01
    jacobian: float = 0.01


@dataclass
class SteerConf:
    """STEER (Ghosh et al. 2020): training solves end at T + U(-b, b); evaluation at T."""

    b: float = 0.5


@dataclass
class ErrorRegConf:
    """Error regulariser (Pal et al. 2021): weights of the summed accepted-step local error estimates
    and stiffness estimates ``|h|·|λ|`` (0 turns a term off)."""

    weight: float = 0.01
    stiffness: float = 0.0


@dataclass
class RegularizerConf:
    """The ``regularizer`` group: each chosen option fills its entry; null entries are off.
    ``regularizer=[rnode,steer]`` combines options (docs/regularizers.md)."""

    rnode: Optional[RNODEConf] = None
    steer: Optional[SteerConf] = None
    error: Optional[ErrorRegConf] = None


@dataclass
class Config:
    model: Any = MISSING
    dataset: Any = MISSING
    solver: SolverConf = MISSING
    optim: OptimConf = MISSING
    trainer: TrainerConf = MISSING
    eval: EvalConf = field(default_factory=EvalConf)
    regularizer: RegularizerConf = field(default_factory=RegularizerConf)
    tol: Union[float, str] = 1e-3  # shorthand: rtol follows it, atol follows rtol; "auto": see AUTO_TOL_START
    rtol: float = 1e-3
    atol: float = 1e-3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data_dir: str = "data"
    resume: Optional[str] = None  # run directory or checkpoint file


class ConfigError(ValueError):
    """A config value that composes but makes no sense; raised before any work."""


def register_configs() -> None:
    """The schemas, and ``${mul:a,b}`` (a times b) for configs whose atol is a fixed fraction of rtol."""
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: float(f"{float(a) * float(b):.12g}"))
    if not OmegaConf.has_resolver("tol_start"):
        OmegaConf.register_new_resolver("tol_start", tol_start)
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

    if cfg.tol == "auto":
        s = cfg.solver
        if s.method not in ADAPTIVE_METHODS or s.step_size is not None:
            problems.append(f"tol=auto tunes an adaptive solver's tolerance, but solver={s.method}"
                            + (f" with solver.step_size={s.step_size}" if s.step_size is not None else "")
                            + f" takes fixed steps: use an adaptive method ({', '.join(ADAPTIVE_METHODS)}) or "
                            "a number, e.g. tol=1e-3")
    elif isinstance(cfg.tol, str):  # rtol follows tol, so nothing else can be checked
        raise ConfigError(f"invalid config: tol={cfg.tol!r} must be a number or auto")
    else:
        positive("tol", cfg.tol)
    positive("rtol", cfg.rtol)
    positive("atol", cfg.atol)
    for r in cfg.eval.rtols:
        positive("eval.rtols[]", r)
    for h in cfg.eval.step_sizes:
        positive("eval.step_sizes[]", h)
    t = cfg.trainer
    positive("trainer.batch_size", t.batch_size)
    positive("trainer.eval_batch_size", t.eval_batch_size)
    positive("trainer.limit_batches", t.limit_batches)
    positive("trainer.limit_eval_batches", t.limit_eval_batches)
    positive("trainer.max_minutes", t.get("max_minutes"))
    positive("trainer.eval_every", t.get("eval_every"))
    non_negative("trainer.epochs", t.epochs)
    non_negative("trainer.num_workers", t.num_workers)
    non_negative("trainer.progress_every", t.progress_every)
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
        one_of("model.time_grid", m.time_grid, ("union", "per_sample"))
        positive("model.obs_std", m.obs_std)
        if d.get("n_obs") is None:
            problems.append(f"model={m.name} needs a time-series dataset (spirals, periodic), not dataset={d.name}")
        for key in ("latent_dim", "rec_hidden", "dyn_hidden", "dec_hidden", "dyn_layers"):
            positive(f"model.{key}", m[key])
    if m.name == "cnf":
        one_of("model.trace", m.trace, TRACES)
        one_of("model.noise", m.noise, NOISES)
        one_of("model.activation", m.activation, ACTIVATIONS)
        one_of("model.field", m.get("field", "conv"), FIELDS)
        if m.get("field") == "unet" and not image_data:
            problems.append(f"model.field=unet is an image field; dataset={d.name} is 2-D (its field is the "
                            f"concat-squash MLP): use dataset=mnist or cifar10, or drop model.field")
        positive("model.time_length", m.time_length)
        positive("model.num_blocks", m.num_blocks)
        positive("model.figure_resolution", m.figure_resolution)
        positive("model.figure_samples", m.figure_samples)
        for h in m.hidden_dims:
            positive("model.hidden_dims[]", h)
        non_negative("model.kinetic_weight", m.kinetic_weight)
        non_negative("model.jacobian_weight", m.jacobian_weight)
        objective = m.get("objective", "ml")
        one_of("model.objective", objective, OBJECTIVES)
        one_of("model.coupling", m.get("coupling", "independent"), COUPLINGS)
        non_negative("model.sigma", m.get("sigma", 0.0))
        positive("model.ot_max_batch", m.get("ot_max_batch", 1))
        ema = m.get("ema")
        if ema is not None and not 0 <= ema < 1:
            problems.append(f"model.ema={ema} must be in [0, 1) (0 or null: see conf/model/cnf.yaml)")
        if objective == "flow_matching":
            if not image_data and d.get("n_train") is None:
                problems.append(f"model.objective=flow_matching needs a density dataset (a toy 2-D one such as "
                                f"8gaussians or checkerboard, or mnist/cifar10), not dataset={d.name}")
            if m.num_blocks != 1:
                problems.append(f"model.objective=flow_matching trains one vector field: set model.num_blocks=1, "
                                f"not {m.num_blocks}")
            if m.get("coupling") == "exact_ot" and t.batch_size > m.get("ot_max_batch", 2048):
                problems.append(f"model.coupling=exact_ot: trainer.batch_size={t.batch_size} exceeds the exact "
                                f"assignment's budget model.ot_max_batch={m.ot_max_batch} (O(n^3) per batch)")
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
    problems += regularizer_problems(cfg)
    one_of("trainer.nfe_guard", t.get("nfe_guard", "warn"), NFE_GUARDS)
    positive("trainer.max_nfe_per_iter", t.get("max_nfe_per_iter"))
    non_negative("eval.validity_threshold", cfg.eval.get("validity_threshold", 0.0))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        problems.append(f"device={cfg.device!r} is not one of auto, cpu, cuda, cuda:N")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def chosen_regularizers(cfg) -> list:
    """The regularizers ``regularizer=`` turns on, in :data:`REGULARIZERS` order."""
    reg = cfg.get("regularizer")
    return [] if reg is None else [name for name in REGULARIZERS if reg.get(name) is not None]


def regularizer_problems(cfg) -> list:
    """What is wrong with the ``regularizer`` choice for this model (docs/regularizers.md)."""
    reg, m = cfg.get("regularizer"), cfg.model
    if reg is None:
        return []
    problems = []
    chosen = chosen_regularizers(cfg)
    rnode, steer, error = reg.get("rnode"), reg.get("steer"), reg.get("error")
    for name, entry, keys in (("error", error, ("weight", "stiffness")), ("rnode", rnode, ("kinetic", "jacobian"))):
        for key in keys if entry is not None else ():
            if not entry[key] >= 0:
                problems.append(f"regularizer.{name}.{key}={entry[key]} must be >= 0 (0 turns the term off)")
    if not chosen:
        return problems
    solves = m.name == "cnf" or m.get("kind") == "latent_ode" or m.name in ("odenet", "rknet")
    if not solves:
        problems.append(f"regularizer={','.join(chosen)}: model={m.name} solves no ODE; use regularizer=none")
        return problems
    if m.name == "cnf" and m.get("objective", "ml") == "flow_matching":
        problems.append("regularizer: model.objective=flow_matching trains without a solve, so there is nothing "
                        "to regularise; use regularizer=none or model.objective=ml")
    if rnode is not None and m.name == "cnf" and (m.kinetic_weight > 0 or m.jacobian_weight > 0):
        problems.append("regularizer=rnode sets the CNF's RNODE weights: leave model.kinetic_weight and "
                        "model.jacobian_weight at 0 (or use them with regularizer=none), not both")
    if rnode is not None and m.get("time_grid") == "per_sample":
        problems.append("regularizer=rnode does not support model.time_grid=per_sample; use model.time_grid=union")
    if error is not None:
        s = cfg.solver
        if s.grad not in ("direct", "checkpoint"):
            problems.append(f"regularizer=error differentiates the solver's error estimates through the forward "
                            f"solve, which solver.grad={s.grad} does not keep: use solver.grad=checkpoint (bounded "
                            f"memory) or solver.grad=direct")
        if s.method not in ERROR_METHODS or s.step_size is not None:
            problems.append(f"regularizer=error needs an adaptive explicit method with an error estimate "
                            f"({', '.join(ERROR_METHODS)}) without solver.step_size, not solver={s.method}"
                            + (f" with step_size={s.step_size}" if s.step_size is not None else ""))
        elif error.stiffness > 0 and s.method not in STIFFNESS_METHODS:
            problems.append(f"regularizer.error.stiffness needs a method with two stages at t + h for the "
                            f"stiffness estimate ({', '.join(STIFFNESS_METHODS)}), not solver={s.method}; "
                            f"set regularizer.error.stiffness=0 or solver=dopri5")
        if m.get("time_grid") == "per_sample":
            problems.append("regularizer=error does not support model.time_grid=per_sample; use model.time_grid=union")
    if steer is not None:
        # The end time T of the solves STEER perturbs: CNF blocks run to model.time_length, ODE blocks
        # to 1, the ODE-RNN encoder solves every gap on s in [0, 1].
        T = float(m.time_length) if m.name == "cnf" else 1.0
        if not steer.b >= 0:
            problems.append(f"regularizer.steer.b={steer.b} must be >= 0")
        elif not steer.b < T:
            problems.append(f"regularizer.steer.b={steer.b} must be < T={T:g}, the solves' end time (end times are "
                            f"drawn from [T-b, T+b] and must stay after the start); use e.g. "
                            f"regularizer.steer.b={T / 2:g}")
        if m.get("kind") == "latent_ode" and m.get("encoder") != "odernn":
            problems.append("regularizer=steer: the latent ODE solves on the observation times, which STEER leaves "
                            "alone, and its gru encoder solves nothing; use model.encoder=odernn (STEER then "
                            "perturbs the encoder's gaps) or regularizer=rnode")
    return problems
