"""Differentiable ODE solvers: explicit and implicit Runge-Kutta methods, dense output, four gradient modes."""
from .errors import (MaxStepsError, NonFiniteError, SolverError, StepSizeUnderflowError, StiffnessError,
                     ToleranceError)
from .dense import DenseSolution, odeint_dense
from .events import odeint_event
from .methods import METHODS, get_method
from .odeint import odeint, odeint_adjoint
from .settings import GRAD_MODES, Adjoint, Checkpoint, Direct, Reversible, SolverSettings
from .stats import MemoryWatch, SolveStats, StatsRecorder, record_stats
from .tableau import TABLEAUS, ButcherTableau

__all__ = [
    "odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "DenseSolution", "SolverSettings", "Direct", "Adjoint", "Checkpoint", "Reversible", "record_stats",
    "MemoryWatch",
    "SolveStats", "StatsRecorder", "SolverError", "StepSizeUnderflowError", "MaxStepsError", "NonFiniteError",
    "StiffnessError", "ToleranceError", "ButcherTableau", "TABLEAUS", "METHODS", "GRAD_MODES", "get_method",
]
