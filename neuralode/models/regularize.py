"""Training-time regularisers of a model's ODE solves, for every model family (issue 17).

- **RNODE** (Finlay et al. 2020): the solve also integrates, per sample, the kinetic energy
  ``∫‖f‖² dt`` and the Jacobian Frobenius norm ``∫‖∂f/∂y‖²_F dt`` (Hutchinson: ``‖εᵀ ∂f/∂y‖²``
  with Gaussian ε drawn once per solve), alongside the state, on the same steps; the loss adds
  ``kinetic · mean_b E + jacobian · mean_b J`` summed over the model's solves.
- **STEER** (Ghosh et al. 2020): a solve from ``t0`` to a single end time ``t1`` (ODE blocks, CNF
  blocks, the ODE-RNN encoder's gaps) ends instead at ``t1 ± U(-b, b)`` during training; solves
  on an output grid (a latent ODE's observation times) keep their times.
- **Error and stiffness** (Pal et al. 2021): the sums over accepted steps of the solver's scaled
  local error estimate (the step-size controller's ratio) and of its stiffness estimate ``|h|·|λ|``
  (Hairer's, from the two stages at ``t + h`` of dopri5, tsit5, ...), differentiated through the
  stages with the steps held fixed; the solver hands them over through a list passed explicitly to
  each solve (``SolverSettings.odeint(..., error_estimates=[])``). Direct and checkpoint gradient
  modes, adaptive explicit methods.

Nothing changes outside :meth:`Regularization.collect`: evaluation, figures and the test-time
tolerance sweep solve exactly as without a regulariser (STEER evaluates at ``T``).

How it reaches every family without touching their code: :func:`install` replaces every
:class:`~neuralode.solvers.SolverSettings` a model holds (the same holders
:func:`~neuralode.models.solver_overrides` finds) by a :class:`RegularizedSettings`, a subclass
that carries the run's :class:`Regularization` explicitly and, while it collects, hands each
solve's integrals to it. A weight of 0 (or ``b = 0``) turns its term off: the solve is then the
plain one, bit for bit, and draws no random numbers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from neuralode.solvers import SolverSettings


class RNODEField(nn.Module):
    """``(y..., E, J)`` dynamics for one solve: the user's field plus the per-sample integrands
    ``‖f‖²`` and ``‖εᵀ∂f/∂y‖²``. The noise ε is fixed when the field is made (once per solve), so an
    adjoint or checkpoint backward pass sees what the forward pass saw."""

    def __init__(self, func: Callable, parts: int, is_tuple: bool, noise: tuple[torch.Tensor, ...] | None):
        super().__init__()
        self.func, self.parts, self.is_tuple, self.noise = func, parts, is_tuple, noise

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        ys = state[:self.parts]
        if self.noise is None:  # kinetic energy only: no Jacobian product needed
            fs = self._call(t, ys)
            return (*fs, _sq(fs), torch.zeros_like(state[-1]))
        graph = torch.is_grad_enabled()  # direct mode or the adjoint's VJP: keep the integrands differentiable
        with torch.enable_grad():
            ys = tuple(y if graph and y.requires_grad else y.detach().requires_grad_(True) for y in ys)
            fs = self._call(t, ys)
            used = [(f, e) for f, e in zip(fs, self.noise) if f.requires_grad]
            if used:
                vjp = torch.autograd.grad([f for f, _ in used], ys, [e for _, e in used], create_graph=graph,
                                          allow_unused=True)
                frob = _sq(tuple(v for v in vjp if v is not None)) if any(v is not None for v in vjp) \
                    else torch.zeros_like(state[-1])
            else:
                frob = torch.zeros_like(state[-1])
        out = (*fs, _sq(fs), frob)
        return out if graph else tuple(o.detach() for o in out)

    def _call(self, t: torch.Tensor, ys: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        f = self.func(t, ys if self.is_tuple else ys[0])
        return tuple(f) if self.is_tuple else (f,)


def _sq(fs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-sample squared norm summed over the parts (leading dimension: the batch)."""
    return sum(f.pow(2).reshape(f.shape[0], -1).sum(1) for f in fs)  # type: ignore[return-value]


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


