"""Reading single files: JPEG/PNG chest sets, kind sniffing, folder walking, hostile bytes."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radscan.ingest import Found, find_files, ingest_file, iter_ingested, sniff_kind
from radscan.policy import Policy
from tests.support import BIDI, assert_plain, ingest_one, remove_chain

from .conftest import CXR_DIR, DICOM_DIR


def test_jpeg_studies_are_keyed_by_root_and_folder(tmp_path, monkeypatch):
    """The same folder name under two roots is two studies, a flat folder is a study of its own
    (not "."), and the key does not depend on how the root is spelled (issue 10, item 3). DICOM
    files keep their StudyInstanceUID wherever they lie."""
    jpegs = sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:3]
    for root, jpeg in (("rootA", jpegs[0]), ("rootB", jpegs[1])):
        (tmp_path / root / "p1").mkdir(parents=True)
        shutil.copy(jpeg, tmp_path / root / "p1" / "x.jpeg")
        shutil.copy(DICOM_DIR / "fo-dicom/CR-MONO1-10-chest", tmp_path / root / "p1" / "IM1")
    shutil.copy(jpegs[2], tmp_path / "rootA" / "flat.jpeg")

    def keys(*roots) -> dict[str, str]:
        return {f"{Path(f.root).resolve().name}:{f.path}": ingest_file(f, Policy())[0].study_key
                for f in find_files(roots)}

    found = keys(tmp_path / "rootA", tmp_path / "rootB")
    assert found["rootA:p1/x.jpeg"] == (tmp_path / "rootA" / "p1").resolve().as_posix()
    assert found["rootB:p1/x.jpeg"] == (tmp_path / "rootB" / "p1").resolve().as_posix()
    assert found["rootA:flat.jpeg"] == (tmp_path / "rootA").resolve().as_posix()
    assert found["rootA:p1/IM1"] == found["rootB:p1/IM1"] != ""  # one StudyInstanceUID, one study
    assert found["rootA:p1/IM1"] not in (found["rootA:p1/x.jpeg"], found["rootB:p1/x.jpeg"])

    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "rootA")
    for spelling in ("rootA", "./rootA/", "link", str(tmp_path / "rootA")):
        assert keys(spelling)["rootA:p1/x.jpeg"] == found["rootA:p1/x.jpeg"], spelling
    assert keys("rootA/p1/x.jpeg")["p1:x.jpeg"] == found["rootA:p1/x.jpeg"]  # a file given by itself


def test_sniffing_uses_content_not_names():
    assert sniff_kind((DICOM_DIR / "fo-dicom/CR-MONO1-10-chest").read_bytes()[:132]) == "dicom"
    assert sniff_kind((DICOM_DIR / "pydicom/rtstruct.dcm").read_bytes()[:132]) == "dicom"  # no preamble
    assert sniff_kind((DICOM_DIR / "pydicom/ExplVR_BigEndNoMeta.dcm").read_bytes()[:132]) == "dicom"
    assert sniff_kind((DICOM_DIR / "not-dicom/html_page_named_test1.dcm").read_bytes()[:132]) == "other"
    assert sniff_kind(b"\xff\xd8\xff\xe0" + bytes(128)) == "jpeg"
    assert sniff_kind(b"\x89PNG\r\n\x1a\n" + bytes(128)) == "png"
    assert sniff_kind(b"") == "other"


def test_radscan_scan_reads_a_film_1900_folders_down(tmp_path):
    """The reproduction through the command a user runs (0.2: RecursionError, no rows)."""
    import subprocess
    import sys

    root = tmp_path / "deep"
    root.mkdir()
    descriptor = os.open(root, os.O_RDONLY)
    for _ in range(1900):
        os.mkdir("d", dir_fd=descriptor)
        inner = os.open("d", os.O_RDONLY, dir_fd=descriptor)
        os.close(descriptor)
        descriptor = inner
    film = (CXR_DIR / "kermany_pediatric_fullres/normal").iterdir().__next__().read_bytes()
    with open(os.open("film.jpeg", os.O_WRONLY | os.O_CREAT, dir_fd=descriptor), "wb") as handle:
        handle.write(film)
    os.close(descriptor)
    try:
        done = subprocess.run([sys.executable, "-m", "radscan", "-q", "scan", str(root), "--out",
                               str(tmp_path / "inventory.csv"), "--workers", "1"], capture_output=True, text=True)
    finally:
        remove_chain(root, "d", 1900, "film.jpeg")
    assert done.returncode == 0, done.stderr[-500:]
    rows = (tmp_path / "inventory.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("/".join(["d"] * 1900) + "/film.jpeg,")


def test_walk_survives_links_loops_and_excludes_outputs(tmp_path):
    studies = tmp_path / "studies"
    (studies / "a").mkdir(parents=True)
    shutil.copy(DICOM_DIR / "highdicom/dx_image.dcm", studies / "a" / "IMG0001")
    (studies / "a" / "loop").symlink_to(studies)  # a symlink loop
    (studies / "a" / "dangling").symlink_to(tmp_path / "missing")
    (studies / "b").symlink_to(studies / "a")  # the same folder twice: entered once
    previews = studies / "previews"
    previews.mkdir()
    (previews / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    odd = os.fsdecode(b"caf\xe9-\xff.dcm")  # not UTF-8
    (studies / odd).write_bytes(b"")
    os.mkfifo(studies / "a" / "fifo.dcm")  # a trial: a pipe left in a share made every night exit 3
    (studies / "a" / "to-null.dcm").symlink_to("/dev/null")

    found = find_files([studies], exclude=[previews])
    paths = [f.path for f in found]
    assert paths.count("a/IMG0001") == 1 and "b/IMG0001" not in paths
    assert not any(p.startswith("previews") for p in paths)
    problems = {f.path: f.problem for f in found if f.problem}
    assert problems == {"a/dangling": "broken symbolic link", "a/fifo.dcm": "not a regular file (device, socket or "
                        "pipe)", "a/to-null.dcm": "not a regular file (a symbolic link to a device, socket or pipe)"}
    records = [record for record, _ in iter_ingested(found, Policy(), workers=1)]
    by_path = {r.path: r for r in records}
    assert by_path["a/IMG0001"].status == "ok"
    assert by_path["a/dangling"].status == "error"  # a link to a film that is gone: for IT
    assert by_path["a/fifo.dcm"].status == by_path["a/to-null.dcm"].status == "skipped"  # never a film
    assert by_path[odd].status == "error" and "empty file" in by_path[odd].reason


@pytest.mark.parametrize("link_name", ["0-link", "m-link", "zz-link"])
def test_what_is_reached_by_its_own_path_and_by_a_link_is_listed_once_under_its_own(tmp_path, link_name):
    """A link named before the real folder in name order hid the real folder and named its study
    after the link, and a link to a file listed the film twice (two studies, one film; a trial). Links
    to what lies outside the roots are still followed."""
    studies, outside = tmp_path / "studies", tmp_path / "outside"
    (studies / "m-real" / "deep").mkdir(parents=True)
    outside.mkdir()
    for folder, name in ((studies / "m-real", "a.dcm"), (studies / "m-real" / "deep", "b.dcm"), (outside, "c.dcm")):
        shutil.copy(DICOM_DIR / "highdicom/dx_image.dcm", folder / name)
    (studies / link_name).symlink_to(studies / "m-real")
    (studies / f"{link_name}.dcm").symlink_to(studies / "m-real" / "deep" / "b.dcm")
    (studies / "m-real" / "deep" / "to-outside").symlink_to(outside)
    paths = sorted(f.path for f in find_files([studies]))
    assert paths == ["m-real/a.dcm", "m-real/deep/b.dcm", "m-real/deep/to-outside/c.dcm"]
    # the same, given as two roots: the second root's films are the first's
    assert sorted(f.path for f in find_files([studies, studies / link_name])) == paths
    # a root reached through a link of an earlier root keeps its films under its own root (the run
    # found the later root empty and stopped with exit 66; a trial), the whole folder or a part of it
    for target in (outside, outside / "o1"):
        (outside / "o1").mkdir(exist_ok=True)
        shutil.copy(DICOM_DIR / "highdicom/dx_image.dcm", outside / "o1" / "d.dcm")
        into = studies / "m-real" / "into-outside"
        into.unlink(missing_ok=True)
        into.symlink_to(target)
        found = find_files([studies, outside])
        assert sorted((Path(f.root).name, f.path) for f in found if f.root == str(outside)) == \
            [("outside", "c.dcm"), ("outside", "o1/d.dcm")]
        assert not any("into-outside" in f.path or "to-outside" in f.path for f in found)


def test_a_file_given_itself_and_reached_through_a_link_is_listed_once(tmp_path):
    real, other = tmp_path / "real", tmp_path / "other"
    (real / "sub").mkdir(parents=True)
    other.mkdir()
    shutil.copy(DICOM_DIR / "highdicom/dx_image.dcm", real / "sub" / "s1.dcm")
    (other / "0-link").symlink_to(real / "sub")
    (other / "flink.dcm").symlink_to(real / "sub" / "s1.dcm")
    for inputs in ([other, real / "sub" / "s1.dcm"], [real / "sub" / "s1.dcm", other], [other, other / "flink.dcm"]):
        assert len(find_files(inputs)) == 1, inputs


def test_every_hard_link_to_a_film_is_listed(tmp_path):
    """Hard links are real entries, each a name a user gave the film (a normals set made with
    `cp -al`): each is listed, in any order, beside a symbolic link to one of them (listed once); a
    trial found the second name missing from the inventory without a word."""
    for index, (first, second) in enumerate((("a/x.dcm", "b/y.dcm"), ("b/y.dcm", "a/x.dcm"), ("a/x.dcm", "a/y.dcm"))):
        root = tmp_path / str(index)
        (root / Path(first).parent).mkdir(parents=True)
        (root / Path(second).parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(DICOM_DIR / "highdicom/dx_image.dcm", root / first)
        os.link(root / first, root / second)
        (root / "z-link.dcm").symlink_to(root / second)
        assert sorted(f.path for f in find_files([root])) == sorted([first, second])
        given = find_files([root / first, root / second])  # named one by one
        assert sorted(f.path for f in given) == sorted(Path(name).name for name in (first, second))


def test_parallel_and_serial_ingest_agree():
    files = find_files([DICOM_DIR / "nih-cxr14-udacity", CXR_DIR / "kermany_pediatric_fullres/normal"])[:12]
    serial = list(iter_ingested(files, Policy(), workers=1))
    parallel = list(iter_ingested(files, Policy(), workers=2))
    assert [r.path for r, _ in serial] == [r.path for r, _ in parallel]  # input order kept
    for (a, x), (b, y) in zip(serial, parallel, strict=True):
        assert a == b and ((x is None and y is None) or np.array_equal(x, y))


@pytest.mark.parametrize("taken", [1, 5])
def test_a_run_stopped_early_leaves_no_warning_about_unused_decodes(taken):
    """Ctrl-C a few seconds into a run printed joblib's "N tasks have been successfully executed but
    not used" after radscan's own "interrupted" line (in a process of its own: pytest resets the
    warning filters of the process it runs in)."""
    program = f"""
