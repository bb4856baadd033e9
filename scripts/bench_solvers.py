"""Benchmark our solvers against torchdiffeq, side by side in one process (issue 2, "Benchmark").

Problems (dopri5 on both sides, rtol = atol in {1e-3, 1e-6}):

* ``mlp``     dy/dt = W2 tanh(W1 y + b1) + b2, 64 hidden units, state 512 x 2, t in [0, 1] with
              10 output times, weights and y0 from a fixed seed, float32 (what users train with).
* ``lorenz``  sigma=10, rho=28, beta=8/3 from (1, 1, 1) on [0, 5], 11 output times, float64.
* ``vdp``     Van der Pol mu=5 from (2, 0) on [0, 10], 11 output times, float64.

Per row: NFE (a counter inside the vector field, so both libraries are counted the same way),
max abs error at the output times against scipy ``solve_ivp(method="DOP853", rtol=atol=1e-12)``
in float64 (for the MLP: the same weights in float64 through a numpy wrapper), median wall time
of the forward solve (under ``torch.no_grad``), and median wall time of forward + backward of
``loss = ys.square().mean()``: direct backprop and the backsolve adjoint (plain and seminorm),
with the backward NFE of each. Every timing interleaves the two libraries (ours, theirs,
theirs, ours, ...) after warm-up runs, so slow drift of a shared machine cancels; the numbers
are medians and ratios are ours / torchdiffeq. torch runs on one thread by default (``--threads``),
the same for both libraries. A backsolve adjoint that fails (step underflow: Van der Pol at 1e-3,
both libraries) is reported as such, not timed.

After the table comes a seminorm study (backward NFE only) on variants of the MLP problem: the
adjoint restarts at every output time, so the benchmark MLP (9 output intervals, each crossed in
about one step) leaves the seminorm nothing to save; one long interval shows where it pays.

``--count-syncs`` also counts host syncs in the forward solve: Python-level conversions of a
tensor to a host value (``Tensor.item``, ``tolist``, ``__float__``, ``__int__``, ``__bool__``,
``__index__``) are wrapped and counted. Syncs made inside C++ kernels are not visible this way
(on CPU there are none worth noting). Reported per attempted dopri5 step, (NFE - 2) / 6.

    python scripts/bench_solvers.py                 # full run (about 10-15 minutes on 2 cores)
    python scripts/bench_solvers.py --quick         # a short smoke run
    python scripts/bench_solvers.py --markdown --count-syncs   # README-ready table
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import neuralode  # noqa: E402

try:
    import torchdiffeq
except ImportError:  # pragma: no cover
    sys.exit("torchdiffeq is needed for the comparison: pip install '.[bench]'")

TOLS = (1e-3, 1e-6)
MLP_OUTPUTS = 10


# ----------------------------------------------------------------------------------- problems
class Counted(nn.Module):
    """Counts every evaluation, whichever library calls it (``counting=False`` pauses it: a counter
    that changes on every call would make torch.compile recompile every step)."""

    def __init__(self):
        super().__init__()
        self.nfe = 0
        self.counting = True


class MLPField(Counted):
    def __init__(self, seed: int, dim: int = 2, hidden: int = 64, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1, self.l2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        with torch.no_grad():
            for p in self.parameters():  # a fixed draw, independent of torch's global RNG
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(p.shape[-1]) * 1.5)
        self.to(dtype)

    def forward(self, t, y):
        if self.counting:
            self.nfe += 1
        return self.l2(torch.tanh(self.l1(y)))

    def numpy_rhs(self):
        w1, b1, w2, b2 = (p.detach().double().numpy() for p in (self.l1.weight, self.l1.bias, self.l2.weight, self.l2.bias))
        def rhs(t, y):
            yy = y.reshape(-1, w1.shape[1])
            return (np.tanh(yy @ w1.T + b1) @ w2.T + b2).reshape(-1)

        return rhs


class Lorenz(Counted):
    def forward(self, t, y):
        if self.counting:
            self.nfe += 1
        x, yy, z = y.unbind(-1)
        return torch.stack([10.0 * (yy - x), x * (28.0 - z) - yy, x * yy - (8.0 / 3.0) * z], -1)

    @staticmethod
    def numpy_rhs():
        return lambda t, y: np.array([10.0 * (y[1] - y[0]), y[0] * (28.0 - y[2]) - y[1], y[0] * y[1] - 8.0 / 3.0 * y[2]])


class VanDerPol(Counted):
    mu = 5.0

    def forward(self, t, y):
        if self.counting:
            self.nfe += 1
        x, v = y.unbind(-1)
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)

    @classmethod
    def numpy_rhs(cls):
        return lambda t, y: np.array([y[1], cls.mu * (1 - y[0] ** 2) * y[1] - y[0]])


@dataclass
class Problem:
    name: str
    func: Counted
    y0: torch.Tensor
    t: torch.Tensor
    ref: np.ndarray  # (len(t), *y0.shape), float64
    dtype_note: str
    has_params: bool


def make_problems(names: List[str], seed: int) -> Dict[str, Problem]:
    from scipy.integrate import solve_ivp

    def reference(rhs, y0: torch.Tensor, t: torch.Tensor) -> np.ndarray:
        tt = t.double().numpy()
        sol = solve_ivp(rhs, (tt[0], tt[-1]), y0.double().numpy().reshape(-1), method="DOP853", t_eval=tt, rtol=1e-12, atol=1e-12)
        assert sol.success, sol.message
        return sol.y.T.reshape(len(tt), *y0.shape)

    out = {}
    for name in names:
        if name == "mlp":
            f = MLPField(seed)
            g = torch.Generator().manual_seed(seed + 1)
            y0 = torch.randn(512, 2, generator=g)
            t = torch.linspace(0.0, 1.0, MLP_OUTPUTS)
            out[name] = Problem(name, f, y0, t, reference(f.numpy_rhs(), y0, t), "float32", True)
        elif name == "lorenz":
            f, y0, t = Lorenz(), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), torch.linspace(0, 5, 11, dtype=torch.float64)
            out[name] = Problem(name, f, y0, t, reference(f.numpy_rhs(), y0, t), "float64", False)
        elif name == "vdp":
            f, y0, t = VanDerPol(), torch.tensor([2.0, 0.0], dtype=torch.float64), torch.linspace(0, 10, 11, dtype=torch.float64)
            out[name] = Problem(name, f, y0, t, reference(f.numpy_rhs(), y0, t), "float64", False)
        else:
            raise SystemExit(f"unknown problem {name!r}; choose from mlp, lorenz, vdp")
    return out


# ----------------------------------------------------------------------------- the two sides
def solve_fn(lib: str, mode: str, prob: Problem, tol: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable y0 -> ys for one library and gradient mode (direct, adjoint, seminorm)."""
    f, t = prob.func, prob.t
    kw = dict(rtol=tol, atol=tol, method="dopri5")
    semi = dict(norm="seminorm")
    if lib == "ours":
        if mode == "direct":
            return lambda y0: neuralode.odeint(f, y0, t, **kw)
        return lambda y0: neuralode.odeint(f, y0, t, **kw, grad="adjoint", adjoint_options=semi if mode == "seminorm" else None)
    if mode == "direct":
        return lambda y0: torchdiffeq.odeint(f, y0, t, **kw)
    return lambda y0: torchdiffeq.odeint_adjoint(f, y0, t, **kw, adjoint_options=semi if mode == "seminorm" else None)


