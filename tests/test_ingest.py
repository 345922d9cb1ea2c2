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
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from radscan.ingest import Found, find_files, ingest_file, iter_ingested, sniff_kind
from radscan.policy import FOLDER_STUDY_LIMIT, STUDY_KEYS, Policy
from radscan.preprocess import to_model_input

from .conftest import CXR_DIR, DICOM_DIR
from .test_dicom_edge import assert_plain


def _ingest(path: Path):
    return ingest_file(Found(str(path.parent), path.name), Policy())


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
    record, image = _ingest(path)
    assert record.status == "ok", record.reason
    assert record.kind == ("jpeg" if path.suffix == ".jpeg" else "png")
    assert image.shape == (128, 128) and image.dtype == np.uint8
    assert record.rows > 0 and record.columns > 0 and record.voi_source == "full-range"
    assert record.study_key == path.parent.resolve().as_posix()
    assert 20 < image.mean() < 235 and image.std() > 10  # a picture, not a flat field


@pytest.mark.parametrize("mode", ["LA", "RGBA", "P"])
def test_a_transparent_png_shows_as_a_viewer_shows_it(tmp_path, mode):
    """Issue 22 item 7: alpha was dropped, so a transparent region showed the grey stored under it
    (here black) where a viewer shows the white page. Composited over white: alpha * grey +
    (1 - alpha) * 255, for grey+alpha, colour+alpha and a palette with a transparent entry."""
    grey = np.tile(np.linspace(0, 200, 256).round().astype(np.uint8), (256, 1))
    alpha = np.tile(np.linspace(0, 255, 256).round().astype(np.uint8)[:, None], (1, 256))
    if mode == "P":  # palette: grey levels 0..254, entry 255 transparent where alpha is below half
        alpha = np.where(alpha < 128, 0, 255).astype(np.uint8)
        indices = np.where(alpha == 0, 255, np.minimum(grey, 254)).astype(np.uint8)
        image = Image.fromarray(indices, "P")
        image.putpalette([v for level in range(256) for v in (level, level, level)])
        image.save(tmp_path / "film.png", transparency=255)
    else:
        bands = [grey, alpha] if mode == "LA" else [grey, grey, grey, alpha]
        Image.fromarray(np.stack(bands, axis=-1), mode).save(tmp_path / "film.png")
    record, image = _ingest(tmp_path / "film.png")
    assert record.status == "ok", record.reason
    a = alpha.astype(float) / 255
    expected = np.asarray(Image.fromarray((a * grey + (1 - a) * 255).round().astype(np.uint8)).resize(
        (128, 128), Image.Resampling.BICUBIC)).astype(float)
    assert np.abs(image.astype(float) - expected).max() <= 3
    assert image[:8].mean() > 240  # the transparent top is white, not the black stored there


