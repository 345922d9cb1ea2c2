"""`radscan listen` (issue 24 part 2): studies sent by real senders on loopback (pynetdicom's storescu,
several associations at once, a sender that aborts mid-association, Orthanc) reach the worklist;
what is not a chest film is listed as skipped; calling AE titles outside --allow-ae are rejected;
SIGTERM ends the listener cleanly and a restart scores what arrived before."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from .conftest import DICOM_DIR, REPO, free_port
from .support import Orthanc, needs

pytest.importorskip("pynetdicom", reason="needs radscan[pacs]: pip install -e '.[dev]'")

EXAMPLES = REPO / "examples" / "studies"
CHESTS = [EXAMPLES / "CR0002" / "IM00001", EXAMPLES / "CR0003" / "IM00001.dcm"]  # two CR chest studies
NOT_A_CHEST = DICOM_DIR / "pydicom" / "CT_small.dcm"


class Listener:
    """`radscan listen` in a process of its own, with --json lines and its log in files."""

    def __init__(self, folder: Path, *extra: str):
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.out = folder / "worklist" / "report.csv"
        self.stdout, self.stderr = open(folder / "stdout.txt", "a"), open(folder / "stderr.txt", "a")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "radscan", "listen", "--port", str(self.port), "--out", str(self.out),
             "--spool", str(folder / "spool"), "--quiet-seconds", "1", "--workers", "1", "--json", *extra],
            stdout=self.stdout, stderr=self.stderr, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._wait(lambda: "listening as" in self.log(), "the listener did not start")

    def log(self) -> str:
        return (self.folder / "stderr.txt").read_text()

    def events(self) -> list[dict]:
        return [json.loads(line) for line in (self.folder / "stdout.txt").read_text().splitlines() if line.strip()]

    def lines(self) -> list[dict]:
        """The --json lines of scored studies (the last line, when it stops, says so)."""
        return [event for event in self.events() if "study" in event]

    def rows(self) -> list[dict[str, str]]:
        with open(self.out, encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def _wait(self, condition, message: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"{message}: the listener exited {self.process.returncode}: {self.log()[-2000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{message}: {self.log()[-2000:]}")

    def wait_for_studies(self, count: int) -> list[dict]:
        self._wait(lambda: len(self.lines()) >= count, f"{count} studies were not scored")
        return self.lines()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.stdout.close()
            self.stderr.close()


def _storescu(port: int, *files: Path, calling: str = "PACS") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(port), *map(str, files),
                           "-aet", calling, "-aec", "RADSCAN", "-cx"], capture_output=True, text=True, timeout=120)


def test_studies_sent_at_once_are_spooled_scored_and_listed(tmp_path):
    listener = Listener(tmp_path / "listener")
    try:
        echo = subprocess.run([sys.executable, "-m", "pynetdicom", "echoscu", "127.0.0.1", str(listener.port),
                               "-aet", "PACS", "-aec", "RADSCAN"], capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0, echo.stdout + echo.stderr  # C-ECHO: how a PACS tests a new destination
        senders = [subprocess.Popen([sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(listener.port),
                                     str(path), "-aet", "PACS", "-aec", "RADSCAN", "-cx"])
                   for path in [*CHESTS, NOT_A_CHEST]]  # three associations at once
        assert [sender.wait(timeout=120) for sender in senders] == [0, 0, 0]
        lines = listener.wait_for_studies(3)
        assert {line["instances"] for line in lines} == {1} and all(line["exit_code"] == 0 for line in lines)
        rows = listener.rows()
        assert len(rows) == 3 and sorted(row["status"] for row in rows) == ["ok", "ok", "skipped"]
        skipped = next(row for row in rows if row["status"] == "skipped")
        assert skipped["Modality"] == "CT" and "Modality CT is not scored" in skipped["reason"]
        sent = {str(pydicom.dcmread(path).SOPInstanceUID) for path in CHESTS}
        assert {row["SOPInstanceUID"] for row in rows if row["status"] == "ok"} == sent
        spool = listener.folder / "spool"
        assert not list(spool.rglob("*.part")) and not any((spool / "incoming").iterdir())
        names = [path.relative_to(spool).as_posix() for path in spool.rglob("*.dcm")]
        assert all(len(part.removesuffix(".dcm")) == 24 for name in names for part in name.split("/")[1:]), names
    finally:
        assert listener.stop() == 0  # SIGTERM: a clean end
    assert "stopped listening" in listener.log() and listener.events()[-1]["event"] == "stopped"
    assert all(line["ok"] is True and line["results_pending"] is False for line in listener.lines())
    assert "association from PACS" in listener.log()  # logged without -v: a service's associations


def test_a_sender_that_aborts_keeps_what_was_acknowledged_and_strangers_are_refused(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    listener = Listener(tmp_path / "listener", "--allow-ae", "PACS")
    try:
        stranger = _storescu(listener.port, CHESTS[0], calling="STRANGER")
        assert stranger.returncode != 0 or "rejected" in (stranger.stdout + stranger.stderr).lower()
        listener._wait(lambda: "association from STRANGER" in listener.log(), "a rejected association is not logged")
        misaddressed = subprocess.run([sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1",
                                       str(listener.port), str(CHESTS[0]), "-aet", "PACS", "-aec", "SOMEONE", "-cx"],
                                      capture_output=True, text=True, timeout=120)
        assert misaddressed.returncode != 0 or "rejected" in (misaddressed.stdout + misaddressed.stderr).lower()
        dataset = pydicom.dcmread(CHESTS[0])
        ae = AE(ae_title="PACS")
        ae.add_requested_context(ComputedRadiographyImageStorage, dataset.file_meta.TransferSyntaxUID)
        association = ae.associate("127.0.0.1", listener.port, ae_title="RADSCAN")
        assert association.is_established
        assert association.send_c_store(dataset).Status == 0x0000
        association.abort()  # the sender drops the association after its first instance
        lines = listener.wait_for_studies(1)
        assert lines[0]["instances"] == 1
        assert [row["SOPInstanceUID"] for row in listener.rows()] == [str(dataset.SOPInstanceUID)]
    finally:
        assert listener.stop() == 0


def test_an_instance_without_its_uid_is_refused_at_once_and_the_rest_is_delivered(tmp_path):
    """A trial: an object whose SOP Instance UID is empty got no answer at all (pynetdicom drops such
    a request), so the sender waited out its timeout, aborted, and the instances after it in the same
    association were never delivered. It is refused with C000 at once, said in the log, and the next
    instance arrives and is scored."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    good = pydicom.dcmread(CHESTS[0])
    broken = pydicom.dcmread(CHESTS[0])
    broken.SOPInstanceUID = ""
    listener = Listener(tmp_path / "listener")
    try:
        ae = AE(ae_title="PACS")
        ae.dimse_timeout = 20
        ae.add_requested_context(ComputedRadiographyImageStorage, good.file_meta.TransferSyntaxUID)
        association = ae.associate("127.0.0.1", listener.port, ae_title="RADSCAN")
        assert association.is_established
        started = time.monotonic()
        assert association.send_c_store(broken).Status == 0xC000
        assert time.monotonic() - started < 10
        assert association.send_c_store(good).Status == 0x0000
        association.release()
        listener.wait_for_studies(1)
        assert [row["SOPInstanceUID"] for row in listener.rows()] == [str(good.SOPInstanceUID)]
        assert "without a SOP Instance UID (status C000)" in listener.log()
    finally:
        assert listener.stop() == 0


