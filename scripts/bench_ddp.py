"""DDP throughput: torchrun with N CPU processes (gloo) against one process.

Trains odenet (adjoint, dopri5, rtol=atol=1e-3, global batch 128) on mnist-10k
through the real entry point for ``--iters`` iterations per configuration, one
configuration at a time, and reads each run's ``time/iter`` back from
TensorBoard (rank 0's clock, after the per-step collectives). Throughput is
global batch / median seconds per iteration.

Configurations:
  1 process, all cores   what a single run gets on this machine
  1 process, 1 thread    the per-process baseline for scaling efficiency
  N processes, 1 thread  torchrun --nproc_per_node=N (torchrun's OMP_NUM_THREADS=1)

Scaling efficiency = throughput(N) / (N x throughput(1 thread)); the speed-up
over the all-cores single process is what a user of this machine sees.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = ["model=odenet", "solver=dopri5", "solver.grad=adjoint", "rtol=1e-3", "atol=1e-3",
          "trainer.batch_size=128", "trainer.epochs=1", "trainer.limit_eval_batches=1", "eval.rtols=[]",
          "dataset.augment=false", "dataset.download=false", "trainer.progress=false"]


def run(name: str, nproc: int, threads: int | None, args: argparse.Namespace) -> dict:
    out = args.out / f"{nproc}proc-{threads or 'all'}threads"
    overrides = [*RECIPE, f"trainer.limit_batches={args.iters}", f"data_dir={args.data_dir}", f"hydra.run.dir={out}"]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if nproc == 1:
        cmd = [sys.executable, "-m", "neuralode.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "neuralode.train", *overrides]
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((out / "tb").rglob("events.out.tfevents.*")).parent), size_guidance={"scalars": 0})
    acc.Reload()
    times = [e.value for e in acc.Scalars("time/iter")][args.warmup:]
    nfe = [e.value for e in acc.Scalars("nfe/forward")][args.warmup:]
    s = statistics.median(times)
    return {"name": name, "s_per_iter": s, "images_per_s": 128 / s, "nfe_forward": statistics.mean(nfe)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist-10k")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_ddp")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    args.data_dir = args.data_dir.resolve()
    cores = os.cpu_count()
    rows = [run(f"1 process, {cores} threads", 1, None, args),
            run("1 process, 1 thread", 1, 1, args),
            run(f"{args.nproc} processes (gloo), 1 thread each", args.nproc, 1, args)]
    one_thread, many = rows[1]["images_per_s"], rows[2]["images_per_s"]
    print("\n| configuration | s/iter | images/s | forward NFE |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['s_per_iter']:.3f} | {r['images_per_s']:.0f} | {r['nfe_forward']:.1f} |")
    print(f"\nscaling efficiency vs 1 thread: {many / (args.nproc * one_thread):.2f}; "
          f"speed-up vs 1 process on all {cores} cores: {many / rows[0]['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
