"""neuralode: Neural ODEs with our own differentiable solvers, and a Hydra experiment runner."""
from .solvers import (
    GRAD_MODES, METHODS, MaxStepsError, NonFiniteError, SolverError, StepSizeUnderflowError, odeint, odeint_adjoint,
    odeint_event,
    record_stats,
)

__all__ = [
    "odeint", "odeint_adjoint", "odeint_event", "record_stats", "SolverError", "StepSizeUnderflowError", "MaxStepsError",
    "NonFiniteError", "METHODS", "GRAD_MODES",
]
