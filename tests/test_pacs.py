"""DICOM results for the PACS (`radscan score --dicom-out --send`): the objects validate (dciodvfy,
highdicom), carry what they must, arrive in a real Orthanc, are queryable by C-FIND in the source
study, are not sent twice, and a failed send loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner

from radscan.cli import cli
from radscan.dicomresults import NOT_FOR_DIAGNOSIS
from radscan.errors import ExitCode

from .conftest import CXR_DIR, DICOM_DIR, free_port
from .support import Orthanc, needs, read_rows

hd = pytest.importorskip("highdicom", reason="needs radscan[pacs]: pip install -e '.[dev]'")
pytest.importorskip("pynetdicom", reason="needs radscan[pacs]: pip install -e '.[dev]'")

def _score(*args: str):
    result = CliRunner().invoke(cli, ["score", *args, "--json"], auto_envvar_prefix="RADSCAN")
    objects = [line for line in result.output.splitlines() if line.startswith("{")]
    return result, json.loads(objects[-1]) if objects else {}


@pytest.fixture()
def studies(tmp_path) -> Path:
    """Four DICOM images in three studies (two in one study), a JPEG study and a DICOM SR."""
    root = tmp_path / "incoming"
    (root / "cr").mkdir(parents=True)
    shutil.copy(DICOM_DIR / "fo-dicom/CR-MONO1-10-chest", root / "cr" / "IM1")  # ACR-NEMA style, no PatientID
    shutil.copy(DICOM_DIR / "highdicom/dx_image.dcm", root / "cr" / "IM2")
    ds = pydicom.dcmread(DICOM_DIR / "nih-cxr14-udacity/test1_no_finding.dcm")
    (root / "nih").mkdir()
    ds.save_as(root / "nih" / "a.dcm")
    ds.SOPInstanceUID = _another(ds.SOPInstanceUID, 2)
    ds.save_as(root / "nih" / "b.dcm")
    shutil.copy(DICOM_DIR / "pydicom/test-SR.dcm", root / "nih" / "sr.dcm")
    (root / "jpeg").mkdir()
    jpeg = sorted((CXR_DIR / "kermany_pediatric_224/test_abnormal").iterdir())[0]
    shutil.copy(jpeg, root / "jpeg" / jpeg.name)
    return root


def _another(uid: str, number: int) -> str:
    """Another valid UID of the same length (the sample's is already 64 characters, the maximum)."""
    return uid[:-2] + f"{number:02d}"


@pytest.fixture()
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


def _results(rows: list[dict[str, str]], out: Path) -> list[tuple[dict[str, str], Path, Path]]:
    return [(row, out.parent / row["dicom_sr"], out.parent / row["dicom_sc"]) for row in rows if row["dicom_sr"]]


def test_results_carry_the_score_reference_the_source_and_validate(studies, tiny_model, tmp_path):
    out, folder = tmp_path / "out" / "report.csv", tmp_path / "out" / "dicom"
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), "--dicom-out", str(folder))
    assert result.exit_code == ExitCode.OK, result.output
    rows = read_rows(out)
    scored = [row for row in rows if row["status"] == "ok"]
    dicom = [row for row in scored if row["kind"] == "dicom"]
    assert len(dicom) == 4 and summary["dicom"]["written"] == 8 and summary["dicom"]["not_made"] == 0
    assert sorted(path.name[:3] for path in folder.iterdir()) == ["SC_"] * 4 + ["SR_"] * 4
    jpeg = next(row for row in scored if row["kind"] == "jpeg")
    assert jpeg["dicom_result"].startswith("none: a JPEG or PNG file has no DICOM study") and not jpeg["dicom_sr"]
    assert next(row for row in rows if row["path"] == "nih/sr.dcm")["status"] == "skipped"

    dciodvfy = needs("dciodvfy", "dicom3tools")
    statuses = set()
    for row, sr_path, sc_path in _results(rows, out):
        source = pydicom.dcmread(studies / row["path"], stop_before_pixels=True, force=True)
        for path in (sr_path, sc_path):
            checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
            errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
            assert not errors, f"{path.name} ({row['path']}): {errors}"
            written = pydicom.dcmread(path)
            assert written.StudyInstanceUID == source.StudyInstanceUID
            assert written.SeriesInstanceUID != source.SeriesInstanceUID
            assert NOT_FOR_DIAGNOSIS in written.SeriesDescription
            assert written.get("PatientID", "") == source.get("PatientID", "")

        report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
        assert report.VerificationFlag == "UNVERIFIED"
        assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
        referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
        values = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in _items(report)}
        score = values["Anomaly score (0-1, high = unlike normal films)"].MeasuredValueSequence[0].NumericValue
        assert abs(float(score) - float(row["score"])) < 1e-5
        threshold = values["Anomaly score threshold"].MeasuredValueSequence[0].NumericValue
        assert abs(float(threshold) - float(row["threshold"])) < 1e-5
        flag = values["Triage flag"].ConceptCodeSequence[0].CodeMeaning
        # issue 21 item 8: the SR carries quality control's verdict, and the flag says when it warned
        warned = row["qc_status"] in ("warn", "fail")
        assert flag == ("Flagged for priority reading" if row["flag"] == "true" else "Not flagged") + (
            "; quality control warning" if warned else "") + (": not a sign of normal" if warned and
                                                              row["flag"] != "true" else "")
        verdict = values["Input quality control"].ConceptCodeSequence[0].CodeValue
        assert verdict == {"pass": "QC-PASS", "warn": "QC-WARNING", "fail": "QC-FAIL"}[row["qc_status"]]
        statuses.add(row["qc_status"])
        algorithm = values["Algorithm Name"].TextValue
        assert algorithm == f"radscan {row['model_name']}"
        parameters = [item.TextValue for item in _items(report) if
                      item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
        assert f"model sha256 {row['model_sha256']}" in parameters

        capture = pydicom.dcmread(sc_path)
        assert capture.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and capture.BurnedInAnnotation == "YES"
        assert capture.pixel_array.ndim == 3 and capture.pixel_array[5, 5, 0] > 100  # the red banner
    assert statuses and statuses <= {"pass", "warn", "fail"}


def test_the_sr_of_a_film_quality_control_warned_about_says_so(tmp_path):
    """Issue 21 item 8: an adult film under the shipped children's model is scored with a warning;
    its SR carries the verdict and a flag that is not read as a confident result."""
    import highdicom as hd

    shipped = Path(__file__).parents[1] / "models" / "kermany-tiny"
    (tmp_path / "in").mkdir()
    shutil.copy(DICOM_DIR / "nih-cxr14-udacity/test1_no_finding.dcm", tmp_path / "in" / "adult.dcm")
    out, folder = tmp_path / "report.csv", tmp_path / "dicom"
    result, _ = _score(str(tmp_path / "in"), "--out", str(out), "--model", str(shipped), "--dicom-out", str(folder),
                       "--qc", "off")  # first without quality control: an SR with no verdict
    assert result.exit_code == ExitCode.OK, result.output
    unchecked = pydicom.dcmread(out.parent / read_rows(out)[0]["dicom_sr"]).SOPInstanceUID
    result, summary = _score(str(tmp_path / "in"), "--out", str(out), "--model", str(shipped), "--dicom-out",
                             str(folder))
    assert result.exit_code == ExitCode.OK, result.output
    assert summary["dicom"]["written"] == 2  # the verdict alone changed: a new SR (and its picture)
    row = read_rows(out)[0]
    assert row["qc_status"] == "warn" and "age" in row["qc_reason"]
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(out.parent / row["dicom_sr"]))
    values = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in _items(report)}
    assert values["Input quality control"].ConceptCodeSequence[0].CodeValue == "QC-WARNING"
    flag = values["Triage flag"].ConceptCodeSequence[0]
    assert flag.CodeValue in ("FLAGGED-QCWARN", "NOT-FLAGGED-QCW") and "quality control warning" in flag.CodeMeaning
    # and why: the film is fine, the patient is not one the model was made for
    assert values["Quality control finding"].ConceptCodeSequence[0].CodeValue == "QC-AGE"
    assert report.SOPInstanceUID != unchecked
    assert report.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == unchecked


