"""The ODE block shared by the classifiers, and the one way to change solver settings of a model.

Models receive a :class:`~neuralode.solvers.SolverSettings` (plain, validated data, no Hydra) so
they can be built and tested without the CLI. Every solve a model runs reads its settings when it
is called, so :func:`solver_overrides` (test-time tolerances) works for any model that holds
settings, whatever its family, and a backward pass always uses what its forward pass used.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Tuple

import torch
from torch import nn

from neuralode.solvers import SolverSettings


class ODEBlock(nn.Module):
    """Integrates ``func`` from t=0 to t=1 and returns the final state."""

    def __init__(self, func: nn.Module, solver: SolverSettings):
        super().__init__()
        self.func = func
        self.solver = solver
        self.register_buffer("t", torch.tensor([0.0, 1.0]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.solver.odeint(self.func, x, self.t.to(x.dtype))[-1]


def _holders(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(module, attribute) for every SolverSettings held by a submodule of ``model``."""
    return [(m, name) for m in model.modules() for name, v in vars(m).items() if isinstance(v, SolverSettings)]


def uses_solver(model: nn.Module) -> bool:
    """Whether any part of ``model`` solves an ODE (holds solver settings)."""
    return bool(_holders(model))


@contextlib.contextmanager
def solver_overrides(model: nn.Module, **changes: Any) -> Iterator[None]:
    """Temporarily change the solver settings held anywhere in ``model`` (any family, any depth):
    ``rtol``/``atol``/``method``/``grad`` or option names such as ``step_size``."""
    holders = _holders(model)
    saved = [getattr(m, name) for m, name in holders]
    for (m, name), s in zip(holders, saved):
        setattr(m, name, s.replace(**changes))
    try:
        yield
    finally:
        for (m, name), s in zip(holders, saved):
            setattr(m, name, s)


def set_solver(model: nn.Module, **changes: Any) -> None:
    """Change the solver settings held anywhere in ``model`` for good (as :func:`solver_overrides`
    does for a block of code), e.g. the training tolerance ``tol=auto`` chose."""
    for m, name in _holders(model):
        setattr(m, name, getattr(m, name).replace(**changes))
