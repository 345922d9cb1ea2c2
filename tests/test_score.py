"""`radscan score` end to end on real files: worklist, residuals, nightly reruns, kill -9, lock, PHI,
bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from radscan.cli import cli
from radscan.errors import ExitCode, LockHeldError
from radscan.pictures import picture_layout
from radscan.state import hold_lock
from radscan.worklist import REPORT_COLUMNS, STUDY_COLUMNS

from .conftest import CXR_DIR, DICOM_DIR, PATIENT_ID
from .support import read_rows


def _run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, auto_envvar_prefix="RADSCAN")


def _problems(result) -> list[str]:
    """A run's problems (its --json summary) but the one every film of the tiny model carries: it was
    trained on fewer than 50 normals, so it has no QC reference (radscan.qc.UNCHECKED)."""
    from radscan.qc import UNCHECKED

    return [problem for problem in json.loads(result.stdout)["problems"] if problem != UNCHECKED]


def test_worklist_columns_sorting_and_residuals(studies, tiny_model, tmp_path):
    out = tmp_path / "out" / "report.csv"
    result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--json", "--workers", "2",
                  "--pictures", "all")
    assert result.exit_code == ExitCode.OK, result.output
    summary = json.loads(result.stdout)
    assert summary["files"] == 11 and summary["counts"] == {"ok": 10, "skipped": 1, "error": 0, "rejected": 0}

    rows = read_rows(out)
    assert tuple(rows[0]) == REPORT_COLUMNS
    assert len(rows) == 11 and len({r["path"] for r in rows}) == 11
    scored = [r for r in rows if r["status"] == "ok"]
    keys = [(-float(r["study_score"]), -float(r["score"])) for r in scored]
    assert keys == sorted(keys), "not sorted by study score, then score"
    assert [int(r["rank"]) for r in scored] == list(range(1, 11))
    for r in scored:
        assert 0.0 <= float(r["score"]) <= 1.0  # 1.0 where a large z saturates it (score_z keeps the order)
        assert 1 / (1 + np.exp(-float(r["score_z"]))) == pytest.approx(float(r["score"]), abs=1e-3)  # sigmoid(z)
        assert (r["flag"] == "true") == (float(r["score"]) >= float(r["threshold"]))
        assert r["model_sha256"] and r["preprocess_version"] == "rs-pre-1" and r["run_id"] == summary["run_id"]
    nih = [r for r in rows if r["path"].startswith("nih/") and r["status"] == "ok"]
    assert float(nih[0]["study_score"]) == pytest.approx(max(float(r["score"]) for r in nih))
    # the device, for flag rates per scanner (issue 21 item 7): as the headers give it, in both lists
    devices = {r["path"]: (r["Manufacturer"], r["ManufacturerModelName"], r["StationName"]) for r in rows}
    assert devices["cr1/IM1"] == ("FUJI PHOTO FILM CO. LTD.", "9000", "")
    assert devices["cr1/IM2"] == ("FUJIFILM Corporation", "", "DEVO") and devices["nih/a.dcm"] == ("", "", "")

    study_rows = read_rows(out.parent / "report_studies.csv")
    assert tuple(study_rows[0]) == STUDY_COLUMNS
    assert len(study_rows) == 9  # cr1 holds two studies (two StudyInstanceUIDs); nih is one
    assert {r["StationName"] for r in study_rows if r["top_path"] == "cr1/IM2"} == {"DEVO"}
    assert [float(s["study_score"]) for s in study_rows] == sorted((float(s["study_score"]) for s in study_rows),
                                                                   reverse=True)
    nih_study = next(s for s in study_rows if s["top_path"].startswith("nih/"))
    assert (nih_study["images"], nih_study["images_scored"], nih_study["images_error"]) == ("2", "2", "0")

    pngs = [out.parent / r["residual_png"] for r in scored]
    assert all(p.is_file() for p in pngs) and len(set(pngs)) == 10
    pictures = [np.asarray(Image.open(p)) for p in pngs[:3]]
    # caption (result, identity, and the tiny model's QC note: no reference) on top, then the film and the
    # map at the film's own ratio, and lines below that say what the map is
    width = round(512 * min(2.0, max(0.5, int(scored[0]["columns"]) / int(scored[0]["rows"]))))
    top = pictures[0].shape[0] - 512 - picture_layout("density")["below"]
    assert top >= 52 and (top - 12) % 20 == 0, top  # 12 px and 20 a caption line
    # no reconstruction panel: the tiny model's critic score is not made of the reconstruction
    assert pictures[0].shape[1] == 2 * width + picture_layout("critic")["fixed_width"]
    readme = out.with_name("report_README.txt").read_text()  # and the note beside the list says what they show
    assert "map of where it raises the anomaly score" in readme and "reconstruction" not in readme
    input_panel = pictures[0][top:top + 512, :width].astype(int)
    score_panel = pictures[0][top:top + 512, width + 8:2 * width + 8].astype(int)
    assert (input_panel[..., 0] == input_panel[..., 2]).all()  # the input, grey
    assert (score_panel[..., 0] - score_panel[..., 2] > 40).any()  # the score map, in colour over it
    assert not np.array_equal(pictures[0], pictures[1])
    assert all(PATIENT_ID not in p.name for p in pngs)
    assert not Image.open(pngs[0]).info.get("text")


@pytest.mark.parametrize("modality", ["DR", "OT", "MG"])
def test_a_study_whose_every_image_the_policy_skips_still_says_so(studies, tiny_model, tmp_path, modality):
    """Issue 22 item 10: a DX chest whose Modality says DR or OT dropped out of the study list with
    exit 0. A study with a skipped image says so; one whose every image was skipped is listed last,
    unflagged, with the reason; a report without pixels (the SR) makes no study of its own."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(DICOM_DIR / "nih-cxr14-udacity/test1_no_finding.dcm")
    ds.Modality, ds.StudyInstanceUID, ds.SOPInstanceUID = modality, generate_uid(), generate_uid()
    (studies / "other").mkdir()
    ds.save_as(studies / "other" / "chest.dcm")
    ds.Modality, ds.SOPInstanceUID = "CT", generate_uid()  # a second image, skipped for another reason
    ds.save_as(studies / "other" / "scout.dcm")
    nih_study = pydicom.dcmread(studies / "nih" / "a.dcm").StudyInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SOPInstanceUID = modality, nih_study, generate_uid()  # a third nih image
    ds.save_as(studies / "nih" / "c.dcm")
    report = pydicom.dcmread(studies / "nih" / "sr.dcm")  # a report in the nih study: not an image
    report.StudyInstanceUID = nih_study
    report.save_as(studies / "nih" / "sr.dcm")
    out = tmp_path / "out" / "report.csv"
    result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--no-residuals")
    assert result.exit_code == ExitCode.OK, result.output

    study_rows = read_rows(out.parent / "report_studies.csv")
    assert len(study_rows) == 10
    last = study_rows[-1]
    assert last["top_path"] == "other/chest.dcm" and last["study_flag"] == "false" and not last["study_score"]
    assert (last["images"], last["images_scored"], last["images_skipped"]) == ("2", "0", "2")
    assert f"skipped by the selection policy (Modality {modality} is not scored" in last["study_note"]
    assert "1 other reason(s): see their rows" in last["study_note"]
    assert "the selection policy skipped it (if it is a chest film" in last["study_note"]  # not "review it yourself"
    nih = next(s for s in study_rows if s["top_path"].startswith("nih/"))
    assert (nih["images"], nih["images_scored"], nih["images_skipped"]) == ("3", "2", "1")
    assert "1 image(s) skipped by the selection policy (see their rows)" in nih["study_note"]
    assert not any(s["top_path"].endswith("sr.dcm") for s in study_rows)


def test_nightly_rerun_is_incremental_and_model_change_rescores(studies, tiny_model, tmp_path):
    out = tmp_path / "report.csv"
    args = ["score", str(studies), "--out", str(out), "--model", str(tiny_model), "--json"]
    first = json.loads(_run(*args).stdout)
    first_rows = {r["path"]: r for r in read_rows(out)}
    again = json.loads(_run(*args).stdout)
    assert (again["scored_now"], again["reused"]) == (0, 11)
    assert {r["path"]: r["score"] for r in read_rows(out)} == {p: r["score"] for p, r in first_rows.items()}
    assert {r["run_id"] for r in read_rows(out) if r["status"] == "ok"} == {first["run_id"]}

    new = studies / "normal9"
    new.mkdir()
    shutil.copy(sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[10], new / "x.jpeg")
    touched = studies / "normal0" / next((studies / "normal0").iterdir()).name
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    third = json.loads(_run(*args).stdout)
    assert (third["files"], third["scored_now"], third["reused"]) == (12, 2, 10)
    assert third["read_because"] == {"new": 1, "changed": 1}  # the summary says why each file was read

    other_model = tmp_path / "other_model"
    shutil.copytree(tiny_model, other_model)
    meta = json.loads((other_model / "model.json").read_text())
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    state = load_file(str(other_model / "model.safetensors"))
    with safe_open(str(other_model / "model.safetensors"), framework="pt") as handle:
        sealed = handle.metadata()  # the model's settings, sealed in the weights file
    state["threshold"] = state["threshold"] * 0 + 0.5
    save_file(state, str(other_model / "model.safetensors"), metadata=sealed)
    meta["calibration"]["threshold"] = 0.5
    meta["weights"]["sha256"] = hashlib.sha256((other_model / "model.safetensors").read_bytes()).hexdigest()
    (other_model / "model.json").write_text(json.dumps(meta))
    fourth = json.loads(_run("score", str(studies), "--out", str(out), "--model", str(other_model), "--json").stdout)
    assert (fourth["scored_now"], fourth["reused"]) == (12, 0)
    assert fourth["read_because"] == {"settings": 12}  # not "new": the files are the same, the model is not
    # but new to the drift check: a model put in place of another starts its history with every film it
    # scores (a trial: the check said "no new films" of 40 films re-scored, 65% flagged)
    scored = sum(r["status"] == "ok" for r in read_rows(out))
    assert fourth["drift"]["scored"] == scored > 0 and "no new films" not in fourth["drift"]["note"]
    assert {r["threshold"] for r in read_rows(out) if r["status"] == "ok"} == {"0.5"}
    said = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model)).stderr
    assert "12 files (12 read again under another model or settings): " in said


def test_a_new_reader_reads_every_file_again(tiny_model, tmp_path, monkeypatch):
    """Files an older reader read are not kept as it read them: a 16-bit colour PNG read as 8 bits
    (nearly black) passed quality control or was rejected, and a rerun kept that row while the file
    did not change (only error rows were retried). A new READER_REVISION reads every file once more."""
    import radscan.score

    films = tmp_path / "films"
    films.mkdir()
    for source in sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:3]:
        shutil.copy(source, films / source.name)
    out = tmp_path / "out" / "report.csv"
    args = ("score", str(films), "--out", str(out), "--model", str(tiny_model), "--json")
    assert json.loads(_run(*args).stdout)["scored_now"] == 3
    assert json.loads(_run(*args).stdout)["reused"] == 3
    monkeypatch.setattr(radscan.score, "READER_REVISION", radscan.score.READER_REVISION + 1)
    again = json.loads(_run(*args).stdout)
    assert (again["scored_now"], again["read_because"]) == (3, {"settings": 3})
    # a model renamed in its model.json (not sealed in the weights): the rows say the new name, as the
    # study list and the page do (a trial: reused rows kept the old one)
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_model, renamed)
    meta = json.loads((renamed / "model.json").read_text())
    meta["name"], meta["version"] = "site-model", "7"
    (renamed / "model.json").write_text(json.dumps(meta))
    for _ in range(2):
        result = _run("score", str(films), "--out", str(out), "--model", str(renamed), "--json")
        assert result.exit_code == ExitCode.OK, result.output
    assert {(row["model_name"], row["model_version"]) for row in read_rows(out)} == {("site-model", "7")}