@pytest.mark.parametrize("how", ["upside down", "turned a quarter", "mirrored and upside down"])
def test_a_film_quality_control_now_rejects_says_so_and_keeps_no_old_result(tmp_path, how):
    """A DICOM film scored under --qc off, then rejected by the default quality control: its row says
    why it has no result, and the results of the earlier run are no longer in the folder."""
    import numpy as np

    shipped = Path(__file__).parents[1] / "models" / "kermany-tiny"
    ds = pydicom.dcmread(DICOM_DIR / "nih-cxr14-udacity/test1_no_finding.dcm")
    pixels = ds.pixel_array
    pixels = {"upside down": np.rot90(pixels, 2), "turned a quarter": np.rot90(pixels, 1),
              "mirrored and upside down": np.flipud(pixels)}[how]
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.PatientAge = "008Y"  # a child: no age warning, only the orientation matters
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "film.dcm")
    out, folder = tmp_path / "report.csv", tmp_path / "dicom"
    result, _ = _score(str(tmp_path / "in"), "--out", str(out), "--model", str(shipped), "--dicom-out", str(folder),
                       "--qc", "off")
    assert result.exit_code == ExitCode.OK, result.output
    assert read_rows(out)[0]["dicom_result"] == "written" and len(list(folder.iterdir())) == 2
    uids = sorted(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in folder.iterdir())
    sent = how == "upside down"
    if sent:  # as a run with --send records what the PACS accepted
        import sqlite3

        with sqlite3.connect(tmp_path / "report.state.sqlite") as db:
            db.executemany("INSERT INTO sent VALUES (?, 'PACS@127.0.0.1:104', '2026-12-01T02:00:00+00:00')",
                           [(uid,) for uid in uids])
    result, summary = _score(str(tmp_path / "in"), "--out", str(out), "--model", str(shipped), "--dicom-out",
                             str(folder))
    assert result.exit_code == ExitCode.OK, result.output
    row = read_rows(out)[0]
    assert row["status"] == "rejected", row
    assert row["dicom_result"].startswith("none: quality control rejected") and not row["dicom_sr"]
    assert list(folder.iterdir()) == []
    # what the PACS was sent earlier cannot be withdrawn by C-STORE: the row and a WARNING say where it is
    assert ("PACS@127.0.0.1:104" in row["dicom_result"] and all(uid in row["dicom_result"] for uid in uids)) == sent
    assert ("holds results radscan sent earlier" in result.output) == sent
    if sent:  # a later run, with nothing left in the folder, still says where those results are
        _score(str(tmp_path / "in"), "--out", str(out), "--model", str(shipped), "--dicom-out", str(folder))
        assert all(uid in read_rows(out)[0]["dicom_result"] for uid in uids)