def test_a_restart_scores_what_arrived_before_it_stopped(tmp_path):
    folder = tmp_path / "listener"
    listener = Listener(folder, "--quiet-seconds", "600")  # nothing completes while it runs
    try:
        assert _storescu(listener.port, CHESTS[0]).returncode == 0
    finally:
        assert listener.stop() == 0
    assert not listener.out.exists() and len(list((folder / "spool" / "incoming").rglob("*.dcm"))) == 1
    assert "1 instance(s) of studies still arriving stay in" in listener.log()
    again = Listener(folder)  # --quiet-seconds 1: the study it kept completes
    try:
        assert again.wait_for_studies(1)[0]["instances"] == 1 and len(again.rows()) == 1
    finally:
        assert again.stop() == 0
    # a run made at the start (or to send waiting results again) has its log and --json lines too
    third = Listener(folder)
    try:
        third._wait(lambda: any(event.get("event") == "restart" for event in third.events()), "no restart line")
        restart = next(event for event in third.events() if event.get("event") == "restart")
        assert restart["study"] is None and restart["ok"] is True and restart["results_pending"] is False
        assert "the complete studies found at the start" in third.log() and len(third.rows()) == 1
    finally:
        assert third.stop() == 0


def test_orthanc_sends_a_study_that_reaches_the_worklist(tmp_path):
    needs("Orthanc", "orthanc")
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"radscan": ["RADSCAN", "127.0.0.1", port]})
    try:
        uploaded = [orthanc.post("/instances", path.read_bytes())["ID"] for path in CHESTS]
        listener = Listener.__new__(Listener)  # on the port Orthanc was told of
        listener.folder, listener.port = tmp_path / "listener", port
        listener.folder.mkdir()
        listener.out = listener.folder / "worklist" / "report.csv"
        listener.stdout, listener.stderr = open(listener.folder / "stdout.txt", "a"), open(  # noqa: SIM115
            listener.folder / "stderr.txt", "a")
        listener.process = subprocess.Popen(
            [sys.executable, "-m", "radscan", "-v", "listen", "--port", str(port), "--out", str(listener.out),
             "--quiet-seconds", "1", "--workers", "1", "--json"],
            stdout=listener.stdout, stderr=listener.stderr, cwd=REPO)
        try:
            listener._wait(lambda: "listening as" in listener.log(), "the listener did not start")
            answer = orthanc.post("/modalities/radscan/store", json.dumps({"Resources": uploaded,
                                                                          "Synchronous": True}).encode())
            assert answer.get("FailedInstancesCount", 0) == 0, answer
            listener.wait_for_studies(2)
            assert sorted(row["status"] for row in listener.rows()) == ["ok", "ok"]
            assert (listener.out.parent / "report_spool" / "studies").is_dir()  # the default spool, beside --out
        finally:
            assert listener.stop() == 0
    finally:
        orthanc.stop()
        shutil.rmtree(tmp_path / "orthanc", ignore_errors=True)