@pytest.mark.parametrize("phi, patients, noted", [
    ("keep", ("PAT-AAAA-111", "PAT-BBBB-222"), 2), ("hash", ("PAT-AAAA-111", "PAT-BBBB-222"), 2),
    ("keep", ("PAT-AAAA-111", "PAT-BBBB-222", "PAT-CCCC-333"), 3), ("keep", ("PAT-AAAA-111", ""), 2),
    ("keep", ("PAT-AAAA-111", "PAT-AAAA-111"), 0), ("keep", ("", ""), 0), ("drop", ("PAT-AAAA-111", "PAT-B"), 0)])
def test_a_study_holding_two_patients_says_so(tiny_model, tmp_path, phi, patients, noted):
    """A trial: two patients' films under one Study Instance UID (a misconfigured modality or
    anonymiser) made one study row named after its top film's patient, and the other patient was on
    no list. The study's note says how many patients it holds (a film without a Patient ID beside
    films with one counts as one more: the study row may name none, a review), in the CSV and on the
    page, and the log warns without naming them; under --phi drop there is nothing to compare."""
    import pydicom

    inputs = tmp_path / "in"
    inputs.mkdir()
    ds = pydicom.dcmread(DICOM_DIR / "nih-cxr14-udacity/test1_no_finding.dcm")
    for index, patient in enumerate(patients):
        ds.PatientID, ds.SOPInstanceUID = patient, f"{ds.SOPInstanceUID}.{index}"
        ds.save_as(inputs / f"p{index}.dcm")
    out = tmp_path / "out" / "report.csv"
    extra = {"hash": ["--phi", "hash", "--phi-key", "k" * 32], "drop": ["--phi", "drop"]}.get(phi, [])
    result = _run("score", str(inputs), "--out", str(out), "--model", str(tiny_model), *extra)
    assert result.exit_code == ExitCode.OK, result.output
    [study] = read_rows(out.with_name("report_studies.csv"))
    page = out.with_suffix(".html").read_text()
    if noted:
        assert study["study_note"].startswith(f"films of {noted} patients (Patient IDs differ"), study["study_note"]
        assert f"films of {noted} patients" in page
        assert "1 studies hold films of more than one patient" in result.stderr
    else:
        assert "patients" not in study["study_note"] and "more than one patient" not in result.stderr
    assert "PAT-" not in result.stderr


@pytest.mark.parametrize("stray, two_roots", [(".DS_Store", False), ("README.txt", False), ("Thumbs.db", False),
                                               ("notes", False), (".DS_Store", True)])
def test_a_folder_left_without_films_keeps_the_list(tiny_model, tmp_path, stray, two_roots):
    """A trial: a share that did not mount, leaving only a stray file, emptied the worklist with exit 0
    (its films' rows and pictures pruned), where an empty folder is exit 66 and keeps it. A folder
    holding files but no film is the same: exit 66, nothing changed, also when another share given
    beside it still holds films (a review); once a film is back the run goes on as before."""
    films = tmp_path / "films"
    films.mkdir()
    sources = sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:3]
    for source in sources:
        shutil.copy(source, films / source.name)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(sources[1], other / sources[1].name)
    out = tmp_path / "out" / "report.csv"
    args = ("score", str(films), *([str(other)] if two_roots else []), "--out", str(out), "--model", str(tiny_model))
    assert _run(*args).exit_code == ExitCode.OK
    before = out.read_bytes()
    for path in films.iterdir():
        path.unlink()
    (films / stray).write_bytes(b"\x00\x01 not a film")
    result = _run(*args, "--json")
    assert result.exit_code == ExitCode.NO_INPUT, result.output
    assert "JPEG or PNG found under" in result.output and "nothing was changed" in result.output
    assert out.read_bytes() == before
    # the same films given one by one (a shell glob), the folder left with the stray file alone
    result = _run("score", *map(str, films.iterdir()), "--out", str(out), "--model", str(tiny_model))
    assert result.exit_code == ExitCode.NO_INPUT and out.read_bytes() == before, result.output
    shutil.copy(sources[0], films / sources[0].name)
    assert _run(*args).exit_code == ExitCode.OK
    assert sorted(row["status"] for row in read_rows(out)) == ["ok"] * (1 + two_roots) + ["skipped"]


@pytest.mark.parametrize("names", [["only.txt"], ["notes.txt", "Thumbs.db", ".DS_Store"]])
def test_files_given_that_are_not_films_are_no_input(tiny_model, tmp_path, names):
    """A new user's trial: `radscan score only.txt` was exit 0 with an empty list, where the README
    says 66 for inputs that hold only files that are neither DICOM nor images (a folder of them was)."""
    given = []
    for name in names:
        (tmp_path / name).write_bytes(b"hi\n")
        given.append(str(tmp_path / name))
    out = tmp_path / "out" / "report.csv"
    result = _run("score", *given, "--out", str(out), "--model", str(tiny_model))
    assert result.exit_code == ExitCode.NO_INPUT and "only other files" in result.output, result.output
    assert not out.exists()
    film = sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[0]
    assert _run("score", *given, str(film), "--out", str(out), "--model", str(tiny_model)).exit_code in (
        ExitCode.OK, ExitCode.PARTIAL)


def test_a_folder_of_links_or_unread_formats_is_not_an_empty_share(tiny_model, tmp_path):
    """What the rule of a folder without films must not catch (a review): a folder whose films are
    links into another folder given, beside a stray file (its films are listed under their targets),
    a folder of TIFF films (their rows say to export them as DICOM or PNG), and a folder of DICOM
    objects that are not images (a structured report: a PACS folder or the listener's spool, which
    must not stop the listener)."""
    films, links, tiffs, reports = (tmp_path / name for name in ("films", "links", "tiffs", "reports"))
    for folder in (films, links, tiffs, reports):
        folder.mkdir()
    shutil.copy(DICOM_DIR / "pydicom/test-SR.dcm", reports / "sr.dcm")
    (reports / ".DS_Store").write_bytes(b"\x00")
    result = _run("score", str(reports), "--out", str(tmp_path / "r" / "report.csv"), "--model", str(tiny_model))
    assert result.exit_code == ExitCode.OK, result.output
    for source in sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:2]:
        shutil.copy(source, films / source.name)
        (links / source.name).symlink_to(films / source.name)
        Image.open(source).save(tiffs / f"{source.stem}.tif")
    (links / ".DS_Store").write_bytes(b"\x00")
    out = tmp_path / "out" / "report.csv"
    result = _run("score", str(films), str(links), "--out", str(out), "--model", str(tiny_model))
    assert result.exit_code == ExitCode.OK, result.output
    result = _run("score", str(tiffs), "--out", str(tmp_path / "t" / "report.csv"), "--model", str(tiny_model))
    assert result.exit_code == ExitCode.OK, result.output
    assert {row["reason"].split(":")[0] for row in read_rows(tmp_path / "t" / "report.csv")} == {"a TIFF image"}
    # a trial: a night of TIFF films showed none of them on the list ("0 to read"); they are a study for IT
    [study] = read_rows(tmp_path / "t" / "report_studies.csv")
    assert (study["study_section"], study["images"]) == ("unreadable", "2"), study
    assert study["study_note"].startswith("2 image(s) in a format radscan does not read"), study["study_note"]


@pytest.mark.parametrize("mode", ["strict", "warn", "off"])
def test_the_list_says_how_quality_control_judged(tiny_model, tmp_path, mode):
    """A trial: with --qc off (or RADSCAN_SCORE_QC, or qc in the settings file) a blank or inverted film
    topped the list at 1.000 with nothing anywhere saying that nothing was set aside. The page, the
    --json summary and the log say so."""
    films = tmp_path / "films"
    films.mkdir()
    for source in sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:2]:
        shutil.copy(source, films / source.name)
    out = tmp_path / "out" / "report.csv"
    result = _run("score", str(films), "--out", str(out), "--model", str(tiny_model), "--json", "--qc", mode)
    assert result.exit_code == ExitCode.OK, result.output
    assert json.loads(result.stdout)["qc"] == mode
    page = out.with_suffix(".html").read_text()
    assert ('id="qc-off"' in page, 'id="qc-warn"' in page) == (mode == "off", mode == "warn")
    assert ("quality control is off" in result.stderr) == (mode == "off")


def test_same_folder_under_two_roots_is_two_studies(tiny_model, tmp_path, monkeypatch):
    """JPEG/PNG studies are keyed by root and folder (issue 10, item 3): rootA/p1 and rootB/p1 are two
    studies in the worklist, a flat folder is its own study, and a rerun with the roots spelled
    differently reuses every stored row under the same keys."""
    jpegs = sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:3]
    for root, jpeg in (("rootA", jpegs[0]), ("rootB", jpegs[1])):
        (tmp_path / root / "p1").mkdir(parents=True)
        shutil.copy(jpeg, tmp_path / root / "p1" / jpeg.name)
    shutil.copy(jpegs[2], tmp_path / "rootB" / jpegs[2].name)
    out = tmp_path / "out" / "report.csv"
    args = ["--out", str(out), "--model", str(tiny_model), "--json", "--workers", "1", "--no-residuals"]
    first = json.loads(_run("score", str(tmp_path / "rootA"), str(tmp_path / "rootB"), *args).stdout)
    assert (first["files"], first["studies"]) == (3, 3)
    keys = {row["study_key"] for row in read_rows(out.parent / "report_studies.csv")}
    assert keys == {(tmp_path / name).resolve().as_posix() for name in ("rootA/p1", "rootB/p1", "rootB")}
    for row in read_rows(out):
        assert row["study_key"] == (Path(row["root"]).resolve() / row["path"]).parent.as_posix()

    monkeypatch.chdir(tmp_path)
    again = json.loads(_run("score", "rootA/", "./rootB", *args).stdout)
    assert (again["scored_now"], again["reused"], again["studies"]) == (0, 3, 3)
    assert {row["study_key"] for row in read_rows(out.parent / "report_studies.csv")} == keys


def test_second_run_on_the_same_outputs_is_locked_out(studies, tiny_model, tmp_path):
    out = tmp_path / "report.csv"
    with hold_lock(tmp_path / "report.lock"):
        result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model))
    assert result.exit_code == ExitCode.LOCKED and "try again later" in result.output
    assert f"(pid {os.getpid()})" in result.output  # the holder, by the PID it wrote
    assert not out.exists()


