"""The four gradient modes side by side (issue 16), in one process; prints markdown tables.

    python scripts/bench_gradients.py                      # Lorenz + MLP rows
    python scripts/bench_gradients.py --odenet --data-dir ../shared/data/mnist-10k --batches 10

Rows:
  * Lorenz (sigma=10, rho=28, beta=8/3) from (1, 1, 1) to T=10 and T=20, dopri5 at rtol=atol=1e-8,
    gradient of v . y(T) w.r.t. y0 (v = (0.3, -0.5, 0.8)): relative error against direct backprop
    through dopri8 at rtol=atol=1e-10, for direct, checkpoint, adjoint (its backward pass capped
    at --adjoint-steps steps, or it runs for minutes before failing) and reversible (the default
    coupling, and coupling=0.5, which keeps the forward pass stable).
  * MLP field (state --dim, two hidden layers of 512, tanh) on a batch of --batch, dopri5 at
    1e-6 over [0, --T]: forward+backward wall time (median of --reps) and peak memory
    (``record_stats(memory=True)``: on the CPU the bytes autograd holds for backward; on CUDA the
    allocator's peak), with reversible's ratios to checkpoint (time) and adjoint (memory).
  * (--odenet) ODE-Net on mnist-10k through the runner (``train()`` in this process), the
    ``--seeds`` of each of ``--modes``, ``--batches`` training batches (0: one epoch), test accuracy on
    ``--eval-batches`` test batches (0: all), s/iter and the mean ``mem/peak``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neuralode import Checkpoint, Reversible, SolverError, odeint, record_stats  # noqa: E402

F64 = torch.float64
V = torch.tensor([0.3, -0.5, 0.8], dtype=F64)


def lorenz(t, y):
    x, yy, z = y.unbind(-1)
    return torch.stack([10.0 * (yy - x), x * (28.0 - z) - yy, x * yy - 8.0 / 3.0 * z], -1)


def lorenz_grad(T: float, grad, method="dopri5", tol=1e-8, **kw):
    y0 = torch.ones(3, dtype=F64, requires_grad=True)
    with record_stats() as stats:
        ys = odeint(lorenz, y0, torch.tensor([0.0, T], dtype=F64), rtol=tol, atol=tol, method=method, grad=grad,
                    adjoint_params=(), **kw)
        g = torch.autograd.grad(ys[-1] @ V, y0)[0]
    return g, stats


def lorenz_rows(args) -> list[str]:
    rows = ["| T | mode | rel. error vs dopri8 1e-10 | ratio to checkpoint | NFE fwd/bwd | time (s) | note |",
            "|---|---|---|---|---|---|---|"]
    modes = [("direct", "direct"), ("checkpoint", Checkpoint()),
             ("adjoint", dict(grad="adjoint", adjoint_options=dict(max_num_steps=args.adjoint_steps))),
             ("reversible", "reversible"), ("reversible(coupling=0.5)", Reversible(coupling=0.5))]
    for T in args.lorenz_T:
        ref, _ = lorenz_grad(T, "direct", method="dopri8", tol=1e-10)
        ckpt_err = None
        for name, grad in modes:
            kw = dict(grad) if isinstance(grad, dict) else dict(grad=grad)
            tic = time.perf_counter()
            try:
                g, st = lorenz_grad(T, **kw)
                err = float((g - ref).norm() / ref.norm())
                ckpt_err = err if name == "checkpoint" else ckpt_err
                ratio = f"{err / ckpt_err:.3g}" if ckpt_err else ""
                note = (f"reconstruction error {st.reconstruction_error:.2g}"
                        if name.startswith("reversible") else "")
                rows.append(f"| {T:g} | {name} | {err:.2e} | {ratio} | {st.nfe_forward}/{st.nfe_backward} | "
                            f"{time.perf_counter() - tic:.1f} | {note} |")
            except SolverError as e:
                msg = str(e).split(": ", 1)[-1][:110].replace("|", "/")
                rows.append(f"| {T:g} | {name} | fails | | | {time.perf_counter() - tic:.1f} | "
                            f"{type(e).__name__}: {msg}... |")
            print(rows[-1], flush=True)
    return rows


class MLPField(nn.Module):
    def __init__(self, dim: int, width: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y)


def mlp_rows(args) -> list[str]:
    torch.manual_seed(0)
    func = MLPField(args.dim)
    with torch.no_grad():
        func.net[-1].weight.mul_(args.gain)  # livelier dynamics: more steps
    y0 = torch.randn(args.batch, args.dim)
    t = torch.tensor([0.0, args.T])
    res = {}
    odeint(func, y0, t, rtol=1e-6, atol=1e-6, method="dopri5")  # warm-up
    for mode in ("direct", "checkpoint", "adjoint", "reversible"):
        times, peaks = [], []
        for _ in range(args.reps):
            func.zero_grad()
            y = y0.clone().requires_grad_(True)
            tic = time.perf_counter()
            with record_stats(memory=True) as st:
                ys = odeint(func, y, t, rtol=1e-6, atol=1e-6, method="dopri5", grad=mode)
                (ys[-1] ** 2).mean().backward()
            times.append(time.perf_counter() - tic)
            peaks.append(st.mem_peak)
        res[mode] = (statistics.median(times), max(peaks), st)
        print(f"  {mode}: {res[mode][0]:.3f} s, {res[mode][1] / 2**20:.2f} MiB ({st.mem_source}), "
              f"NFE {st.nfe_forward}/{st.nfe_backward}, steps {st.n_accepted}", flush=True)
    rows = [f"MLP field: state {args.dim}, hidden 512x2 (tanh, output weights x{args.gain:g}), batch {args.batch}, "
            f"dopri5 rtol=atol=1e-6, T={args.T:g}, {args.reps} reps, memory source: {res['direct'][2].mem_source}",
            "",
            "| mode | fwd+bwd time (s) | time / checkpoint | peak memory (MiB) | memory / adjoint | NFE fwd/bwd |",
            "|---|---|---|---|---|---|"]
    for mode, (tm, peak, st) in res.items():
        rows.append(f"| {mode} | {tm:.3f} | {tm / res['checkpoint'][0]:.2f} | {peak / 2**20:.2f} | "
                    f"{peak / res['adjoint'][1]:.2f} | {st.nfe_forward}/{st.nfe_backward} |")
    return rows


def odenet_rows(args) -> list[str]:
    from hydra import compose, initialize_config_module

    from neuralode.config import register_configs
    from neuralode.train import train

    register_configs()
    rows = ["| mode | seed | test acc | s/iter | mean mem/peak (MiB) | NFE fwd/bwd per iter |", "|---|---|---|---|---|---|"]
    for mode, seed in ((m, s) for s in args.seeds for m in args.modes):
        overrides = ["model=odenet", f"data_dir={args.data_dir}", f"solver.grad={mode}", "trainer.epochs=1",
                     f"trainer.limit_batches={args.batches or 'null'}", f"trainer.batch_size={args.odenet_batch}",
                     f"trainer.limit_eval_batches={args.eval_batches or 'null'}", "trainer.eval_batch_size=500",
                     "rtol=1e-3", "atol=1e-3", "eval.rtols=[]", f"seed={seed}"]
        with initialize_config_module("neuralode.conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        with tempfile.TemporaryDirectory() as d:
            code = train(cfg, Path(d), overrides)
            metrics = __import__("json").loads((Path(d) / "metrics.json").read_text())
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            (tb,) = {p.parent for p in (Path(d) / "tb").rglob("events.out.tfevents.*")}
            acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
            acc.Reload()
            mem = statistics.mean(e.value for e in acc.Scalars("mem/peak")) if "mem/peak" in acc.Tags()["scalars"] \
                else float("nan")
        acc_, s_iter = metrics.get("test_acc") or float("nan"), metrics.get("time_per_iter") or 0.0
        rows.append(f"| {mode} | {seed} | {acc_:.4f} | {s_iter:.2f} | "
                    f"{mem / 2**20:.1f} | {metrics.get('nfe_forward', 0):.0f}/{metrics.get('nfe_backward', 0):.0f} |"
                    + ("" if code == 0 else f" exit {code}: {metrics.get('error', '')[:80]}"))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lorenz-T", type=float, nargs="*", default=[10.0, 20.0])
    p.add_argument("--adjoint-steps", type=int, default=2000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gain", type=float, default=4.0, help="MLP row: scale of the output layer's weights")
    p.add_argument("--T", type=float, default=10.0, help="MLP row: solve over [0, T]")
    p.add_argument("--skip-mlp", action="store_true")
    p.add_argument("--odenet", action="store_true")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-10k"))
    p.add_argument("--batches", type=int, default=10, help="ODE-Net: training batches (0: the whole epoch)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="ODE-Net: the seeds of each mode")
    p.add_argument("--modes", nargs="+", default=["checkpoint", "adjoint", "reversible", "direct"])
    p.add_argument("--odenet-batch", type=int, default=64)
    p.add_argument("--eval-batches", type=int, default=2, help="ODE-Net: test batches of 500 (0: all 2,000 images)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    out = []
    if args.lorenz_T:
        out += ["## Lorenz", ""] + lorenz_rows(args) + [""]
    if not args.skip_mlp:
        out += ["## MLP field", ""] + mlp_rows(args) + [""]
    if args.odenet:
        out += [f"## ODE-Net mnist-10k ({args.batches or 'all'} batches of {args.odenet_batch}, seeds {args.seeds}, "
                f"{args.eval_batches or 'all'} test batches of 500)", ""] + odenet_rows(args) + [""]
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
