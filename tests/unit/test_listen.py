"""The listener's spool and loop without a sender: names that are digests, never header text; a full
disk answered A700 with nothing lost; a study completed only when quiet; a worklist locked by another
run scored after it."""

from __future__ import annotations

import errno
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radscan.errors import LockHeldError
from radscan.listen import OUT_OF_RESOURCES, SUCCESS, ListenSettings, Spool, _store_handler, listen
from tests.conftest import free_port


@settings(max_examples=40, deadline=None)
@given(study=st.text(max_size=80), sop=st.text(min_size=1, max_size=80))
def test_an_instance_lands_under_digests_whatever_its_uids_say(tmp_path_factory, study, sop):
    spool = Spool(tmp_path_factory.mktemp("spool"))
    path = spool.store(b"DICM data", study, sop)
    assert path.parent.parent == spool.incoming and path.read_bytes() == b"DICM data"
    assert len(path.parent.name) == 24 and path.name == path.name.lower() and len(path.stem) == 24
    assert not list(spool.root.rglob("*.part"))


def test_a_full_disk_is_out_of_resources_and_nothing_is_lost(tmp_path):
    spool = Spool(tmp_path / "spool")
    kept = spool.store(b"first", "1.2.3", "1.2.3.4")
    full = Spool(tmp_path / "spool", min_free_bytes=1 << 62)  # less free space than the reserve
    with pytest.raises(OSError) as refused:
        full.store(b"second", "1.2.3", "1.2.3.5")
    assert refused.value.errno == errno.ENOSPC and kept.read_bytes() == b"first"
    event = SimpleNamespace(request=SimpleNamespace(AffectedSOPInstanceUID="1.2.3.6"),
                            dataset={"StudyInstanceUID": "1.2.3"}, encoded_dataset=lambda include_meta: b"third")
    assert _store_handler(full, threading.Event())(event) == OUT_OF_RESOURCES
    assert _store_handler(spool, threading.Event())(event) == SUCCESS
    stopping = threading.Event()
    stopping.set()
    assert _store_handler(spool, stopping)(event) == OUT_OF_RESOURCES  # shutting down: the sender keeps it


