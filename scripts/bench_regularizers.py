"""Benchmark the issue-17 regularisers and ``tol=auto`` through the real entry point.

Rows (``--rows``, default all):

- ``odenet``: ODE-Net on mnist-10k, dopri5 at 1e-3, 3 epochs; ``none`` against ``rnode``, ``steer``,
  ``error`` (error needs ``solver.grad=checkpoint``, so every job here uses it for a fair NFE
  comparison). Reports the last epoch's mean forward NFE per iteration and test accuracy.
- ``latent``: ``experiment=spirals_latent_ode_30`` (ODE-RNN encoder, so STEER has solves to act
  on); forward NFE and extrapolation RMSE.
- ``cnf``: ``experiment=cnf_checkerboard``; RNODE (the preset's weights, 0.05) vs error (and error
  with the stiffness term) vs STEER vs combinations; NLL and NFE.
- ``auto``: ODE-Net with ``tol=auto`` against a manual sweep of ``tol`` (0.5, tol=auto's upper bound, .. 1e-4) with
  ``eval.validity=true``: the loosest tolerance whose validity gap stays below the threshold.

``--quick`` cuts every budget (a few batches per epoch) to check the script end to end; its numbers
are not the benchmark's. Jobs run one at a time; each row's ratios come from the same invocation.
Prints a Markdown table per row (and writes ``<out>/results.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ODENET = ["model=odenet", "solver=dopri5", "tol=1e-3", "solver.grad=checkpoint", "trainer.epochs=3",
          "eval.rtols=[]", "dataset.download=false"]
LATENT = ["experiment=spirals_latent_ode_30", "model.encoder=odernn"]
CNF = ["experiment=cnf_checkerboard", "model.kinetic_weight=0", "model.jacobian_weight=0"]
RNODE_CNF = ["regularizer.rnode.kinetic=0.05", "regularizer.rnode.jacobian=0.05"]
ROWS = {
    "odenet": (ODENET, {"none": [], "rnode": ["regularizer=rnode"], "steer": ["regularizer=steer"],
                        "error": ["regularizer=error"], "rnode+steer": ["regularizer=[rnode,steer]"],
                        # RNODE's integrals sum over the state (64x14x14 here): the default 0.01 swamps the loss
                        "rnode_1e-4": ["regularizer=rnode", "regularizer.rnode.kinetic=1e-4",
                                       "regularizer.rnode.jacobian=1e-4"]}),
    "latent": (LATENT, {"none": [], "rnode": ["regularizer=rnode"], "steer": ["regularizer=steer"],
                        "error": ["regularizer=error"]}),
    "cnf": (CNF, {"none": [], "rnode": ["regularizer=rnode", *RNODE_CNF], "error": ["regularizer=error"],
                  "steer": ["regularizer=steer"], "rnode+steer": ["regularizer=[rnode,steer]", *RNODE_CNF],
                  "rnode+error": ["regularizer=[rnode,error]", *RNODE_CNF],
                  "error+stiffness": ["regularizer=error", "regularizer.error.stiffness=0.05"]}),
}
QUICK = ["trainer.limit_batches=5", "trainer.limit_eval_batches=1", "trainer.epochs=2", "trainer.max_minutes=null"]


def budget(args, evaluate_once: bool = True) -> list[str]:
    """The command-line budget: --quick, or --batches/--epochs (reduced budgets: a fixed number of
    iterations whatever the machine's load, the test set once at the end unless the row needs it
    every epoch), else the recipe's."""
    if args.quick:
        return QUICK
    out = [f"trainer.limit_batches={args.batches}"] if args.batches else []
    if args.epochs:
        out += [f"trainer.epochs={args.epochs}", "trainer.max_minutes=null"]
        out += [f"trainer.eval_every={args.epochs}"] if evaluate_once else []
    return out