def run_forward(fn, prob: Problem):
    prob.func.nfe = 0
    with torch.no_grad():
        ys = fn(prob.y0)
    return ys, prob.func.nfe


def run_fwd_bwd(fn, prob: Problem):
    prob.func.nfe = 0
    prob.func.zero_grad(set_to_none=True)
    y0 = prob.y0.clone().requires_grad_(True)
    ys = fn(y0)
    nfe_f = prob.func.nfe
    ys.square().mean().backward()
    return nfe_f, prob.func.nfe - nfe_f, y0.grad


def interleaved_times(fa, fb, reps: int, warmup: int) -> tuple[List[float], List[float]]:
    """Time fa and fb alternately (ABBA ordering), after warm-up; returns both lists of seconds."""
    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for r in range(reps):
        order = ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta))
        for fn, store in order:
            gc.collect()
            t0 = time.perf_counter()
            fn()
            store.append(time.perf_counter() - t0)
    return ta, tb


# ------------------------------------------------------------------------------ sync counting
@contextlib.contextmanager
def count_syncs():
    """Counts Python-level tensor -> host conversions (item, tolist, float, int, bool, index)."""
    counter = {"n": 0}
    names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(orig):
        def inner(self, *a, **k):
            counter["n"] += 1
            return orig(self, *a, **k)

        return inner

    for n in names:
        setattr(torch.Tensor, n, wrap(saved[n]))
    try:
        yield counter
    finally:
        for n, v in saved.items():
            setattr(torch.Tensor, n, v)


# ------------------------------------------------------------------------------------ results
@dataclass
class Row:
    problem: str
    tol: float
    nfe: Dict[str, int] = field(default_factory=dict)
    err: Dict[str, float] = field(default_factory=dict)
    fwd: Dict[str, float] = field(default_factory=dict)  # median seconds
    fb: Dict[str, Dict[str, float]] = field(default_factory=dict)  # mode -> lib -> median seconds
    nfe_bwd: Dict[str, Dict[str, int]] = field(default_factory=dict)  # mode -> lib -> backward NFE
    syncs: Dict[str, float] = field(default_factory=dict)  # syncs per attempted step
    steps: Dict[str, int] = field(default_factory=dict)  # ours: accepted / rejected
    failed: Dict[str, Dict[str, str]] = field(default_factory=dict)  # mode -> lib -> error, when a solve failed
    graddiff: Dict[str, float] = field(default_factory=dict)  # mode -> |dL/dy0 ours - td| / |td|
    wp: List[tuple] = field(default_factory=list)  # (tol factor, NFE, err) of ours at looser tolerances, if NFE > td's