def _items(dataset):
    """Every content item of an SR tree, depth first."""
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _items(item)


def test_uids_are_stable_so_a_rerun_rewrites_the_same_objects(studies, tiny_model, tmp_path):
    out, folder = tmp_path / "report.csv", tmp_path / "dicom"
    _score(str(studies), "--out", str(out), "--model", str(tiny_model), "--dicom-out", str(folder))
    first = sorted(path.name for path in folder.iterdir())
    shutil.rmtree(folder)  # results lost: the next run writes them again, under the same UIDs
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), "--dicom-out", str(folder))
    assert result.exit_code == ExitCode.OK and summary["scored_now"] == 0 and summary["dicom"]["written"] == 8
    assert sorted(path.name for path in folder.iterdir()) == first
    (studies / "nih" / "b.dcm").unlink()  # a file gone from the inputs takes its results with it
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), "--dicom-out", str(folder))
    assert result.exit_code == ExitCode.OK and len(list(folder.iterdir())) == 6


def test_results_arrive_in_orthanc_once_and_are_found_in_the_source_study(studies, tiny_model, tmp_path, orthanc):
    out, folder = tmp_path / "report.csv", tmp_path / "dicom"
    send = ["--dicom-out", str(folder), "--send", f"127.0.0.1:{orthanc.dicom_port}", "--called-ae", Orthanc.AET]
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *send)
    assert result.exit_code == ExitCode.OK, result.output
    assert summary["dicom"]["sent"] == 8 and summary["dicom"]["not_sent"] == 0
    assert orthanc.instances() == 8
    rows = read_rows(out)
    for row, sr_path, sc_path in _results(rows, out):
        assert row["dicom_result"] == f"{Orthanc.AET}@127.0.0.1:{orthanc.dicom_port}".join(["sent to ", ""])
        source = pydicom.dcmread(studies / row["path"], stop_before_pixels=True, force=True)
        found = orthanc.find_images(source.StudyInstanceUID)
        uids = {uid for _, uid, _ in found}
        assert pydicom.dcmread(sr_path).SOPInstanceUID in uids and pydicom.dcmread(sc_path).SOPInstanceUID in uids
        classes = {cls for cls, _, description in found if NOT_FOR_DIAGNOSIS in description}
        assert classes == {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"}

    # the next night: nothing new, nothing sent again
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *send)
    assert result.exit_code == ExitCode.OK and summary["dicom"]["sent"] == 0 and orthanc.instances() == 8
    # a new image: only its two objects travel
    ds = pydicom.dcmread(studies / "nih" / "a.dcm")
    ds.SOPInstanceUID = _another(ds.SOPInstanceUID, 3)
    ds.save_as(studies / "nih" / "c.dcm")
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *send)
    assert result.exit_code == ExitCode.OK and summary["dicom"]["sent"] == 2 and orthanc.instances() == 10
    # the same SOP Instance UID in another study (a sender's error): results of their own, which arrive in
    # that study; one UID for both made the second "sent" while the PACS had nothing (a helper's trial)
    ds.StudyInstanceUID = _another(ds.StudyInstanceUID, 7)
    (studies / "moved").mkdir()
    ds.save_as(studies / "moved" / "c.dcm")
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *send)
    assert result.exit_code == ExitCode.OK and summary["dicom"]["sent"] == 2 and orthanc.instances() == 12
    moved = next(row for row in read_rows(out) if row["path"] == "moved/c.dcm")
    assert {uid for _, uid, _ in orthanc.find_images(ds.StudyInstanceUID)} >= {
        pydicom.dcmread(out.parent / moved["dicom_sr"]).SOPInstanceUID}