class Regularization:
    """The run's regularisers and what one training iteration's solves contributed to them.

    ``kinetic``/``jacobian``: RNODE weights (0: off); ``steer_b``: STEER half-width (0: off);
    ``error``/``stiffness``: weights of the summed local error and stiffness estimates (0: off)."""

    def __init__(self, kinetic: float = 0.0, jacobian: float = 0.0, steer_b: float = 0.0, error: float = 0.0,
                 stiffness: float = 0.0):
        for name, v in (("kinetic", kinetic), ("jacobian", jacobian), ("steer_b", steer_b), ("error", error),
                        ("stiffness", stiffness)):
            if not v >= 0:
                raise ValueError(f"Regularization({name}={v}) must be >= 0")
        self.kinetic_weight, self.jacobian_weight, self.steer_b = float(kinetic), float(jacobian), float(steer_b)
        self.error_weight, self.stiffness_weight = float(error), float(stiffness)
        self.active = False
        self._reset()

    @property
    def rnode(self) -> bool:
        return self.kinetic_weight > 0 or self.jacobian_weight > 0

    @property
    def enabled(self) -> bool:
        return self.rnode or self.steer_b > 0 or self.estimates

    @property
    def estimates(self) -> bool:
        """Whether the solves hand over their steps' error and stiffness estimates."""
        return self.error_weight > 0 or self.stiffness_weight > 0

    def _reset(self) -> None:
        self.kinetic: list[torch.Tensor] = []  # per solve: mean over the batch of ∫‖f‖²
        self.jacobian: list[torch.Tensor] = []
        self.end_times: list[float] = []  # per STEER'd solve: the sampled duration
        self.errors: list[torch.Tensor] = []  # per solve: the sum of its accepted steps' [error, stiffness]

    @contextlib.contextmanager
    def collect(self) -> Iterator["Regularization"]:
        """Regularise the solves run inside (one training iteration's forward pass)."""
        self._reset()
        self.active = self.enabled
        try:
            yield self
        finally:
            self.active = False

    def penalty(self) -> torch.Tensor | float:
        """What the collected solves add to the loss (0.0 when nothing was collected)."""
        out: Any = 0.0
        if self.kinetic_weight > 0 and self.kinetic:
            out = out + self.kinetic_weight * torch.stack(self.kinetic).sum()
        if self.jacobian_weight > 0 and self.jacobian:
            out = out + self.jacobian_weight * torch.stack(self.jacobian).sum()
        if self.estimates and self.errors:
            sums = torch.stack(self.errors).sum(0)
            for weight, term in zip((self.error_weight, self.stiffness_weight), sums):
                if weight > 0:  # an unused term stays out of the graph
                    out = out + weight * term
        return out

    def logs(self) -> dict[str, float]:
        """``reg/<name>`` scalars of the iteration: the weighted RNODE penalty and its two raw
        integrals, and STEER's mean sampled duration."""
        out: dict[str, float] = {}
        if self.rnode and self.kinetic:
            k, j = (float(torch.stack(v).detach().sum()) for v in (self.kinetic, self.jacobian))
            out.update({"rnode": self.kinetic_weight * k + self.jacobian_weight * j, "rnode_kinetic": k,
                        "rnode_jacobian": j})
        if self.end_times:
            out["steer"] = sum(self.end_times) / len(self.end_times)
        if self.estimates and self.errors:
            e, s = torch.stack(self.errors).detach().sum(0).tolist()
            if self.error_weight > 0:
                out.update({"error": self.error_weight * e, "error_sum": e})
            if self.stiffness_weight > 0:
                out.update({"stiffness": self.stiffness_weight * s, "stiffness_sum": s})
        return out

    # -- one solve ---------------------------------------------------------------------------------
    def solve(self, settings: SolverSettings, func: Callable, y0: Any, t: torch.Tensor, adjoint_params=None):
        if self.steer_b > 0 and t.ndim == 1 and t.numel() == 2:
            t = self._steer(t)
        sink = [] if self.estimates else None
        out = self._solve(settings, func, y0, t, adjoint_params, sink)
        if sink is not None:
            self.errors.append(torch.stack(sink).sum(0) if sink else t.new_zeros(2))
        return out

    def _solve(self, settings: SolverSettings, func: Callable, y0: Any, t: torch.Tensor, adjoint_params, sink):
        if not self.rnode:
            return settings.odeint(func, y0, t, adjoint_params=adjoint_params, error_estimates=sink)
        is_tuple = isinstance(y0, tuple)
        parts = tuple(y0) if is_tuple else (y0,)
        noise = tuple(torch.randn_like(p) for p in parts) if self.jacobian_weight > 0 else None
        field_ = RNODEField(func, len(parts), is_tuple, noise)
        zeros = parts[0].new_zeros(parts[0].shape[0])
        user = settings.parsed.norm
        n = len(parts)
        if user is not None:  # the user's norm of the original state; the integrals never set the steps
            norm = (lambda s: user(tuple(s[:n]))) if is_tuple else (lambda s: user(s[0]))
        else:  # the solver's default norm of the original state (max over its tensors of their RMS)
            norm = lambda s: torch.stack([_rms(p) for p in s[:n]]).max()  # noqa: E731
        out = settings.replace(norm=norm).odeint(field_, (*parts, zeros, zeros), t, adjoint_params=adjoint_params,
                                                 error_estimates=sink)
        self.kinetic.append(out[n][-1].mean())
        self.jacobian.append(out[n + 1][-1].mean())
        return tuple(out[:n]) if is_tuple else out[0]

    def _steer(self, t: torch.Tensor) -> torch.Tensor:
        """[t0, t1] -> [t0, t1 + U(-b, b)] (in the direction of time)."""
        u = float(torch.rand(())) * 2 - 1
        direction = 1.0 if float(t[1]) >= float(t[0]) else -1.0
        end = t[1] + direction * self.steer_b * u
        self.end_times.append(abs(float(end - t[0])))
        return torch.stack([t[0], end])


