"""The public, torchdiffeq-compatible entry points: input checks, tuple states, gradient modes."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adjoint import BacksolveAdjoint, adjoint_norm
from .checkpoint import CheckpointedSolve
from .integrate import Options, Problem, rms_norm, solve
from .stats import SolveStats, new_solve_stats
from .methods import METHODS

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]
GRAD_MODES = ("direct", "adjoint", "checkpoint")
_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))


class _Structure:
    """Flattens a tuple state into one 1-D tensor and back; a lone tensor passes through."""

    def __init__(self, y0: State):
        self.is_tuple = isinstance(y0, (tuple, list))
        parts = tuple(y0) if self.is_tuple else (y0,)
        self.shapes = [p.shape for p in parts]
        self.sizes = [p.numel() for p in parts]

    def flatten(self, y: State) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in y]) if self.is_tuple else y

    def unflatten(self, y: torch.Tensor, lead: Tuple[int, ...] = ()) -> State:
        if not self.is_tuple:
            return y
        return tuple(p.reshape((*lead, *s)) for p, s in zip(torch.split(y, self.sizes, dim=-1), self.shapes))


class _Func:
    """Calls the user's func(t, y) on the solver's flat float-time interface and counts evaluations.
    The first call checks the returned shape and dtype against y0."""

    def __init__(self, func: Callable, structure: _Structure, t_dtype: torch.dtype, device, dtype, stats: SolveStats, backward: bool):
        self.func, self.structure, self.t_dtype, self.device, self.dtype = func, structure, t_dtype, device, dtype
        self.stats, self.backward, self.checked = stats, backward, False

    def raw(self, t: float, y: torch.Tensor) -> torch.Tensor:
        out = self.func(torch.full((), t, dtype=self.t_dtype, device=self.device), self.structure.unflatten(y))
        if not self.checked:
            self._check(out)
        return self.structure.flatten(out)

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        if self.backward:
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe_forward += 1
        return self.raw(t, y)

    def _check(self, out) -> None:
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(self.structure.shapes) or isinstance(out, (tuple, list)) != self.structure.is_tuple:
            raise ValueError(f"func must return the same structure as y0: {len(self.structure.shapes)} tensor(s), got {type(out).__name__}")
        for o, shape in zip(outs, self.structure.shapes):
            if not isinstance(o, torch.Tensor):
                raise TypeError(f"func must return tensors, got {type(o).__name__}")
            if o.shape != shape:
                raise ValueError(f"func returned shape {tuple(o.shape)} but y0 has shape {tuple(shape)}; dy/dt must match y.")
            if o.dtype != self.dtype:
                raise TypeError(f"func returned dtype {o.dtype} but y0 has dtype {self.dtype}; cast inside func.")
        self.checked = True


def _check_t(t) -> Tuple[float, ...]:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D tensor of times, got {type(t).__name__}")
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"t must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"t must be floating point, got {t.dtype}; use torch.linspace or t.float()")
    ts = tuple(t.detach().double().cpu().tolist())
    if not all(map(math.isfinite, ts)):
        raise ValueError("t contains NaN or Inf")
    diffs = [b - a for a, b in zip(ts, ts[1:])]
    if diffs and not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError("t must be strictly increasing or strictly decreasing (no repeats); sort it first")
    return ts


def _check_y0(y0) -> None:
    parts = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
    if not parts:
        raise ValueError("y0 is an empty tuple")
    for p in parts:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"y0 must be a tensor or a tuple of tensors, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"y0 must be floating point, got {p.dtype}; convert with y0.float() or y0.double()")
    if len({(p.dtype, p.device) for p in parts}) > 1:
        raise TypeError("all tensors of a tuple y0 must share one dtype and device")
    if not bool(torch.stack([torch.isfinite(p).all() for p in parts]).all()):
        raise ValueError("y0 contains NaN or Inf")


def _tolerance(name: str, tol, structure: _Structure, like: torch.Tensor):
    """A positive float, or a flat tensor matching the flattened state."""
    if isinstance(tol, (int, float)) and not isinstance(tol, bool):
        if not tol > 0:
            raise ValueError(f"{name} must be positive, got {tol}")
        return float(tol)
    parts = tuple(tol) if structure.is_tuple and isinstance(tol, (tuple, list)) else None
    tols = parts if parts is not None else (tol,) * len(structure.shapes)
    flat = []
    for tl, shape in zip(tols, structure.shapes):
        tl = torch.as_tensor(tl, dtype=like.dtype, device=like.device)
        try:
            tl = tl.expand(shape) if structure.is_tuple else torch.broadcast_to(tl, shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(tl.shape)} does not broadcast to the state shape {tuple(shape)}") from None
        if not bool((tl > 0).all()):
            raise ValueError(f"{name} must be positive everywhere")
        flat.append(tl.reshape(-1) if structure.is_tuple else tl)
    return torch.cat(flat) if structure.is_tuple else flat[0]


def _options(options: Optional[dict], method: str, allow_seminorm: bool = False) -> Options:
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {', '.join(_OPTION_NAMES)}")
    opts = Options(**options)
    if opts.step_size is not None and not opts.step_size > 0:
        raise ValueError(f"step_size must be positive, got {opts.step_size}")
    if opts.step_size is None and not METHODS[method].adaptive:
        raise ValueError(f"method {method!r} is fixed-step: pass options=dict(step_size=...)")
    if opts.controller not in ("I", "PI"):
        raise ValueError(f"controller must be 'I' or 'PI', got {opts.controller!r}")
    if not opts.checkpoint_every >= 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {opts.checkpoint_every}")
    if opts.norm is not None and not callable(opts.norm) and not (allow_seminorm and opts.norm == "seminorm"):
        allowed = "a callable or 'seminorm'" if allow_seminorm else "a callable"
        raise ValueError(f"norm must be {allowed}, got {opts.norm!r}")
    for name in ("safety", "ifactor", "dfactor", "max_num_steps"):
        if not getattr(opts, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(opts, name)}")
    if isinstance(opts.step_t, torch.Tensor):
        opts.step_t = opts.step_t.tolist()
    if isinstance(opts.jump_t, torch.Tensor):
        opts.jump_t = opts.jump_t.tolist()
    return opts


def _method(method: Optional[str]) -> str:
    method = method or "dopri5"
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return method


def _user_norm(norm: Callable, structure: _Structure) -> Callable:
    return (lambda r: norm(structure.unflatten(r))) if structure.is_tuple else norm


def make_problem(func: Callable, y0: State, rtol, atol, method: Optional[str], options: Optional[dict]):
    """Check the inputs and build the solver's view of them: the problem (with a fresh
    SolveStats), the state structure, the flat y0, and a factory for backward-counting funcs."""
    _check_y0(y0)
    method = _method(method)
    opts = _options(options, method)
    structure = _Structure(y0)
    y0_flat = structure.flatten(y0)
    rtol_, atol_ = (_tolerance(n, v, structure, y0_flat) for n, v in (("rtol", rtol), ("atol", atol)))
    stats = new_solve_stats()
    t_dtype = opts.time_dtype or y0_flat.dtype
    make_func = lambda backward: _Func(func, structure, t_dtype, y0_flat.device, y0_flat.dtype, stats, backward)
    norm = _user_norm(opts.norm, structure) if opts.norm is not None else rms_norm
    return Problem(make_func(False), METHODS[method], rtol_, atol_, norm, opts, stats), structure, y0_flat, make_func


def odeint(
    func: Callable,
    y0: State,
    t: torch.Tensor,
    rtol: Union[float, torch.Tensor] = 1e-7,
    atol: Union[float, torch.Tensor] = 1e-9,
    method: Optional[str] = None,
    options: Optional[dict] = None,
    *,
    grad: str = "direct",
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_method: Optional[str] = None,
    adjoint_options: Optional[dict] = None,
    adjoint_params: Optional[Sequence[torch.Tensor]] = None,
) -> State:
    """Solve dy/dt = func(t, y) from y(t[0]) = y0 and return y at every t[i] (leading time axis).

    ``grad`` picks how gradients are computed: "direct" (backprop through the solver's
    operations), "adjoint" (backsolve adjoint, O(1) memory) or "checkpoint" (re-run segments from
    stored states: exact, bounded memory). See the README for methods and options.
    """
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; valid modes: {', '.join(GRAD_MODES)}")
    ts = _check_t(t)
    params = _adjoint_params(func, adjoint_params) if grad != "direct" else ()
    prob, structure, y0_flat, make_func = make_problem(func, y0, rtol, atol, method, options)

    if t.requires_grad:  # moving t0 by dt moves y0 by -f(t0, y0) dt (the outputs' t_i are handled below)
        with torch.no_grad():
            f_start = prob.func(ts[0], y0_flat)
        y0_flat = y0_flat + (t[0].detach() - t[0]).to(y0_flat.dtype) * f_start

    if grad == "direct":
        res = solve(prob, y0_flat, ts)
        ys = torch.stack(res.outputs)
    elif grad == "checkpoint":
        ys = CheckpointedSolve.apply(prob, lambda: dataclasses.replace(prob, func=make_func(True), stats=None), y0_flat, ts, *params)
    else:
        adj = _adjoint_problem(prob, make_func, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options)
        ys = BacksolveAdjoint.apply(prob, adj, y0_flat, ts, *params)

    if t.requires_grad:
        ys = _attach_time_grad(prob, ys, t, ts, y0 if not structure.is_tuple else structure.flatten(y0))
    return structure.unflatten(ys, (len(ts),))


def odeint_adjoint(func, y0, t, rtol=1e-7, atol=1e-9, method=None, options=None, *, adjoint_rtol=None, adjoint_atol=None,
                   adjoint_method=None, adjoint_options=None, adjoint_params=None):
    """``odeint`` with the backsolve adjoint, as in torchdiffeq."""
    return odeint(func, y0, t, rtol, atol, method, options, grad="adjoint", adjoint_rtol=adjoint_rtol,
                  adjoint_atol=adjoint_atol, adjoint_method=adjoint_method, adjoint_options=adjoint_options,
                  adjoint_params=adjoint_params)


def _adjoint_params(func, adjoint_params) -> Tuple[torch.Tensor, ...]:
    if adjoint_params is None:
        if not isinstance(func, nn.Module):
            raise ValueError(
                "grad='adjoint'/'checkpoint' needs func's parameters: make func an nn.Module or pass "
                "adjoint_params=(...) (an empty tuple if it has none)"
            )
        adjoint_params = func.parameters()
    return tuple(p for p in adjoint_params if isinstance(p, torch.Tensor) and p.requires_grad)


def _adjoint_problem(prob, make_func, rtol, atol, method, options):
    """A factory, called in backward once the augmented sizes are known."""
    method = _method(method or prob.method.name)
    base = {f.name: getattr(prob.opts, f.name) for f in dataclasses.fields(Options) if f.name != "norm"}
    opts = _options({**base, **(options or {})} if options is not None else base, method, allow_seminorm=True)
    as_float = lambda tol, fallback: float(tol) if tol is not None else (fallback if isinstance(fallback, float) else float(fallback.min()))
    rtol_, atol_ = as_float(rtol, prob.rtol), as_float(atol, prob.atol)
    for name, v in (("adjoint_rtol", rtol_), ("adjoint_atol", atol_)):
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v}")

    def make(n_state: int, n_params: int):
        user = opts.norm
        norm = user if callable(user) else adjoint_norm(n_state, n_params, seminorm=user == "seminorm")
        counting = make_func(True)
        return Problem(None, METHODS[method], rtol_, atol_, norm, opts, counting.stats, backward=True), counting

    return make


def _attach_time_grad(prob: Problem, ys: torch.Tensor, t: torch.Tensor, ts, y0_flat) -> torch.Tensor:
    """dL/dt_i = <dL/dy_i, f(t_i, y_i)> for the outputs, and y_0 itself does not depend on t_0."""
    with torch.no_grad():
        fs = torch.stack([prob.func(ti, yi) for ti, yi in zip(ts[1:], ys[1:])])
    shift = (t[1:] - t[1:].detach()).to(ys.dtype).view(-1, *([1] * (ys.ndim - 1)))
    return torch.cat([y0_flat.unsqueeze(0), ys[1:] + shift * fs])