def ratio(d: Dict[str, float]) -> float:
    return d["ours"] / d["td"]


def bench_row(prob: Problem, tol: float, args, modes: List[str]) -> Row:
    row = Row(prob.name, tol)
    libs = ("ours", "td")
    fns = {lib: solve_fn(lib, "direct", prob, tol) for lib in libs}
    for lib in libs:
        ys, nfe = run_forward(fns[lib], prob)
        row.nfe[lib] = nfe
        row.err[lib] = float(np.abs(ys.double().numpy() - prob.ref).max())
    if row.nfe["ours"] > row.nfe["td"]:  # work-precision check: what does ours give at torchdiffeq's NFE?
        for factor in (1.25, 1.5, 2.0):
            ys, nfe = run_forward(solve_fn("ours", "direct", prob, tol * factor), prob)
            if nfe <= row.nfe["td"]:
                row.wp.append((factor, nfe, float(np.abs(ys.double().numpy() - prob.ref).max())))
                break
    with neuralode.record_stats() as s:
        run_forward(fns["ours"], prob)
    row.steps = {"accepted": s.n_accepted, "rejected": s.n_rejected}
    if args.count_syncs:
        for lib in libs:
            with count_syncs() as c:
                _, nfe = run_forward(fns[lib], prob)
            row.syncs[lib] = c["n"] / max((nfe - 2) / 6, 1)
            row.syncs[lib + "_total"] = c["n"]
        with count_syncs() as c:
            run_forward(fns["ours"], prob)
        row.syncs["ours_per_accepted"] = c["n"] / max(row.steps["accepted"], 1)

    ta, tb = interleaved_times(lambda: run_forward(fns["ours"], prob), lambda: run_forward(fns["td"], prob), args.reps, args.warmup)
    row.fwd = {"ours": statistics.median(ta), "td": statistics.median(tb)}

    for mode in modes:
        gfns = {lib: solve_fn(lib, mode, prob, tol) for lib in libs}
        row.nfe_bwd[mode] = {}
        grads = {}
        failed = {}
        for lib in libs:
            try:
                _, nb, grads[lib] = run_fwd_bwd(gfns[lib], prob)
                row.nfe_bwd[mode][lib] = nb
            except (neuralode.SolverError, AssertionError, RuntimeError) as e:  # torchdiffeq asserts on underflow
                failed[lib] = f"{type(e).__name__}: {str(e)[:90]}"
        if len(grads) == 2:  # sanity: both libraries' dL/dy0 agree to about the tolerance
            row.graddiff[mode] = float((grads["ours"] - grads["td"]).norm() / grads["td"].norm())
        if failed:  # the backsolve adjoint can blow up backwards in time (e.g. Van der Pol at loose tolerance)
            row.failed[mode] = failed
            continue
        reps = max(3, args.reps // 2) if mode != "direct" else args.reps
        ta, tb = interleaved_times(lambda: run_fwd_bwd(gfns["ours"], prob), lambda: run_fwd_bwd(gfns["td"], prob), reps, args.warmup)
        row.fb[mode] = {"ours": statistics.median(ta), "td": statistics.median(tb)}
    return row


# ----------------------------------------------------------------------------- seminorm study
STUDY = (  # (label, t_end, output times, loss); the first is the benchmark's own MLP problem
    ("benchmark MLP: t in [0,1], 10 outputs, mean loss", 1.0, 10, "mean"),
    ("t in [0,10], 2 outputs, mean loss", 10.0, 2, "mean"),
    ("t in [0,10], 2 outputs, sum loss", 10.0, 2, "sum"),
)


def seminorm_study(seed: int, tols) -> List[str]:
    """Backward NFE of the plain vs the seminorm adjoint on MLP variants (NFE only, no timing).

    The adjoint restarts at every output time, so with 10 outputs on [0, 1] the backward pass
    can take no fewer than one step per output interval, whatever the norm; the variants with
    one interval show where the seminorm pays: when dL/dtheta, integrated over a long
    interval, is what limits the backward step (a summed loss makes it large against atol)."""
    lines = ["| MLP variant | tol | bwd NFE plain ours / td | bwd NFE seminorm ours / td | seminorm / plain ours / td |",
             "|---|---|---|---|---|"]
    for label, t_end, n_out, loss in STUDY:
        f = MLPField(seed)
        y0 = torch.randn(512, 2, generator=torch.Generator().manual_seed(seed + 1))
        t = torch.linspace(0.0, t_end, n_out)
        for tol in tols:
            nb = {}
            for lib in ("ours", "td"):
                for mode in ("adjoint", "seminorm"):
                    f.nfe = 0
                    ys = solve_fn(lib, mode, Problem("mlp", f, y0, t, None, "", True), tol)(y0.clone().requires_grad_(True))
                    nf = f.nfe
                    (ys.square().mean() if loss == "mean" else ys.square().sum()).backward()
                    nb[lib, mode] = f.nfe - nf
            q = {lib: nb[lib, "seminorm"] / nb[lib, "adjoint"] for lib in ("ours", "td")}
            lines.append(f"| {label} | {tol:g} | {nb['ours', 'adjoint']} / {nb['td', 'adjoint']} | "
                         f"{nb['ours', 'seminorm']} / {nb['td', 'seminorm']} | {q['ours']:.2f} / {q['td']:.2f} |")
    return lines


# ------------------------------------------------------------------------------------- output
def fmt_t(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def table(rows: List[Row], modes: List[str], syncs: bool) -> str:
    head = ["problem", "tol", "NFE ours / td", "max err ours / td", "fwd ours / td", "fwd ratio"]
    for m in modes:
        head += [f"fwd+bwd {m} ours / td", f"{m} ratio", f"bwd NFE {m} ours / td"]
    if syncs:
        head += ["syncs/step ours / td"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.problem, f"{r.tol:g}", f"{r.nfe['ours']} / {r.nfe['td']}", f"{r.err['ours']:.2e} / {r.err['td']:.2e}",
                 f"{fmt_t(r.fwd['ours'])} / {fmt_t(r.fwd['td'])}", f"{ratio(r.fwd):.2f}"]
        for m in modes:
            if m in r.fb:
                cells += [f"{fmt_t(r.fb[m]['ours'])} / {fmt_t(r.fb[m]['td'])}", f"{ratio(r.fb[m]):.2f}",
                          f"{r.nfe_bwd[m]['ours']} / {r.nfe_bwd[m]['td']}"]
            elif m in r.failed:
                who = " and ".join("ours" if k == "ours" else "td" for k in r.failed[m])
                cells += [f"fails ({who}: step underflow)", "-", "-"]
            else:
                cells += ["-", "-", "-"]
        if syncs:
            cells += [f"{r.syncs['ours']:.2f} / {r.syncs['td']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: List[Row]) -> List[str]:
    out = []

    def line(ok: bool, text: str):
        out.append(f"{'PASS' if ok else 'FAIL'}  {text}")

    bad = [f"{r.problem}@{r.tol:g}" for r in rows if r.nfe["ours"] > r.nfe["td"]]
    line(not bad, "NFE <= torchdiffeq's on every row" + (f" (over: {', '.join(bad)})" if bad else ""))
    for r in rows:
        if r.nfe["ours"] > r.nfe["td"] and r.wp:
            out.append(f"      info {r.problem}@{r.tol:g}: ours at a looser tolerance, NFE <= torchdiffeq's {r.nfe['td']} -> "
                       + ", ".join(f"tol x{s:g}: NFE {n}, err {e:.2e}" for s, n, e in r.wp) + f" (torchdiffeq err {r.err['td']:.2e})")
    bad = [f"{r.problem}@{r.tol:g}" for r in rows if r.err["ours"] > r.err["td"]]
    line(not bad, "max error <= torchdiffeq's on every row" + (f" (worse: {', '.join(bad)})" if bad else ""))
    fr = [ratio(r.fwd) for r in rows]
    med = statistics.median(fr)
    line(med <= 0.6, f"median forward-time ratio {med:.2f} <= 0.6")
    worst = max(zip(fr, rows), key=lambda x: x[0])
    line(worst[0] <= 1.0, f"no forward-time row above 1.0 (worst {worst[0]:.2f}: {worst[1].problem}@{worst[1].tol:g})")
    adj = [(ratio(r.fb[m]), r, m) for r in rows for m in ("adjoint", "seminorm") if m in r.fb]
    if adj:
        med = statistics.median(a for a, _, _ in adj)
        worst = max(adj, key=lambda x: x[0])
        line(med <= 0.8 and worst[0] <= 1.0,
             f"forward+backward with the adjoint: median ratio {med:.2f} <= 0.8 "
             f"(worst {worst[0]:.2f}: {worst[1].problem}@{worst[1].tol:g} {worst[2]})")
    for r in rows:
        if r.problem == "mlp" and "adjoint" in r.nfe_bwd and "seminorm" in r.nfe_bwd:
            q = r.nfe_bwd["seminorm"]["ours"] / r.nfe_bwd["adjoint"]["ours"]
            qt = r.nfe_bwd["seminorm"]["td"] / r.nfe_bwd["adjoint"]["td"]
            line(q <= 0.7, f"mlp@{r.tol:g}: seminorm backward NFE / plain adjoint backward NFE = {q:.2f} <= 0.7 "
                           f"(ours {r.nfe_bwd['seminorm']['ours']}/{r.nfe_bwd['adjoint']['ours']}; "
                           f"torchdiffeq {qt:.2f} = {r.nfe_bwd['seminorm']['td']}/{r.nfe_bwd['adjoint']['td']})")
            n_int = MLP_OUTPUTS - 1  # the adjoint restarts at every output time
            if q > 0.7:
                out.append(f"      note: {n_int} output intervals force >= {n_int} backward steps (>= {7 * n_int} NFE) "
                           "with either norm; see the seminorm study for where the seminorm pays")
    return out


# ---------------------------------------------------------------------- fixed-step methods
FIXED_METHODS = {  # method: torchdiffeq release that has it
    "euler": "0.2.5", "rk4": "0.2.5", "explicit_adams": "0.2.5", "implicit_adams": "0.2.5",
    "implicit_euler": "master", "trapezoid": "master", "sdirk2": "master", "trbdf2": "master",
    "implicit_midpoint": "master", "radauIIA3": "master", "gl4": "master", "radauIIA5": "master", "gl6": "master",
}


class StiffLinear(Counted):
    """y' = A y with eigenvalues -1 and -500: explicit steps of 0.01 are unstable, implicit ones are not."""

    A = torch.tensor([[-500.0, 0.0], [499.0, -1.0]], dtype=torch.float64)

    def forward(self, t, y):
        self.nfe += 1
        return y @ self.A.T

    @classmethod
    def exact(cls, t: torch.Tensor, y0: torch.Tensor) -> np.ndarray:
        return np.stack([(torch.linalg.matrix_exp(cls.A * ti) @ y0).numpy() for ti in t])


def import_torchdiffeq_master(path: Optional[str]):
    """torchdiffeq master (for its implicit fixed-grid methods) from a checkout at ``path``, imported
    under another name so that it sits beside the installed release in this process."""
    if not path:
        return None
    import importlib
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp())
    shutil.copytree(Path(path) / "torchdiffeq", root / "torchdiffeq_master")  # its imports are relative
    sys.path.insert(0, str(root))
    return importlib.import_module("torchdiffeq_master")


def fixed_methods_table(args, master) -> List[str]:
    """NFE, error and forward time of the fixed-step methods against the torchdiffeq that has them
    (0.2.5 for Adams, master for the implicit ones), on Lorenz (h = 1e-3, t in [0, 1]) and on a stiff
    linear system (h = 0.01, t in [0, 2])."""
    lor = Lorenz()
    y0l, tl = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), torch.linspace(0, 1, 11, dtype=torch.float64)
    from scipy.integrate import solve_ivp
    ref_l = solve_ivp(Lorenz.numpy_rhs(), (0, 1), y0l.numpy(), method="DOP853", t_eval=tl.numpy(), rtol=1e-12, atol=1e-12).y.T
    stiff = StiffLinear()
    y0s, ts = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.linspace(0, 2, 11, dtype=torch.float64)
    cases = [("lorenz", lor, y0l, tl, ref_l, 1e-3), ("stiff linear", stiff, y0s, ts, StiffLinear.exact(ts, y0s), 1e-2)]
    lines = ["| method | problem | h | NFE ours / td | max err ours / td | fwd ours / td | fwd ratio |", "|---|---|---|---|---|---|---|"]
    for method, release in FIXED_METHODS.items():
        td = torchdiffeq if release == "0.2.5" else master
        for pname, f, y0, t, ref, h in cases:
            if pname == "stiff linear" and method in ("euler", "rk4", "explicit_adams", "implicit_adams"):
                continue  # explicit: unstable at this step
            opts = dict(step_size=h, max_order=5) if "adams" in method else dict(step_size=h)  # AB11 (the default) is unstable here
            kw = dict(rtol=1e-7, atol=1e-9) if method == "implicit_adams" else {}
            ours_fn = lambda: neuralode.odeint(f, y0, t, method=method, options=opts, **kw)  # noqa: E731
            nfe, err = {}, {}
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f.nfe = 0
                err["ours"] = float(np.abs(ours_fn().numpy() - ref).max())
                nfe["ours"] = f.nfe
                if td is not None:
                    td_fn = lambda: td.odeint(f, y0, t, method=method, options=opts, **kw)  # noqa: E731
                    f.nfe = 0
                    err["td"] = float(np.abs(td_fn().numpy() - ref).max())
                    nfe["td"] = f.nfe
                    ta, tb = interleaved_times(ours_fn, td_fn, max(3, args.reps // 3), 1)
                    times = {"ours": statistics.median(ta), "td": statistics.median(tb)}
                else:
                    ta, _ = interleaved_times(ours_fn, ours_fn, max(3, args.reps // 3), 1)
                    times = {"ours": statistics.median(ta)}
            if "td" in times:
                lines.append(f"| {method} | {pname} | {h:g} | {nfe['ours']} / {nfe['td']} | {err['ours']:.2e} / {err['td']:.2e} | "
                             f"{fmt_t(times['ours'])} / {fmt_t(times['td'])} | {ratio(times):.2f} |")
            else:
                lines.append(f"| {method} | {pname} | {h:g} | {nfe['ours']} / - | {err['ours']:.2e} / - | "
                             f"{fmt_t(times['ours'])} / - | - |")
            print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------------- per-sample stepping
def van_der_pol_batch(n: int, seed: int = 0, mu_max: float = 20.0) -> torch.Tensor:
    """(n, 3) states (x, v, mu) with mu log-uniform in [0.1, mu_max]; mu rides along with zero derivative."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.1), math.log(mu_max), generator=g))
    return torch.stack([torch.full((n,), 2.0, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), mu], -1)


class VdPBatch(Counted):
    def forward(self, t, s):
        self.nfe += 1
        x, v, mu = s.unbind(-1)
        return torch.stack([v, mu * (1 - x * x) * v - x, torch.zeros_like(mu)], -1)


def per_sample_table(args) -> List[str]:
    """Van der Pol batch of 256, mu log-uniform in [0.1, 20], dopri5 at 1e-6, 20 outputs on [0, 10]:
    our per-sample solve against our joint solve and torchode's per-sample solve, forward and
    forward + backward (checkpoint and adjoint)."""
    import torchode as to

    B, tol = 256, 1e-6
    f = VdPBatch()
    y0 = van_der_pol_batch(B, args.seed)
    t = torch.linspace(0, 10, 20, dtype=torch.float64)
    joint_f = lambda s, y: f(s.expand(B), y)  # noqa: E731
    per = dict(per_sample=True, compact=True)

    def ours(options, grad="direct"):
        def run(y=None):
            with neuralode.record_stats() as st:
                ys = neuralode.odeint(f if options else joint_f, y0 if y is None else y, t, rtol=tol, atol=tol,
                                      options=options, grad=grad, adjoint_params=())
            return ys, st
        return run

    term = to.ODETerm(f)
    td_solver = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(atol=tol, rtol=tol, term=term))
    torchode_fwd = lambda: td_solver.solve(to.InitialValueProblem(y0=y0, t_eval=t.expand(B, -1)))  # noqa: E731
    reps = max(3, args.reps // 3)
    with torch.no_grad():
        _, st_joint = ours({})()
        _, st_per = ours(per)()
        sol = torchode_fwd()
        tj, tp = interleaved_times(lambda: ours({})(), lambda: ours(per)(), reps, 1)
        tp2, tt = interleaved_times(lambda: ours(per)(), torchode_fwd, reps, 1)
    steps_joint = st_joint.n_accepted
    steps_per = st_per.sample_accepted.double().mean().item()
    lines = ["| row | ours per-sample | ours joint | torchode per-sample | per-sample / joint | per-sample / torchode |",
             "|---|---|---|---|---|---|"]
    lines.append(f"| mean accepted steps per sample | {steps_per:.1f} (max {int(st_per.sample_accepted.max())}) | "
                 f"{steps_joint} | {sol.stats['n_accepted'].double().mean().item():.1f} | {steps_per / steps_joint:.2f} | - |")
    lines.append(f"| loop iterations | {st_per.n_accepted and int((st_per.sample_accepted + st_per.sample_rejected).max())} | "
                 f"{st_joint.n_accepted + st_joint.n_rejected} | {int(sol.stats['n_steps'].max())} | - | - |")
    fwd_p, fwd_j, fwd_t = statistics.median(tp + tp2), statistics.median(tj), statistics.median(tt)
    lines.append(f"| forward wall time | {fmt_t(fwd_p)} | {fmt_t(fwd_j)} | {fmt_t(fwd_t)} | {fwd_p / fwd_j:.2f} | "
                 f"{fwd_p / fwd_t:.2f} |")

    def fwd_bwd(options, grad):
        def run():
            y = y0.clone().requires_grad_(True)
            ys, st = ours(options, grad)(y)
            ys.square().mean().backward()
            return st
        return run

    for grad in ("checkpoint", "adjoint"):
        try:
            st_p, st_j = fwd_bwd(per, grad)(), fwd_bwd({}, grad)()
        except neuralode.SolverError as e:
            lines.append(f"| forward + backward, {grad} | fails | fails | - | {type(e).__name__}: the backsolve "
                         "adjoint is unstable on the stiff samples (mu up to 20) | - |")
            y0 = van_der_pol_batch(B, args.seed)
            y0[:, 2] = y0[:, 2] / 10.0  # the same batch with mu in [0.01, 2]: the backward solve succeeds
            label_mu = " (mu / 10)"
            st_p, st_j = fwd_bwd(per, grad)(), fwd_bwd({}, grad)()
        else:
            label_mu = ""
        ta, tb = interleaved_times(fwd_bwd(per, grad), fwd_bwd({}, grad), reps, 1)
        cost = ""
        if grad == "adjoint":  # backward seconds per backward step, against the joint adjoint's
            cost = (f"; backward NFE {st_p.nfe_backward} / {st_j.nfe_backward}, backward steps "
                    f"{st_p.n_accepted_backward + st_p.n_rejected_backward} / {st_j.n_accepted_backward + st_j.n_rejected_backward}")
        lines.append(f"| forward + backward, {grad}{label_mu} | {fmt_t(statistics.median(ta))} | {fmt_t(statistics.median(tb))} | - | "
                     f"{statistics.median(ta) / statistics.median(tb):.2f}{cost} | - |")
    for line in lines:
        print(line, flush=True)
    return lines


def per_sample_stiff_table(args) -> List[str]:
    """Stiff methods per sample: Van der Pol batch of 64, mu log-uniform in [0.1, 1000], 10 outputs
    on [0, 3], rtol = atol = 1e-6: kvaerno5 joint against kvaerno5 and auto per sample (forward, and
    forward + backward with checkpoint gradients)."""
    B, tol = 64, 1e-6
    f = VdPBatch()
    y0 = van_der_pol_batch(B, args.seed, mu_max=1000.0)
    t = torch.linspace(0, 3, 10, dtype=torch.float64)
    joint_f = lambda s, y: f(s.expand(B), y)  # noqa: E731
    runs = {"kvaerno5 joint": (joint_f, "kvaerno5", {}),
            "kvaerno5 per-sample": (f, "kvaerno5", dict(per_sample=True, compact=True)),
            "auto per-sample": (f, "auto", dict(per_sample=True, compact=True))}

    def solve(name, grad=None):
        func, method, options = runs[name]
        y = y0.clone().requires_grad_(grad is not None)
        with neuralode.record_stats() as st:
            ys = neuralode.odeint(func, y, t, rtol=tol, atol=tol, method=method, options=options,
                                  grad=grad or "direct", adjoint_params=())
            if grad is not None:
                ys.square().mean().backward()
        return st

    reps = max(3, args.reps // 5)
    lines = ["| stiff batch (mu up to 1000) | mean accepted steps per sample | loop iterations | forward | "
             "fwd+bwd, checkpoint | forward vs joint |", "|---|---|---|---|---|---|"]
    fwd = {}
    for name in runs:
        with torch.no_grad():
            st = solve(name)
            times = [_timed(lambda: solve(name)) for _ in range(reps)]
        per = st.sample_accepted is not None and name != "kvaerno5 joint"
        steps = f"{st.sample_accepted.double().mean().item():.1f}" if per else str(st.n_accepted)
        iters = int((st.sample_accepted + st.sample_rejected).max()) if per else st.n_accepted + st.n_rejected
        fwd[name] = statistics.median(times)
        back = statistics.median([_timed(lambda: solve(name, "checkpoint")) for _ in range(max(2, reps // 2))])
        lines.append(f"| {name} | {steps} | {iters} | {fmt_t(fwd[name])} | {fmt_t(back)} | "
                     f"{fwd[name] / fwd['kvaerno5 joint']:.2f} |")
    for line in lines:
        print(line, flush=True)
    return lines


def _timed(run: Callable) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _uncounted(f: Counted, run: Callable):
    """Run with the field's counter paused, adding the solve's NFE from record_stats instead."""
    f.counting = False
    try:
        with neuralode.record_stats() as stats:
            out = run()
    finally:
        f.counting = True
    f.nfe += stats.nfe_forward
    return out


def overhead_table(probs: Dict[str, Problem], tols, args) -> List[str]:
    """The loop's own cost: a forward solve's wall time divided by the bare cost of its function
    evaluations (the same number of calls of the field on the initial state, timed alone), for us,
    torchdiffeq and torchode (joint solve, batch of one) on the same problems, and ours with
    ``options=dict(compile=True)`` (each step's stages through torch.compile; compiled before
    timing). 1.0 is the limit."""
    import torchode as to

    lines = ["| problem | tol | NFE ours / td / torchode | solve ÷ bare evaluations: ours | ours, compile=True | "
             "torchdiffeq | torchode |", "|---|---|---|---|---|---|---|"]
    reps = max(5, args.reps)
    for name, prob in probs.items():
        f, y0, t = prob.func, prob.y0, prob.t
        shape = y0.shape
        flat = lambda s, y: f(s[0], y.reshape(shape)).reshape(1, -1)  # noqa: E731  torchode: (batch, features)
        for tol in tols:
            term = to.ODETerm(flat)
            tdo = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(atol=tol, rtol=tol, term=term))
            ivp = to.InitialValueProblem(y0=y0.reshape(1, -1), t_eval=t[None])
            runs = {"ours": lambda: neuralode.odeint(f, y0, t, rtol=tol, atol=tol),
                    "compiled": lambda: _uncounted(f, lambda: neuralode.odeint(f, y0, t, rtol=tol, atol=tol,
                                                                                options=dict(compile=True))),
                    "td": lambda: torchdiffeq.odeint(f, y0, t, rtol=tol, atol=tol),
                    "torchode": lambda: tdo.solve(ivp)}
            ratios, nfes = {}, {}
            with torch.no_grad():
                for lib, run in runs.items():
                    f.nfe = 0
                    run()
                    nfes[lib] = n = f.nfe
                    t0 = t[0]
                    bare = lambda: [f(t0, y0) for _ in range(n)]  # noqa: E731
                    ts, tb = interleaved_times(run, bare, reps, 1)
                    ratios[lib] = statistics.median(ts) / statistics.median(tb)
            line = (f"| {name} | {tol:g} | {nfes['ours']} / {nfes['td']} / {nfes['torchode']} | {ratios['ours']:.2f} | "
                    f"{ratios['compiled']:.2f} | {ratios['td']:.2f} | {ratios['torchode']:.2f} |")
            print(line, flush=True)
            lines.append(line)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="mlp,lorenz,vdp", help="comma-separated subset of mlp,lorenz,vdp")
    ap.add_argument("--tols", default="1e-3,1e-6", help="comma-separated rtol=atol values")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per library (forward); fwd+bwd adjoint uses half")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per library before timing")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (fixed for both libraries)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad-modes", default="direct,adjoint,seminorm",
                    help="forward+backward modes to time: direct, adjoint, seminorm (adjoint with seminorm)")
    ap.add_argument("--grad-problems", default="mlp,lorenz,vdp", help="problems that get forward+backward timings")
    ap.add_argument("--quick", action="store_true", help="short run: 5 reps, 1 warm-up")
    ap.add_argument("--markdown", action="store_true", help="print a README-ready markdown table")
    ap.add_argument("--count-syncs", action="store_true", help="count tensor->host conversions per step in the forward solve")
    ap.add_argument("--no-study", action="store_true", help="skip the seminorm study on MLP variants")
    ap.add_argument("--fixed-methods", action="store_true", help="also compare the fixed-step methods (Adams, implicit)")
    ap.add_argument("--per-sample", action="store_true", help="also compare per-sample stepping (ours, joint, torchode)")
    ap.add_argument("--overhead", action="store_true", help="only the loop-overhead table (solve time / bare NFE cost)")
    ap.add_argument("--td-master", default=None, help="a torchdiffeq master checkout, for its implicit fixed-step methods")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = min(args.reps, 5), 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    names = [p for p in args.problems.split(",") if p]
    tols = [float(x) for x in args.tols.split(",")]
    modes = [m for m in args.grad_modes.split(",") if m]
    grad_problems = set(args.grad_problems.split(","))
    probs = make_problems(names, args.seed)
    if args.overhead:
        print(f"Loop overhead ({args.threads} thread(s), {args.reps} reps, medians):")
        overhead_table(probs, tols, args)
        return

    header = (f"torch {torch.__version__}, torchdiffeq {getattr(torchdiffeq, '__version__', '?')}, python {platform.python_version()}, "
              f"{platform.machine()} with {torch.get_num_threads()} torch thread(s) (set_num_threads={args.threads}); "
              f"reps={args.reps} (adjoint fwd+bwd: {max(3, args.reps // 2)}), warm-up={args.warmup}, ABBA-interleaved, medians")
    print(header, flush=True)
    rows = []
    t_start = time.perf_counter()
    for name in names:
        for tol in tols:
            p = probs[name]
            row = bench_row(p, tol, args, modes if name in grad_problems else [])
            rows.append(row)
            print(f"  {name} ({p.dtype_note}) tol={tol:g}: NFE {row.nfe['ours']}/{row.nfe['td']} "
                  f"(ours: {row.steps['accepted']} accepted, {row.steps['rejected']} rejected), "
                  f"err {row.err['ours']:.2e}/{row.err['td']:.2e}, fwd {fmt_t(row.fwd['ours'])}/{fmt_t(row.fwd['td'])} "
                  f"= {ratio(row.fwd):.2f}"
                  + "".join(f", {m} {fmt_t(row.fb[m]['ours'])}/{fmt_t(row.fb[m]['td'])} = {ratio(row.fb[m]):.2f} "
                            f"(bwd NFE {row.nfe_bwd[m]['ours']}/{row.nfe_bwd[m]['td']}, dL/dy0 rel diff {row.graddiff[m]:.1e})" for m in row.fb)
                  + "".join(f", {m} FAILED: {v}" for m, v in row.failed.items())
                  + (f", syncs/attempted step {row.syncs['ours']:.2f}/{row.syncs['td']:.2f} "
                     f"(totals {row.syncs['ours_total']}/{row.syncs['td_total']})"
                     f" (ours per accepted step {row.syncs['ours_per_accepted']:.2f})" if row.syncs else ""),
                  flush=True)
    study = seminorm_study(args.seed, tols) if "mlp" in names and not args.no_study else []
    print(f"total {time.perf_counter() - t_start:.0f} s\n")
    print(table(rows, [m for m in modes if any(m in r.fb for r in rows)], bool(args.count_syncs)) if args.markdown else "")
    if study:
        print("\nSeminorm study (backward NFE only):\n" + "\n".join(study))
    if args.per_sample:
        print("\nPer-sample stepping (Van der Pol batch):")
        per_sample_table(args)
        per_sample_stiff_table(args)
    if args.fixed_methods:
        print("\nFixed-step methods:")
        fixed_methods_table(args, import_torchdiffeq_master(args.td_master))
    print()
    for line in targets(rows):
        print(line)


if __name__ == "__main__":
    main()
