"""`radscan score --scheduler`: on a Dask LocalCluster of 2 worker processes, the same worklist
and pictures as on one machine (real data), the same failure guarantees when a worker dies, and
clear errors when the cluster cannot be used."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from radscan.cli import cli
from radscan.errors import ExitCode, ModelError, NoInputError

from .conftest import CXR_DIR, DICOM_DIR, free_port

pytest.importorskip("distributed", reason="needs radscan[dask]: pip install -e '.[dev]'")

REPO = Path(__file__).resolve().parents[1]
# what differs between two runs of the same inputs, whatever runs them
_PER_RUN = ("run_id", "scored_at")


@pytest.fixture()
def mixed(tmp_path) -> Path:
    """Real films of every kind: DICOM CR/DX (one study of two images), paediatric JPEGs, a DICOM
    SR (skipped), a truncated JPEG (error) and a text file."""
    import pydicom

    root = tmp_path / "incoming"
    (root / "cr").mkdir(parents=True)
    shutil.copy(DICOM_DIR / "fo-dicom/CR-MONO1-10-chest", root / "cr" / "IM1")
    shutil.copy(DICOM_DIR / "highdicom/dx_image.dcm", root / "cr" / "IM2")
    ds = pydicom.dcmread(DICOM_DIR / "nih-cxr14-udacity/test1_no_finding.dcm")
    (root / "nih").mkdir()
    ds.save_as(root / "nih" / "a.dcm")
    shutil.copy(DICOM_DIR / "pydicom/test-SR.dcm", root / "nih" / "sr.dcm")
    for label, folder, count in (("normal", "train_normal", 12), ("pneumonia", "val_abnormal", 12)):
        for index, jpeg in enumerate(sorted((CXR_DIR / "kermany_pediatric_224" / folder).iterdir())[:count]):
            (root / f"{label}{index:02d}").mkdir()
            shutil.copy(jpeg, root / f"{label}{index:02d}" / jpeg.name)
    (root / "broken").mkdir()
    (root / "broken" / "cut.jpeg").write_bytes(jpeg.read_bytes()[:300])
    (root / "broken" / "notes.txt").write_text("not an image")
    return root


def _score(*args: str):
    result = CliRunner().invoke(cli, ["score", *args, "--json"], auto_envvar_prefix="RADSCAN")
    objects = [line for line in result.output.splitlines() if line.startswith("{")]
    return result, json.loads(objects[-1]) if objects else {}


def _table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{key: value for key, value in row.items() if key not in _PER_RUN} for row in csv.DictReader(handle)]


def _pictures(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.glob("*.png")}


def _assert_same_outputs(one: Path, other: Path) -> None:
    """Two worklists of the same inputs: equal row for row, apart from run id and timestamps."""
    rows, others = _table(one), _table(other)
    differences = {row["path"]: {key: (value, twin.get(key)) for key, value in row.items() if twin.get(key) != value}
                   for row, twin in zip(rows, others, strict=False)}
    assert rows == others, {path: change for path, change in differences.items() if change}
    assert _table(one.with_name(one.stem + "_studies.csv")) == _table(other.with_name(other.stem + "_studies.csv"))
    pictures = _pictures(one.with_name(one.stem + "_residuals"))
    assert pictures and pictures == _pictures(other.with_name(other.stem + "_residuals"))


def test_a_local_cluster_gives_the_same_worklist_and_pictures(mixed, tmp_path):
    here, there = tmp_path / "here" / "report.csv", tmp_path / "there" / "report.csv"
    result, alone = _score(str(mixed), "--out", str(here), "--batch-size", "8")
    assert result.exit_code == ExitCode.PARTIAL, result.output  # the truncated JPEG
    result, spread = _score(str(mixed), "--out", str(there), "--batch-size", "8", "--scheduler", "local:2")
    assert result.exit_code == ExitCode.PARTIAL, result.output
    assert spread["counts"] == alone["counts"] and spread["counts"]["error"] == 1 and spread["scored_now"] == 30
    _assert_same_outputs(here, there)
    # the next night, nothing new: only the file that failed is read again (failures are retried)
    result, again = _score(str(mixed), "--out", str(there), "--batch-size", "8", "--scheduler", "local:2")
    unchanged = [{k: v for k, v in row.items() if k != "new_this_run"} for row in _table(there)]
    assert again["scored_now"] == 1 and unchanged == [{k: v for k, v in row.items() if k != "new_this_run"}
                                                      for row in _table(here)]


@pytest.mark.parametrize("change", ["size", "mtime"])
def test_a_worker_that_sees_another_copy_of_a_file_gives_an_error_row(mixed, tmp_path, monkeypatch, change):
    """A trial: a worker whose mount showed other content at a path (a stale replica) scored that
    content under the driver's listing with exit 0, and later runs kept the row, the driver's file
    being unchanged. A file whose size or time differs on the worker is an error row (read again by the
    next run); here the driver's listing is made to differ instead."""
    import radscan.score
    from radscan.state import FileIdentity

    real = radscan.score._identity

    def listed_otherwise(found):
        identity = real(found)
        if not found.path.startswith("normal00/"):
            return identity
        if change == "size":
            return FileIdentity(identity.key, identity.size + 1, identity.mtime_ns)
        return FileIdentity(identity.key, identity.size, identity.mtime_ns - 10**10)

    there = tmp_path / "there" / "report.csv"
    monkeypatch.setattr(radscan.score, "_identity", listed_otherwise)
    result, summary = _score(str(mixed), "--out", str(there), "--batch-size", "8", "--scheduler", "local:2")
    assert result.exit_code == ExitCode.PARTIAL, result.output
    row = next(row for row in _table(there) if row["path"].startswith("normal00/"))
    assert row["status"] == "error" and "on Dask worker" in row["reason"] and "stale" in row["reason"], row
    assert summary["counts"]["error"] == 2  # and the truncated JPEG
    monkeypatch.setattr(radscan.score, "_identity", real)
    result, again = _score(str(mixed), "--out", str(there), "--batch-size", "8", "--scheduler", "local:2")
    assert next(row for row in _table(there) if row["path"].startswith("normal00/"))["status"] == "ok"