def test_sixteen_bit_png_keeps_its_depth_until_windowed(tmp_path):

    ramp = np.tile(np.linspace(1000, 5000, 300, dtype=np.uint16), (200, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    record, image = _ingest(tmp_path / "ramp16.png")
    assert record.status == "ok" and record.bits_stored == 16 and record.voi_source == "percentile"
    assert image[:, 0].mean() < 10 and image[:, -1].mean() > 245  # 12-bit content fills the 8 bits


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


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(min_value=1, max_value=2000), name_length=st.integers(min_value=1, max_value=3))
@example(depth=1900, name_length=1)  # far past Python's recursion limit, within PATH_MAX
@example(depth=1200, name_length=3)  # past PATH_MAX on the way down
def test_a_tree_of_any_depth_is_crawled_or_says_why_not(tmp_path_factory, depth, name_length):
    """The crawl does not depend on recursion depth (issue 22, item 5: RecursionError past about
    1,000 levels). A file at the bottom is found; where the path grows past the system's limit
    (PATH_MAX, 4,096 bytes), the folder that cannot be listed is a row that says so."""
    import errno

    root = tmp_path_factory.mktemp("deep")
    descriptor = os.open(root, os.O_RDONLY)
    try:  # build it relative to open folders: the full path may be longer than the system allows
        for _ in range(depth):
            os.mkdir("d" * name_length, dir_fd=descriptor)
            inner = os.open("d" * name_length, os.O_RDONLY, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = inner
        with open(os.open("film.png", os.O_WRONLY | os.O_CREAT, dir_fd=descriptor), "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n")
    finally:
        os.close(descriptor)
    try:
        found = find_files([root])
    finally:
        _remove_chain(root, "d" * name_length, depth, "film.png")
    assert len(found) == 1
    expected = "/".join(["d" * name_length] * depth)
    if not found[0].problem:
        assert found[0].path == f"{expected}/film.png"
    else:  # the path ran past PATH_MAX on the way down
        assert found[0].problem == f"cannot list folder: {os.strerror(errno.ENAMETOOLONG)}"
        assert expected.startswith(found[0].path) and len(str(root / found[0].path)) >= 4096 - 16


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
        _remove_chain(root, "d", 1900, "film.jpeg")
    assert done.returncode == 0, done.stderr[-500:]
    rows = (tmp_path / "inventory.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("/".join(["d"] * 1900) + "/film.jpeg,")


def _remove_chain(root: Path, name: str, depth: int, leaf: str) -> None:
    """Remove root/name/name/.../leaf without recursion or long paths (shutil.rmtree, and so
    pytest's clean-up of old temporary folders, recurses once per level)."""
    descriptor = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        inner = os.open(name, os.O_RDONLY, dir_fd=descriptor)
        os.close(descriptor)
        descriptor = inner
    os.unlink(leaf, dir_fd=descriptor)
    for _ in range(depth):
        parent = os.open("..", os.O_RDONLY, dir_fd=descriptor)
        os.close(descriptor)
        os.rmdir(name, dir_fd=parent)
        descriptor = parent
    os.close(descriptor)


def test_links_to_devices_and_pipes_are_named_for_what_they_are(tmp_path):
    """A link whose target is a pipe or a device is not 'broken' (issue 22, item 6)."""
    studies = tmp_path / "studies"
    studies.mkdir()
    os.mkfifo(tmp_path / "pipe")
    (studies / "to-pipe.dcm").symlink_to(tmp_path / "pipe")
    (studies / "to-device.dcm").symlink_to("/dev/null")
    (studies / "dangling.dcm").symlink_to(tmp_path / "missing")
    os.mkfifo(studies / "pipe.dcm")
    problems = {f.path: f.problem for f in find_files([studies])}
    assert problems == {"dangling.dcm": "broken symbolic link",
                        "pipe.dcm": "not a regular file (device, socket or pipe)",
                        "to-device.dcm": "not a regular file (a symbolic link to a device, socket or pipe)",
                        "to-pipe.dcm": "not a regular file (a symbolic link to a device, socket or pipe)"}


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

    found = find_files([studies], exclude=[previews])
    paths = [f.path for f in found]
    assert paths.count("a/IMG0001") == 1 and "b/IMG0001" not in paths
    assert not any(p.startswith("previews") for p in paths)
    problems = {f.path: f.problem for f in found if f.problem}
    assert problems == {"a/dangling": "broken symbolic link"}
    records = [record for record, _ in iter_ingested(found, Policy(), workers=1)]
    by_path = {r.path: r for r in records}
    assert by_path["a/IMG0001"].status == "ok"
    assert by_path["a/dangling"].status == "error"
    assert by_path[odd].status == "error" and "empty file" in by_path[odd].reason


def test_inputs_named_twice_or_inside_another_are_listed_once_under_the_outer_root(tmp_path):
    """`score /data /data/2026` used to stop with "no files found under /data/2026" (exit 66), and
    `score a.dcm a.dcm` listed the file twice; the command line's order must not matter."""
    (tmp_path / "data" / "2026").mkdir(parents=True)
    (tmp_path / "data" / "a.jpeg").write_bytes(b"x")
    (tmp_path / "data" / "2026" / "b.jpeg").write_bytes(b"x")
    data, year = str(tmp_path / "data"), str(tmp_path / "data" / "2026")
    expected = [Found(data, "2026/b.jpeg"), Found(data, "a.jpeg")]
    assert find_files([data, year]) == expected
    assert find_files([year, data, f"{data}/"]) == expected
    single = str(tmp_path / "data" / "a.jpeg")
    assert find_files([single, single]) == [Found(data, "a.jpeg")]


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


def test_to_model_input_rejects_anything_but_8bit_grey():
    with pytest.raises(ValueError):
        to_model_input(np.zeros((10, 10), dtype=np.float32))


_fractions = st.floats(0, 1, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 600), width=st.integers(1, 600), a=_fractions, b=_fractions, c=_fractions, d=_fractions)
@example(height=1, width=1, a=0.0, b=0.0, c=1.0, d=1.0)
def test_a_models_box_is_cut_from_films_of_any_size_at_their_own_resolution(height, width, a, b, c, d):
    """A thorax-box model's crop (fractions of the film) is cut before resizing, from films of any
    size, down to one pixel; what comes out is always the model's 128 x 128 input, and the box's
    content is what it shows."""
    from radscan.preprocess import crop_pixels

    left, right = sorted((a, c))
    top, bottom = sorted((b, d))
    if not (left < right and top < bottom):
        with pytest.raises(ValueError, match="crop must be"):
            Policy(crop=(left, top, right, bottom))
        return
    crop = Policy(crop=(left, top, right, bottom)).crop
    x0, y0, x1, y1 = crop_pixels(crop, height, width)
    assert 0 <= x0 < x1 <= max(width, x0 + 1) and 0 <= y0 < y1 <= max(height, y0 + 1) and x1 <= width and y1 <= height
    film = np.zeros((height, width), dtype=np.uint8)
    film[y0:y1, x0:x1] = 200  # the box bright, the rest black
    model_input = to_model_input(film, crop)
    assert model_input.shape == (128, 128) and model_input.dtype == np.uint8
    assert model_input.min() >= 199  # nothing from outside the box
    assert np.array_equal(to_model_input(film), to_model_input(film, None))


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
@pytest.mark.data
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


@given(st.lists(st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b),
                min_size=2, max_size=6, unique=True))
@example(names=[b"caf\xe9", b"caf\\xe9"])  # the byte 0xE9, and a typed backslash-x-e-9
def test_different_file_names_never_print_alike(names):
    """Issue 22, item 6: the `path` column must tell any two file names apart, whatever their bytes
    (not UTF-8, a typed backslash-x sequence, a backslash of its own)."""
    from radscan.records import printable

    shown = [printable(os.fsdecode(name)) for name in names]
    assert len(set(shown)) == len(names)
    assert all("\udc80" > ch or ch > "\udcff" for text in shown for ch in text)  # no lone surrogates left


def test_names_that_printed_alike_in_0_2_are_told_apart(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    for raw in (b"caf\xe9.dcm", b"caf\\xe9.dcm"):
        (studies / os.fsdecode(raw)).write_bytes(b"")
    paths = sorted(record.path for record, _ in iter_ingested(find_files([studies]), Policy(), workers=1))
    from radscan.records import printable

    assert sorted(printable(p) for p in paths) == ["caf\\\\xe9.dcm", "caf\\xe9.dcm"]


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


_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


@given(st.text(alphabet=st.sampled_from(list(_BIDI) + list("A1\\u2e ")), max_size=20))
def test_bidirectional_controls_are_written_out_never_kept(text):
    """Issue 22, item 8: an override in a value or a name reversed the rest of a study line."""
    from radscan.records import printable, visible_controls

    for shown in (visible_controls(text), printable(text)):
        assert not set(shown) & set(_BIDI)
        assert shown.count("\\u") >= sum(text.count(ch) for ch in _BIDI)


def test_a_header_value_with_a_right_to_left_override_is_shown_as_it_is(tmp_path):
    import pydicom

    ds = pydicom.dcmread(DICOM_DIR / "highdicom/dx_image.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = "A\u202e12345"
    ds.StudyDescription = "CHEST \u2067PA\u2069"
    ds.save_as(tmp_path / "rlo.dcm")
    record, _ = ingest_file(Found(str(tmp_path), "rlo.dcm"), Policy())
    assert record.AccessionNumber == "A\\u202e12345"
    assert not set(record.as_row()["AccessionNumber"]) & set(_BIDI)


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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 2 * FOLDER_STUDY_LIMIT + 2), min_size=1, max_size=5),
       in_root=st.integers(0, 12), mode=st.sampled_from(STUDY_KEYS))
