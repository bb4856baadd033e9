"""neuralode-report: table and figures from the jobs' metrics.json files; the Pareto front."""

from __future__ import annotations

import csv
import json
import logging
import sys

import pytest
from PIL import Image

from conftest import images
from neuralode import plots, report
from neuralode.plots import pareto_front
from neuralode.report import main, write_summary


@pytest.fixture
def no_figures(monkeypatch):
    """For tests of the table: drawing takes about a second per figure."""
    monkeypatch.setattr(report, "write_figures", lambda rows, sweep_dir: [])


def fake_sweep(root, rtols=(0.1, 0.01, 0.001), method="dopri5", start=0, **extra):
    for i, r in enumerate(rtols, start=start):
        job = root / str(i)
        job.mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps({
            "overrides": [f"rtol={r}", *([f"solver={method}"] if method != "dopri5" else [])], "model": "odenet",
            "method": method, "grad": "adjoint", "rtol": r, "atol": 1e-3, "test_acc": 0.9 + i / 100,
            "test_loss": 0.3, "nfe_forward": 14.0 + 6 * i, "nfe_backward": 20.0 + 6 * i, "time_per_iter": 0.5,
            "train_time": 30.0 + i, **extra}))
    return root


def test_pareto_front_keeps_the_non_dominated_points_in_both_directions():
    cost = [10, 20, 30, 40, 20, 5, 40]
    acc = [0.80, 0.90, 0.85, 0.95, 0.90, 0.70, 0.95]
    # 30 is dominated by 20 (cheaper, better); the two (20, 0.90) and the two (40, 0.95) are duplicates
    assert pareto_front(cost, acc, "max") == [5, 0, 1, 4, 3, 6]
    loss = [1.0, 0.5, 0.6, 0.5, 2.0]  # lower is better: (40, 0.5) is dominated by (20, 0.5)
    assert pareto_front([10, 20, 30, 40, 5], loss, "min") == [4, 0, 1]
    assert pareto_front([3.0, 1.0, 2.0], [1.0, 1.0, 1.0], "max") == [1]  # equal metrics: the cheapest
    assert pareto_front([], [], "min") == []
    with pytest.raises(ValueError, match="'max' or 'min'"):
        pareto_front([1.0], [1.0], "best")


def test_report_writes_csv_and_markdown(tmp_path, capsys, no_figures):
    sweep = fake_sweep(tmp_path / "sweep")
    assert main([str(sweep)]) == 0
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["overrides"] for r in rows] == ["rtol=0.1", "rtol=0.01", "rtol=0.001"]
    assert [float(r["nfe_forward"]) for r in rows] == [14.0, 20.0, 26.0]
    md = (sweep / "summary.md").read_text().splitlines()
    assert md[0].startswith("| job | status | exit_code | overrides") and len(md) == 2 + 3
    assert {r["status"] for r in rows} == {"completed"}  # metrics.json without a status: an older, finished run
    assert "rtol=0.001" in capsys.readouterr().out


def test_summary_draws_tolerance_and_pareto_figures_into_png_and_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    sweep = fake_sweep(tmp_path / "sweep", primary_metric="test_acc", primary_mode="max")
    fake_sweep(sweep, method="tsit5", start=3, primary_metric="test_acc", primary_mode="max")
    (sweep / "6").mkdir()
    (sweep / "6" / "metrics.json").write_text(json.dumps({"status": "failed", "error": "boom", "test_acc": 0.99}))
    (sweep / "7").mkdir()
    (sweep / "7" / "metrics.json").write_text(json.dumps({"status": "completed", "test_acc": float("nan")}))
    stale = sweep / "tb" / "summary" / "events.out.tfevents.0.earlier-report"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    paths = write_summary(sweep)
    assert not stale.exists()  # a second report replaces the summary's event file, adding no duplicates
    names = [p.name for p in paths]
    assert names[:4] == ["summary.csv", "summary.md", "summary.png", "pareto.png"]
    assert names[4].startswith("events.out.tfevents.") and paths[4].parent == sweep / "tb" / "summary"
    assert list(csv.DictReader(open(sweep / "summary.csv")))[0]["primary_mode"] == "max"
    jobs, seconds_label = report.plot_jobs(report.collect(sweep))  # the failed and the NaN job are left out
    rtols = (0.1, 0.01, 0.001)
    expected = [f"rtol={r}" for r in rtols] + [f"rtol={r} solver=tsit5" for r in rtols]
    assert sorted(j.label for j in jobs) == sorted(expected)
    assert seconds_label == "training wall time (s)" and {j.mode for j in jobs} == {"max"}
    sizes = {}
    for name in ("summary.png", "pareto.png"):
        with Image.open(sweep / name) as img:
            colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
            sizes[name] = img.size
        assert img.width > 600 and img.height > 300
        background = max(colors)[0] / (img.width * img.height)
        assert len(colors) > 50 and background < 0.95, (name, len(colors), background)  # drawn, not blank
    logged = images(sweep)  # <sweep>/tb/summary, beside the jobs' own tb/ directories
    assert {"summary/tolerance", "summary/pareto"} == logged.keys()
    assert (logged["summary/tolerance"][0].width, logged["summary/tolerance"][0].height) == sizes["summary.png"]
    assert (logged["summary/pareto"][0].width, logged["summary/pareto"][0].height) == sizes["pareto.png"]


def test_summary_without_matplotlib_writes_the_table_and_one_hint(tmp_path, monkeypatch, caplog):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    monkeypatch.setattr(plots, "_hinted", False)
    sweep = fake_sweep(tmp_path / "sweep")
    with caplog.at_level(logging.WARNING, logger="neuralode.plots"):
        assert [p.name for p in write_summary(sweep)] == ["summary.csv", "summary.md"]
        assert [p.name for p in write_summary(sweep)] == ["summary.csv", "summary.md"]
    assert [r.getMessage() for r in caplog.records] == [plots.HINT]  # once per process
    assert "pip install 'neuralode[plots]'" in plots.HINT
    assert not (sweep / "summary.png").exists() and not (sweep / "pareto.png").exists()
    assert not (sweep / "tb").exists()


def test_report_orders_jobs_numerically(tmp_path, no_figures):
    sweep = fake_sweep(tmp_path / "sweep", rtols=[10.0 ** -k for k in range(1, 12)])
    write_summary(sweep)
    jobs = [r["job"] for r in csv.DictReader(open(sweep / "summary.csv"))]
    assert jobs == [str(i) for i in range(11)]


def test_report_without_finished_jobs_fails_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "no job directories" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
