"""One settings type from configuration to solver: :class:`SolverSettings` and the gradient modes.

A ``SolverSettings`` is immutable and validated when it is made, so a bad option fails where it is
written (a YAML file, a model's constructor) rather than at the first solve. Everything a solve
needs beyond the user's ``func``/``y0``/``t`` is in it; models hold one and call
``settings.odeint(func, y0, t)``. ``odeint(...)`` with torchdiffeq's keywords is a thin adapter
that builds one.

Gradient modes are small objects: ``Direct()``, ``Adjoint(rtol=..., seminorm=True)``,
``Checkpoint(every=k)``, ``Reversible(coupling=...)``; the strings "direct", "adjoint",
"checkpoint", "reversible" name their defaults.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import torch

# -- options ------------------------------------------------------------------------------------

ADAPTIVE_OPTIONS = frozenset({
    "first_step", "safety", "ifactor", "dfactor", "min_step", "max_step", "max_num_steps", "controller", "pcoeff",
    "icoeff", "step_t", "jump_t", "stiffness_check", "per_sample", "compact",
})
FIXED_OPTIONS = frozenset({"step_size", "grid_constructor", "perturb", "interp", "step_t", "jump_t"})
COMMON_OPTIONS = frozenset({"norm", "dtype", "max_nfe", "max_num_steps"})
IMPLICIT_OPTIONS = frozenset({"linear_solver", "batch_jacobian"})
RK_OPTIONS = frozenset({"compile"})  # explicit Runge-Kutta only
ADAMS_OPTIONS = frozenset({"max_order", "max_iters"})
SCIPY_OPTIONS = frozenset({"solver", "min_step", "max_step", "first_step"})


@dataclass(frozen=True)
class Options:
    """The ``options=`` of a solve, parsed and range-checked (names and defaults as torchdiffeq's)."""

    # adaptive step-size control
    first_step: Optional[float] = None
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    min_step: float = 0.0
    max_step: float = math.inf
    max_num_steps: Optional[int] = None  # None: 100_000 for adaptive solves, no limit on a finite fixed grid
    controller: str = "I"
    pcoeff: Optional[float] = None
    icoeff: Optional[float] = None
    step_t: Tuple[float, ...] = ()
    jump_t: Tuple[float, ...] = ()
    stiffness_check: bool = True  # explicit methods: fail fast on a sustained stiff phase
    per_sample: bool = False  # every sample (leading dimension) gets its own steps (per_sample.py)
    compact: bool = False  # per-sample: drop finished samples from the batch handed to func
    compile: Any = False  # explicit RK: torch.compile each step's stages (True: inductor, or a backend name)
    # every method
    norm: Any = None  # callable of the scaled error (a tuple for tuple states); "seminorm" for the adjoint
    dtype: Optional[torch.dtype] = None  # dtype of the time tensor handed to func
    max_nfe: Optional[int] = None  # a budget of function evaluations for the solve
    # fixed grids
    step_size: Optional[float] = None
    grid_constructor: Optional[Callable] = None
    perturb: bool = False
    interp: str = "linear"
    # implicit methods
    linear_solver: str = "auto"  # "auto" | "dense" | "gmres"
    batch_jacobian: Optional[bool] = None  # block-diagonal J over dim 0 (None: when the state has >= 2 dims)
    max_iters: Optional[int] = None  # Newton / corrector iterations (implicit fixed-grid and Adams methods)
    # Adams
    max_order: Optional[int] = None
    # scipy_solver
    solver: str = "LSODA"


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))


def _number(name: str, value, integer: bool = False):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"options[{name!r}] must be {kind}, got {value!r}")
    return int(value) if integer else float(value)


def _times(name: str, value) -> Tuple[float, ...]:
    if isinstance(value, torch.Tensor):
        value = value.detach().reshape(-1).double().cpu().tolist()
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"options[{name!r}] must be a sequence or 1-D tensor of times, got {value!r}") from None
    if not all(map(math.isfinite, out)):
        raise ValueError(f"options[{name!r}] contains NaN or Inf")
    return out