def test_a_failed_send_loses_nothing_and_the_next_run_delivers(studies, tiny_model, tmp_path, orthanc):
    out, folder = tmp_path / "report.csv", tmp_path / "dicom"
    down = ["--dicom-out", str(folder), "--send", f"127.0.0.1:{free_port()}", "--called-ae", Orthanc.AET]
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *down)
    assert result.exit_code == ExitCode.PARTIAL, result.output
    assert summary["exit_code"] == ExitCode.PARTIAL and summary["dicom"]["not_sent"] == 8
    assert len(list(folder.glob("*.dcm"))) == 8
    waiting = [row for row in read_rows(out) if row["dicom_sr"]]
    assert len(waiting) == 4 and all(row["reason"].startswith("results not sent to") for row in waiting)
    assert all(row["dicom_result"].startswith("not sent: ") and row["status"] == "ok" for row in waiting)

    # a host name that does not resolve is a PACS that cannot be reached, not a crash (a helper's trial)
    nowhere = ["--dicom-out", str(folder), "--send", "nosuchhost.invalid:104"]
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *nowhere)
    assert result.exit_code == ExitCode.PARTIAL and summary["dicom"]["not_sent"] == 8, result.output
    assert "cannot reach nosuchhost.invalid" in summary["dicom"]["send_failure"]

    # the destination as radscan writes it in the rows (AE@HOST:PORT) is accepted as --send
    up = ["--dicom-out", str(folder), "--send", f"{Orthanc.AET}@127.0.0.1:{orthanc.dicom_port}"]
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *up)
    assert result.exit_code == ExitCode.OK and summary["scored_now"] == 0 and summary["dicom"]["sent"] == 8
    assert orthanc.instances() == 8
    assert all(row["reason"] == "" for row in read_rows(out) if row["status"] == "ok")

    # a PACS that refuses the called AE title: a reason that says what to check, exit 3
    wrong = ["--dicom-out", str(folder), "--send", f"127.0.0.1:{orthanc.dicom_port}", "--called-ae", "NOTORTHANC"]
    shutil.rmtree(folder)  # written again, and not yet accepted by this (other) destination
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *wrong)
    assert result.exit_code == ExitCode.PARTIAL and summary["dicom"]["not_sent"] == 8
    assert "check --send, --called-ae" in next(row for row in read_rows(out) if row["dicom_sr"])["reason"]