def run_job(overrides: list[str], run_dir: Path, seed: int, reuse: bool = False) -> dict:
    """One training job through the CLI; with ``reuse``, a job that already finished is read back."""
    done = run_dir / "metrics.json"
    finished = json.loads(done.read_text()) if reuse and done.exists() else {}
    if finished.get("status") == "completed":
        print(f"reusing {run_dir}", flush=True)
        return finished
    cmd = [sys.executable, "-m", "neuralode.train", *overrides, f"hydra.run.dir={run_dir}", f"seed={seed}",
           "trainer.progress=false"]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "metrics.json").read_text())


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def regulariser_row(name: str, args, out: Path) -> list[dict]:
    base, variants = ROWS[name]
    extra = [f"data_dir={args.data_dir}"] if name == "odenet" else []
    results = []
    for label, overrides in variants.items():
        if args.only and label not in args.only:
            continue
        jobs = [run_job([*base, *extra, *overrides, *budget(args)], out / name / f"{label}-{s}", s, args.reuse)
                for s in range(args.seeds)]
        results.append({"regularizer": label, "primary": jobs[0]["primary_metric"],
                        "metric": mean([j["test_primary"] for j in jobs]),
                        "nfe_forward": mean([j["nfe_forward"] for j in jobs]),
                        "nfe_backward": mean([j["nfe_backward"] for j in jobs]),
                        "s_per_iter": mean([j["time_per_iter"] for j in jobs]),
                        "metric_sd": statistics.stdev([j["test_primary"] for j in jobs]) if len(jobs) > 1 else 0.0})
    ref = results[0]
    print(f"\n{name} ({args.seeds} seed(s); budget: {' '.join(budget(args)) or 'the recipe'})\n")
    print(f"| regularizer | test {ref['primary'].removeprefix('test_')} (± sd) | fwd NFE / iter | NFE vs none | bwd NFE / iter | s / iter |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['regularizer']} | {r['metric']:.4f} ± {r['metric_sd']:.4f} | {r['nfe_forward']:.1f} | "
              f"{ref['nfe_forward'] / r['nfe_forward']:.2f}x fewer | {r['nfe_backward']:.1f} | {r['s_per_iter']:.3f} |")
    return results


def auto_row(args, out: Path) -> dict:
    base = [*ODENET, f"data_dir={args.data_dir}", "eval.validity=true", *budget(args, evaluate_once=False)]
    base = [o for o in base if not o.startswith("tol=")]
    sweep = {}
    for tol in (0.5, 1e-1, 1e-2, 1e-3, 1e-4):  # 0.5: tol=auto's upper bound
        m = run_job([*base, f"tol={tol:g}"], out / "auto" / f"tol_{tol:g}", 0, args.reuse)  # no "=": Hydra parses the dir
        sweep[tol] = m.get("validity_gap")
    threshold = 0.01
    valid = [t for t, gap in sweep.items() if gap is not None and gap <= threshold]
    loosest = max(valid) if valid else None
    auto = run_job([*base, "tol=auto"], out / "auto" / "auto", 0, args.reuse)
    print("\nauto\n")
    print("| tol | validity gap |\n|---|---|")
    for t, gap in sweep.items():
        print(f"| {t:g} | {gap:.4f} |" if gap is not None else f"| {t:g} | - |")
    print(f"\nloosest valid (manual): {loosest}; tol=auto ended at rtol={auto.get('rtol_auto')} "
          f"(validity gap {auto.get('validity_gap')})")
    return {"sweep": {str(k): v for k, v in sweep.items()}, "loosest_valid": loosest,
            "auto_rtol": auto.get("rtol_auto"), "auto_gap": auto.get("validity_gap")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=[*ROWS, "auto"], choices=[*ROWS, "auto"])
    parser.add_argument("--only", nargs="+", help="run only these variants of the rows (e.g. rnode_1e-4)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per job (3 where noise matters)")
    parser.add_argument("--reuse", action="store_true",
                        help="read back jobs that already finished under --out (e.g. to add seeds)")
    parser.add_argument("--quick", action="store_true", help="a few batches per epoch: checks the script only")
    parser.add_argument("--batches", type=int, help="reduced budget: training batches per epoch")
    parser.add_argument("--epochs", type=int, help="reduced budget: epochs")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist-10k")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_regularizers")
    args = parser.parse_args()
    results = {}
    for row in args.rows:
        results[row] = auto_row(args, args.out) if row == "auto" else regulariser_row(row, args, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