def parse_options(options: Optional[Mapping[str, Any]], method, *, adjoint: bool = False) -> Options:
    """Check names, types and ranges; warn (as torchdiffeq does) about options the method ignores."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method.name!r}; valid options: {', '.join(OPTION_NAMES)}")
    ignored = sorted(set(options) - method.option_names - COMMON_OPTIONS)
    if ignored:
        warnings.warn(f"method {method.name!r} ignores option(s) {ignored}", UserWarning, stacklevel=4)
    kw = {}
    for name, value in options.items():
        if value is None and name in ("max_num_steps", "first_step", "pcoeff", "icoeff", "step_size", "max_nfe", "dtype", "norm",
                                      "grid_constructor", "max_iters", "max_order", "batch_jacobian"):
            continue
        if name in ("step_t", "jump_t"):
            kw[name] = _times(name, value)
        elif name in ("max_num_steps", "max_nfe", "max_iters", "max_order"):
            kw[name] = _number(name, value, integer=True)
        elif name in ("first_step", "safety", "ifactor", "dfactor", "min_step", "max_step", "pcoeff", "icoeff",
                      "step_size"):
            kw[name] = _number(name, value)
        else:
            kw[name] = value
    opts = Options(**kw)
    if set(opts.step_t) & set(opts.jump_t):
        raise ValueError("`step_t` and `jump_t` must not have any repeated elements between them.")
    _check_ranges(opts, adjoint)
    return opts


def _check_ranges(o: Options, adjoint: bool) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(o.step_size is None or (o.step_size > 0 and math.isfinite(o.step_size)), f"step_size must be positive and finite, got {o.step_size}")
    need(o.first_step is None or (o.first_step > 0 and math.isfinite(o.first_step)), f"first_step must be positive and finite, got {o.first_step}")
    need(0 < o.safety <= 1, f"safety must be in (0, 1], got {o.safety}")
    need(o.ifactor >= 1, f"ifactor must be >= 1 (the largest step growth), got {o.ifactor}")
    need(0 < o.dfactor < 1, f"dfactor must be in (0, 1) (the largest step shrink), got {o.dfactor}")
    need(o.min_step >= 0 and math.isfinite(o.min_step), f"min_step must be >= 0 and finite, got {o.min_step}")
    need(o.max_step > 0, f"max_step must be positive, got {o.max_step}")
    need(o.max_step >= o.min_step, f"max_step={o.max_step} is below min_step={o.min_step}")
    need(o.max_num_steps is None or o.max_num_steps >= 1, f"max_num_steps must be >= 1, got {o.max_num_steps}")
    need(o.max_nfe is None or o.max_nfe >= 1, f"max_nfe must be >= 1, got {o.max_nfe}")
    need(o.controller in ("I", "PI"), f"controller must be 'I' or 'PI', got {o.controller!r}")
    need(o.interp in ("linear", "cubic"), f"interp must be 'linear' or 'cubic', got {o.interp!r}")
    need(o.linear_solver in ("auto", "dense", "gmres"), f"linear_solver must be 'auto', 'dense' or 'gmres', got {o.linear_solver!r}")
    need(o.max_iters is None or o.max_iters >= 1, f"max_iters must be >= 1, got {o.max_iters}")
    need(o.max_order is None or o.max_order >= 1, f"max_order must be >= 1, got {o.max_order}")
    need(isinstance(o.perturb, bool), f"perturb must be True or False, got {o.perturb!r}")
    need(isinstance(o.stiffness_check, bool), f"stiffness_check must be True or False, got {o.stiffness_check!r}")
    need(isinstance(o.per_sample, bool) and isinstance(o.compact, bool), "per_sample and compact must be True or False")
    need(not o.compact or o.per_sample, "compact applies to per-sample solves: pass per_sample=True as well")
    need(isinstance(o.compile, (bool, str)), f"compile must be True, False or a torch.compile backend name, got {o.compile!r}")
    need(not (o.compile and o.per_sample), "compile applies to joint solves; drop it with per_sample=True")
    if o.per_sample:
        for name, bad in (("step_size", o.step_size is not None), ("step_t", bool(o.step_t)), ("jump_t", bool(o.jump_t)),
                          ("grid_constructor", o.grid_constructor is not None)):
            need(not bad, f"per-sample stepping does not take {name}: every sample chooses its own steps")
    need(o.grid_constructor is None or callable(o.grid_constructor), "grid_constructor must be a callable (func, y0, t) -> grid")
    need(o.dtype is None or (isinstance(o.dtype, torch.dtype) and o.dtype.is_floating_point),
         f"dtype must be a floating torch.dtype, got {o.dtype!r}")
    norm_ok = o.norm is None or callable(o.norm) or (adjoint and o.norm == "seminorm")
    need(norm_ok, f"norm must be {'a callable or ' + repr('seminorm') if adjoint else 'a callable'}, got {o.norm!r}")


# -- gradient modes -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Direct:
    """Backpropagate through the solver's operations: exact, memory grows with the steps."""

    name = "direct"


@dataclass(frozen=True, eq=False)
class Adjoint:
    """The backsolve adjoint: O(1) memory. ``None`` fields mean 'as the forward solve' (options:
    the forward ones without ``norm``). ``seminorm`` leaves the parameter part of the adjoint
    state out of step control; ``options["norm"]`` may be a callable of the adjoint state."""

    rtol: Any = None
    atol: Any = None
    method: Optional[str] = None
    options: Optional[Mapping[str, Any]] = None
    seminorm: bool = False
    name = "adjoint"