@pytest.mark.parametrize("refusal", ["no SR context", "status 0x0122"])
def test_a_pacs_that_refuses_for_good_is_not_promised_the_next_run(studies, tiny_model, tmp_path, refusal):
    """Issue 21: a PACS that accepts no SR (or answers SOP class not supported) refuses it every night;
    the rows, the summary, the log and the metrics say so instead of "sent by the next run"."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

    def store(event):  # keeps nothing; the SR is refused by its status in the second case
        return 0x0122 if event.request.AffectedSOPClassUID == Comprehensive3DSRStorage else 0x0000

    ae = AE(ae_title="PICKY")
    ae.add_supported_context(SecondaryCaptureImageStorage)
    if refusal != "no SR context":
        ae.add_supported_context(Comprehensive3DSRStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        out, metrics = tmp_path / "report.csv", tmp_path / "radscan.prom"
        result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), "--dicom-out",
                                 str(tmp_path / "dicom"), "--send", f"127.0.0.1:{port}", "--called-ae", "PICKY",
                                 "--metrics", str(metrics))
    finally:
        server.shutdown()
    assert result.exit_code == ExitCode.PARTIAL, result.output
    assert summary["dicom"]["sent"] == 4 and summary["dicom"]["not_sent"] == summary["dicom"]["refused"] == 4
    rows = [row for row in read_rows(out) if row["dicom_sr"]]
    assert len(rows) == 4 and all("in vain until the PACS's administrator lets AE title RADSCAN store them"
                                  in row["reason"] and "next run" not in row["reason"] for row in rows)
    assert any("no rerun sends them" in problem for problem in summary["problems"])
    assert not any("sent by the next run" in problem for problem in summary["problems"])
    assert "WARNING" in result.stderr and "refuses 4 objects" in result.stderr
    assert 'radscan_dicom_results_pending{kind="refused"} 4' in metrics.read_text()


def test_an_image_whose_results_cannot_be_made_says_why_and_exits_3(studies, tiny_model, tmp_path):
    ds = pydicom.dcmread(studies / "nih" / "b.dcm")
    ds.SOPInstanceUID += ".2"  # 66 characters: not a valid UID, and no object may reference it
    ds.save_as(studies / "nih" / "b.dcm")
    out = tmp_path / "report.csv"
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model),
                             "--dicom-out", str(tmp_path / "dicom"))
    assert result.exit_code == ExitCode.PARTIAL and summary["dicom"]["not_made"] == 1
    assert summary["dicom"]["written"] == 6
    row = next(row for row in read_rows(out) if row["path"] == "nih/b.dcm")
    assert row["status"] == "ok" and row["dicom_result"] == "none: the file's SOPInstanceUID is missing or not a " \
        "valid UID"


def test_a_full_disk_under_dicom_out_costs_the_results_not_the_worklist(studies, tiny_model, tmp_path, monkeypatch):
    """Issue 22, item 2: ENOSPC while a result was saved ended the run with exit 1, a traceback and
    no worklist. The results are not made (rows say why, exit 3); the worklist and the page are."""
    import errno

    from pydicom.dataset import Dataset

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Dataset, "save_as", full)
    out = tmp_path / "report.csv"
    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model),
                             "--dicom-out", str(tmp_path / "dicom"))
    assert result.exit_code == ExitCode.PARTIAL, result.output
    assert summary["dicom"]["written"] == 0 and summary["dicom"]["not_made"] >= 1
    assert out.exists() and (tmp_path / "report_studies.csv").exists() and (tmp_path / "report.html").exists()
    dicom_rows = [row for row in read_rows(out) if row["kind"] == "dicom" and row["status"] == "ok"]
    assert dicom_rows and all(row["dicom_result"].startswith("none: cannot write them") for row in dicom_rows)
    assert all("No space left on device" in row["dicom_result"] for row in dicom_rows)
    assert "Traceback" not in result.output
    assert not list((tmp_path / "dicom").glob("*.dcm"))  # nothing half-written left behind


@pytest.mark.parametrize("args, message", [
    (["--phi", "hash", "--phi-key", "k-0123456789abcdef"], "use --phi keep"),
    (["--phi", "drop"], "use --phi keep"),
    (["--no-residuals"], "leave out --no-residuals"),
    (["--send", "pacs"], "must be HOST:PORT"),
    (["--send", "pacs:99999"], "must be HOST:PORT"),
    (["--send", "pacs:104", "--called-ae", "A" * 17], "--called-ae must be 1-16"),
    (["--send", "pacs:104", "--ae-title", "A\\B"], "--ae-title must be 1-16"),
])
def test_dicom_settings_that_cannot_work_are_usage_errors(studies, tiny_model, tmp_path, args, message):
    result, summary = _score(str(studies), "--out", str(tmp_path / "r.csv"), "--model", str(tiny_model),
                             "--dicom-out", str(tmp_path / "dicom"), *args)
    assert result.exit_code == ExitCode.USAGE and message in result.output, result.output
    assert not (tmp_path / "r.csv").exists()


def test_a_refused_dicom_setting_creates_no_phi_key_file(studies, tiny_model, tmp_path):
    """Issue 21: `--dicom-out` with `--phi hash` was refused only after the PHI key file was made."""
    key_file = tmp_path / "keys" / "phi.key"
    result, _ = _score(str(studies), "--out", str(tmp_path / "out" / "report.csv"), "--model", str(tiny_model),
                       "--dicom-out", str(tmp_path / "dicom"), "--phi", "hash", "--phi-key-file", str(key_file))
    assert result.exit_code == ExitCode.USAGE and "--phi keep" in result.output
    assert not key_file.exists() and not key_file.parent.exists()


def test_send_without_dicom_out_and_dicom_out_inside_the_inputs_are_usage_errors(studies, tiny_model, tmp_path):
    result, _ = _score(str(studies), "--out", str(tmp_path / "r.csv"), "--send", "pacs:104")
    assert result.exit_code == ExitCode.USAGE and "give --dicom-out" in result.output
    result, _ = _score(str(studies), "--out", str(tmp_path / "r.csv"), "--dicom-out", str(studies / "results"))
    assert result.exit_code == ExitCode.USAGE


def test_changed_sources_and_tampered_results_are_rewritten_and_resent(studies, tiny_model, tmp_path, orthanc):
    """A file rescored with another result (same SOP Instance UID, other pixels) gets new objects
    whose SR names the one it replaces; results replaced by garbage or a symbolic link are written
    again (the link's target untouched) and not sent twice."""
    out, folder = tmp_path / "report.csv", tmp_path / "dicom"
    send = ["--dicom-out", str(folder), "--send", f"127.0.0.1:{orthanc.dicom_port}", "--called-ae", Orthanc.AET]
    result, _ = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *send)
    assert result.exit_code == ExitCode.OK and orthanc.instances() == 8
    before = {row["path"]: row for row in read_rows(out)}
    old_sr = pydicom.dcmread(out.parent / before["nih/a.dcm"]["dicom_sr"])

    ds = pydicom.dcmread(studies / "nih" / "a.dcm")
    pixels = ds.pixel_array.copy()
    pixels[: pixels.shape[0] // 5] = pixels.max()  # a white upper fifth: another film, the same UID
    ds.PixelData, ds.file_meta.TransferSyntaxUID = pixels.tobytes(), pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(studies / "nih" / "a.dcm", enforce_file_format=True)
    (out.parent / before["cr/IM1"]["dicom_sc"]).write_bytes(b"garbage")
    outside = tmp_path / "outside.dcm"
    outside.write_bytes((out.parent / before["nih/b.dcm"]["dicom_sr"]).read_bytes())
    replaced = out.parent / before["cr/IM2"]["dicom_sr"]
    replaced.unlink()
    replaced.symlink_to(outside)
    kept = outside.read_bytes()

    result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *send)
    assert result.exit_code == ExitCode.OK, result.output
    after = {row["path"]: row for row in read_rows(out)}
    assert after["nih/a.dcm"]["score"] != before["nih/a.dcm"]["score"]
    new_sr = pydicom.dcmread(out.parent / after["nih/a.dcm"]["dicom_sr"])
    assert new_sr.SOPInstanceUID != old_sr.SOPInstanceUID
    assert new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    score = next(item for item in _items(new_sr) if item.ConceptNameCodeSequence[0].CodeValue == "ANOMALY-SCORE")
    assert abs(float(score.MeasuredValueSequence[0].NumericValue) - float(after["nih/a.dcm"]["score"])) < 1e-5
    assert summary["dicom"]["sent"] == 2 and orthanc.instances() == 10  # only a.dcm's new SR and SC
    assert not replaced.is_symlink() and outside.read_bytes() == kept
    assert pydicom.dcmread(replaced).SOPInstanceUID != pydicom.dcmread(outside).SOPInstanceUID
    assert pydicom.dcmread(out.parent / after["cr/IM1"]["dicom_sc"]).SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


