"""Plain ``nn.Module`` models; they take ordinary arguments and know nothing of the CLI."""

from neuralode.models.odeblock import ODEBlock, set_solver, solver_overrides, uses_solver
from neuralode.models.odenet import odenet, resnet
from neuralode.solvers import SolverSettings

__all__ = ["ODEBlock", "SolverSettings", "set_solver", "solver_overrides", "uses_solver", "odenet", "resnet"]