import gc, time
from radscan.ingest import find_files, iter_ingested
from radscan.policy import Policy
results = iter_ingested(find_files([{str(CXR_DIR / "kermany_pediatric_224/test_normal")!r}])[:40], Policy(), workers=2)
for _ in range({taken}):
    next(results)
time.sleep(1.5)  # the workers finish what they were given, unused
results.close()  # what an interrupted run does to it while unwinding
del results
gc.collect()
print("done")
"""
    finished = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0 and finished.stdout.strip() == "done", finished.stderr
    assert "not used" not in finished.stderr and "Traceback" not in finished.stderr, finished.stderr


class _CountingFiles(list):
    """A file list that counts how many files have been handed out for decoding."""

    handed_out = 0

    def __getitem__(self, index):
        items = super().__getitem__(index)
        if not isinstance(index, slice):
            return items

        def counted():
            for item in items:
                _CountingFiles.handed_out += 1
                yield item
        return counted()


def test_decoding_stays_a_bounded_distance_ahead_of_a_slow_caller(monkeypatch):
    """joblib dispatches a new task whenever one completes, taken or not: without windows, a caller
    slower than the decoders (the model, on small images) would hold every decoded image of the run."""
    import time

    import radscan.ingest

    monkeypatch.setattr(radscan.ingest, "_WINDOW", 16)
    files = find_files([CXR_DIR / "kermany_pediatric_224/train_normal"])[:120]
    counting = _CountingFiles(files)
    _CountingFiles.handed_out = 0
    results = iter_ingested(counting, Policy(), workers=2, in_flight=8)
    next(results)
    time.sleep(3)  # the workers could decode all 120 small images in this time
    assert _CountingFiles.handed_out <= 16
    assert sum(1 for _ in results) == 119


def test_ingest_cuts_the_models_box_from_dicom_and_raster_files_alike(tmp_path):
    crop = (0.1, 0.2, 0.8, 0.9)
    for found in find_files([str(CXR_DIR / "kermany_pediatric_fullres"), str(DICOM_DIR / "fo-dicom")])[:40]:
        record, whole = ingest_file(found, Policy(modalities=None, body_parts=None))
        if whole is None:
            continue
        cut = ingest_file(found, Policy(modalities=None, body_parts=None, crop=crop))[1]
        assert cut.shape == (128, 128), record.path
        assert not np.array_equal(cut, whole) or whole.min() == whole.max(), record.path


@functools.cache
def _seeds() -> dict[str, bytes]:
    """Real files of each kind, the starting points of the damage (read on first use)."""
    return {
        "dicom_mono1": (DICOM_DIR / "fo-dicom/CR-MONO1-10-chest").read_bytes(),
        "dicom_dx": (DICOM_DIR / "highdicom/dx_image.dcm").read_bytes(),
        "dicom_jpeg": (DICOM_DIR / "pylibjpeg-data/JPEGBaseline_1s_1f_u_08_08.dcm").read_bytes(),
        "jpeg": sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[0].read_bytes(),
        "png": sorted((CXR_DIR / "nih_cxr14_64px/test_normal").iterdir())[0].read_bytes(),
    }


SEED_NAMES = ("dicom_jpeg", "dicom_dx", "dicom_mono1", "jpeg", "png")
WIDE = Policy(modalities=None, body_parts=None, frames="first")


@st.composite
def damaged(draw):
    name = draw(st.sampled_from(sorted(SEED_NAMES)))
    data = bytearray(_seeds()[name])
    for _ in range(draw(st.integers(0, 8))):  # flip bytes, mostly in the header
        position = draw(st.integers(0, min(len(data) - 1, draw(st.sampled_from([512, 4096, len(data)])))))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return name, bytes(data if cut is None else data[:cut])


FUZZ_EXAMPLES = int(os.environ.get("RADSCAN_FUZZ_EXAMPLES", "150"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=damaged())
def test_damaged_bytes_never_raise(tmp_path, case):
    name, data = case
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(data)
    for policy in (Policy(), WIDE):
        record, image = ingest_file(Found(str(tmp_path), path.name), policy)
        assert record.status in ("ok", "skipped", "error")
        assert (record.status == "ok") == (image is not None)
        assert (record.reason == "") == (record.status == "ok")
        if record.status == "error":  # whatever broke, the reason is in plain words
            assert_plain(record.reason)
        if image is not None:
            assert image.shape == (128, 128) and image.dtype == np.uint8


@pytest.mark.parametrize(("pack", "named"), [("gzip", "gzip-compressed"), ("zip", "zip archive"),
                                             ("bz2", "bzip2-compressed"), ("xz", "xz-compressed")])
def test_compressed_dicom_is_named_for_what_it_is(tmp_path, pack, named):
    """Issue 22, item 9: a .dcm.gz of a research export was 'not a DICOM, JPEG or PNG file'."""
    import bz2
    import gzip
    import lzma
    import zipfile

    source = (DICOM_DIR / "highdicom/dx_image.dcm").read_bytes()
    target = tmp_path / "studies" / f"IMG0001.dcm.{pack}"
    target.parent.mkdir()
    if pack == "zip":
        with zipfile.ZipFile(target, "w") as archive:
            archive.writestr("IMG0001.dcm", source)
    else:
        target.write_bytes({"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[pack](source))
    (record, image), = iter_ingested(find_files([target.parent]), Policy(), workers=1)
    assert image is None and record.status == "skipped"
    assert record.reason == f"a {named} file, not an image: unpack it to score what it holds"


def test_a_header_value_with_a_right_to_left_override_is_shown_as_it_is(tmp_path):
    import pydicom

    ds = pydicom.dcmread(DICOM_DIR / "highdicom/dx_image.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = "A\u202e12345"
    ds.StudyDescription = "CHEST \u2067PA\u2069"
    ds.save_as(tmp_path / "rlo.dcm")
    record, _ = ingest_file(Found(str(tmp_path), "rlo.dcm"), Policy())
    assert record.AccessionNumber == "A\\u202e12345"
    assert not set(record.as_row()["AccessionNumber"]) & set(BIDI)


def test_decoding_workers_end_with_a_killed_run(tmp_path):
    """Issue 22 item 11: joblib keeps its workers for reuse, and after `kill -9` of a run they went
    on decoding for minutes. Each worker watches the run that started it and ends within a second."""
    psutil = pytest.importorskip("psutil")
    command = [sys.executable, "-m", "radscan", "scan", str(CXR_DIR / "kermany_pediatric_224/train_normal"),
               "--out", str(tmp_path / "inventory.csv"), "--workers", "2"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.monotonic() + 60, []
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.2)
            workers = [child for child in psutil.Process(run.pid).children(recursive=True)
                       if "loky.backend.popen_loky_posix" in " ".join(child.cmdline())]
        assert len(workers) >= 2, "the run never started its decoding workers"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    gone, alive = psutil.wait_procs(workers, timeout=5)
    for process in alive:
        process.kill()
    assert not alive, f"{len(alive)} worker(s) still running 5 s after the run was killed"


def _sample(folder: str, count: int) -> list[Path]:
    files = sorted((CXR_DIR / folder).iterdir()) if (CXR_DIR / folder).is_dir() else []  # none: tests skip
    return files[:: max(1, len(files) // count)][:count]


RASTERS = (
    _sample("kermany_pediatric_224/train_normal", 4)  # 224x224 RGB JPEG
    + _sample("kermany_pediatric_fullres/normal", 4)  # full-size grey JPEG, many sizes
    + _sample("kermany_pediatric_fullres/abnormal", 4)
    + _sample("nih_cxr14_64px/test_abnormal", 4)  # 64x64 RGB/RGBA PNG (upsampled)
)


@pytest.mark.parametrize("path", RASTERS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_chest_jpeg_and_png_load_at_any_size(path):
    record, image = ingest_one(path)
    assert record.status == "ok", record.reason
    assert record.kind == ("jpeg" if path.suffix == ".jpeg" else "png")
    assert image.shape == (128, 128) and image.dtype == np.uint8
    assert record.rows > 0 and record.columns > 0 and record.voi_source == "full-range"
    assert record.study_key == path.parent.resolve().as_posix()
    assert 20 < image.mean() < 235 and image.std() > 10  # a picture, not a flat field


def test_load_images_gives_each_kept_films_patient_id(tmp_path):
    """radscan train splits a site's DICOM normals by Patient ID (a trial: split by study, a
    patient's studies were on both sides): each image returned comes with its own, "" for a JPEG,
    also when the judge drops some."""
    import pydicom

    from radscan.ingest import load_images

    source = pydicom.dcmread(DICOM_DIR / "nih-cxr14-udacity/test1_no_finding.dcm")
    for index, patient in enumerate(["MRN1", "MRN2", "MRN1"]):
        source.PatientID, source.SOPInstanceUID = patient, f"1.2.3.{index}"
        source.save_as(tmp_path / f"{index}.dcm")
    shutil.copy(sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[0], tmp_path / "3.jpeg")
    patients: list[str] = []
    _, names, _ = load_images([str(tmp_path)], Policy(), 1, False, patients=patients,
                              judge=lambda records, films: [record.path != "1.dcm" for record in records])
    assert dict(zip(names, patients, strict=True)) == {"0.dcm": "MRN1", "2.dcm": "MRN1", "3.jpeg": ""}