def _with_control_characters(ds: pydicom.Dataset) -> None:
    """Descriptive text with characters its VR forbids, at the top level and inside a sequence: left
    out of the results (what a line break means in a long text VR is kept)."""
    ds.StudyDescription = "CHEST\r\nPA"
    ds.InstitutionName = "Ward\x00B"
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X1", "99LOCAL", "chest\x07"
    ds.ProcedureCodeSequence = [item]
    ds.ImageComments = "line one\r\nline two"


def test_awkward_headers_give_valid_results_or_say_why(dicom_dir, tiny_model, tmp_path):
    """Names in Latin-1 without a character set, a source Laterality, a two-letter patient
    orientation and a multi-frame image all give results that dciodvfy passes (the multi-frame SR
    references the scored frame); an identifier that is not valid DICOM gives none, with the reason."""
    from pydicom.dataelem import DataElement

    root = tmp_path / "incoming"
    root.mkdir()
    base = pydicom.dcmread(dicom_dir / "nih-cxr14-udacity/test1_no_finding.dcm")
    for number, (name, change) in enumerate({
        "latin.dcm": lambda ds: ds.__setitem__(0x00100010, DataElement(0x00100010, "PN", b"M\xfcller^J\xfcrgen")),
        "sided.dcm": lambda ds: (setattr(ds, "Laterality", "L"), setattr(ds, "PatientOrientation", ["A", "FL"])),
        "longid.dcm": lambda ds: setattr(ds, "PatientID", "X" * 70),
        # a trial: control characters reached the PACS (dciodvfy: "Character invalid for this VR")
        "ctrlid.dcm": lambda ds: setattr(ds, "AccessionNumber", "ACC\x07BEL"),
        "ctrltext.dcm": _with_control_characters,
        # a trial: Latin-1 bytes under a declared UTF-8 reached the PACS as another patient (P\ufffdID01)
        "undecodable.dcm": lambda ds: (setattr(ds, "SpecificCharacterSet", "ISO_IR 192"),
                                       ds.__setitem__(0x00100020, DataElement(0x00100020, "LO", b"P\xe9ID01"))),
        # a trial: a legal Japanese character set (its first value empty) gave no results
        "jis.dcm": lambda ds: (setattr(ds, "SpecificCharacterSet", ["", "ISO 2022 IR 87"]),
                               ds.__setitem__(0x00100010, DataElement(
                                   0x00100010, "PN", "Yamada^Tarou=山田^太郎".encode("iso2022_jp")))),
        # a review: a character set DICOM does not define was read as Latin-1, an identifier as another's
        "unknownset.dcm": lambda ds: (setattr(ds, "SpecificCharacterSet", "ISO_IR 999"),
                                      ds.__setitem__(0x00100020, DataElement(0x00100020, "LO", "PÉID01".encode()))),
    }.items()):
        ds = pydicom.dcmread(dicom_dir / "nih-cxr14-udacity/test1_no_finding.dcm")
        ds.SOPInstanceUID = _another(base.SOPInstanceUID, 10 + number)
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
        change(ds)
        ds.save_as(root / name)
    shutil.copy(dicom_dir / "fo-dicom/HasFragmentSequence.dcm", root / "frames.dcm")  # XA, 96 frames
    out = tmp_path / "report.csv"
    result, summary = _score(str(root), "--out", str(out), "--model", str(tiny_model), "--dicom-out",
                             str(tmp_path / "dicom"), "--qc", "off", "--frames", "middle", "--modalities", "all",
                             "--body-parts", "all", "--views", "all")
    assert result.exit_code == ExitCode.PARTIAL and summary["dicom"]["not_made"] == 4, result.output
    rows = {row["path"]: row for row in read_rows(out)}
    assert rows["longid.dcm"]["dicom_result"].startswith("none: the file's PatientID is not valid DICOM")
    assert rows["undecodable.dcm"]["dicom_result"].startswith("none: the file's PatientID is not valid DICOM "
                                                              "(bytes its character set cannot decode")
    assert rows["ctrlid.dcm"]["dicom_result"].startswith("none: the file's AccessionNumber is not valid DICOM "
                                                         "(control character '\\x07')")
    assert rows["unknownset.dcm"]["dicom_result"].startswith("none: the header declares a character set DICOM "
                                                             "does not define (ISO_IR 999)")
    assert rows["longid.dcm"]["reason"].startswith("no DICOM results: ")
    dciodvfy = needs("dciodvfy", "dicom3tools")
    for name in ("latin.dcm", "sided.dcm", "frames.dcm", "ctrltext.dcm", "jis.dcm"):
        for key in ("dicom_sr", "dicom_sc"):
            path = out.parent / rows[name][key]
            checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
            errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
            assert not errors, f"{name} {key}: {errors}"
    assert str(pydicom.dcmread(out.parent / rows["latin.dcm"]["dicom_sr"]).PatientName) == "Müller^Jürgen"
    assert str(pydicom.dcmread(out.parent / rows["jis.dcm"]["dicom_sr"]).PatientName) == "Yamada^Tarou=山田^太郎"
    frames = pydicom.dcmread(out.parent / rows["frames.dcm"]["dicom_sr"])
    referenced = [item.ReferencedSOPSequence[0] for item in _items(frames) if "ReferencedSOPSequence" in item]
    assert referenced and int(referenced[0].ReferencedFrameNumber) == int(rows["frames.dcm"]["frame_used"]) + 1


