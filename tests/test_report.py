"""neuralode-report: table and plot from the jobs' metrics.json files."""

from __future__ import annotations

import csv
import json

from PIL import Image

from neuralode.report import main, write_summary


def fake_sweep(root, rtols=(0.1, 0.01, 0.001)):
    for i, r in enumerate(rtols):
        job = root / str(i)
        job.mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps({
            "overrides": [f"rtol={r}"], "model": "odenet", "method": "dopri5", "grad": "adjoint", "rtol": r,
            "atol": 1e-3, "test_acc": 0.9 + i / 100, "test_loss": 0.3, "nfe_forward": 14.0 + 6 * i,
            "nfe_backward": 20.0 + 6 * i, "time_per_iter": 0.5, "train_time": 30.0}))
    return root


def test_report_writes_csv_markdown_and_png(tmp_path, capsys):
    sweep = fake_sweep(tmp_path / "sweep")
    assert main([str(sweep)]) == 0
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["overrides"] for r in rows] == ["rtol=0.1", "rtol=0.01", "rtol=0.001"]
    assert [float(r["nfe_forward"]) for r in rows] == [14.0, 20.0, 26.0]
    md = (sweep / "summary.md").read_text().splitlines()
    assert md[0].startswith("| job | status | exit_code | overrides") and len(md) == 2 + 3
    assert {r["status"] for r in rows} == {"completed"}  # metrics.json without a status: an older, finished run
    with Image.open(sweep / "summary.png") as img:
        assert img.size == (1000, 420)
        assert len(img.getcolors(maxcolors=10_000) or []) > 2  # something was drawn
    assert "rtol=0.001" in capsys.readouterr().out


def test_report_orders_jobs_numerically(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", rtols=[10.0 ** -k for k in range(1, 12)])
    write_summary(sweep)
    jobs = [r["job"] for r in csv.DictReader(open(sweep / "summary.csv"))]
    assert jobs == [str(i) for i in range(11)]


def test_report_without_finished_jobs_fails_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "no job directories" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
