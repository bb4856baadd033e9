"""Solver failures. They subclass RuntimeError so generic handlers still catch them."""


class SolverError(RuntimeError):
    """The integration could not be completed; the message gives t, dt and a remedy."""


class StepSizeUnderflowError(SolverError):
    pass


class MaxStepsError(SolverError):
    """``max_num_steps`` or ``max_nfe`` was exhausted."""


class NonFiniteError(SolverError):
    """NaN or Inf in the state or in what ``func`` returned."""


class StiffnessError(SolverError):
    """An explicit method spent a sustained stretch of steps at its stability limit."""


class ToleranceError(SolverError, ValueError):
    """A tolerance the state's dtype cannot resolve (also a ValueError: it is bad input)."""


STIFF_HINT = (
    "Try a looser tolerance (rtol/atol), smooth activations (softplus/tanh instead of ReLU) in the "
    "vector field, a smaller learning rate, or a stiff solver if the dynamics are stiff."
)