@pytest.mark.parametrize("option", [["--ae-title", "RADSCAN_TOO_LONG_AET"], ["--ae-title", "A\\B"],
                                    ["--allow-ae", ""], ["--allow-ae", "   "]])
def test_an_ae_title_that_dicom_forbids_is_a_usage_error_and_creates_nothing(tmp_path, option):
    from click.testing import CliRunner

    from radscan.cli import cli

    result = CliRunner().invoke(cli, ["listen", "--port", str(free_port()), "--out", str(tmp_path / "wl" / "r.csv"),
                                      *option])
    assert result.exit_code == 2 and "1-16 printable ASCII characters" in result.stderr, result.output
    assert not (tmp_path / "wl").exists()


def test_what_the_first_run_would_refuse_is_refused_before_listening(tmp_path):
    """A helper's trial (issue 24): a worklist inside the spool, or an edited model, was found only by
    the first scoring run, after studies had been acknowledged; now the listener does not start."""
    import json as json_module

    from click.testing import CliRunner

    from radscan.cli import cli

    spool = tmp_path / "spool"
    inside = CliRunner().invoke(cli, ["listen", "--port", str(free_port()), "--spool", str(spool),
                                      "--out", str(spool / "studies" / "report.csv")])
    assert inside.exit_code == 2 and "listening as" not in inside.output, inside.output
    arriving = CliRunner().invoke(cli, ["listen", "--port", str(free_port()), "--spool", str(spool),
                                        "--out", str(spool / "incoming" / "report.csv")])  # anywhere in the spool
    assert arriving.exit_code == 2 and "inside the spool" in arriving.output, arriving.output
    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "kermany-tiny", model)
    metadata = json_module.loads((model / "model.json").read_text())
    metadata["calibration"]["threshold"] = 0.5
    (model / "model.json").write_text(json_module.dumps(metadata))
    edited = CliRunner().invoke(cli, ["listen", "--port", str(free_port()), "--spool", str(tmp_path / "s2"),
                                      "--out", str(tmp_path / "wl" / "report.csv"), "--model", str(model)])
    assert edited.exit_code == 65 and "listening as" not in edited.output, edited.output