@dataclass(frozen=True, eq=False)
class RegularizedSettings(SolverSettings):
    """Solver settings that regularise their solves while ``regularization`` collects (training);
    otherwise exactly the plain settings. ``replace`` keeps the regularisation."""

    regularization: Any = None
    plain: SolverSettings = field(init=False, repr=False, default=None)  # type: ignore[assignment]

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "plain", SolverSettings(method=self.method, rtol=self.rtol, atol=self.atol,
                                                         options=self.options, grad=self.grad))

    def odeint(self, func: Callable, y0, t: torch.Tensor, *, event_fn=None, adjoint_params=None):
        reg = self.regularization
        if reg is None or not reg.active or event_fn is not None:
            return self.plain.odeint(func, y0, t, event_fn=event_fn, adjoint_params=adjoint_params)
        return reg.solve(self.plain, func, y0, t, adjoint_params)


def install(model: nn.Module, regularization: Regularization) -> int:
    """Make every solve of ``model`` report to ``regularization``; returns how many solver
    settings it wrapped (0: the model solves no ODE)."""
    from neuralode.models.odeblock import _holders

    holders = _holders(model)
    for m, name in holders:
        s = getattr(m, name)
        plain = s.plain if isinstance(s, RegularizedSettings) else s
        setattr(m, name, RegularizedSettings(method=plain.method, rtol=plain.rtol, atol=plain.atol,
                                             options=plain.options, grad=plain.grad, regularization=regularization))
    return len(holders)

