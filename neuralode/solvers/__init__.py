"""Differentiable ODE solvers: explicit Runge-Kutta methods, dense output, three gradient modes."""
from .errors import MaxStepsError, NonFiniteError, SolverError, StepSizeUnderflowError
from .events import odeint_event
from .odeint import GRAD_MODES, odeint, odeint_adjoint
from .stats import SolveStats, StatsRecorder, record_stats
from .methods import METHODS
from .tableau import TABLEAUS, ButcherTableau
__all__ = [
    "odeint", "odeint_adjoint", "odeint_event", "record_stats", "SolveStats", "StatsRecorder", "SolverError",
    "StepSizeUnderflowError", "MaxStepsError", "NonFiniteError", "ButcherTableau", "TABLEAUS", "METHODS", "GRAD_MODES",
]
