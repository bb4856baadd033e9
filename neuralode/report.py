"""``neuralode-report <sweep dir>``: one table and one plot for a multirun.

Each job writes ``metrics.json`` (see ``train.py``), so the summary needs no
TensorBoard parsing. Writes ``summary.csv``, ``summary.md`` and ``summary.png``
(accuracy and NFE against rtol) into the sweep directory. The plot is drawn
with PIL, which torchvision already depends on, to keep matplotlib out of the
runtime dependencies. Hydra runs this automatically at the end of a multirun
through :class:`SweepSummaryCallback`.

Failed and interrupted jobs are rows too, with their exit code and reason; a job
directory whose ``metrics.json`` is missing or unreadable gets a row saying so.
NaN and infinite metrics are reported as such and left out of the plot.
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

log = logging.getLogger("neuralode.report")

COLUMNS = ["job", "status", "exit_code", "overrides", "model", "method", "grad", "rtol", "atol", "test_acc",
           "test_loss", "primary_metric", "test_primary", "nfe_forward", "nfe_backward", "time_per_iter",
           "train_time", "error"]

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


def write_summary(sweep_dir: str | Path) -> list[Path]:
    """Write the three summary files; return their paths (none when the directory holds no job)."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        return []
    csv_path, md_path, png_path = (sweep_dir / f"summary.{ext}" for ext in ("csv", "md", "png"))
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
    plot(rows, png_path)
    return [csv_path, md_path, png_path]


# -- a minimal PIL line plot ---------------------------------------------------
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels against log10(rtol): the jobs' primary test metric (accuracy for
    classifiers, NLL or bits/dim for flows, RMSE for latent ODEs), and forward/backward
    NFE. One line per (model, method, grad) combination."""
    from PIL import Image, ImageDraw

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if _number(r["rtol"]) and r["rtol"] > 0 and _primary(r) is not None:
            groups.setdefault(f"{r['model']} {r['method']} {r['grad']}", []).append(r)
    img = Image.new("RGB", (1000, 420), "white")
    draw = ImageDraw.Draw(img)
    series_acc, series_nfe = [], []
    for i, (name, rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["rtol"])
        xs = [math.log10(r["rtol"]) for r in rs]
        color = COLORS[i % len(COLORS)]
        series_acc.append((name, color, xs, [_primary(r) for r in rs], False))
        series_nfe.append((f"{name} fwd", color, xs, [_number(r["nfe_forward"]) or 0.0 for r in rs], False))
        series_nfe.append((f"{name} bwd", color, xs, [_number(r["nfe_backward"]) or 0.0 for r in rs], True))
    metrics = {(r["primary_metric"] or "test_acc").removeprefix("test_") for rs in groups.values() for r in rs}
    _panel(draw, (60, 30, 470, 360), f"test {' / '.join(sorted(metrics))} vs log10(rtol)", series_acc)
    _panel(draw, (560, 30, 970, 360), "NFE per iteration vs log10(rtol)", series_nfe)
    img.save(path)


def _primary(row: dict[str, Any]) -> float | None:
    """The job's primary test metric if it is a finite number."""
    return _number(row["test_primary"] if row["test_primary"] is not None else row["test_acc"])


def _panel(draw, box, title, series) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline="black")
    draw.text((x0, y0 - 18), title, fill="black")
    xs = [x for s in series for x in s[2]] or [0.0]
    ys = [y for s in series for y in s[3]] or [0.0]
    xlo, xhi = min(xs) - 0.5, max(xs) + 0.5
    ylo, yhi = min(0.0, min(ys)), max(ys) * 1.1 or 1.0

    def to_px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for k in range(5):  # y ticks
        y = ylo + (yhi - ylo) * k / 4
        _, py = to_px(xlo, y)
        draw.line([(x0 - 4, py), (x0, py)], fill="black")
        draw.text((x0 - 45, py - 6), f"{y:.3g}", fill="black")
    for x in sorted(set(xs)):  # x ticks at the swept values
        px, _ = to_px(x, ylo)
        draw.line([(px, y1), (px, y1 + 4)], fill="black")
        draw.text((px - 10, y1 + 6), f"{x:g}", fill="black")
    for i, (name, color, sx, sy, dashed) in enumerate(series):
        pts = [to_px(x, y) for x, y in zip(sx, sy)]
        for a, b in zip(pts, pts[1:]):
            draw.line([a, b], fill=color, width=1 if dashed else 2)
        for px, py in pts:
            r = 3
            (draw.rectangle if dashed else draw.ellipse)([px - r, py - r, px + r, py + r], fill=color)
        draw.text((x0 + 8, y1 + 24 + 12 * i), ("□ " if dashed else "● ") + name, fill=color)


class SweepSummaryCallback(Callback):
    """Hydra callback: write the summary when a multirun ends, report the jobs that failed and
    set :data:`sweep_exit_code`."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        global sweep_exit_code
        sweep_dir = Path(config.hydra.sweep.dir)
        paths = write_summary(sweep_dir)
        if paths:
            log.info("sweep summary: %s", ", ".join(str(p) for p in paths))
        bad = failed(collect(sweep_dir))
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