def test_the_lock_names_its_holder_only_while_that_process_runs(tmp_path):
    """A finished holder clears its PID; a PID whose process is gone is said to be gone (a process it
    started may hold the lock on), so an operator is not sent after the wrong process."""
    import subprocess

    lock = tmp_path / "report.lock"
    with hold_lock(lock):
        assert lock.read_text().startswith(f"pid {os.getpid()}")
        written = lock.read_text().strip()
    assert lock.read_text() == ""
    from radscan.state import _holder, _started

    assert _holder(written) == f"pid {os.getpid()}"
    started = _started(os.getpid())
    if started is not None:  # Linux: the number taken by a process that started later is not the holder
        reused = _holder(f"pid {os.getpid()} started {int(started) - 1}")
        assert reused.endswith("no longer running: a process it started may still hold the lock")

    child = subprocess.Popen(["true"])  # a PID no process has once it is reaped
    child.wait()
    assert _holder(f"pid {child.pid}\n").endswith("no longer running: a process it started may still hold the lock")
    assert _holder(f"pid {os.getpid()}") == f"pid {os.getpid()}"
    for text in ("", "pid 0", "pid -1", "pid 99999999999", "pid 12; rm -rf /", "\x1b[2J", "pid 12 started x"):
        assert _holder(text) == "unknown pid", text


@pytest.mark.parametrize("second_run", ["holding", "finished", None],
                         ids=["another run holds the path", "another run came and went", "nobody took it"])
def test_a_lock_file_deleted_mid_run_never_lets_two_runs_write(studies, tiny_model, tmp_path, monkeypatch,
                                                               second_run):
    """Issue 22 item 11: deleting report.lock mid-run let a second run in, which pruned the first
    run's rows from the store. The run notices before it writes the shared outputs: it stops (exit
    75, nothing written) when another lock file is at that path, whether its run still holds it or
    has finished, and takes the lock again when nobody made a new one."""
    import radscan.score as score_module

    out = tmp_path / "out" / "report.csv"
    lock_path = out.with_name("report.lock")
    held = []
    real_score_new = score_module._score_new

    def score_then_lose_the_lock(*args, **kwargs):
        real_score_new(*args, **kwargs)
        lock_path.unlink()
        if second_run:  # another run starts: it creates a new lock file and holds it (or has finished)
            held.append(hold_lock(lock_path))
            held[-1].__enter__()
            if second_run == "finished":
                held.pop().__exit__(None, None, None)

    monkeypatch.setattr(score_module, "_score_new", score_then_lose_the_lock)
    try:
        result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--no-residuals")
    finally:
        for lock in held:
            lock.__exit__(None, None, None)
    if second_run:
        assert result.exit_code == ExitCode.LOCKED, result.output
        assert not out.exists() and not out.with_name("report_studies.csv").exists()
    else:
        assert result.exit_code == ExitCode.OK, result.output
        assert out.exists() and lock_path.exists()


def test_the_worklist_files_are_put_in_place_together(studies, tiny_model, tmp_path, monkeypatch):
    """Issue 22 item 11: a run killed between the renames of report.csv and report_studies.csv left
    a mismatched pair. Every file is written and synced first; a failure before the renames leaves
    all of the previous list; the renames then follow back to back, report.csv last."""
    import errno

    import radscan.report as report_module
    import radscan.worklist as worklist_module

    out = tmp_path / "out" / "report.csv"
    args = ("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--no-residuals")
    assert _run(*args).exit_code == ExitCode.OK
    names = ("report.csv", "report_studies.csv", "report.html")
    before = {name: out.with_name(name).read_bytes() for name in names}
    shutil.copy(DICOM_DIR / "nih-cxr14-udacity/test2_cardiomegaly.dcm", studies / "new.dcm")

    def page_fails(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(worklist_module, "render_worklist_html", page_fails)
        assert _run(*args).exit_code == ExitCode.CANT_CREATE
    after = {name: out.with_name(name).read_bytes() for name in names}
    assert after["report.csv"] == before["report.csv"] and after["report_studies.csv"] == before["report_studies.csv"]

    def studies_block(page: bytes) -> bytes:  # the list the page shows; its run record says the run failed
        return page.split(b'id="studies">')[1].split(b"</script>")[0]

    assert studies_block(after["report.html"]) == studies_block(before["report.html"])
    assert b'"ok": false' in after["report.html"]
    assert not list(out.parent.glob(".*.tmp"))

    renamed, real_replace = [], os.replace
    monkeypatch.setattr(report_module.os, "replace", lambda src, dst: (renamed.append(Path(dst).name),
                                                                       real_replace(src, dst)))
    assert _run(*args).exit_code == ExitCode.OK
    first = renamed.index("report_studies.csv")
    assert renamed[first:first + 3] == ["report_studies.csv", "report.html", "report.csv"]
    assert "new.dcm" in out.read_text() and "new.dcm" in out.with_name("report_studies.csv").read_text()


def test_a_lock_file_replaced_while_it_is_taken_is_refused(tmp_path, monkeypatch):
    """A holder that finishes removes its lock file; a run that opened the old file just before
    must not go on holding a lock nobody else can see."""
    import radscan.state as state_module

    lock_path = tmp_path / "report.lock"
    real_flock = state_module.fcntl.flock

    def replaced_before_the_lock(handle, operation):
        lock_path.unlink()
        lock_path.write_text("pid 1\n")
        return real_flock(handle, operation)

    monkeypatch.setattr(state_module.fcntl, "flock", replaced_before_the_lock)
    with pytest.raises(LockHeldError, match="changed while it was being taken"):
        with hold_lock(lock_path):
            pass


def test_a_disk_too_full_for_the_lock_file_is_exit_73_not_a_bug(tmp_path, monkeypatch):
    """A trial: with 0 bytes free, writing the holder into the lock file failed (exit 73), then
    closing the file flushed the same bytes again and its OSError replaced that error: exit 1, "a bug
    in radscan", with a traceback. Whatever the buffer does on close, the run says the disk is full."""
    import errno

    import radscan.state as state_module
    from radscan.errors import OutputError

    class FullDisk:  # a file object on a disk with no space left: writes buffer, flushes fail
        def __init__(self, handle):
            self.handle, self.pending = handle, False

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def write(self, text):
            self.pending = True
            return len(text)

        def flush(self):
            if self.pending:
                raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.handle.close()
            self.flush()

    real_fdopen = os.fdopen
    monkeypatch.setattr(state_module.os, "fdopen", lambda *args, **kwargs: FullDisk(real_fdopen(*args, **kwargs)))
    with pytest.raises(OutputError, match="No space left on device"):
        with hold_lock(tmp_path / "report.lock"):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("stop, cluster", [(signal.SIGKILL, []), (signal.SIGTERM, []),
                                           (signal.SIGKILL, ["--scheduler", "local:2"]),
                                           (signal.SIGTERM, ["--scheduler", "local:2"])],
                         ids=["kill -9", "SIGTERM", "kill -9 of a Dask run", "SIGTERM of a Dask run"])
def test_killed_mid_run_then_rerun_completes_without_duplicates(stop, cluster, tiny_model, tmp_path):
    """kill -9 leaves the previous worklist as it was; SIGTERM (systemd stop, kill) also unwinds:
    exit 143, a JSON summary that says so, no temporary files left. The same on a Dask cluster."""
    folder = tmp_path / "many"
    folder.mkdir()
    files = sorted((CXR_DIR / "kermany_pediatric_224/test_abnormal").iterdir())[:60]
    for path in files[:10]:
        shutil.copy(path, folder / path.name)

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "radscan", "-q", "score", str(folder), "--out", str(out),
                "--model", str(tiny_model), "--batch-size", "4", "--workers", "2"]

    out = tmp_path / "out" / "report.csv"
    subprocess.run(command(out), check=True)
    before = out.read_bytes()
    cut_short = [*command(out), *cluster, "--json"]
    for path in files[10:]:
        shutil.copy(path, folder / path.name)

    process = subprocess.Popen(cut_short, start_new_session=True, stdout=subprocess.PIPE, text=True)
    state = tmp_path / "out" / "report.state.sqlite"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        with sqlite3.connect(state) as db:
            if db.execute("SELECT count(*) FROM results").fetchone()[0] >= 22:
                break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed; make the test set larger"
    os.killpg(process.pid, stop)
    summary = process.communicate()[0]
    assert out.read_bytes() == before  # the previous report is untouched
    if stop == signal.SIGTERM:
        assert process.returncode == 143 and json.loads(summary)["exit_code"] == 143
        assert not list(out.parent.glob(".*.tmp")) and not list(out.parent.glob("*_residuals/.*.tmp"))

    rerun = subprocess.run([*command(out), "--json"], check=True, stdout=subprocess.PIPE, text=True)
    rows = read_rows(out)
    assert len(rows) == 60 and len({r["path"] for r in rows}) == 60
    assert all(r["status"] == "ok" for r in rows)
    # the films the stopped run read were on no list: the run that lists them lists them as new, and
    # its drift check counts them (issue 21, a helper's trial: 32 of 80 were shown as not new)
    new = {r["path"] for r in rows if r["new_this_run"] == "true"}
    assert new == {path.name for path in files[10:]}, len(new)
    assert json.loads(rerun.stdout)["drift"]["scored"] == 50
    clean = tmp_path / "clean" / "report.csv"
    subprocess.run(command(clean), check=True)
    assert {r["path"]: r["score"] for r in rows} == {r["path"]: r["score"] for r in read_rows(clean)}


def test_phi_hash_and_drop(studies, tiny_model, tmp_path):
    runs = iter(range(100))

    def patient_ids(*extra: str, env=None) -> set[str]:
        out = tmp_path / f"run{next(runs)}" / "report.csv"
        result = _run("-v", "score", str(studies), "--out", str(out), "--model", str(tiny_model), *extra, env=env)
        assert result.exit_code == 0, result.output
        assert PATIENT_ID not in result.output
        text = out.read_text() + (out.parent / "report_studies.csv").read_text() + out.with_suffix(".html").read_text()
        assert (PATIENT_ID in text) == (not extra)
        return {r["PatientID"] for r in read_rows(out) if r["path"].startswith("nih/") and r["status"] == "ok"}

    assert patient_ids() == {PATIENT_ID}
    hashed = patient_ids("--phi", "hash", "--phi-key", "k1-0123456789abcdef")
    assert len(hashed) == 1 and len(next(iter(hashed))) == 16 and hashed != {PATIENT_ID}
    # the same key, the same token
    assert patient_ids("--phi", "hash", env={"RADSCAN_PHI_KEY": "k1-0123456789abcdef"}) == hashed
    assert patient_ids("--phi", "hash", "--phi-key", "k2-0123456789abcdef") != hashed
    key_file = tmp_path / "keys" / "phi.key"
    from_file = patient_ids("--phi", "hash", "--phi-key-file", str(key_file))
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert patient_ids("--phi", "hash", "--phi-key-file", str(key_file)) == from_file
    assert patient_ids("--phi", "drop") == {""}


