"""``neuralode-report <sweep dir>``: one table and two figures for a multirun.

Each job writes ``metrics.json`` (see ``train.py``), so the summary needs no
TensorBoard parsing. Writes ``summary.csv`` and ``summary.md`` into the sweep
directory, and with matplotlib (the ``plots`` extra, :mod:`neuralode.plots`)
``summary.png`` (primary metric and NFE against rtol), ``pareto.png`` (primary
metric against NFE and against wall time, with the non-dominated front) and both
as TensorBoard images in ``tb/summary``, so ``tensorboard --logdir <sweep>`` shows
them beside the jobs. Hydra runs this automatically at the end of a multirun
through :class:`SweepSummaryCallback`.

Failed and interrupted jobs are rows too, with their exit code and reason; a job
directory whose ``metrics.json`` is missing or unreadable gets a row saying so.
NaN and infinite metrics are reported as such and left out of the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from neuralode import plots

log = logging.getLogger("neuralode.report")

COLUMNS = ["job", "status", "exit_code", "overrides", "model", "method", "grad", "rtol", "atol", "test_acc",
           "test_loss", "primary_metric", "primary_mode", "test_primary", "nfe_forward", "nfe_backward",
           "time_per_iter", "mem_peak_mb", "train_time", "error"]

#: Exit code of the last multirun summarised in this process: 0 when every job completed, else
#: the first failed job's. Set by :class:`SweepSummaryCallback`; ``neuralode-train`` exits with it.
sweep_exit_code = 0


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories of the sweep's jobs: those Hydra wrote a ``.hydra/`` into or with a metrics.json."""
    found = {p.parent for p in sweep_dir.rglob("metrics.json")}
    found |= {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir() and p.parent != sweep_dir}
    return sorted(found, key=lambda d: (len(str(d)), str(d)))


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job; a missing or unreadable metrics.json is a failed row that says so."""
    rows = []
    for d in job_dirs(sweep_dir):
        job = str(d.relative_to(sweep_dir))
        try:
            m = json.loads((d / "metrics.json").read_text())
            if not isinstance(m, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            m = {"status": "failed", "error": "no metrics.json (the job did not finish or crashed)"}
        except (OSError, ValueError) as e:
            m = {"status": "failed", "error": f"unreadable metrics.json ({type(e).__name__}: {e})"}
        row = {"job": job, **{k: m.get(k) for k in COLUMNS[3:]},
               "overrides": " ".join(map(str, m.get("overrides") or []))}
        row["status"] = m.get("status", "completed")  # metrics.json of older runs has no status
        row["exit_code"] = m.get("exit_code", 0 if row["status"] == "completed" else None)
        rows.append(row)
    return rows


def failed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] != "completed"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")


def _number(v: Any) -> float | None:
    """A finite float, or None (missing, NaN, infinite or not a number)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def write_summary(sweep_dir: str | Path, rows: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write the table and the figures (:func:`write_figures`) of ``rows`` (default: :func:`collect`
    them); return the paths written (none when the directory holds no job)."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir) if rows is None else rows
    if not rows:
        return []
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    bad = failed(rows)
    if bad:
        lines += ["", f"**{len(bad)} of {len(rows)} jobs did not complete:**", ""]
        lines += [f"- job {r['job']} ({r['status']}, exit code {_fmt(r['exit_code']) or '?'}): {_fmt(r['error'])}"
                  for r in bad]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path, *write_figures(rows, sweep_dir)]


# -- figures ---------------------------------------------------------------------------------------
def plot_jobs(rows: list[dict[str, Any]]) -> tuple[list[plots.Job], str]:
    """The completed jobs with a finite primary metric, and the label of their ``seconds``: the
    training wall time, or seconds per iteration when no job recorded it (older runs)."""
    done = [r for r in rows if r["status"] == "completed" and _primary(r) is not None]
    key, label = (("train_time", "training wall time (s)") if any(_number(r["train_time"]) for r in done)
                  else ("time_per_iter", "seconds per iteration"))
    tokens = [r["overrides"].split() for r in done]
    shared = set.intersection(*map(set, tokens)) if len(done) > 1 else set()  # what the sweep did not vary
    jobs = []
    for r, own in zip(done, tokens):
        name = r["primary_metric"] or "test_acc"  # older metrics.json: classifiers
        mode = r["primary_mode"] if r["primary_mode"] in ("max", "min") else "max" if name.endswith("acc") else "min"
        jobs.append(plots.Job(label=" ".join(o for o in own if o not in shared) or r["job"], group=f"{r['model']} {r['method']} {r['grad']}",
                              metric_name=name, mode=mode, metric=_primary(r), rtol=_number(r["rtol"]),
                              nfe_forward=_number(r["nfe_forward"]), nfe_backward=_number(r["nfe_backward"]),
                              seconds=_number(r[key])))
    return jobs, label


def write_figures(rows: list[dict[str, Any]], sweep_dir: Path) -> list[Path]:
    """``summary.png`` (tolerance curves), ``pareto.png``, and both as the images ``summary/tolerance``
    and ``summary/pareto`` of one TensorBoard event file in ``tb/summary`` (replacing the previous
    one, so re-running the report adds no duplicates). Nothing without matplotlib or plottable jobs."""
    jobs, seconds_label = plot_jobs(rows)
    if not jobs:
        return []
    drawn = {tag: (image, name) for tag, image, name in (
        ("summary/tolerance", plots.tolerance_curves(jobs), "summary.png"),
        ("summary/pareto", plots.pareto(jobs, seconds_label), "pareto.png")) if image is not None}
    if not drawn:
        return []
    from torch.utils.tensorboard import SummaryWriter

    paths = [plots.save_png(image, sweep_dir / name) for image, name in drawn.values()]
    tb_dir = sweep_dir / "tb" / "summary"
    for old in tb_dir.glob("events.out.tfevents.*"):
        old.unlink()
    with SummaryWriter(str(tb_dir)) as writer:
        for tag, (image, _) in drawn.items():
            writer.add_image(tag, image, 0)
    return paths + sorted(tb_dir.glob("events.out.tfevents.*"))


def _primary(row: dict[str, Any]) -> float | None:
    """The job's primary test metric if it is a finite number."""
    return _number(row["test_primary"] if row["test_primary"] is not None else row["test_acc"])


class SweepSummaryCallback(Callback):
    """Hydra callback: write the summary when a multirun ends, report the jobs that failed and
    set :data:`sweep_exit_code`."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        global sweep_exit_code
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)  # each job's metrics.json, read once for the summary and the failures
        paths = write_summary(sweep_dir, rows)
        if paths:
            log.info("sweep summary: %s", ", ".join(str(p) for p in paths))
        bad = failed(rows)
        for r in bad:
            log.error("job %s %s (exit code %s): %s", r["job"], r["status"], r["exit_code"], r["error"])
        sweep_exit_code = next((int(r["exit_code"] or 1) for r in bad), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"neuralode-report: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    paths = write_summary(args.sweep_dir)
    if not paths:
        print(f"neuralode-report: no job directories (metrics.json or .hydra/) under {args.sweep_dir}",
              file=sys.stderr)
        return 1
    print((args.sweep_dir / "summary.md").read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
