"""Latent ODE, one training iteration on the union of the batch's times against per-sample time grids.

``experiment=spirals_latent_ode_30`` (batch 50, dopri5, direct gradients), the same weights and
batch for both: forward + backward wall time (ABBA-interleaved medians, one thread), forward NFE,
loss. With per-sample grids every series is solved on its own ~30 times instead of the ~1,500
distinct times of the union, each sample with its own steps.

    python scripts/bench_time_grid.py [--reps 9] [overrides ...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_module

from neuralode import record_stats
from neuralode.config import register_configs
from neuralode.tasks import build_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_module("neuralode.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=spirals_latent_ode_30", *args.overrides])
    torch.manual_seed(0)
    task = build_task(cfg)
    train, _ = task.datasets()
    batch = task.collate_fn([train[i] for i in range(cfg.trainer.batch_size)])
    model = task.model

    def iteration(grid: str):
        def run():
            model.time_grid = grid
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the same z0 sample for both grids
            with record_stats() as stats:
                loss, _ = task.loss(batch)
                loss.backward()
            return loss.item(), stats.nfe_forward
        return run

    union, per = iteration("union"), iteration("per_sample")
    (loss_u, nfe_u), (loss_p, nfe_p) = union(), per()
    times = {"union": [], "per_sample": []}
    for r in range(args.reps):
        for name in (("union", "per_sample") if r % 2 == 0 else ("per_sample", "union")):
            tic = time.perf_counter()
            (union if name == "union" else per)()
            times[name].append(time.perf_counter() - tic)
    tu, tp = statistics.median(times["union"]), statistics.median(times["per_sample"])
    n_union = int(torch.unique(batch["times"]).numel())
    print(f"batch {cfg.trainer.batch_size}, {n_union} distinct times in the union, {args.threads} thread(s), {args.reps} reps")
    print("| time grid | fwd+bwd s/iter | forward NFE | loss |\n|---|---|---|---|")
    print(f"| union | {tu:.3f} | {nfe_u} | {loss_u:.4f} |")
    print(f"| per_sample | {tp:.3f} ({tp / tu:.2f}×) | {nfe_p} | {loss_p:.4f} (rel. diff {abs(loss_p - loss_u) / abs(loss_u):.1e}) |")


if __name__ == "__main__":
    main()
