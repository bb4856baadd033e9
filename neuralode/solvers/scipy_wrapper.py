"""method="scipy_solver": the whole solve handed to ``scipy.integrate.solve_ivp``, as torchdiffeq does.

Options: ``solver`` (solve_ivp's method, default "LSODA"; RK45, RK23, DOP853, Radau, BDF or an
OdeSolver class), ``min_step``, ``max_step``, ``first_step``; rtol/atol (per component too) go
to solve_ivp unchanged. Outputs come from solve_ivp's dense output at ``t`` (``t_eval``).

What it cannot do, by design (scipy works on NumPy copies of the state):

* no gradients: ``func`` runs under ``torch.no_grad()`` and the outputs never require grad,
  whatever ``y0``, ``t`` or the parameters require (torchdiffeq behaves the same way), and the
  adjoint and checkpoint modes are refused;
* no events and no callbacks;
* complex states only with the solvers scipy integrates in the complex domain (RK45, RK23,
  DOP853, BDF); LSODA and Radau refuse them.

Decreasing ``t`` is solved in negated time, like torchdiffeq, so both give the same numbers.
``func`` receives t as a 0-dim tensor in the state's real dtype; its evaluations (including the
finite-difference Jacobians of the stiff solvers) count towards the NFE statistics and
``options['max_nfe']``.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from .errors import MaxStepsError, SolverError
from .settings import SCIPY_OPTIONS


def _numpy_tolerance(tol):
    return tol if isinstance(tol, float) else tol.detach().cpu().double().numpy()


class ScipySolver:
    """The solve_ivp wrapper; it has no stepper: ``integrate.solve`` hands it the whole solve."""

    name = "scipy_solver"
    kind = "scipy"
    adaptive = False  # as torchdiffeq classifies it: not one of its step-size-controlled solvers
    fsal = False
    order = None  # scipy's choice (LSODA and BDF vary it)
    controller_order = None
    supports_adjoint_solve = False
    supports_backward_modes = False
    multistep = False
    option_names = SCIPY_OPTIONS

    def integrate(self, prob, y0: torch.Tensor, ts: Sequence[float], event=None) -> List[torch.Tensor]:
        """The states at ``ts`` (detached)."""
        if event is not None:
            raise ValueError("method 'scipy_solver' does not support event_fn; use an adaptive method such as dopri5")
        if len(ts) == 1:
            return [y0.detach().clone()]
        try:
            from scipy.integrate import solve_ivp
        except ImportError as err:
            raise ImportError("method='scipy_solver' needs SciPy: pip install scipy") from err
        o, stats = prob.opts, prob.stats
        sign = 1.0 if ts[-1] > ts[0] else -1.0
        shape, dtype, device = y0.shape, y0.dtype, y0.device
        reached = [ts[0]]  # the latest time func was called at, for the error message

        def fun(t, y):
            reached[0] = sign * float(t)
            if o.max_nfe is not None and stats is not None and stats.nfe_forward >= o.max_nfe:
                raise MaxStepsError(f"scipy_solver: max_nfe={o.max_nfe} function evaluations used up at "
                                    f"t={reached[0]:.6g}; raise options['max_nfe'] or loosen the tolerance")
            with torch.no_grad():
                f = prob.func(sign * float(t), torch.tensor(y).to(device, dtype).reshape(shape))
            f = f if sign > 0 else -f
            return f.detach().cpu().numpy().reshape(-1)

        times = np.array([sign * t for t in ts], dtype=np.float64)
        kwargs = dict(method=o.solver, rtol=_numpy_tolerance(prob.tol.rtol), atol=_numpy_tolerance(prob.tol.atol),
                      max_step=o.max_step)
        if o.min_step > 0:
            kwargs["min_step"] = o.min_step
        if o.first_step is not None:
            kwargs["first_step"] = o.first_step
        sol = solve_ivp(fun, (times[0], times[-1]), y0.detach().cpu().numpy().reshape(-1), t_eval=times, **kwargs)
        if not sol.success:
            raise SolverError(f"scipy_solver ({o.solver}) failed near t={reached[0]:.6g}: {sol.message}")
        ys = torch.tensor(sol.y.T).to(device, dtype).reshape(len(ts), *shape)
        return list(ys.unbind(0))


SCIPY_METHODS = {"scipy_solver": ScipySolver()}
