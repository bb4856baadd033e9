"""Model families, keyed by ``model.name``.

A :class:`Task` bundles what differs between families (model, data, loss and
metrics) behind one interface, so ``train.py`` has a single generic loop.
Later families (cnf, latent_ode) register themselves with :func:`register`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from neuralode.solvers import Adjoint, SolverSettings


class Task:
    """Interface of one model family; see :mod:`neuralode.tasks.classification`."""

    model: nn.Module
    #: Metric the sweep summary and the HParams table report as "test accuracy".
    primary_metric: str = "acc"
    #: "max" (accuracy) or "min" (losses, RMSE): which direction is better for primary_metric.
    primary_mode: str = "max"
    #: DataLoader collate function; None means PyTorch's default (tuples of tensors).
    collate_fn: Callable[[list], Any] | None = None

    _net: nn.Module | None = None

    @property
    def net(self) -> nn.Module:
        """What ``loss`` calls for the forward pass. In training mode under torchrun this is
        the DistributedDataParallel wrapper ``train.py`` puts around ``model`` (only a call
        through it syncs gradients); otherwise, evaluation included, ``model`` itself, so
        ranks may evaluate different numbers of batches. Everything else uses ``model``."""
        return self._net if self._net is not None and self.model.training else self.model

    @net.setter
    def net(self, module: nn.Module) -> None:
        self._net = module

    def datasets(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss of a batch and per-batch mean metrics (e.g. ``{"acc": 0.9}``). A metric ``m``
        with a per-sample spread may come with ``m_sq``, the batch mean of its square: evaluation
        turns the pair into the test-set mean and its standard error ``m_se``."""
        raise NotImplementedError

    def log_figures(self, writer: Any, step: int) -> None:
        """Optional TensorBoard figures; image classifiers have none."""

    def hparams(self) -> dict[str, Any]:
        """Extra hyperparameters for the HParams table (beyond model, solver, tolerances, ...)."""
        return {}


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register(*names: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    def wrap(factory: Callable[..., Task]) -> Callable[..., Task]:
        for name in names:
            _REGISTRY[name] = factory
        return factory

    return wrap


def solver_settings(cfg: Any) -> SolverSettings:
    """The run's solver settings from the composed config: the one conversion from YAML to the
    solver's own type (which validates every value, ``+solver.options.*`` included)."""
    s = cfg.solver
    options = dict(s.options)
    if s.step_size is not None:
        options["step_size"] = s.step_size
    grad: Any = s.grad
    if grad == "adjoint":
        a = s.adjoint
        grad = Adjoint(rtol=a.rtol, atol=a.atol, method=a.method, options=dict(a.options) or None,
                       seminorm=bool(s.seminorm))
    return SolverSettings(method=s.method, rtol=float(cfg.rtol), atol=float(cfg.atol), options=options, grad=grad)


def rnode_weights(cfg: Any) -> tuple[float, float]:
    """The CNF's RNODE weights (kinetic, jacobian): ``regularizer=rnode`` when chosen (the config
    check refuses it together with non-zero ``model.kinetic_weight``/``jacobian_weight``), else
    the model's own keys. The CNF integrates them in its own augmented state (exact Frobenius norm
    with the exact trace), so the generic regulariser leaves its RNODE part to the flow."""
    rnode = cfg.get("regularizer", {}).get("rnode")
    if rnode is not None:
        return float(rnode.kinetic), float(rnode.jacobian)
    return float(cfg.model.kinetic_weight), float(cfg.model.jacobian_weight)


def regularization(cfg: Any):
    """The run's :class:`~neuralode.models.regularize.Regularization` from ``cfg.regularizer``;
    None when no regulariser is chosen. For the CNF only STEER goes through it (see :func:`rnode_weights`)."""
    from neuralode.models.regularize import Regularization

    reg = cfg.get("regularizer")
    if reg is None:
        return None
    rnode, steer, error = reg.get("rnode"), reg.get("steer"), reg.get("error")
    kinetic = jacobian = 0.0
    if rnode is not None and cfg.model.name != "cnf":
        kinetic, jacobian = float(rnode.kinetic), float(rnode.jacobian)
    out = Regularization(kinetic, jacobian, float(steer.b) if steer is not None else 0.0,
                         float(error.weight) if error is not None else 0.0,
                         float(error.stiffness) if error is not None else 0.0)
    return out if out.enabled else None


def build_task(cfg: Any) -> Task:
    """Build the task for ``cfg.model.name``; raise ``KeyError`` listing known names."""
    from neuralode.tasks import classification  # noqa: F401  (registers odenet, resnet, rknet)
    from neuralode.tasks import latent_ode  # noqa: F401  (registers latent_ode, rnn)
    from neuralode.tasks import cnf  # noqa: F401  (registers cnf)

    try:
        factory = _REGISTRY[cfg.model.name]
    except KeyError:
        raise KeyError(f"unknown model.name={cfg.model.name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(cfg)