def test_a_study_completes_when_quiet_and_a_restart_finds_what_was_left(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.store(b"a", "1.2.3", "1.2.3.1")
    spool.store(b"b", "1.2.3", "1.2.3.2")
    assert spool.complete(quiet_s=60) == []  # still arriving
    again = Spool(tmp_path / "spool")  # a restart: what was received counts as just arrived
    assert again.complete(quiet_s=60) == []
    done = again.complete(quiet_s=0)
    assert [count for _, count in done] == [2] and len(list(again.studies.rglob("*.dcm"))) == 2
    assert not any(again.incoming.iterdir())


def test_an_identical_resend_keeps_the_earlier_file_and_a_changed_one_replaces_it(tmp_path):
    """A sender's retry of an instance already scored leaves its file (size and mtime: the state
    store's identity) as it was, so it is not scored again; other content under the same UID replaces it."""
    spool = Spool(tmp_path / "spool")
    spool.store(b"first", "1.2.3", "1.2.3.1")
    spool.complete(quiet_s=0)
    [scored] = spool.studies.rglob("*.dcm")
    before = scored.stat().st_mtime_ns
    time.sleep(0.01)
    assert spool.store(b"first", "1.2.3", "1.2.3.1") == scored
    assert spool.complete(quiet_s=0) == [] and not any(spool.incoming.iterdir())
    assert scored.stat().st_mtime_ns == before and scored.read_bytes() == b"first"
    spool.store(b"second", "1.2.3", "1.2.3.1")
    assert [count for _, count in spool.complete(quiet_s=0)] == [1]
    assert scored.read_bytes() == b"second"


@pytest.mark.parametrize("complete_first", [True, False], ids=["earlier copy complete", "earlier copy arriving"])
@pytest.mark.parametrize("restart", [False, True])
def test_an_instance_sent_again_under_another_study_replaces_its_copy(tmp_path, complete_first, restart):
    """A trial: a PACS that merged two studies (or reconciled a patient) sent an instance again under a
    new Study Instance UID; the spool kept both copies, so the list showed the image twice, under the
    old study and patient too. The new copy replaces the old one wherever it lies, after a restart too."""
    spool = Spool(tmp_path / "spool")
    spool.store(b"as first sent", "1.2.3", "1.2.3.1")
    spool.store(b"another image", "1.2.3", "1.2.3.2")
    if complete_first:
        spool.complete(quiet_s=0)
    if restart:
        spool = Spool(tmp_path / "spool")
    spool.store(b"as sent after the merge", "1.2.9", "1.2.3.1")
    spool.complete(quiet_s=0)
    files = sorted(path.read_bytes() for path in spool.root.rglob("*.dcm"))
    assert files == [b"another image", b"as sent after the merge"]


def test_a_resend_after_its_earlier_study_was_cleaned_up_says_nothing_of_a_copy(tmp_path, caplog):
    """The spool's index outlives a cron clean-up of `studies/`: an instance sent again under another
    study then replaces nothing, and the log must not say it replaced an earlier copy."""
    import shutil

    spool = Spool(tmp_path / "spool")
    spool.store(b"first", "1.2.3", "1.2.3.1")
    spool.complete(quiet_s=0)
    shutil.rmtree(next(spool.studies.iterdir()))  # what `find SPOOL/studies -mtime +30 -exec rm -r` does
    with caplog.at_level("WARNING", logger="radscan.listen"):
        spool.store(b"again", "1.2.9", "1.2.3.1")
    assert "replaces the earlier copy" not in caplog.text
    assert [path.read_bytes() for path in spool.root.rglob("*.dcm")] == [b"again"]


def test_a_study_whose_only_instance_moved_away_is_not_reported(tmp_path):
    """A review: an instance moved to another study while its first study was still arriving left
    that study empty, and it was still reported complete (a --json line with 0 instances)."""
    spool = Spool(tmp_path / "spool")
    spool.store(b"before the merge", "1.2.3", "1.2.3.1")
    spool.store(b"after the merge", "1.2.9", "1.2.3.1")
    done = spool.complete(quiet_s=0)
    assert [count for _, count in done] == [1]
    assert [path.read_bytes() for path in spool.root.rglob("*.dcm")] == [b"after the merge"]
    assert len(list(spool.studies.iterdir())) == 1


def test_each_study_line_says_its_own_outcome(tmp_path):
    """A trial: one unreadable file left in the spool made every later study's --json line read "ok":
    false, exit code 3 (the run's, which counts every unreadable file listed). Each line also says its
    own study's files by status and whether they were all read."""
    from radscan.listen import _run_entries

    worklist = tmp_path / "report.csv"
    worklist.write_text("path,status\nold/1.dcm,error\nnew/2.dcm,ok\nnew/3.dcm,rejected\nbad/4.dcm,error\n")
    outcome = {"ok": False, "exit_code": 3, "run_id": "r", "worklist": str(worklist)}
    entries = {entry["study"]: entry for entry in _run_entries([("new", 2), ("bad", 1)], "", outcome)}
    assert entries["new"]["study_files"] == {"ok": 1, "rejected": 1} and entries["new"]["study_ok"] is True
    assert entries["bad"]["study_files"] == {"error": 1} and entries["bad"]["study_ok"] is False
    assert entries["new"]["exit_code"] == 3  # the run's, as documented


def test_a_worklist_locked_by_another_run_is_scored_after_it(tmp_path):
    pytest.importorskip("pynetdicom", reason="needs radscan[pacs]")
    spool = Spool(tmp_path / "spool")
    spool.store(b"a", "1.2.3", "1.2.3.1")
    calls, lines, stop = [], [], threading.Event()

    def run_score(inputs):
        calls.append(inputs)
        if len(calls) == 1:
            raise LockHeldError("held by the nightly run")
        stop.set()
        return {"run_id": "r2", "exit_code": 0}

    runner = threading.Thread(target=listen, args=(ListenSettings(port=free_port(), quiet_s=0, poll_s=0.05), spool,
                                                   run_score, lines.append, stop))
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive() and len(calls) == 2 and calls[1] == [spool.studies]
    assert [line["run_id"] for line in lines] == ["r2"] and lines[0]["instances"] == 1


def test_a_study_that_goes_on_arriving_is_not_completed(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.store(b"a", "1.2.3", "1.2.3.1")
    time.sleep(0.2)
    spool.store(b"b", "1.2.3", "1.2.3.2")
    assert spool.complete(quiet_s=0.15) == []  # its last instance is newer than that


def test_a_study_that_goes_quiet_while_an_instance_is_written_keeps_it(tmp_path, monkeypatch):
    """A second trial (issue 24): complete() moved a study whose next instance was being written,
    deleting its half-written file; the write failed and the sender got 0xA700 on a healthy disk."""
    import os

    spool = Spool(tmp_path / "spool")
    spool.store(b"first", "1.2.3", "1.2.3.1")
    real_fsync, writing = os.fsync, threading.Event()

    def slow_fsync(descriptor):
        writing.set()
        time.sleep(0.3)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    outcome: list = []
    writer = threading.Thread(target=lambda: outcome.append(spool.store(b"second", "1.2.3", "1.2.3.2")))
    writer.start()
    assert writing.wait(5)
    moved_while_writing = spool.complete(quiet_s=0)  # the first instance is quiet; the second is being written
    writer.join(5)
    assert moved_while_writing == [] and len(outcome) == 1 and outcome[0].read_bytes() == b"second"
    assert [count for _, count in spool.complete(quiet_s=0)] == [2]
    assert sorted(path.read_bytes() for path in spool.studies.rglob("*.dcm")) == [b"first", b"second"]


def test_allowed_ae_titles_from_a_variable_are_split_at_commas_not_spaces():
    """A second trial: RADSCAN_LISTEN_ALLOW_AE="MY PACS" allowed MY and PACS instead (Click splits a
    repeatable option's variable at spaces, and an AE title may hold one)."""
    from radscan.cli.scoring import AeTitles

    assert AeTitles().split_envvar_value("MY PACS,OTHER") == ["MY PACS", "OTHER"]
