"""method="auto": start explicit (dopri5), switch to the implicit kvaerno5 once the problem is stiff.

Stiffness test (Hairer & Wanner, II.15 / DOPRI5's ``nstiff``): for dopri5 the last two stages are
both evaluated at t + h, so ||k7 - k6|| / ||y7 - y6|| estimates the dominant eigenvalue |lambda|
of df/dy along the step. When h*|lambda| exceeds the edge of dopri5's stability region on the
negative axis (about 3.3) the step size is limited by stability, not accuracy. After 15 such
estimates without 6 non-stiff ones in between, the solve switches to kvaerno5 for good (there is
no switch back, unlike LSODA). The switch is logged on the "neuralode.solvers" logger and counted
in ``SolveStats.n_switches`` / ``switched_at``.

The switch state lives in the solve's :class:`AutoStepper` (``AutoSwitch.start``), never on the
method. Every step is tagged with the sub-method that took it, so checkpoint replay re-runs each
step with the same method; the adjoint's backward solve runs its own "auto".
"""
from __future__ import annotations

import logging
import math

import torch

from .implicit import ESDIRK
from .rk import ExplicitRK, Step
from .settings import ADAPTIVE_OPTIONS, IMPLICIT_OPTIONS, RK_OPTIONS

logger = logging.getLogger("neuralode.solvers")


class AutoSwitch:
    kind = "auto"
    name = "auto"
    adaptive = True
    fsal = True
    supports_adjoint_solve = True
    supports_backward_modes = True
    multistep = False
    option_names = ADAPTIVE_OPTIONS | IMPLICIT_OPTIONS | RK_OPTIONS | {"step_size"}  # compile: the explicit steps

    def __init__(self, explicit: ExplicitRK, implicit: ESDIRK):
        if explicit.stiff_stage is None:
            raise ValueError("the stiffness estimate needs two stages at t + h")
        self.explicit, self.implicit = explicit, implicit
        self.order = explicit.order
        self.controller_order = explicit.controller_order
        assert implicit.controller_order == self.controller_order

    def start(self, prob) -> "AutoStepper":
        return AutoStepper(self, prob)


class AutoStepper:
    """One solve's explicit and implicit steppers and which of them is in charge."""

    def __init__(self, method: AutoSwitch, prob):
        self.method = method
        self.order, self.controller_order, self.fsal = method.order, method.controller_order, True
        self.explicit = method.explicit.start(prob, watch=True)
        self.implicit = method.implicit.start(prob)
        self.stats = prob.stats
        self.stiff = False

    def _for(self, step: Step):
        return self.implicit if step.tag == "i" else self.explicit

    def step(self, func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, tag=None) -> Step:
        implicit = self.stiff if tag is None else tag == "i"
        step = (self.implicit if implicit else self.explicit).step(func, t, h, y, f0)
        step.tag = "i" if implicit else "e"  # recorded in the checkpoint trace, so replay re-runs it alike
        return step

    def error(self, step: Step, abs_y: torch.Tensor):
        return self._for(step).error(step, abs_y)

    def accepted(self, step: Step, n_steps: int, t_end: float, max_steps: int) -> None:
        if step.tag == "i" or not self.explicit.observe():
            return
        self.stiff = True
        t = step.t + step.h
        logger.info("method='auto': stiffness detected at t=%.6g (h*|lambda|=%.3g at h=%.3g); switching %s -> %s",
                    t, self.explicit.hl, step.h, self.method.explicit.name, self.method.implicit.name)
        if self.stats is not None:
            self.stats.n_switches += 1
            if math.isnan(self.stats.switched_at):
                self.stats.switched_at = t

    def end_derivative(self, func, step: Step):
        return self._for(step).end_derivative(func, step)

    def interpolate(self, func, step: Step, t_out: float):
        return self._for(step).interpolate(func, step, t_out)
