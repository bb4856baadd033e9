"""Stiff benchmark: Robertson, Van der Pol (mu=1000) and HIRES at rtol=1e-6, side by side in one process.

Rows: our kvaerno5 (ESDIRK + simplified Newton), our auto (dopri5 -> kvaerno5), our dopri5 and
torchdiffeq's dopri5 (both capped at an NFE budget so the run finishes), scipy Radau and BDF.
Error: max over the output times and components of |y - ref| / (atol + rtol |ref|), the reference
being scipy Radau at rtol=atol=1e-10. Wall time: median of --repeats runs after one warm-up
(single run for the capped explicit solvers). float64, CPU, one thread.

    python scripts/bench_stiff.py [--repeats 3] [--budget 200000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from scipy.integrate import solve_ivp  # noqa: E402

from neuralode.solvers import SolverError, odeint, record_stats  # noqa: E402
from test_stiff import PROBLEMS  # noqa: E402  (one definition of the problems)

F64 = torch.float64


class Budget(Exception):
    pass


def counted(f, budget):
    n = [0]

    def g(t, y):
        n[0] += 1
        if n[0] > budget:
            raise Budget()
        return f(t, y)

    return g, n


def ours(name, method, budget, repeats):
    f, _, y0, ts, rtol, atol, _ = PROBLEMS[name]
    y0t, tt = torch.tensor(y0, dtype=F64), torch.tensor(ts, dtype=F64)
    opts = dict(max_num_steps=budget // 6) if method == "dopri5" else None
    times, out = [], None
    for r in range(repeats + (method != "dopri5")):
        with record_stats() as s:
            t0 = time.perf_counter()
            try:
                ys = odeint(f, y0t, tt, rtol=rtol, atol=atol, method=method, options=opts)
            except SolverError as e:
                return dict(nfe=s.nfe_forward, njac=s.n_jac, time=time.perf_counter() - t0, ys=None,
                            note=f"{type(e).__name__} at t={str(e).split('at t=')[1].split()[0].rstrip(',')}")
            dt = time.perf_counter() - t0
        if method != "dopri5" and r == 0:
            continue  # warm-up
        times.append(dt)
        out = dict(nfe=s.nfe_forward, njac=s.n_jac, ys=ys.numpy(), note=f"steps {s.n_accepted}+{s.n_rejected} rej"
                   + (f", switched at t={s.switched_at:.3g}" if s.n_switches else ""))
        if method == "dopri5":
            break
    out["time"] = statistics.median(times)
    return out


def tdq(name, budget):
    try:
        import torchdiffeq
    except ImportError:
        return dict(nfe=0, njac=0, time=float("nan"), ys=None, note="torchdiffeq not installed")
    f, _, y0, ts, rtol, atol, _ = PROBLEMS[name]
    g, n = counted(f, budget)
    t0 = time.perf_counter()
    try:
        ys = torchdiffeq.odeint(g, torch.tensor(y0, dtype=F64), torch.tensor(ts, dtype=F64), rtol=rtol, atol=atol, method="dopri5")
    except Budget:
        return dict(nfe=n[0] - 1, njac=0, time=time.perf_counter() - t0, ys=None, note=f"stopped at the {budget} NFE budget")
    except Exception as e:  # noqa: BLE001  (underflow in dt, ...)
        return dict(nfe=n[0], njac=0, time=time.perf_counter() - t0, ys=None, note=f"{type(e).__name__}: {str(e)[:40]}")
    return dict(nfe=n[0], njac=0, time=time.perf_counter() - t0, ys=ys.numpy(), note="")


def scipy_run(name, method, repeats):
    _, fnp, y0, ts, rtol, atol, _ = PROBLEMS[name]
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        sol = solve_ivp(fnp, (ts[0], ts[-1]), y0, method=method, rtol=rtol, atol=atol, t_eval=ts)
        if r:
            times.append(time.perf_counter() - t0)
    return dict(nfe=sol.nfev, njac=sol.njev, time=statistics.median(times), ys=sol.y.T, note=f"nlu {sol.nlu}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=int, default=200_000, help="NFE cap of the explicit solvers")
    ap.add_argument("--problems", default="robertson,vdp1000,hires")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| problem | solver | NFE | Jacobians | wall time (s) | error / tol | vs scipy Radau time | note |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name in args.problems.split(","):
        _, fnp, y0, ts, rtol, atol, _ = PROBLEMS[name]
        ref = solve_ivp(fnp, (ts[0], ts[-1]), y0, method="Radau", rtol=1e-10, atol=1e-10, t_eval=ts).y.T
        rows = {
            "scipy Radau": scipy_run(name, "Radau", args.repeats),
            "scipy BDF": scipy_run(name, "BDF", args.repeats),
            "ours kvaerno5": ours(name, "kvaerno5", args.budget, args.repeats),
            "ours auto": ours(name, "auto", args.budget, args.repeats),
            "ours dopri5": ours(name, "dopri5", args.budget, args.repeats),
            "torchdiffeq dopri5": tdq(name, args.budget),
        }
        radau_t = rows["scipy Radau"]["time"]
        for solver, r in rows.items():
            err = "—" if r["ys"] is None else f"{float((np.abs(r['ys'] - ref) / (atol + rtol * np.abs(ref))).max()):.3g}"
            print(f"| {name} | {solver} | {r['nfe']} | {r['njac']} | {r['time']:.3f} | {err} | {r['time'] / radau_t:.2f}x | {r['note']} |",
                  flush=True)


if __name__ == "__main__":
    main()
