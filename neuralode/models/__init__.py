"""Plain ``nn.Module`` models; they take ordinary arguments and know nothing of the CLI."""

from neuralode.models.odeblock import ODEBlock, SolverSettings, solver_overrides
from neuralode.models.odenet import odenet, resnet

__all__ = ["ODEBlock", "SolverSettings", "solver_overrides", "odenet", "resnet"]
