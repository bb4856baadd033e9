"""Paper Table 2 on this machine: spirals with 30, 50 and 100 observations, latent ODE vs RNN.

Runs the real entry point (``python -m neuralode.train experiment=spirals_<model>_<n>``) six
times under one wall-clock budget each (``trainer.max_minutes``), ``--parallel`` at a time with
one thread each, then prints the test extrapolation RMSE beside the paper's and writes
``table.md`` and ``results.json`` into the output directory.

RMSE: sqrt(mean over the held-out future values of (prediction - noisy value)^2), 50 future
points per test series, 200 test series, prediction from the posterior mean z0 (latent ODE) or
autoregressive decoding (RNN). The data's noise std is ``dataset.noise`` (0.1 by default), so
the noise alone contributes 0.1 to this RMSE.

    python scripts/bench_latent.py --minutes 9 --parallel 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PAPER = {"rnn": {30: 0.3937, 50: 0.3202, 100: 0.1813}, "latent_ode": {30: 0.1642, 50: 0.1502, 100: 0.1346}}
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=9.0, help="training budget per run (trainer.max_minutes)")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--counts", default="30,50,100")
    ap.add_argument("--models", default="latent_ode,rnn")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_latent"))
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(c) for c in args.counts.split(",")]
    models = args.models.split(",")
    jobs = [(m, n) for n in counts for m in models]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    running: list[tuple[tuple[str, int], subprocess.Popen, float]] = []
    done: dict[tuple[str, int], dict] = {}

    def start(job):
        m, n = job
        run_dir = out / f"{m}_{n}"
        cmd = [sys.executable, "-m", "neuralode.train", f"experiment=spirals_{m}_{n}", f"hydra.run.dir={run_dir}",
               f"trainer.max_minutes={args.minutes}", f"dataset.noise={args.noise}", "trainer.progress=false",
               *args.overrides]
        log = open(out / f"{m}_{n}.out", "w")
        print(f"start {m} n_obs={n}: {' '.join(cmd[2:])}", flush=True)
        return job, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.time()

    queue = list(jobs)
    while queue or running:
        while queue and len(running) < args.parallel:
            running.append(start(queue.pop(0)))
        time.sleep(2)
        for item in list(running):
            job, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            metrics_path = out / f"{job[0]}_{job[1]}" / "metrics.json"
            metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
            done[job] = dict(metrics, returncode=proc.returncode, wall=time.time() - t0)
            print(f"done  {job[0]} n_obs={job[1]}: rc={proc.returncode} "
                  f"extrap RMSE={metrics.get('test_rmse_extrap')} epochs={metrics.get('epochs')} "
                  f"wall={time.time() - t0:.0f}s", flush=True)

    lines = [f"Spirals, extrapolation RMSE (noise std {args.noise}; RMSE over held-out future values vs the noisy "
             f"data; {args.minutes:g} min training per run, {args.parallel} runs at a time on this machine)", "",
             "| n_obs | RNN (paper) | latent ODE (paper) | RNN (ours) | latent ODE (ours) | ours: latent < RNN | "
             "interp RMSE RNN / latent | epochs RNN / latent |",
             "|---|---|---|---|---|---|---|---|"]
    for n in counts:
        r, l = done.get(("rnn", n), {}), done.get(("latent_ode", n), {})
        re, le = r.get("test_rmse_extrap"), l.get("test_rmse_extrap")
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"
        better = "yes" if (re is not None and le is not None and le < re) else "no"
        lines.append(f"| {n} | {PAPER['rnn'][n]:.4f} | {PAPER['latent_ode'][n]:.4f} | {fmt(re)} | {fmt(le)} | {better} | "
                     f"{fmt(r.get('test_rmse_interp'))} / {fmt(l.get('test_rmse_interp'))} | "
                     f"{r.get('epochs', '-')} / {l.get('epochs', '-')} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({f"{m}_{n}": v for (m, n), v in done.items()}, indent=2))
    return 0 if all(v["returncode"] == 0 for v in done.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