def test_every_new_verdict_is_a_new_object_and_damage_is_repaired_in_place(studies, tiny_model, tmp_path, orthanc):
    """A verdict that returns to an earlier value is a third SR naming the second (never the first
    UID with other content); a damaged SC is rewritten alone, its SR untouched and naming nothing;
    a FIFO where a result goes is replaced, a folder there costs that image its results (row
    reason, exit 3), not the night's worklist; a `sent` table that is not radscan's is rebuilt."""
    out, folder = tmp_path / "report.csv", tmp_path / "dicom"
    send = ["--dicom-out", str(folder), "--send", f"127.0.0.1:{orthanc.dicom_port}", "--called-ae", Orthanc.AET]
    source = studies / "nih" / "a.dcm"
    original = source.read_bytes()

    def run():
        result, summary = _score(str(studies), "--out", str(out), "--model", str(tiny_model), *send)
        return result, summary, {row["path"]: row for row in read_rows(out)}

    _, _, rows = run()
    first = pydicom.dcmread(out.parent / rows["nih/a.dcm"]["dicom_sr"])
    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array.copy()
    pixels[: pixels.shape[0] // 5] = pixels.max()  # a white upper fifth (half would be flat tone: rejected)
    ds.PixelData, ds.file_meta.TransferSyntaxUID = pixels.tobytes(), pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(source, enforce_file_format=True)
    _, _, rows = run()
    second = pydicom.dcmread(out.parent / rows["nih/a.dcm"]["dicom_sr"])
    source.write_bytes(original)  # the first film again: the first verdict again
    result, summary, rows = run()
    third = pydicom.dcmread(out.parent / rows["nih/a.dcm"]["dicom_sr"])
    assert len({first.SOPInstanceUID, second.SOPInstanceUID, third.SOPInstanceUID}) == 3
    named = third.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert named.ReferencedSOPInstanceUID == second.SOPInstanceUID and summary["dicom"]["sent"] == 2
    assert orthanc.instances() == 12

    sr_path, sc_path = out.parent / rows["cr/IM2"]["dicom_sr"], out.parent / rows["cr/IM2"]["dicom_sc"]
    report = sr_path.read_bytes()
    sc_path.write_bytes(b"garbage")
    fifo = out.parent / rows["cr/IM1"]["dicom_sc"]
    fifo.unlink()
    os.mkfifo(fifo)
    blocked = out.parent / rows["nih/b.dcm"]["dicom_sr"]
    blocked.unlink()
    blocked.mkdir()
    import sqlite3

    with sqlite3.connect(out.with_name("report.state.sqlite")) as db:
        db.execute("DROP TABLE sent")
        db.execute("CREATE TABLE sent (a, b)")
    result, summary, rows = run()
    assert result.exit_code == ExitCode.PARTIAL, result.output
    assert sr_path.read_bytes() == report and "PredecessorDocumentsSequence" not in pydicom.dcmread(sr_path)
    assert pydicom.dcmread(sc_path).SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and fifo.is_file()
    assert rows["nih/b.dcm"]["dicom_result"].startswith("none: cannot write them")
    assert rows["nih/b.dcm"]["reason"].startswith("no DICOM results") and rows["cr/IM1"]["reason"] == ""
    assert orthanc.instances() == 12  # everything sent again after the rebuilt table: the same objects


def test_a_uid_with_an_illegal_root_or_an_unsupported_deidentification_claim(dicom_dir, tiny_model, tmp_path):
    root = tmp_path / "incoming"
    root.mkdir()
    ds = pydicom.dcmread(dicom_dir / "nih-cxr14-udacity/test1_no_finding.dcm")
    ds.PatientIdentityRemoved = "YES"  # without the method that must go with it
    ds.save_as(root / "claims.dcm")
    ds.SOPInstanceUID = "9.99.999.9999"
    ds.save_as(root / "root9.dcm")
    out = tmp_path / "report.csv"
    result, summary = _score(str(root), "--out", str(out), "--model", str(tiny_model), "--dicom-out",
                             str(tmp_path / "dicom"), "--qc", "off")
    rows = {row["path"]: row for row in read_rows(out)}
    assert result.exit_code == ExitCode.PARTIAL and rows["root9.dcm"]["dicom_result"].startswith("none: the file's")
    dciodvfy = needs("dciodvfy", "dicom3tools")
    for key in ("dicom_sr", "dicom_sc"):
        checked = subprocess.run([dciodvfy, str(out.parent / rows["claims.dcm"][key])], capture_output=True, text=True)
        assert not [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