def test_picture_captions_say_what_and_whose_as_the_phi_mode_allows():
    from radscan.batch import picture_caption
    from radscan.phi import PhiFilter
    from radscan.records import ImageRecord

    record = ImageRecord(path="nih/a.dcm", root="/in", kind="dicom", PatientID=PATIENT_ID,
                         AccessionNumber="ACC\n42", ViewPosition="PA", StudyDate="2026-11-29")
    model = {"model_name": "kermany-tiny", "model_version": "2026.11.29"}
    assert PATIENT_ID in picture_caption(record, 0.5, 0.8, model)  # --phi keep: as in the CSV
    PhiFilter("hash", b"site key").apply(record)
    caption = picture_caption(record, 0.93, 0.8, model)
    lines = caption.splitlines()
    assert PATIENT_ID not in caption and f"patient {record.PatientID}" in lines[1]
    assert "FLAGGED" in lines[0] and "not a diagnosis" in lines[0]
    assert all(part in lines[1] for part in ("PA", "2026-11-29", "nih/a.dcm", "kermany-tiny 2026.11.29"))
    assert len(lines) == 2  # no QC verdict, and a header value with a newline stays on its line
    # near 1 the score is cut, not rounded up to a certainty it does not have, and its z keeps the order
    assert picture_caption(record, 0.99991, 0.8, model, z=9.27).startswith("anomaly score 0.999, z +9.3 (")
    # a deep path loses its middle, never the file's name or the model (a new user's trial)
    for depth in (5, 30, 300):
        record.path = "/".join(f"Klinik_für_Radiologie_{i}" for i in range(depth)) + "/Patientin_Müller.jpeg"
        identity = picture_caption(record, 0.93, 0.8, model).splitlines()[1]
        assert len(identity) <= 200 and identity.endswith("Patientin_Müller.jpeg · model kermany-tiny 2026.11.29")
        assert identity.startswith(f"patient {record.PatientID}") and "2026-11-29" in identity
    # a film read by a guess says so under the verdict, whole (the trial's two notes fit one line)
    record.qc_status, record.qc_reason = "warn", "patient age 64 years is outside the model's training population"
    record.note_header("Window Center/Width '400'/'0' unusable: automatic window")
    record.note_header("VOI LUT Sequence unusable: automatic window")
    lines = picture_caption(record, 0.93, 0.8, model).splitlines()
    assert lines[2].startswith("quality control warn: patient age 64")
    assert lines[3] == f"header read by a guess: {record.header_notes}" and len(lines) == 4
    # a newline, a tab or a terminal's ESC in a name is written out, never drawn as a space or a box
    record.path = "new\nline\tand\x1b[31mred.jpeg"
    assert "new\\x0aline\\x09and\\x1b[31mred.jpeg" in picture_caption(record, 0.93, 0.8, model).splitlines()[1]
    # identifiers as long as DICOM allows (64 characters each): the path keeps its end, never cut to nothing
    record.path, record.PatientID, record.AccessionNumber = "a/b/short.jpeg", "P" * 64, "A" * 64
    identity = picture_caption(record, 0.93, 0.8, model).splitlines()[1]
    assert len(identity) <= 200 and "short.jpeg · model kermany-tiny" in identity


def test_bad_input_costs_a_row_never_the_run(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[0]
    shutil.copy(good, bad / "good.jpeg")
    chest = (DICOM_DIR / "fo-dicom/CR-MONO1-10-chest").read_bytes()
    (bad / "truncated.dcm").write_bytes((DICOM_DIR / "pydicom-data/RG1_J2KI.dcm").read_bytes()[:30000])
    (bad / "random.dcm").write_bytes(np.random.default_rng(0).bytes(5000))
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "headless").write_bytes(chest[:2000])  # a bare DICOM header, pixels cut off
    (bad / "bomb.png").write_bytes(_png_claiming(60000, 60000))
    (bad / "corrupt.jpeg").write_bytes(good.read_bytes()[:600] + b"\x00" * 100)
    (bad / os.fsdecode(b"bad-\xff\xfe-name.dcm")).write_bytes(b"not dicom")
    (bad / "loop").symlink_to(bad)
    (bad / "dangling.dcm").symlink_to(tmp_path / "nowhere")
    import pydicom

    huge = pydicom.dcmread(DICOM_DIR / "highdicom/dx_image.dcm")
    huge.Rows = huge.Columns = 60000  # a header that claims a 3.6 gigapixel image
    huge.save_as(bad / "huge.dcm")

    out = tmp_path / "report.csv"
    result = _run("score", str(bad), "--out", str(out), "--model", str(tiny_model), "--json")
    assert result.exit_code == ExitCode.PARTIAL, result.output
    rows = {r["path"]: r for r in read_rows(out)}
    assert rows["good.jpeg"]["status"] == "ok"
    for name in ("truncated.dcm", "random.dcm", "empty.dcm", "headless", "bomb.png", "corrupt.jpeg",
                 "dangling.dcm", "huge.dcm", "bad-\\xff\\xfe-name.dcm"):  # undecodable bytes shown escaped
        assert rows[name]["status"] == "error", (name, rows[name])
        assert rows[name]["reason"], name
    assert "exceeds the limit" in rows["huge.dcm"]["reason"]
    studies = read_rows(tmp_path / "report_studies.csv")
    # the reading list first (the one scored film), then, for IT, the studies nothing could be read of
    assert [s["study_section"] for s in studies] == ["reading"] + ["unreadable"] * (len(studies) - 1)
    assert studies[0]["top_path"] == "good.jpeg" and all(s["images_scored"] == "0" for s in studies[1:])
    assert all("for IT" in s["study_note"] and "review it yourself" not in s["study_note"] for s in studies[1:])
    folder = next(s for s in studies if s["top_path"] == "good.jpeg")
    # a folder of 11 files is an export, not one examination: each file is a study (--study-key auto)
    assert folder["study_key"] == (bad.resolve() / "good.jpeg").as_posix()
    truncated = next(s for s in studies if s["top_path"] == "truncated.dcm")  # its own StudyInstanceUID
    assert (truncated["images_scored"], truncated["images_error"], truncated["study_score"]) == ("0", "1", "")
    assert not any(path.startswith("loop/") for path in rows)
    # the first time, every file is new: a dangling link, a loop and unreadable files too
    assert json.loads(result.stdout)["read_because"] == {"new": len(rows)}
    again = json.loads(_run("score", str(bad), "--out", str(out), "--model", str(tiny_model), "--json").stdout)
    errors = sum(row["status"] == "error" for row in rows.values())
    assert again["read_because"] == {"error": errors} and again["scored_now"] == errors  # retried every night
    (bad / "good.jpeg").unlink()
    (bad / "good.jpeg").symlink_to(tmp_path / "gone.jpeg")  # a film that read well is now a broken link
    third = json.loads(_run("score", str(bad), "--out", str(out), "--model", str(tiny_model), "--json").stdout)
    assert third["read_because"] == {"changed": 1, "error": errors}


@pytest.mark.parametrize("damage", ["zero-filled", "cut in its preamble", "overwritten by text", "emptied"])
def test_a_film_damaged_after_a_run_read_it_stays_on_the_list_as_an_error(studies, tiny_model, tmp_path, damage):
    """A trial: a DICOM film without an extension, flagged one night and then zero-filled by a copy
    that did not finish (or cut short, or overwritten), was skipped the next night as "not a DICOM
    file": its study left the worklist, the run said exit 0 and no problem. Whatever the damage, it
    is an error row (exit 3) listed for IT, saying that the file was a film."""
    out = tmp_path / "report.csv"
    args = ["score", str(studies), "--out", str(out), "--model", str(tiny_model), "--json"]
    assert _run(*args).exit_code == ExitCode.OK
    film = studies / "cr1" / "IM1"
    film.write_bytes({"zero-filled": bytes(film.stat().st_size), "cut in its preamble": bytes(100),
                      "overwritten by text": b"transfer aborted\n" * 20, "emptied": b""}[damage])
    result = _run(*args)
    assert result.exit_code == ExitCode.PARTIAL, result.output
    assert json.loads(result.stdout)["counts"]["error"] == 1
    row = {r["path"]: r for r in read_rows(out)}["cr1/IM1"]
    assert row["status"] == "error", row
    assert "only zero bytes" in row["reason"] or "an earlier run read it as a DICOM film" in row["reason"], row
    listed = [s for s in read_rows(tmp_path / "report_studies.csv") if s["top_path"] == "cr1/IM1"]
    assert len(listed) == 1 and listed[0]["study_section"] == "unreadable" and listed[0]["images_error"] == "1"
    sr = {r["path"]: r for r in read_rows(out)}["nih/sr.dcm"]
    assert sr["status"] == "skipped"  # a file skipped by the policy stays skipped
    again = _run(*args)  # retried the next night, and still the film it was
    retried = {r["path"]: r for r in read_rows(out)}["cr1/IM1"]
    assert again.exit_code == ExitCode.PARTIAL
    assert (retried["status"], retried["reason"]) == (row["status"], row["reason"])


def test_a_film_stays_on_the_list_whatever_its_damage_becomes_night_after_night(studies, tiny_model, tmp_path):
    """A review's trial: zero-filled one night (an error), overwritten by text the next, the film was
    skipped and its study left the list with exit 0; so after a TIFF or its own gzip, then emptied.
    Whatever follows whatever, a film an earlier run read stays known as one until it is mended."""
    import gzip

    out = tmp_path / "report.csv"
    args = ["score", str(studies), "--out", str(out), "--model", str(tiny_model)]
    film = studies / "cr1" / "IM1"
    original = film.read_bytes()
    assert _run(*args).exit_code == ExitCode.OK
    tiff = tmp_path / "film.tiff"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tiff)
    text = b"transfer aborted\n" * 9
    nights = [(bytes(len(original)), "error"), (text, "error"), (b"", "error"), (gzip.compress(original), "skipped"),
              (text, "error"), (tiff.read_bytes(), "skipped"), (bytes(100), "error"), (original, "ok")]
    for content, status in nights:
        film.write_bytes(content)
        result = _run(*args)
        row = {r["path"]: r for r in read_rows(out)}["cr1/IM1"]
        assert row["status"] == status, (content[:20], row)
        assert result.exit_code == (ExitCode.PARTIAL if status == "error" else ExitCode.OK), result.output
        if status != "ok":
            assert "an earlier run read it as a DICOM film" in row["reason"], row
        if status == "error":
            listed = [s for s in read_rows(tmp_path / "report_studies.csv") if s["top_path"] == "cr1/IM1"]
            assert len(listed) == 1 and listed[0]["study_section"] == "unreadable", listed


def test_a_film_packed_after_a_run_read_it_is_skipped_with_what_to_do(studies, tiny_model, tmp_path):
    """A film compressed in place (archived) is no damage: skipped, its row saying to unpack it."""
    import gzip

    out = tmp_path / "report.csv"
    args = ["score", str(studies), "--out", str(out), "--model", str(tiny_model)]
    assert _run(*args).exit_code == ExitCode.OK
    film = studies / "cr1" / "IM1"
    film.write_bytes(gzip.compress(film.read_bytes()))
    assert _run(*args).exit_code == ExitCode.OK
    row = {r["path"]: r for r in read_rows(out)}["cr1/IM1"]
    assert row["status"] == "skipped" and "unpack it" in row["reason"], row


def _films(root: Path, *folders: str, offset: int = 0) -> None:
    """One Kermany test film in each of `folders` under `root`, as x.jpeg."""
    films = sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())
    for index, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        shutil.copy(films[offset + index], root / folder / "x.jpeg")


