"""The drift check (issue 21 item 7): a night's flagged share against its own history and the model's
calibration, as a function and end to end (the summary, the WARNING line, the page, the metrics)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from click.testing import CliRunner

from radscan.cli import cli
from radscan.drift import MIN_FILMS

from .conftest import CXR_DIR

SHIPPED = Path(__file__).parents[1] / "models" / "kermany-tiny"


def test_a_run_that_drifts_says_so_in_the_summary_the_log_and_the_metrics(tmp_path):
    films = sorted((CXR_DIR / "kermany_pediatric_224/val_abnormal").iterdir())[:MIN_FILMS + MIN_FILMS // 2]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for film in films[:MIN_FILMS // 2]:
        shutil.copy(film, inputs / film.name)
    out, metrics = tmp_path / "out" / "report.csv", tmp_path / "radscan.prom"
    args = ["score", str(inputs), "--out", str(out), "--json", "--workers", "1", "--no-residuals",
            "--metrics", str(metrics), "--model", str(SHIPPED)]
    first = json.loads(CliRunner().invoke(cli, args).stdout)
    assert first["drift"]["scored"] == MIN_FILMS // 2 and first["drift"]["warning"] == ""  # too few to judge
    assert first["drift"]["note"].startswith(f"not checked: {MIN_FILMS // 2} new films in this run")
    with sqlite3.connect(out.with_name("report.state.sqlite")) as db:  # five quiet nights: 1% flagged
        assert db.execute("SELECT scored FROM runs").fetchall() == [(MIN_FILMS // 2,)]
        fingerprint = db.execute("SELECT fingerprint FROM runs").fetchone()[0]
        db.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                       [(f"r{n}", f"2026-11-2{n}T02:00:00+00:00", 100, 1, fingerprint) for n in range(5)])
        # later nights of another model (or settings) flagged half their films: not this model's history
        db.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                       [(f"o{n}", f"2026-11-2{n}T03:00:00+00:00", 100, 50, "another model") for n in range(5)])
    for film in films[MIN_FILMS // 2:]:  # tonight: 20 new pneumonias beside the 10 of last night
        shutil.copy(film, inputs / film.name)
    result = CliRunner().invoke(cli, args)
    summary = json.loads(result.stdout)
    assert summary["drift"]["scored"] == MIN_FILMS  # only the films read anew
    # the history: last night's 10 films and the five quiet nights
    assert summary["drift"]["baseline"] < 0.05 and "over the last 6 runs" in summary["drift"]["warning"]
    assert summary["drift"]["warning"] in summary["problems"] and result.exit_code == 0
    assert "WARNING" in result.stderr and "over the last 6 runs" in result.stderr
    text = metrics.read_text()
    assert "radscan_drift_warning 1" in text and 'radscan_new_flagged_share{of="history"}' in text


    # nights without new films keep the warning: however many there are, and whatever --pictures says
    # (a second trial: it cleared after six empty runs, and at once with --pictures all)
    with sqlite3.connect(out.with_name("report.state.sqlite")) as db:
        history_key = db.execute("SELECT fingerprint FROM runs ORDER BY finished_at DESC LIMIT 1").fetchone()[0]
        # the two runs above as if they finished within one second (a fast machine): still newest first
        db.execute("UPDATE runs SET finished_at = '2026-12-01T02:00:00+00:00' WHERE finished_at > '2026-12'")
        db.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                       [(f"e{n}", f"2099-01-0{n + 1}T02:00:00+00:00", 0, 0, history_key) for n in range(8)])
    quiet = json.loads(CliRunner().invoke(cli, [*args, "--pictures", "all"]).stdout)
    # tonight is judged by the newest run (20 films), not pooled with the one before it
    assert quiet["drift"]["scored"] == 0, quiet["drift"]
    tonight = summary["drift"]["flagged"]
    assert f"{tonight} of 20 new films of this run and the 1 run before it" in quiet["drift"]["warning"], quiet["drift"]
    text = metrics.read_text()  # the metrics show the share the warning is about
    assert "radscan_drift_warning 1" in text and f'radscan_new_flagged_share{{of="judged"}} {tonight / 20:g}' in text
    assert 'of="this_run"' not in text  # no new film tonight: no share of its own