def test_a_file_that_kills_its_worker_costs_one_row_as_on_one_machine(mixed, tmp_path, monkeypatch):
    monkeypatch.setenv("RADSCAN_TEST_FAULT", "crash:IM2")  # the worker reading cr/IM2 dies, every time
    here, there = tmp_path / "here" / "report.csv", tmp_path / "there" / "report.csv"
    # in a process of its own: joblib reuses worker processes started before the fault was set
    alone = subprocess.run([sys.executable, "-m", "radscan", "score", str(mixed), "--out", str(here), "--batch-size",
                            "8", "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert alone.returncode == ExitCode.PARTIAL, alone.stderr[-3000:]
    result, summary = _score(str(mixed), "--out", str(there), "--batch-size", "8", "--scheduler", "local:2")
    assert result.exit_code == ExitCode.PARTIAL, result.output
    row = next(row for row in _table(there) if row["path"] == "cr/IM2")
    assert row["status"] == "error" and "crashed" in row["reason"]
    _assert_same_outputs(here, there)


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(mixed, tmp_path):
    """SIGKILL one of two workers while the run is going: Dask hands its batches to the other
    (and to the restarted one) and the worklist is the single-machine one."""
    from distributed import Client, LocalCluster

    for index, jpeg in enumerate(sorted((CXR_DIR / "kermany_pediatric_224" / "val_abnormal").iterdir())[12:72]):
        (mixed / f"more{index:02d}").mkdir()
        shutil.copy(jpeg, mixed / f"more{index:02d}" / jpeg.name)
    here, there = tmp_path / "here" / "report.csv", tmp_path / "there" / "report.csv"
    result, _ = _score(str(mixed), "--out", str(here), "--batch-size", "4")
    assert result.exit_code == ExitCode.PARTIAL, result.output

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        pids = client.run(os.getpid)
        run = subprocess.Popen([sys.executable, "-m", "radscan", "score", str(mixed), "--out", str(there),
                                "--batch-size", "4", "--scheduler", cluster.scheduler_address, "--json"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        store = there.with_name("report.state.sqlite")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None and _stored(store) < 8:
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before a worker could be killed"
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        killed_at = _stored(store)
        output, errors = run.communicate(timeout=300)
    assert run.returncode == ExitCode.PARTIAL, errors[-3000:]
    assert killed_at < 90 and json.loads(output.strip().splitlines()[-1])["scored_now"] == 90
    _assert_same_outputs(here, there)


def _stored(store: Path) -> int:
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=0.1) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("scheduler, code, message", [
    ("local:0", ExitCode.USAGE, "local:N needs a number"),
    ("somewhere", ExitCode.USAGE, "must be a scheduler address"),
    ("xyz://127.0.0.1:8786", ExitCode.USAGE, "must be a scheduler address"),
    ("tcp://[::1", ExitCode.USAGE, "must be a scheduler address"),
    ("inproc://x", ExitCode.USAGE, "must be a scheduler address"),
    ("tcp://127.0.0.1:9", ExitCode.UNAVAILABLE, "cannot use the Dask scheduler"),
])
def test_a_cluster_that_cannot_be_used_says_so(mixed, tmp_path, scheduler, code, message, monkeypatch):
    monkeypatch.setattr("radscan.cluster._CONNECT_TIMEOUT_S", 3)
    result, summary = _score(str(mixed), "--out", str(tmp_path / "r.csv"), "--scheduler", scheduler)
    assert result.exit_code == code and message in result.output, result.output
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("answer", [b"", os.urandom(4096)], ids=["silent", "garbage"])
def test_a_port_that_does_not_speak_dask_is_exit_69_not_a_hang(mixed, tmp_path, monkeypatch, answer):
    """A port that keeps the handshake waiting, or answers garbage: given up in time, one line."""
    import socket
    import threading

    monkeypatch.setattr("radscan.cluster._CONNECT_TIMEOUT_S", 2)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []

    def serve() -> None:
        connection, _ = server.accept()
        accepted.append(connection)
        if answer:
            connection.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    started = time.monotonic()
    result, summary = _score(str(mixed), "--out", str(tmp_path / "r.csv"), "--scheduler",
                             f"tcp://127.0.0.1:{server.getsockname()[1]}")
    assert result.exit_code == ExitCode.UNAVAILABLE, result.output
    assert time.monotonic() - started < 30 and "Traceback" not in result.output and "PiB" not in result.output
    server.close()


def test_a_single_file_can_be_scored_on_a_cluster(mixed, tmp_path):
    film = next((mixed / "pneumonia00").iterdir())
    result, summary = _score(str(film), "--out", str(tmp_path / "r.csv"), "--scheduler", "local:1")
    assert result.exit_code == ExitCode.OK and summary["counts"]["ok"] == 1, result.output


@pytest.mark.slow
def test_losing_the_scheduler_mid_run_is_exit_69_and_a_rerun_finishes(mixed, tmp_path):
    for index, jpeg in enumerate(sorted((CXR_DIR / "kermany_pediatric_224" / "val_abnormal").iterdir())[12:72]):
        (mixed / f"more{index:02d}").mkdir()
        shutil.copy(jpeg, mixed / f"more{index:02d}" / jpeg.name)
    port = free_port()
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
            "--no-dashboard"]
    scheduler = subprocess.Popen(dask, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}",
                               "--nthreads", "1", "--no-dashboard"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=REPO)
    out = tmp_path / "out" / "report.csv"
    try:
        run = subprocess.Popen([sys.executable, "-m", "radscan", "score", str(mixed), "--out", str(out),
                                "--batch-size", "4", "--scheduler", f"tcp://127.0.0.1:{port}", "--json"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and run.poll() is None and _stored(out.with_name("report.state.sqlite")) < 8:
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before the scheduler could be killed"
        scheduler.kill()
        output, errors = run.communicate(timeout=120)
    finally:
        for process in (scheduler, worker):
            process.kill()
            process.wait()
    assert run.returncode == ExitCode.UNAVAILABLE, errors[-2000:]
    assert "lost the Dask scheduler" in json.loads(output.strip().splitlines()[-1])["error"]
    result, summary = _score(str(mixed), "--out", str(out), "--batch-size", "4")
    assert result.exit_code == ExitCode.PARTIAL and summary["reused"] > 0  # what was scored is kept
    assert len(_table(out)) == 90


class _Workers:
    """A stand-in for a Dask client whose second worker misses `missing` or runs `versions`."""

    def __init__(self, missing: list[str], versions: tuple[str, str] | None = None):
        from radscan.cluster import _versions

        self.missing, self.versions = missing, versions or _versions()

    def run(self, function, *args):
        if function.__name__ == "_versions":
            return {"tcp://10.0.0.7:40000": function(), "tcp://10.0.0.8:40000": self.versions}
        return {"tcp://10.0.0.7:40000": [], "tcp://10.0.0.8:40000": self.missing}


def test_workers_that_cannot_see_the_inputs_or_run_another_radscan_are_refused(tmp_path):
    from radscan.cluster import Cluster, _visible
    from radscan.errors import UnavailableError

    assert _visible([str(tmp_path), str(tmp_path / "gone")]) == [str(tmp_path / "gone")]
    cluster = Cluster.__new__(Cluster)
    cluster.client = _Workers(["/data/incoming"])
    with pytest.raises(NoInputError, match="tcp://10.0.0.8:40000 cannot see /data/incoming"):
        cluster._check_workers(["/data/incoming"], tmp_path, [])
    cluster.client = _Workers([str(tmp_path.resolve())])
    with pytest.raises(ModelError, match="cannot see the model"):
        cluster._check_workers(["/data/incoming"], tmp_path, [])
    cluster.client = _Workers([], versions=("0.9.9-other", "3"))
    with pytest.raises(UnavailableError, match="tcp://10.0.0.8:40000 runs radscan 0.9.9-other"):
        cluster._check_workers(["/data/incoming"], tmp_path, [])