def test_a_study_is_a_folder_of_a_few_films_and_a_file_of_a_flat_export(tmp_path_factory, sizes, in_root, mode):
    """Issue 21 item 1: files whose content names no study (JPEG, PNG) are grouped by the crawl. A
    folder of one examination's few views is one study; a flat folder of many films (an export) is
    not, or the page links only its top film; --study-key folder and file force either."""
    root = tmp_path_factory.mktemp("studies")
    layout = {f"p{index}": size for index, size in enumerate(sizes)} | ({"": in_root} if in_root else {})
    for folder, size in layout.items():
        (root / folder).mkdir(exist_ok=True)
        for number in range(size):
            (root / folder / f"im{number}.png").write_bytes(b"x")
    for folder in layout:  # what sits beside films and is never one does not count
        for stray in (".DS_Store", "Thumbs.db", "notes.txt", "._im0.png"):
            (root / folder / stray).write_bytes(b"x")
    found = [each for each in find_files([root], study_key=mode) if each.path.endswith(".png")
             and not each.path.rpartition("/")[2].startswith("._")]
    keys = {each.path: each.study_key for each in found}
    assert len(keys) == sum(layout.values())
    for folder, size in layout.items():
        mine = {key for path, key in keys.items() if path.rpartition("/")[0] == folder}
        one_study = mode == "folder" or (mode == "auto" and size <= FOLDER_STUDY_LIMIT)
        assert len(mine) == (1 if one_study else size)
        others = {key for path, key in keys.items() if path.rpartition("/")[0] != folder}
        assert not mine & others  # no study spans two folders
    again = {each.path: each.study_key for each in find_files([root], study_key=mode)}
    assert all(again[path] == key for path, key in keys.items())  # the same keys run after run


def test_an_unknown_study_key_mode_is_refused(tmp_path):
    from radscan.errors import SettingError

    with pytest.raises(SettingError, match="--study-key"):
        find_files([tmp_path], study_key="patient")
