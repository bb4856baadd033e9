"""neuralode: Neural ODEs with our own differentiable solvers, and a Hydra experiment runner."""
from .solvers import (
    GRAD_MODES, METHODS, Adjoint, Checkpoint, Direct, MaxStepsError, NonFiniteError, Reversible, SolverError,
    SolverSettings, StepSizeUnderflowError, StiffnessError, ToleranceError, odeint, odeint_adjoint, odeint_dense,
    odeint_event, record_stats,
)

__all__ = [
    "odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "SolverSettings", "Direct", "Adjoint", "Checkpoint",
    "Reversible", "record_stats", "SolverError", "StepSizeUnderflowError", "MaxStepsError", "NonFiniteError",
    "StiffnessError", "ToleranceError", "METHODS", "GRAD_MODES",
]
