"""The ODE block shared by every model family: ``h(1) = h(0) + ∫_0^1 f(t, h) dt``.

Models receive a :class:`SolverSettings` (plain data, no Hydra) so they can be
built and tested without the CLI; test-time tolerance changes go through
:func:`solver_overrides` instead of rebuilding the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class SolverSettings:
    """Arguments for ``neuralode.odeint`` that stay fixed across calls."""

    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    grad: str = "adjoint"  # direct | adjoint | checkpoint
    seminorm: bool = False
    step_size: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    adjoint_rtol: float | None = None
    adjoint_atol: float | None = None
    adjoint_method: str | None = None
    adjoint_options: dict[str, Any] = field(default_factory=dict)

    def odeint_kwargs(self) -> dict[str, Any]:
        options = dict(self.options)
        if self.step_size is not None:
            options["step_size"] = self.step_size
        adjoint_options = dict(self.adjoint_options)
        if self.seminorm:
            adjoint_options["norm"] = "seminorm"
        kwargs: dict[str, Any] = dict(
            rtol=self.rtol, atol=self.atol, method=self.method, options=options or None, grad=self.grad
        )
        if self.grad != "direct":
            kwargs.update(
                adjoint_rtol=self.adjoint_rtol,
                adjoint_atol=self.adjoint_atol,
                adjoint_method=self.adjoint_method,
                adjoint_options=adjoint_options or None,
            )
        return kwargs


class ODEBlock(nn.Module):
    """Integrates ``func`` from t=0 to t=1 and returns the final state."""

    def __init__(self, func: nn.Module, solver: SolverSettings):
        super().__init__()
        self.func = func
        self.solver = solver
        self.register_buffer("t", torch.tensor([0.0, 1.0]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from neuralode import odeint  # the solver package imports nothing from models

        return odeint(self.func, x, self.t.to(x.dtype), **self.solver.odeint_kwargs())[-1]


@contextlib.contextmanager
def solver_overrides(model: nn.Module, **changes: Any) -> Iterator[None]:
    """Temporarily change solver settings (e.g. ``rtol``) of every ODE block in ``model``."""
    blocks = [m for m in model.modules() if isinstance(m, ODEBlock)]
    saved = [b.solver for b in blocks]
    for b in blocks:
        b.solver = dataclasses.replace(b.solver, **changes)
    try:
        yield
    finally:
        for b, s in zip(blocks, saved):
            b.solver = s
