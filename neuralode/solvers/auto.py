"""method="auto": start explicit (dopri5), switch to the implicit kvaerno5 once the problem is stiff.

Stiffness test (Hairer & Wanner, II.15 / DOPRI5's ``nstiff``): for dopri5 the last two stages are
both evaluated at t + h, so ||k7 - k6|| / ||y7 - y6|| estimates the dominant eigenvalue |lambda|
of df/dy along the step. When h*|lambda| exceeds 3.25 (the edge of dopri5's stability region on
the negative axis) the step size is limited by stability, not accuracy. After ``STIFF_COUNT``
such attempted steps without ``RESET_COUNT`` non-stiff ones in between, the method switches to
kvaerno5 for the rest of the solve (once: there is no switch back, unlike LSODA). The switch is
logged on the "neuralode.solvers" logger and counted in ``SolveStats.n_switches`` /
``switched_at``. Every step is tagged with the sub-method that took it, so checkpoint replay
re-runs each step with the same method; the adjoint's backward solve runs its own "auto".
"""
from __future__ import annotations

import logging
import math
import weakref

import torch

from .implicit import ESDIRK, ImplicitStep
from .rk import ExplicitRK, Step, combine

logger = logging.getLogger("neuralode.solvers")

STIFF_LIMIT = 3.25
STIFF_COUNT = 15
RESET_COUNT = 6


class _TaggedStep(Step):
    __slots__ = ("tag",)


class _AutoState:
    def __init__(self, stats=None):
        self.stiff = False
        self.n_stiff = 0
        self.n_nonstiff = 0
        self.stats = stats


class AutoSwitch:
    name = "auto"
    adaptive = True
    fsal = True

    def __init__(self, explicit: ExplicitRK, implicit: ESDIRK):
        if explicit.tableau.name != "dopri5":
            raise ValueError("the stiffness estimate is written for dopri5's stages")
        self.explicit, self.implicit = explicit, implicit
        self.order = explicit.order
        self.controller_order = explicit.controller_order
        assert implicit.controller_order == self.controller_order
        self._states: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def bind(self, prob) -> None:
        self.implicit.bind(prob)
        try:
            self._states[prob.func] = _AutoState(prob.stats)
        except TypeError:
            pass

    def _state(self, func) -> _AutoState:
        try:
            st = self._states.get(func)
            if st is None:
                st = self._states[func] = _AutoState()
            return st
        except TypeError:
            return _AutoState()

    def step(self, func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, tag=None):
        st = self._state(func)
        use_implicit = st.stiff if tag is None else tag == "i"
        if use_implicit:
            s = self.implicit.step(func, t, h, y, f0)  # an ImplicitStep: dispatched on by its type
            s.tag = "i"  # recorded in the checkpoint trace, so replay re-runs this step implicitly
            return s
        s = self.explicit.step(func, t, h, y, f0)
        out = _TaggedStep(s.t, s.h, s.y, s.y1, s.ks, s.f1)
        out.tag = "e"
        if tag is None:
            self._detect(st, func, out, t, h)
        return out

    def _detect(self, st: _AutoState, func, s: Step, t: float, h: float) -> None:
        tab = self.explicit.tableau
        with torch.no_grad():
            y6 = combine(s.y.detach(), h, tab.a[4], [k.detach() for k in s.ks[:6]])  # stage 6, at t + h
            num = torch.linalg.vector_norm(s.ks[6].detach() - s.ks[5].detach())
            den = torch.linalg.vector_norm(s.y1.detach() - y6)
            num, den = torch.stack([num, den]).tolist()
        if den <= 0.0 or not math.isfinite(num):
            return
        hl = abs(h) * num / den
        if hl > STIFF_LIMIT:
            st.n_nonstiff = 0
            st.n_stiff += 1
            if st.n_stiff >= STIFF_COUNT:
                st.stiff = True
                logger.info("method='auto': stiffness detected at t=%.6g (h*|lambda|=%.3g at h=%.3g); switching %s -> %s",
                            t, hl, h, self.explicit.name, self.implicit.name)
                if st.stats is not None:
                    st.stats.n_switches += 1
                    if math.isnan(st.stats.switched_at):
                        st.stats.switched_at = t
        else:
            st.n_nonstiff += 1
            if st.n_nonstiff >= RESET_COUNT:
                st.n_stiff = 0

    def error_vectors(self, step):
        return (self.implicit if isinstance(step, ImplicitStep) else self.explicit).error_vectors(step)

    def end_derivative(self, func, step):
        return (self.implicit if isinstance(step, ImplicitStep) else self.explicit).end_derivative(func, step)

    def interpolate(self, func, step, t_out):
        return (self.implicit if isinstance(step, ImplicitStep) else self.explicit).interpolate(func, step, t_out)