def test_every_row_names_its_root_as_this_run_spells_it(tiny_model, tmp_path):
    """A trial: a run by hand with "../in", then cron's with the absolute path and one new film: the
    films kept from the first run still said root "../in", and a tool joining root and path from
    another folder opened nothing. Every row says the root as the run that wrote the list gave it,
    through a symbolic link too. (Each run a process of its own in its working folder, as from a
    shell: the test's decoding workers outlive a chdir.)"""
    _films(tmp_path / "in", "p1", "p2")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "in")
    out = tmp_path / "out" / "report.csv"
    for root, new in (("../in", None), (str(tmp_path / "in"), "p3"), (str(tmp_path / "link"), None)):
        if new:
            _films(tmp_path / "in", new, offset=5)
        subprocess.run([sys.executable, "-m", "radscan", "-q", "score", root, "--out", str(out), "--model",
                        str(tiny_model)], check=True, cwd=work)
        rows = read_rows(out)
        assert {r["root"] for r in rows} == {root} and len(rows) == (2 if root == "../in" else 3), rows
        assert all((work / r["root"] / r["path"]).is_file() for r in rows)


def test_films_of_two_roots_at_the_same_path_are_told_apart_on_the_page(tiny_model, tmp_path):
    """A trial: `radscan score siteA siteB`, both holding p1/x.jpeg, showed two studies on the page
    labelled alike. With several roots the page shows each path under its root; with one, as before.
    report_studies.csv names each study's root beside its top path (`top_root`)."""
    _films(tmp_path / "siteA", "p1")
    _films(tmp_path / "siteB", "p1", offset=3)

    def shown(*roots: Path) -> list[str]:
        out = tmp_path / f"out{len(roots)}" / "report.csv"
        assert _run("score", *map(str, roots), "--out", str(out), "--model", str(tiny_model)).exit_code == 0
        page = (out.parent / "report.html").read_text()
        studies = json.loads(re.search(r'<script type="application/json" id="studies">(.*?)</script>', page, re.S)[1])
        # the study list names the top film's root too (report.csv's `root`), as the page does
        listed = {(row["top_root"], row["top_path"]) for row in read_rows(out.with_name("report_studies.csv"))}
        assert listed == {(str(root), "p1/x.jpeg") for root in roots}
        return sorted(study["path"] for study in studies)

    assert shown(tmp_path / "siteA", tmp_path / "siteB") == [f"{tmp_path}/siteA/p1/x.jpeg",
                                                             f"{tmp_path}/siteB/p1/x.jpeg"]
    assert shown(tmp_path / "siteA") == ["p1/x.jpeg"]


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and header that claims an enormous image, with almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def test_missing_model_is_exit_65(studies, tmp_path):
    result = _run("score", str(studies), "--out", str(tmp_path / "r.csv"), "--model", str(tmp_path / "nope"))
    assert result.exit_code == ExitCode.DATA and "radscan train" in result.output


def test_settings_from_toml_and_environment(studies, tiny_model, tmp_path):
    config = tmp_path / "radscan.toml"
    config.write_text(f'[score]\nmodel = "{tiny_model}"\nno_residuals = true\nmodalities = "MR"\n')
    out = tmp_path / "report.csv"
    result = _run("--config", str(config), "score", str(studies), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["residuals"] is None and summary["counts"]["ok"] == 6  # DICOMs out of scope: MR only
    result = _run("--config", str(config), "score", str(studies), "--out", str(out), "--json",
                  env={"RADSCAN_SCORE_MODALITIES": "CR,DX"})
    assert json.loads(result.stdout)["counts"]["ok"] == 10  # the environment beats the file


def test_toml_lists_are_accepted_and_a_policy_that_skips_every_dicom_is_loud(studies, tiny_model, tmp_path):
    """modalities = ["CR", "DX"] in TOML means what --modalities CR,DX means (it used to skip every
    DICOM with exit 0); a selection that skips all DICOM files says so in the log."""
    config = tmp_path / "radscan.toml"
    config.write_text(f'[score]\nmodel = "{tiny_model}"\nno_residuals = true\nmodalities = ["CR", "DX"]\n')
    result = _run("--config", str(config), "score", str(studies), "--out", str(tmp_path / "a.csv"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["ok"] == 10
    config.write_text(f'[score]\nmodel = "{tiny_model}"\nno_residuals = true\nmodalities = ["MR"]\n')
    result = _run("--config", str(config), "score", str(studies), "--out", str(tmp_path / "b.csv"))
    assert result.exit_code == 0, result.output
    assert "none of the 5 DICOM files read in this run was used" in result.stderr
    # a list where one value is meant (a path, a number, one choice) is a usage error, not "no model at a,b"
    for line in ('model = ["a", "b"]', "batch_size = [8, 16]", 'qc = ["warn", "off"]'):
        config.write_text(f"[score]\n{line}\n")
        result = _run("--config", str(config), "score", str(studies), "--out", str(tmp_path / "c.csv"))
        assert result.exit_code == ExitCode.USAGE and "is a list where one value is expected" in result.output, line


def test_a_damaged_model_stops_the_run_before_anything_is_stored(studies, tiny_model, tmp_path):
    """The weights load (and are verified) in a thread while the first files decode: a model that
    fails verification must still leave the last worklist and the store as they were."""
    out = tmp_path / "report.csv"
    assert _run("score", str(studies), "--out", str(out), "--model", str(tiny_model)).exit_code == ExitCode.OK
    before = out.read_bytes()
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # the sha256 in model.json no longer matches
    new_study = studies / "late"
    new_study.mkdir()
    shutil.copy(sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[5], new_study / "late.jpeg")

    result = _run("score", str(studies), "--out", str(out), "--model", str(damaged))
    assert result.exit_code == ExitCode.DATA and "sha256" in result.output
    assert out.read_bytes() == before
    rerun = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--json")
    assert json.loads(rerun.stdout)["scored_now"] == 1  # only the new file: nothing was stored by the failed run


def test_outputs_that_would_destroy_or_feed_back_into_inputs_are_refused(studies, tiny_model, tmp_path):
    """--out naming an input radiograph used to overwrite it with CSV; --out inside the input tree
    read radscan's own README back as an input. Both are usage errors now, and nothing is written."""
    image = next((studies / "normal0").iterdir())
    before = image.read_bytes()
    for out in (image, studies / "report.csv"):
        result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--no-residuals")
        assert result.exit_code == ExitCode.USAGE, result.output
        assert "outside the folders it reads" in result.output
    assert image.read_bytes() == before and not (studies / "report.csv").exists()
    result = _run("scan", str(studies), "--out", str(studies / "nih" / "inventory.csv"))
    assert result.exit_code == ExitCode.USAGE and not (studies / "nih" / "inventory.csv").exists()


def test_a_damaged_state_store_is_moved_aside_and_rebuilt(studies, tiny_model, tmp_path):
    """Random bytes or a truncated file in report.state.sqlite used to stop every night with
    "database disk image is malformed" (exit 1) until a person deleted it."""
    out = tmp_path / "out" / "report.csv"
    args = ("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--no-residuals", "--json")
    assert _run(*args).exit_code == 0
    state = out.with_name("report.state.sqlite")
    for damage in (lambda data: data[: len(data) // 3], lambda data: bytes(reversed(data))):
        for extra in out.parent.glob("report.state.sqlite-*"):
            extra.unlink()
        state.write_bytes(damage(state.read_bytes()))
        result = _run(*args)
        assert result.exit_code == 0, result.output
        assert "is damaged" in result.stderr and json.loads(result.stdout)["scored_now"] == 11
        assert json.loads(result.stdout)["read_because"] == {"store": 11}  # not "new": they were scored before
        # the moved store may hold identifiers: an operator's task, in the summary's problems
        assert any("moved aside to report.state.sqlite.damaged-" in problem and "delete it" in problem
                   for problem in json.loads(result.stdout)["problems"])
    assert _problems(_run(*args)) == []  # said once, by the run that moved it
    assert len(list(out.parent.glob("report.state.sqlite.damaged-*"))) >= 1


@pytest.mark.parametrize("name", ["report.lock", "report.state.sqlite", "report.csv", "report_studies.csv",
                                  "report_README.txt"])
def test_outputs_that_are_symlinks_are_refused_and_their_targets_untouched(studies, tiny_model, tmp_path, name):
    """A report.lock linked to another file had that file truncated to "pid N"; a state file
    linked to another SQLite database had that database's results table dropped."""
    import sqlite3

    out = tmp_path / "out" / "report.csv"
    out.parent.mkdir()
    target = tmp_path / "precious.db"
    with sqlite3.connect(target) as db:
        db.execute("CREATE TABLE results (x)")
    before = target.read_bytes()
    (out.parent / name).symlink_to(target)
    result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--no-residuals")
    assert result.exit_code == ExitCode.CANT_CREATE, result.output
    assert "symbolic link" in result.output and target.read_bytes() == before


def test_pictures_for_flagged_images_only_keep_the_scores_and_rerun_incrementally(studies, tiny_model, tmp_path):
    """--pictures flagged skips the gradient pass of unflagged images: same scores and flags as
    --pictures all, a picture for every flagged image and none for the rest, and a rerun reuses all."""
    everything = tmp_path / "all" / "report.csv"
    assert _run("score", str(studies), "--out", str(everything), "--model", str(tiny_model)).exit_code == 0
    out = tmp_path / "flagged" / "report.csv"
    args = ("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--pictures", "flagged", "--json")
    assert _run(*args).exit_code == 0
    rows = {row["path"]: row for row in read_rows(out)}
    assert {p: (r["score"], r["flag"]) for p, r in rows.items()} == \
        {row["path"]: (row["score"], row["flag"]) for row in read_rows(everything)}
    scored = [row for row in rows.values() if row["status"] == "ok"]
    assert any(row["flag"] == "true" for row in scored) and any(row["flag"] == "false" for row in scored)
    for row in scored:
        assert bool(row["residual_png"]) == (row["flag"] == "true")
        assert not row["residual_png"] or (out.parent / row["residual_png"]).is_file()
    assert len(list((out.parent / "report_residuals").glob("*.png"))) == sum(row["flag"] == "true" for row in scored)
    assert json.loads(_run(*args).stdout)["scored_now"] == 0
    # a picture removed by hand is drawn again
    (out.parent / next(row for row in scored if row["residual_png"])["residual_png"]).unlink()
    assert json.loads(_run(*args).stdout)["read_because"] == {"picture": 1}
    # another pictures folder: the pictures are drawn there, and the list links them there
    moved = json.loads(_run(*args, "--residuals", str(out.parent / "elsewhere")).stdout)
    flagged = sum(row["residual_png"] != "" for row in scored)
    assert moved["read_because"] == {"picture": flagged}
    links = [row["residual_png"] for row in read_rows(out) if row["residual_png"]]
    assert len(links) == flagged and all(link.startswith("elsewhere/") and (out.parent / link).is_file()
                                         for link in links)
    outside = json.loads(_run(*args, "--residuals", str(out.parent.parent / "beside")).stdout)
    assert outside["read_because"] == {"picture": flagged}
    assert "\n../beside/: each flagged image" in out.with_name("report_README.txt").read_text()


def test_the_pictures_folder_holds_what_the_list_links_whatever_the_rerun_asks(studies, tiny_model, tmp_path):
    """A rerun with fewer pictures (--pictures flagged after all, then --no-residuals) leaves no picture
    of an earlier run beside the list; a picture it did not write stays."""
    out = tmp_path / "out" / "report.csv"
    folder = out.parent / "report_residuals"
    other = folder / f"{'ab' * 12}.png"  # a picture it did not write

    def run(*extra: str) -> set[str]:
        result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), *extra)
        assert result.exit_code == 0, result.output
        return {Path(row["residual_png"]).name for row in read_rows(out) if row["residual_png"]}

    hostile = studies / "hostile" / "back\\slash\nnew line.jpeg"  # its row's path is shown escaped
    hostile.parent.mkdir()
    shutil.copy(sorted((CXR_DIR / "kermany_pediatric_224/test_abnormal").iterdir())[0], hostile)
    linked = run("--pictures", "all")
    other.write_bytes(b"not ours")
    assert {p.name for p in folder.glob("*.png")} == linked | {other.name} and len(linked) >= 8
    flagged = run("--pictures", "flagged")
    assert flagged and flagged < linked
    assert {p.name for p in folder.glob("*.png")} == flagged | {other.name}
    assert run("--no-residuals") == set()
    assert [p.name for p in folder.glob("*.png")] == [other.name]
    assert "No pictures were written" in out.with_name("report_README.txt").read_text()


@pytest.mark.parametrize("name", ["report.csv", "report.lock", "report.state.sqlite", "report.state.sqlite-journal",
                                  "report.html"])
def test_outputs_that_are_not_regular_files_are_refused_and_left_alone(studies, tiny_model, tmp_path, name):
    """--out /dev/null (as root) used to rename regular files over the device nodes /dev/null and
    /dev/full; a FIFO stands in for a device here."""
    import stat

    out = tmp_path / "out" / "report.csv"
    out.parent.mkdir()
    os.mkfifo(out.parent / name)
    result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model))
    assert result.exit_code == ExitCode.CANT_CREATE and "not a regular file" in result.output
    assert stat.S_ISFIFO((out.parent / name).stat().st_mode)
    assert sorted(p.name for p in out.parent.iterdir()) == [name]  # nothing made beside it either


def test_picture_folders_under_a_file_or_behind_a_link_are_refused(studies, tiny_model, tmp_path):
    (tmp_path / "afile").touch()
    result = _run("score", str(studies), "--out", str(tmp_path / "o" / "r.csv"), "--model", str(tiny_model),
                  "--residuals", str(tmp_path / "afile" / "pictures"))
    assert result.exit_code == ExitCode.CANT_CREATE and "is a file, not a folder" in result.output
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "previews").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    result = _run("scan", str(studies), "--out", str(tmp_path / "inventory.csv"), "--previews",
                  str(tmp_path / "previews"))
    assert result.exit_code == ExitCode.CANT_CREATE and "symbolic link" in result.output
    assert not list((tmp_path / "elsewhere").iterdir())


