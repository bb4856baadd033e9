"""Solver failures. They subclass RuntimeError so generic handlers still catch them."""


class SolverError(RuntimeError):
    """The integration could not be completed; the message gives t, dt and a remedy."""


class StepSizeUnderflowError(SolverError, AssertionError):
    """The step size fell below what the time grid can resolve. Also an AssertionError: that is
    what torchdiffeq raises ("underflow in dt"), and code written for it may catch that."""


class MaxStepsError(SolverError, AssertionError):
    """``max_num_steps`` or ``max_nfe`` was exhausted (an AssertionError too, as in torchdiffeq)."""


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