@dataclass(frozen=True)
class Checkpoint:
    """Re-run stored segments in backward: the gradient of direct mode in bounded memory.
    The state is stored at the start of every ``every``-th accepted step."""

    every: int = 1
    name = "checkpoint"

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Checkpoint(every=...) must be an integer >= 1, got {self.every!r}")


@dataclass(frozen=True)
class Reversible:
    """Algebraically reversible steps of an explicit Runge-Kutta method (McCallum & Foster 2024):
    the exact gradient of that solve in memory independent of the number of steps, about twice
    the evaluations of a checkpointed solve. ``coupling`` (the paper's lambda) damps the
    difference of the two states the scheme carries: 1 leaves it undamped (unstable, like
    reversible Heun), lower values cost accuracy in the reconstruction (about coupling**-steps).
    ``max_error``: the largest relative error of a reconstructed output state the backward pass
    accepts before it stops with a SolverError (None: only record it)."""

    coupling: float = 0.999
    max_error: Optional[float] = 1e-3
    name = "reversible"

    def __post_init__(self):
        c = self.coupling
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 < c < 1:
            why = ("the coupled states are then undamped and the scheme is unstable (use e.g. 0.999)" if c == 1 else
                   "it must lie in (0, 1); 0.999 is a stable default")
            raise ValueError(f"Reversible(coupling={c!r}): {why}")
        e = self.max_error
        if e is not None and (isinstance(e, bool) or not isinstance(e, numbers.Real) or not e > 0):
            raise ValueError(f"Reversible(max_error={e!r}) must be a positive number or None")


GradMode = Union[Direct, Adjoint, Checkpoint, Reversible]
GRAD_MODES = ("direct", "adjoint", "checkpoint", "reversible")


def grad_mode(grad: Union[str, GradMode]) -> GradMode:
    if isinstance(grad, (Direct, Adjoint, Checkpoint, Reversible)):
        return grad
    modes = {"direct": Direct, "adjoint": Adjoint, "checkpoint": Checkpoint, "reversible": Reversible}
    if grad not in modes:
        raise ValueError(f"unknown grad mode {grad!r}; valid modes: {', '.join(GRAD_MODES)} "
                         "(or Direct(), Adjoint(...), Checkpoint(every=k), Reversible(coupling=...))")
    return modes[grad]()


# -- the settings ---------------------------------------------------------------------------------

def _check_tolerance(name: str, tol) -> Any:
    if isinstance(tol, bool):
        raise TypeError(f"{name} must be a number or a tensor, got {tol!r}")
    if isinstance(tol, numbers.Real):
        if not (tol > 0 and math.isfinite(tol)):
            raise ValueError(f"{name} must be positive and finite, got {tol}")
        return float(tol)
    if isinstance(tol, torch.Tensor) and tol.numel() == 1 and not tol.requires_grad:
        return _check_tolerance(name, tol.item())
    if not isinstance(tol, (torch.Tensor, tuple, list)):
        raise TypeError(f"{name} must be a number, a tensor or a tuple of them (tuple states), got {type(tol).__name__}")
    return tol  # tensors are checked against the state's shape when the solve starts


def _steps_per_sample(method) -> bool:
    """Adaptive one-step methods can give every sample its own steps: explicit tableaus, the ESDIRKs, auto."""
    return method.kind in ("explicit", "implicit", "auto") and method.adaptive and not method.multistep


def _check_per_sample(method, opts: Options) -> None:
    """Per-sample stepping needs adaptive one-step methods; implicit ones take block Jacobians."""
    if not _steps_per_sample(method):
        raise ValueError(f"per-sample stepping needs an adaptive explicit method (dopri5, tsit5, bosh3, dopri8, "
                         f"fehlberg2, adaptive_heun), an ESDIRK (kvaerno3, kvaerno5) or auto, got {method.name!r}")
    if method.kind != "explicit" and (opts.linear_solver == "gmres" or opts.batch_jacobian is False):
        raise ValueError("per-sample implicit stepping solves one Newton system per sample with a dense Jacobian "
                         "block: drop linear_solver='gmres' / batch_jacobian=False, or solve jointly (without per_sample)")