def test_a_pictures_folder_that_is_a_symlink_is_refused(studies, tiny_model, tmp_path):
    """Pictures would be written, and old ones deleted, wherever the link points."""
    out = tmp_path / "out" / "report.csv"
    out.parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out.parent / "report_residuals").symlink_to(elsewhere, target_is_directory=True)
    result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model))
    assert result.exit_code == ExitCode.CANT_CREATE and "symbolic link" in result.output
    assert not list(elsewhere.iterdir())


def test_what_a_killed_run_left_is_cleaned_and_bad_stored_rows_are_rescored(studies, tiny_model, tmp_path):
    """Temporary files of a run killed before its renames may hold rows of that run; a stored row
    edited or damaged by hand (not valid JSON) must cost a rescore, not the night."""
    import sqlite3

    out = tmp_path / "out" / "report.csv"
    args = ("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--json")
    assert _run(*args).exit_code == 0
    first = read_rows(out)
    left = [out.parent / ".report.csv.k1ll3d.tmp", out.parent / "report_residuals" / ".abc.png.x9.tmp"]
    for path in left:
        path.write_text(PATIENT_ID)
    with sqlite3.connect(out.with_name("report.state.sqlite")) as db:
        db.execute("UPDATE results SET row = '{not json' WHERE rowid IN (SELECT rowid FROM results LIMIT 2)")
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["scored_now"] == 2 and not any(path.exists() for path in left)
    assert sorted(row["path"] for row in read_rows(out)) == sorted(row["path"] for row in first)  # no duplicates
    # a sort column or a score edited apart from its row, or another program's table: never trusted
    for tamper, rescored in (("UPDATE results SET score = 'x' WHERE status = 'ok' AND rowid = "
                              "(SELECT MIN(rowid) FROM results WHERE status = 'ok')", 1),
                             ("UPDATE results SET row = json_set(row, '$.score', 'abc') WHERE rowid = "
                              "(SELECT MIN(rowid) FROM results WHERE status = 'ok')", 1),
                             ("UPDATE results SET row = json_set(row, '$.score', 7.5) WHERE status = 'ok'", 10),
                             ("DROP TABLE results; CREATE TABLE results (x)", 11)):
        with sqlite3.connect(out.with_name("report.state.sqlite")) as db:
            db.executescript(tamper)
        result = _run(*args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["scored_now"] == rescored, tamper
        assert all(row["score"] == "" or 0 <= float(row["score"]) <= 1 for row in read_rows(out))  # no "abc", no 7.5


def test_files_gone_from_the_inputs_are_pruned_and_raw_identifiers_do_not_outlive_a_switch_to_hash(
        studies, tiny_model, tmp_path):
    """Rows and pictures of files deleted from the inputs used to stay forever, and the raw
    PatientID stayed in the state file after a switch from --phi keep to --phi hash."""
    out = tmp_path / "out" / "report.csv"
    args = ("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--json")
    assert _run(*args).exit_code == 0
    pictures = {r["path"]: r["residual_png"] for r in read_rows(out) if r["residual_png"]}
    gone = [path for path in pictures if path.startswith("normal0/")]
    assert gone and all((out.parent / pictures[p]).is_file() for p in gone)
    shutil.rmtree(studies / "normal0")
    result = _run(*args)
    assert result.exit_code == 0 and json.loads(result.stdout)["scored_now"] == 0
    assert not any(r["path"].startswith("normal0/") for r in read_rows(out))
    assert not any((out.parent / pictures[p]).exists() for p in gone)
    assert all((out.parent / pictures[p]).is_file() for p in pictures if p not in gone)
    state = out.with_name("report.state.sqlite")
    assert PATIENT_ID.encode() in state.read_bytes()  # --phi keep stores it, as the CSV shows it
    assert _run(*args, "--phi", "hash", "--phi-key", "k-0123456789abcdef").exit_code == 0
    stored = state.read_bytes() + b"".join(p.read_bytes() for p in out.parent.glob("report.state.sqlite-*"))
    assert PATIENT_ID.encode() not in stored


def test_new_this_run_marks_what_arrived_since_the_last_run(studies, tiny_model, tmp_path):
    out = tmp_path / "out" / "report.csv"
    args = ("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--no-residuals")
    assert _run(*args).exit_code == 0
    assert {r["new_this_run"] for r in read_rows(out)} == {"true"}
    (studies / "late").mkdir()
    shutil.copy(next((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir()), studies / "late" / "x.jpeg")
    assert _run(*args).exit_code == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows if r["new_this_run"] == "true"] == ["late/x.jpeg"]
    by_study = {r["study_key"]: r for r in read_rows(out.with_name("report_studies.csv"))}
    assert [k for k, r in by_study.items() if r["images_new"] != "0"] == [str((studies / "late").resolve())]
    dates = {r["StudyDate"] for r in rows if r["StudyDate"]}
    assert dates and all(len(d) == 10 and d[4] == d[7] == "-" for d in dates)  # ISO 8601, not DICOM's YYYYMMDD
    # read again only because the settings changed (pictures, quality control, study grouping): not new;
    # a file whose content changed is
    for extra in (("--pictures", "all"), ("--qc", "warn"), ("--study-key", "file")):
        result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), *extra, "--json")
        assert result.exit_code == 0 and json.loads(result.stdout)["scored_now"] > 0, result.output
        assert {r["new_this_run"] for r in read_rows(out)} == {"false"}, extra
        assert {r["images_new"] for r in read_rows(out.with_name("report_studies.csv"))} == {"0"}, extra
    (studies / "late" / "x.jpeg").write_bytes(next((CXR_DIR / "kermany_pediatric_224/test_abnormal").iterdir())
                                              .read_bytes())
    assert _run(*args).exit_code == 0
    assert [r["path"] for r in read_rows(out) if r["new_this_run"] == "true"] == ["late/x.jpeg"]
    # a file that is no image (a note beside the films) is no new image of its study (a new user's trial:
    # "2 images, 4 new")
    (studies / "normal1" / "notes.txt").write_text("seen by Dr X")
    assert _run(*args).exit_code == 0
    study_rows = read_rows(out.with_name("report_studies.csv"))
    assert all(int(r["images_new"]) <= int(r["images"]) for r in study_rows)
    assert {r["images_new"] for r in study_rows if r["study_key"].endswith("normal1")} == {"0"}


def test_an_emptied_root_stops_the_run_before_anything_is_pruned(studies, tiny_model, tmp_path):
    """An unmounted share looks like an empty folder: with two roots, the empty one used to have all
    its rows and pictures pruned with exit 0. Now it is exit 66 and nothing changes."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(next((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir()), other / "x.jpeg")
    out = tmp_path / "out" / "report.csv"
    args = ("score", str(studies), str(other), "--out", str(out), "--model", str(tiny_model), "--no-residuals")
    assert _run(*args).exit_code == 0
    before = out.read_bytes()
    (other / "x.jpeg").unlink()
    result = _run(*args)
    assert result.exit_code == ExitCode.NO_INPUT and "unmounted or emptied" in result.output
    assert out.read_bytes() == before


def test_two_outputs_on_one_path_or_inside_the_model_are_refused(studies, tiny_model, tmp_path):
    out = tmp_path / "out" / "report.csv"
    for extra in (["--studies", str(out)], ["--studies", str(out.with_name("report.lock"))]):
        result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), *extra)
        assert result.exit_code == ExitCode.USAGE and "same path" in result.output
    result = _run("score", str(studies), "--out", str(tiny_model / "model.json"), "--model", str(tiny_model))
    assert result.exit_code == ExitCode.USAGE
    assert json.loads((tiny_model / "model.json").read_text())["format"]  # still the model's metadata


@pytest.mark.parametrize("phi", ["keep", "hash", "drop"])
def test_dicom_files_without_a_study_uid_are_told_apart_by_patient_as_the_phi_mode_allows(tiny_model, tmp_path,
                                                                                        phi):
    """Two patients' DICOM files without StudyInstanceUID in one folder were one study."""
    import pydicom

    folder = tmp_path / "in" / "export"
    folder.mkdir(parents=True)
    source = pydicom.dcmread(DICOM_DIR / "nih-cxr14-udacity/test1_no_finding.dcm")
    del source.StudyInstanceUID
    for index, (patient, accession) in enumerate([("P-1001", "A1"), ("P-1001", "A1"), ("P-2002", "A7")]):
        source.PatientID, source.AccessionNumber = patient, accession
        source.SOPInstanceUID = f"1.2.3.4.{index}"
        source.save_as(folder / f"im{index}.dcm")
    out = tmp_path / "out" / "report.csv"
    args = ("score", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_model), "--phi", phi,
            "--phi-key", "site-key-0123456789", "--json")
    result = _run(*args)
    assert result.exit_code == 0, result.output
    studies = read_rows(out.with_name("report_studies.csv"))
    assert sorted(int(row["images"]) for row in studies) == ([3] if phi == "drop" else [1, 2])
    for row in studies:
        assert "P-1001" not in row["study_key"] and "P-2002" not in row["study_key"] and "A7" not in row["study_key"]
    again = _run(*args)
    assert json.loads(again.stdout)["scored_now"] == 0  # the split keys are stable from run to run


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test run started in the background ignores SIGINT


