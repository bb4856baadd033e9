"""Solver failures. They subclass RuntimeError so generic handlers still catch them."""


class SolverError(RuntimeError):
    """The integration could not be completed; the message gives t, dt and a remedy."""


class StepSizeUnderflowError(SolverError):
    pass


class MaxStepsError(SolverError):
    pass


class NonFiniteError(SolverError):
    pass


STIFF_HINT = (
    "Try a looser tolerance (rtol/atol), smooth activations (softplus/tanh instead of ReLU) in the "
    "vector field, a smaller learning rate, or a stiff solver if the dynamics are stiff."
)