def _check_reversible(method, opts: Options) -> None:
    """The reversible scheme is built from one explicit Runge-Kutta step (a tableau)."""
    if method.kind != "explicit" or method.multistep:
        what = "a multistep method" if method.kind == "explicit" else f"not an explicit Runge-Kutta method ({method.kind})"
        raise ValueError(f"grad='reversible' needs an explicit Runge-Kutta method (dopri5, tsit5, bosh3, dopri8, rk4, ...); "
                         f"{method.name!r} is {what}: use grad='checkpoint' (exact, bounded memory) or grad='direct'")
    if opts.perturb:
        raise ValueError("grad='reversible' does not support options['perturb']; use grad='checkpoint' or grad='direct'")
    if opts.per_sample:
        raise ValueError("grad='reversible' does not support options['per_sample'] (one step sequence per sample); "
                         "use grad='checkpoint' (exact, bounded memory), grad='direct' or grad='adjoint'")


@dataclass(frozen=True, eq=False)
class SolverSettings:
    """Method, tolerances, options and gradient mode of a solve (validated on construction)."""

    method: str = "dopri5"
    rtol: Any = 1e-7
    atol: Any = 1e-9
    options: Mapping[str, Any] = field(default_factory=dict)
    grad: Any = field(default_factory=Direct)
    parsed: Options = field(init=False, repr=False)  # ``options`` checked and typed
    adjoint_parsed: Optional[Options] = field(init=False, repr=False, default=None)

    def __post_init__(self):
        from .methods import get_method

        method = get_method(self.method)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once, here)
        set_("method", method.name)
        set_("rtol", _check_tolerance("rtol", self.rtol))
        set_("atol", _check_tolerance("atol", self.atol))
        set_("options", dict(self.options or {}))
        set_("grad", grad_mode(self.grad))
        set_("parsed", parse_options(self.options, method))
        if self.parsed.norm == "seminorm":
            raise ValueError("norm='seminorm' applies to the adjoint solve: pass it in adjoint_options")
        if isinstance(self.grad, Reversible):
            _check_reversible(method, self.parsed)
        if self.parsed.per_sample:
            _check_per_sample(method, self.parsed)
        if not isinstance(self.grad, Direct) and not method.supports_backward_modes:
            raise ValueError(f"method {method.name!r} supports only grad='direct'")
        if isinstance(self.grad, Adjoint):
            adj = get_method(self.grad.method or method.name)
            if not adj.supports_adjoint_solve:
                raise ValueError(f"adjoint_method={adj.name!r} cannot solve the adjoint's augmented system; "
                                 "use an explicit or ESDIRK method")
            _check_tolerance("adjoint_rtol", self.grad.rtol) if self.grad.rtol is not None else None
            _check_tolerance("adjoint_atol", self.grad.atol) if self.grad.atol is not None else None
            set_("adjoint_parsed", parse_options(self.adjoint_options(), adj, adjoint=True))

    @property
    def adaptive(self) -> bool:
        """Whether this solve controls its step size (False for fixed grids and given step sizes)."""
        from .methods import get_method

        return get_method(self.method).adaptive and self.parsed.step_size is None

    @property
    def per_sample_capable(self) -> bool:
        """Whether ``options["per_sample"]`` could apply to these settings (method, step size, gradient mode)."""
        from .methods import get_method

        return self.adaptive and _steps_per_sample(get_method(self.method)) and not isinstance(self.grad, Reversible)

    def adjoint_options(self) -> dict:
        """The backward solve's options: the adjoint's own when given, else (as torchdiffeq does)
        the forward ones without ``norm`` when the method is the same."""
        g = self.grad
        if g.options is not None:
            out = dict(g.options)
        elif g.method is None or g.method == self.method:
            out = {k: v for k, v in self.options.items() if k != "norm"}
        else:
            out = {}
        if g.seminorm:
            out["norm"] = "seminorm"
        return out

    def replace(self, **changes) -> "SolverSettings":
        """A copy with fields or option values changed: ``s.replace(rtol=1e-5, atol=1e-5)``,
        ``s.replace(step_size=0.1)`` (option names merge into ``options``)."""
        fields = {f.name for f in dataclasses.fields(self) if f.init}
        opts = {k: changes.pop(k) for k in list(changes) if k not in fields}
        if opts:
            changes["options"] = {**changes.get("options", self.options), **opts}
        return dataclasses.replace(self, **changes)

    def odeint(self, func: Callable, y0, t: torch.Tensor, *, event_fn: Optional[Callable] = None,
               adjoint_params=None, error_estimates: Optional[list] = None):
        """Solve dy/dt = func(t, y) with these settings (see :func:`neuralode.odeint`). A list passed
        as ``error_estimates`` receives the solve's accepted-step ``[error, stiffness]`` terms, differentiable
        (direct and checkpoint modes, adaptive explicit methods; :func:`neuralode.solvers.odeint.solve_ivp`)."""
        from .odeint import solve_ivp

        return solve_ivp(self, func, y0, t, event_fn=event_fn, adjoint_params=adjoint_params,
                         error_estimates=error_estimates)