@pytest.mark.parametrize("after_s", [0.9, 1.4, 2.5])
def test_ctrl_c_in_the_first_seconds_stops_the_run_cleanly(tmp_path, after_s):
    """Issue 21: a terminal's Ctrl-C reaches every process of the run. In its first seconds (torch
    loading, decoding workers starting) it hung the run in Python's import lock once in seven tries,
    or aborted it inside torch's C++ start-up (exit 134). It must stop with exit 130 and its one
    line, and no worker may be left behind."""
    process = subprocess.Popen(
        [sys.executable, "-m", "radscan", "score", str(CXR_DIR / "kermany_pediatric_224/val_abnormal"),
         "--out", str(tmp_path / "report.csv"), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_default_sigint)
    time.sleep(after_s)
    os.killpg(process.pid, signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the run did not stop within 60 s of Ctrl-C")
    assert process.returncode == ExitCode.INTERRUPTED, stderr
    assert "interrupted" in stderr and "terminate called" not in stderr, stderr
    # the run's own code never shows a traceback (a worker interrupted while it starts may print
    # its import's: loky's spawn resets the signal mask, see radscan.score._ctrl_c_deferred)
    assert "radscan/" not in "".join(line for line in stderr.splitlines(True) if line.startswith("  File")), stderr
    deadline = time.monotonic() + 10
    while _live_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _live_members(process.pid)  # no decoding worker outlives the run (zombies not counted)


@pytest.mark.parametrize("swallowed", ["SIGINT", "SIGTERM"])
def test_a_stop_that_code_in_the_run_swallowed_still_stops_it(tmp_path, monkeypatch, swallowed):
    """CI, once: a Ctrl-C 1.4 s into a run was caught where it landed (a decoding pool starting) and
    the run went on to replace its outputs with exit 0. Whatever code catches the signal's
    exception, the run stops at its next batch with 130 (143 for SIGTERM), its outputs untouched."""
    import radscan.score
    import radscan.stopping
    from radscan.cli import main

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(radscan.stopping, "_asked", None)
    original = radscan.score.iter_ingested

    def swallowing(*args, **kwargs):
        try:  # a library's `except BaseException: pass` where the signal landed
            os.kill(os.getpid(), getattr(signal, swallowed))
            time.sleep(0.5)
        except BaseException:  # noqa: BLE001
            pass
        yield from original(*args, **kwargs)

    monkeypatch.setattr(radscan.score, "iter_ingested", swallowing)
    films = sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[:3]
    out = tmp_path / "out" / "report.csv"
    monkeypatch.setattr(sys, "argv", ["radscan", "score", *map(str, films), "--out", str(out), "--workers", "1"])
    try:
        with pytest.raises(SystemExit) as stopped:
            main()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert stopped.value.code == (ExitCode.INTERRUPTED if swallowed == "SIGINT" else ExitCode.TERMINATED)
    assert not out.exists()


@pytest.mark.parametrize("sig, after_s", [(signal.SIGTERM, 0.0), (signal.SIGTERM, 0.1), (signal.SIGTERM, 0.25),
                                          (signal.SIGINT, 0.1)])
def test_a_stop_after_the_summary_keeps_the_exit_code_it_printed(tmp_path, sig, after_s):
    """A review: a SIGTERM 0.02-0.3 s after `"ok": true, "exit_code": 0` was printed (Python's
    shutdown with torch loaded) made the process exit 143, and a wrapper that reran as told got a
    usage error. Once the summary is printed, the process exits with its code."""
    films = sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[:3]
    process = subprocess.Popen(
        [sys.executable, "-m", "radscan", "score", *map(str, films), "--out", str(tmp_path / "report.csv"),
         "--workers", "1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint)
    line = process.stdout.readline()
    time.sleep(after_s)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert json.loads(line)["exit_code"] == process.returncode == 0, stderr


def _live_members(group: int) -> list[int]:
    """Processes of process group `group` that are not zombies (Linux /proc; a container's init may
    reap the run's exited workers late)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.parametrize("size", [(784, 224), (224, 900), (300, 64)])
def test_a_rejected_films_picture_shows_the_whole_film_quality_control_judged(tmp_path, monkeypatch, size):
    """A new user's trial: a 3.5:1 film rejected for its shape by the shipped (thorax-box) model was
    drawn as the box the model would have read, its note saying "the film is 3.7:1" under a reason
    that said 3.50. The picture shows the whole film at its own ratio."""
    import radscan.batch
    from radscan.preprocess import to_qc_input

    drawn = []
    original = radscan.batch.render_film
    monkeypatch.setattr(radscan.batch, "render_film", lambda *args: drawn.append(args) or original(*args))
    film = np.asarray(Image.open(sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[0]).convert("L"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(film).resize(size).save(inputs / "odd.png")
    out = tmp_path / "out" / "report.csv"
    shipped = Path(__file__).resolve().parents[1] / "models" / "kermany-tiny"
    result = CliRunner().invoke(cli, ["score", str(inputs), "--out", str(out), "--model", str(shipped),
                                      "--workers", "1"])
    assert result.exit_code == 0, result.output
    (row,) = read_rows(out)
    assert row["status"] == "rejected" and row["residual_png"], row
    (image, caption, aspect), = drawn
    whole = to_qc_input(np.asarray(Image.open(inputs / "odd.png")))
    assert np.array_equal(image, whole) and aspect == pytest.approx(size[0] / size[1])


def test_a_study_holding_one_dicom_image_twice_says_so(studies, tiny_model, tmp_path):
    """A new user's trial: a DICOM file and its copy under another name (one SOP Instance UID) were one
    study "2 scored of 2" with no word of it; the study's note says that an image is there twice."""
    out = tmp_path / "out" / "report.csv"
    assert _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--no-residuals").exit_code == 0
    notes = {r["top_path"].split("/")[0]: r["study_note"] for r in read_rows(out.with_name("report_studies.csv"))}
    assert "SOPInstanceUID" not in notes["nih"]  # two images of one study, each its own
    shutil.copy(studies / "nih" / "a.dcm", studies / "nih" / "copy of a.dcm")
    assert _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--no-residuals").exit_code == 0
    study = next(r for r in read_rows(out.with_name("report_studies.csv")) if r["top_path"].startswith("nih/"))
    assert study["images_scored"] == "3"
    assert "1 file(s) hold a DICOM image that another file of this study holds too" in study["study_note"]


@pytest.mark.parametrize("blank", [False, True], ids=["same pixels", "other pixels"])
def test_one_dicom_image_under_two_studies_is_said_in_both(studies, tiny_model, tmp_path, blank):
    """A trial: two files with one SOPInstanceUID, different pixels and different StudyInstanceUIDs, one
    scored and one rejected, and neither row nor note said so. Each study's note now says that a file
    of another study holds its image (which one is right is the sender's to say), and the log counts
    the studies without naming a UID."""
    import pydicom

    out = tmp_path / "out" / "report.csv"
    copy = pydicom.dcmread(studies / "nih" / "a.dcm")
    copy.StudyInstanceUID = pydicom.uid.generate_uid()
    if blank:
        copy.PixelData = bytes(len(copy.PixelData))
    (studies / "other").mkdir()
    copy.save_as(studies / "other" / "b.dcm")
    result = _run("score", str(studies), "--out", str(out), "--model", str(tiny_model), "--no-residuals")
    assert result.exit_code == ExitCode.OK, result.output
    rows = read_rows(out.with_name("report_studies.csv"))
    noted = [r for r in rows if "a file of another study holds too" in r["study_note"]]
    assert sorted(r["StudyInstanceUID"] for r in noted) == sorted([copy.StudyInstanceUID,
                                                                   pydicom.dcmread(studies / "nih" / "a.dcm")
                                                                   .StudyInstanceUID])
    assert all(r["study_note"].count("1 file(s) hold a DICOM image that a file of another study") == 1 for r in noted)
    assert "2 studies hold a DICOM image (one SOPInstanceUID) that another study holds too" in result.stderr
    assert copy.SOPInstanceUID not in result.stderr


def test_a_root_whose_films_are_all_behind_a_link_is_not_empty(tiny_model, tmp_path):
    """`score C B` where C holds only a link into B stopped with exit 66 ("no files found under C
    ... an unmounted or emptied folder?"): the films are listed once, under B (a trial)."""
    films = sorted((CXR_DIR / "kermany_pediatric_224/val_abnormal").iterdir())[:2]
    (tmp_path / "B" / "sub").mkdir(parents=True)
    for film in films:
        shutil.copy(film, tmp_path / "B" / "sub" / film.name)
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "only").symlink_to(tmp_path / "B" / "sub")
    (tmp_path / "empty").mkdir()
    for order in (("C", "B"), ("B", "C")):
        out = tmp_path / "-".join(order) / "report.csv"
        result = _run("score", *(str(tmp_path / name) for name in order), "--out", str(out), "--model",
                      str(tiny_model), "--no-residuals")
        assert result.exit_code == ExitCode.OK, result.output
        assert sorted(row["path"] for row in read_rows(out)) == sorted(f"sub/{film.name}" for film in films)
    # an empty folder beside them is still an unmounted share until said otherwise
    refused = _run("score", str(tmp_path / "C"), str(tmp_path / "B"), str(tmp_path / "empty"), "--out",
                   str(tmp_path / "e" / "report.csv"), "--model", str(tiny_model), "--no-residuals")
    assert refused.exit_code == ExitCode.NO_INPUT and "empty" in refused.output and "/C" not in refused.output



def test_films_swapped_under_the_same_names_sizes_and_times_are_read_again(tiny_model, tmp_path):
    """A new user's trial: two films of one size and time swapped by name (a re-export that keeps
    sequential names and timestamps) kept their old rows: the previous patient's score and flag."""
    (tmp_path / "in").mkdir()
    films = [sorted((CXR_DIR / f"kermany_pediatric_224/{kind}").iterdir())[0] for kind in ("train_normal",
                                                                                            "val_abnormal")]
    data = [film.read_bytes() for film in films]
    size = max(map(len, data))
    for name, content in zip(("IM0001.jpeg", "IM0002.jpeg"), data, strict=True):
        (tmp_path / "in" / name).write_bytes(content + b"\0" * (size - len(content)))  # after the JPEG's end
        os.utime(tmp_path / "in" / name, ns=(10**18, 10**18))
    out = tmp_path / "out" / "report.csv"
    args = ("score", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_model), "--study-key", "file")
    assert _run(*args).exit_code == ExitCode.OK
    before = {row["path"]: row["score"] for row in read_rows(out)}
    (tmp_path / "in" / "IM0001.jpeg").rename(tmp_path / "in" / "swap")
    (tmp_path / "in" / "IM0002.jpeg").rename(tmp_path / "in" / "IM0001.jpeg")
    (tmp_path / "in" / "swap").rename(tmp_path / "in" / "IM0002.jpeg")
    again = _run(*args, "--json")
    assert json.loads(again.stdout)["read_because"] == {"changed": 2}
    assert {row["path"]: row["score"] for row in read_rows(out)} == \
        {"IM0001.jpeg": before["IM0002.jpeg"], "IM0002.jpeg": before["IM0001.jpeg"]}
    assert json.loads(_run(*args, "--json").stdout)["scored_now"] == 0  # and kept from then on


def test_a_share_that_holds_only_part_of_its_films_is_a_problem_not_a_good_night(tiny_model, tmp_path):
    """A new user's trial: a share left with 1 of its 29 files (a partial mount) replaced the list
    with a clean-looking night: exit 0, no problem. Films deleted a few at a time are not one."""
    share = tmp_path / "in"
    share.mkdir()
    films = sorted((CXR_DIR / "kermany_pediatric_224/val_abnormal").iterdir())[:14]
    for film in films:
        shutil.copy(film, share / film.name)
    args = ("score", str(share), "--out", str(tmp_path / "out" / "report.csv"), "--model", str(tiny_model),
            "--no-residuals", "--json")
    assert _problems(_run(*args)) == []
    for film in films[:3]:  # an ordinary night's clean-up
        (share / film.name).unlink()
    assert _problems(_run(*args)) == []
    aside = tmp_path / "aside"  # the films of a share that did not mount: still there, not seen
    aside.mkdir()
    for film in films[3:-1]:
        (share / film.name).rename(aside / film.name)
    metrics = tmp_path / "radscan.prom"
    result = _run(*args, "--metrics", str(metrics))
    # a second trial: that night was exit 0, "ok" and a last success for the page, the metrics and the
    # nightly wrapper alike, though two thirds of the films had left the list: exit 3, not a success
    summary = json.loads(result.stdout)
    assert result.exit_code == ExitCode.PARTIAL and summary["inputs_missing"] and not summary["ok"]
    assert any("10 films listed by earlier runs are no longer among the inputs, more than the 1" in problem
               for problem in summary["problems"]), result.stdout
    assert re.search(r"^radscan_last_success_timestamp_seconds 0$", metrics.read_text(), re.M)
    page = (tmp_path / "out" / "report.html").read_text()
    record = json.loads(re.search(r'<script type="application/json" id="run-status">(.*?)</script>', page, re.S)[1])
    assert record["last_success"]["run_id"] != record["last_attempt"]["run_id"]
    # a review: the next night, the share still half there, was a good night again (the films had been forgotten)
    again = _run(*args)
    assert again.exit_code == ExitCode.PARTIAL and json.loads(again.stdout)["inputs_missing"], again.stdout
    for film in films[3:-1]:  # the share is whole again: its films are back, read from the store, not scored again
        (aside / film.name).rename(share / film.name)
    back = json.loads(_run(*args).stdout)
    assert back["ok"] and not back["inputs_missing"] and back["files"] == 11
    assert not {"new", "changed"} & set(back["read_because"]), back  # kept: not new films (their study may regroup)
    for film in films[3:-1]:  # removed on purpose: said once more, then forgotten when asked
        (share / film.name).unlink()
    assert _run(*args).exit_code == ExitCode.PARTIAL
    forgotten = _run(*args, "--forget-missing")
    assert forgotten.exit_code == ExitCode.OK and _problems(forgotten) == []
    assert _run(*args).exit_code == ExitCode.OK
    # a review: the same beside a second share that did not move
    other = tmp_path / "other"
    other.mkdir()
    for film in sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:14]:
        shutil.copy(film, other / film.name)
    for film in films:
        shutil.copy(film, share / film.name)
    both = ("score", str(share), str(other), *args[2:])
    assert not any("no longer among the inputs" in problem for problem in json.loads(_run(*both).stdout)["problems"])
    for film in films[1:]:
        (share / film.name).unlink()
    assert any("13 films listed by earlier runs are no longer among the inputs, more than the 1" in problem
               for problem in json.loads(_run(*both).stdout)["problems"])
    # a review: scoring another folder into the same outputs is a choice, not a share that mounted in part
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(films[0], elsewhere / films[0].name)
    moved_on = _run("score", str(elsewhere), *args[2:])
    assert moved_on.exit_code == ExitCode.OK and json.loads(moved_on.stdout)["inputs_missing"] is False


def test_a_study_whose_files_fail_for_different_reasons_does_not_give_one_for_all(tiny_model, tmp_path):
    """A new user's trial: "4 image(s) could not be read (not a DICOM, JPEG or PNG file ...)" covered an
    HTML page, a truncated JPEG and two empty files. The note gives the top file's reason and says
    that the others differ; files failing alike get their one reason."""
    study, alike = tmp_path / "in" / "study", tmp_path / "in" / "alike"
    study.mkdir(parents=True)
    alike.mkdir()
    film = sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[0]
    (study / "zero.jpeg").write_bytes(b"")
    (study / "page.jpeg").write_text("<html>a page</html>")
    (study / "cut.jpeg").write_bytes(film.read_bytes()[:3000])
    for name in ("a.jpeg", "b.jpeg"):
        (alike / name).write_text("<html>a page</html>")
    out = tmp_path / "out" / "report.csv"
    assert _run("score", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_model)).exit_code == \
        ExitCode.PARTIAL
    notes = {Path(row["study_key"]).name: row["study_note"] for row in read_rows(out.with_name("report_studies.csv"))}
    reasons = {row["path"]: row["reason"] for row in read_rows(out)}
    assert len({reasons[f"study/{name}.jpeg"] for name in ("zero", "page", "cut")}) == 3
    assert notes["study"].startswith("3 image(s) could not be read (") and \
        "; 2 other reason(s): see their rows)" in notes["study"], notes["study"]
    assert notes["alike"].startswith(f"2 image(s) could not be read ({reasons['alike/a.jpeg']}); "), notes["alike"]


def test_pictures_left_in_an_earlier_pictures_folder_are_removed(tiny_model, tmp_path):
    """A new user's trial: after --residuals changed (twice), the earlier folders kept every picture,
    captions with Patient IDs, linked by nothing. A rerun drawing them in the new folder removes them
    (and the emptied folder), never a file it did not draw nor another worklist's folder."""
    (tmp_path / "in").mkdir()
    for film in sorted((CXR_DIR / "kermany_pediatric_224/val_abnormal").iterdir())[:2]:
        shutil.copy(film, tmp_path / "in" / film.name)
    out = tmp_path / "out" / "report.csv"

    def run(*extra: str) -> list[str]:
        result = _run("score", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_model), "--pictures",
                      "all", *extra)
        assert result.exit_code == ExitCode.OK, result.output
        return sorted(row["residual_png"] for row in read_rows(out))

    default = run()
    assert len(default) == 2 and all(link.startswith("report_residuals/") for link in default)
    (out.parent / "report_residuals" / "notes.txt").write_bytes(b"a file the user put there")
    first = run("--residuals", str(out.parent / "pics2"))
    assert sorted((out.parent / "report_residuals").iterdir()) == [out.parent / "report_residuals" / "notes.txt"]
    third = run("--residuals", str(out.parent / "pics3"))
    assert not (out.parent / "pics2").exists() and all((out.parent / link).is_file() for link in run(
        "--residuals", str(out.parent / "pics3")))
    assert first and not any((out.parent / link).exists() for link in first)
    # a review: --no-residuals after them left the pictures of the folder given last
    assert run("--no-residuals") == ["", ""]
    assert not (out.parent / "pics3").exists() and not any((out.parent / link).exists() for link in third)


def test_two_worklists_never_share_a_pictures_folder(tiny_model, tmp_path):
    """A new user's trial: two jobs (one for the PACS, one de-identified) given one --residuals
    overwrote each other's pictures, a caption with the other job's identifiers, and deleted
    pictures the other still linked. The second is refused before it reads a film; a folder whose
    worklist was deleted is taken over."""
    (tmp_path / "in").mkdir()
    for film in sorted((CXR_DIR / "kermany_pediatric_224/val_abnormal").iterdir())[:2]:
        shutil.copy(film, tmp_path / "in" / film.name)
    pictures = tmp_path / "pictures"

    def run(name: str, *extra: str):
        return _run("score", str(tmp_path / "in"), "--out", str(tmp_path / name / "report.csv"), "--model",
                    str(tiny_model), "--residuals", str(pictures), "--pictures", "all", *extra)

    assert run("pacs").exit_code == ExitCode.OK
    before = {png.name: png.read_bytes() for png in pictures.glob("*.png")}
    refused = run("research", "--phi", "drop")
    assert refused.exit_code == ExitCode.USAGE and "another worklist" in refused.output, refused.output
    assert not (tmp_path / "research" / "report.csv").exists()
    assert {png.name: png.read_bytes() for png in pictures.glob("*.png")} == before and len(before) == 2
    assert run("pacs").exit_code == ExitCode.OK  # its own folder, night after night
    # a review: a worklist that has not finished its first run holds the folder from its lock on
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "report.lock").touch()
    (pictures / ".radscan-worklist").write_text(f"{tmp_path / 'first' / 'report.csv'}\n{pictures}\n")
    assert run("research").exit_code == ExitCode.USAGE
    shutil.rmtree(tmp_path / "first")
    shutil.rmtree(tmp_path / "pacs")
    assert run("research", "--phi", "drop").exit_code == ExitCode.OK
    # a review: a worklist folder copied elsewhere, pictures and mark with it, is its own
    original = tmp_path / "site" / "report.csv"
    _run("score", str(tmp_path / "in"), "--out", str(original), "--model", str(tiny_model), "--pictures", "all")
    shutil.copytree(tmp_path / "site", tmp_path / "copy")
    copied = _run("score", str(tmp_path / "in"), "--out", str(tmp_path / "copy" / "report.csv"), "--model",
                  str(tiny_model), "--pictures", "all")
    assert copied.exit_code == ExitCode.OK, copied.output


def test_a_film_that_can_no_longer_be_read_loses_its_picture(tiny_model, tmp_path):
    """Its row says why it cannot be read; the picture of what it was must not stay beside the list."""
    (tmp_path / "in").mkdir()
    film = sorted((CXR_DIR / "kermany_pediatric_224/val_abnormal").iterdir())[0]
    shutil.copy(film, tmp_path / "in" / "a.jpeg")
    out = tmp_path / "out" / "report.csv"
    args = ("score", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_model), "--pictures", "all")
    assert _run(*args).exit_code == ExitCode.OK
    assert len(list((tmp_path / "out" / "report_residuals").glob("*.png"))) == 1
    (tmp_path / "in" / "a.jpeg").unlink()
    (tmp_path / "in" / "a.jpeg").symlink_to(tmp_path / "gone.jpeg")
    assert _run(*args).exit_code == ExitCode.PARTIAL
    assert list((tmp_path / "out" / "report_residuals").glob("*.png")) == []
