"""Finding and reading single files without the shared data: rasters made here at any size and
depth, folder walking, study keys, names that print alike, hostile bytes and links."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from radscan.errors import NoInputError
from radscan.ingest import Found, check_inputs, find_files, iter_ingested
from radscan.policy import FOLDER_STUDY_LIMIT, STUDY_KEYS, Policy
from radscan.preprocess import to_model_input
from tests.support import BIDI, ingest_one, remove_chain


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
    record, image = ingest_one(tmp_path / "film.png")
    assert record.status == "ok", record.reason
    a = alpha.astype(float) / 255
    expected = np.asarray(Image.fromarray((a * grey + (1 - a) * 255).round().astype(np.uint8)).resize(
        (128, 128), Image.Resampling.BICUBIC)).astype(float)
    assert np.abs(image.astype(float) - expected).max() <= 3
    assert image[:8].mean() > 240  # the transparent top is white, not the black stored there


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tint=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
       opacity=st.integers(0, 255), fmt=st.sampled_from(["PNG", "JPEG"]), palette=st.booleans())
def test_a_coloured_or_translucent_film_is_noted_and_a_grey_one_in_any_container_is_not(tmp_path, tint, opacity,
                                                                                     fmt, palette):
    """A trial: a film tinted sepia, or saved half transparent, was shown darker or washed out and
    flagged without a word. Grey content in RGB, a palette or a JPEG is not colour; a tint whose
    channels differ by more than 8 levels on average is; a mean transparency above 1% is noted."""
    grey = np.tile(np.linspace(30, 220, 200), (160, 1))
    rgb = np.clip(grey[..., None] * (1 - 0.3 * np.array(tint)), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if palette:
        image = image.quantize(64)
    if fmt == "PNG":
        image = image.convert("RGBA")
        image.putalpha(opacity)
    else:
        image = image.convert("RGB")
    path = tmp_path / f"film.{fmt.lower()}"
    image.save(path, fmt)
    record, shown = ingest_one(path)
    assert record.status == "ok" and shown is not None
    chroma = (rgb.max(axis=2).astype(float) - rgb.min(axis=2)).mean()
    coloured = "colour" in record.converted
    if chroma > 10:
        assert coloured, (chroma, record.converted)
    elif chroma < 6:
        assert not coloured, (chroma, record.converted)
    if fmt == "PNG" and opacity <= 250:  # a film shown washed out over white
        assert "transparency" in record.converted
    elif opacity >= 253 or fmt == "JPEG":  # alpha 254 changes nothing a reader sees (a second trial)
        assert "transparency" not in record.converted


@pytest.mark.parametrize("mark, warned", [("ruler at the edge", False), ("label in a corner", False),
                                         ("lines across the lungs", True), ("a dot in the middle", False)])
def test_coloured_marks_warn_where_the_chest_is_not_at_its_edge(tmp_path, mark, warned):
    """A second trial: a coloured ruler outside the chest warned while coloured measurement lines
    across the lungs did not; a radiologist wants the reverse."""
    film = np.repeat(np.tile(np.linspace(30, 220, 400), (500, 1))[..., None], 3, axis=2).astype(np.uint8)
    red = (230, 20, 20)
    if mark == "ruler at the edge":
        film[:, :30] = red
    elif mark == "label in a corner":
        film[10:60, 10:150] = red
    elif mark == "lines across the lungs":
        film[200:203, 60:340] = red
        film[300:303, 60:340] = (20, 200, 20)
    else:
        film[248:252, 198:202] = red
    path = tmp_path / "marked.png"
    Image.fromarray(film).save(path)
    record, _ = ingest_one(path)
    assert ("colour" in record.converted) == warned, (mark, record.converted)


def test_sixteen_bit_png_keeps_its_depth_until_windowed(tmp_path):

    ramp = np.tile(np.linspace(1000, 5000, 300, dtype=np.uint16), (200, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    record, image = ingest_one(tmp_path / "ramp16.png")
    assert record.status == "ok" and record.bits_stored == 16 and record.voi_source == "percentile"
    assert image[:, 0].mean() < 10 and image[:, -1].mean() > 245  # 12-bit content fills the 8 bits


def _png16(samples: np.ndarray, colour_type: int, row_filter: int) -> bytes:
    """A 16-bit PNG of (H, W, C) samples (ISO/IEC 15948: colour type 2 RGB, 4 grey+alpha, 6 RGBA),
    every row with `row_filter` (0 none .. 4 Paeth): Pillow cannot write 16-bit colour."""
    import struct
    import zlib

    raw = samples.astype(">u2").reshape(samples.shape[0], -1).view(np.uint8).astype(np.int64)
    step = 2 * samples.shape[2]  # bytes per pixel: the filters' left neighbour
    rows, above = [], np.zeros_like(raw[0])
    for row in raw:
        left = np.r_[np.zeros(step, np.int64), row[:-step]]
        upper_left = np.r_[np.zeros(step, np.int64), above[:-step]]
        if row_filter == 4:
            p = left + above - upper_left
            pa, pb, pc = abs(p - left), abs(p - above), abs(p - upper_left)
            predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upper_left))
        else:
            predictor = [0 * row, left, above, (left + above) // 2][row_filter]
        rows.append(bytes([row_filter]) + ((row - predictor) % 256).astype(np.uint8).tobytes())
        above = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = samples.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(colour_type=st.sampled_from([2, 4, 6]), bits=st.integers(9, 16), row_filter=st.integers(0, 4),
       tint=st.booleans())
def test_sixteen_bit_colour_png_keeps_its_depth_as_grey_does(tmp_path, colour_type, bits, row_filter, tint):
    """A trial: Pillow reads 16-bit colour (and grey with alpha) PNGs as 8 bits by keeping each
    sample's high byte, so a film of 12-bit values in 16-bit samples came out nearly black. Any such
    PNG (every row filter, 9-16 bits used) now shows as the 16-bit grey PNG of its luma does, and a
    tinted one is noted as colour."""
    rng = np.random.default_rng(bits)
    grey = np.clip(np.tile(np.linspace(0, 1, 48), (40, 1)) + rng.normal(0, 0.05, (40, 48)), 0, 1)
    luma = np.rint(grey * (2**bits - 1)).astype(np.uint16)
    Image.fromarray(luma).save(tmp_path / "grey16.png")
    expected = ingest_one(tmp_path / "grey16.png")[1]
    opaque = np.full_like(luma, 65535)
    if colour_type == 4:
        samples, tint = np.stack([luma, opaque], axis=-1), False
    else:
        shift = (2**bits // 16) if tint else 0  # red up, blue down: luma moves by 0.185 * shift
        channels = [luma.astype(np.int64) + shift, luma.astype(np.int64), luma.astype(np.int64) - shift]
        samples = np.stack([np.clip(c, 0, 2**bits - 1) for c in channels] + [opaque] * (colour_type == 6), axis=-1)
    path = tmp_path / "film.png"
    path.write_bytes(_png16(samples, colour_type, row_filter))
    record, image = ingest_one(path)
    assert record.status == "ok" and record.bits_stored == 16, record.reason
    assert ("colour" in record.converted) == tint, record.converted
    if not tint:
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(colour_type=st.sampled_from([0, 2, 4, 6]), bits=st.integers(9, 16), margin=st.integers(3, 12))
def test_transparent_margins_of_a_sixteen_bit_png_are_white_and_leave_the_film_as_it_is(tmp_path, colour_type,
                                                                                       bits, margin):
    """A review: a 12-bit film in a 16-bit PNG with transparent margins (alpha, or a tRNS key colour)
    came out black: composited over 65535, its window reached up to there. The margins show white (the
    page) and the film between them as the 16-bit grey PNG of that part alone shows it; a key colour was
    ignored (shown black) where the 8-bit path honours it."""
    rng = np.random.default_rng(bits)
    grey = np.clip(np.tile(np.linspace(0.05, 0.95, 48), (40, 1)) + rng.normal(0, 0.03, (40, 48)), 0, 1)
    luma = np.rint(grey * (2**bits - 1)).astype(np.uint16)
    from radscan.raster import read_raster
    from radscan.records import ImageRecord

    def displayed(path: Path) -> tuple[ImageRecord, np.ndarray]:  # at the film's own size, before resizing
        record = ImageRecord(path=path.name, root=str(path.parent), kind="png")
        return record, read_raster(path, record, Policy())

    Image.fromarray(np.ascontiguousarray(luma[:, margin:-margin])).save(tmp_path / "middle16.png")
    expected = displayed(tmp_path / "middle16.png")[1]
    drawn = np.zeros(luma.shape, bool)
    drawn[:, margin:-margin] = True
    if colour_type in (4, 6):  # an alpha channel
        alpha = np.where(drawn, 65535, 0).astype(np.uint16)
        samples = np.stack([luma, alpha] if colour_type == 4 else [luma, luma, luma, alpha], axis=-1)
        key = b""
    else:  # a key colour (tRNS): pixels of exactly that value are transparent
        keyed = np.where(drawn, np.maximum(luma, 1), 0).astype(np.uint16)
        samples = keyed[..., None] if colour_type == 0 else np.stack([keyed] * 3, axis=-1)
        key = b"\x00\x00" * (1 if colour_type == 0 else 3)
    data = _png16(samples, colour_type, 0)
    if key:  # tRNS goes before IDAT
        import struct
        import zlib

        chunk = struct.pack(">I", len(key)) + b"tRNS" + key + struct.pack(">I", zlib.crc32(b"tRNS" + key))
        at = data.index(b"IDAT") - 4
        data = data[:at] + chunk + data[at:]
    path = tmp_path / "film.png"
    path.write_bytes(data)
    record, image = displayed(path)
    assert record.status == "ok", record.reason
    assert (image[:, :margin] == 255).all() and (image[:, -margin:] == 255).all()
    assert np.abs(image[:, margin:-margin].astype(int) - expected.astype(int)).mean() <= 1.0


@pytest.mark.parametrize("colour_type", [0, 2, 4, 6])
def test_a_wholly_transparent_sixteen_bit_png_is_white(tmp_path, colour_type):
    """A review: a 16-bit PNG with nothing drawn (alpha 0, or a tRNS key matching every pixel) over
    samples of one value came out black (its window had no width), where its 8-bit twin is white."""
    import struct
    import zlib

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    data = _png16(np.zeros((20, 24, channels), np.uint16), colour_type, 0)
    if colour_type in (0, 2):
        key = b"\x00\x00" * channels
        chunk = struct.pack(">I", len(key)) + b"tRNS" + key + struct.pack(">I", zlib.crc32(b"tRNS" + key))
        at = data.index(b"IDAT") - 4
        data = data[:at] + chunk + data[at:]
    (tmp_path / "blank.png").write_bytes(data)
    from radscan.raster import read_raster
    from radscan.records import ImageRecord

    record = ImageRecord(path="blank.png", root=str(tmp_path), kind="png")
    shown = read_raster(tmp_path / "blank.png", record, Policy())
    assert record.status == "ok" and (shown == 255).all(), record.reason


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
        remove_chain(root, "d" * name_length, depth, "film.png")
    assert len(found) == 1
    expected = "/".join(["d" * name_length] * depth)
    if not found[0].problem:
        assert found[0].path == f"{expected}/film.png"
    else:  # the path ran past PATH_MAX on the way down
        assert found[0].problem == f"cannot list folder: {os.strerror(errno.ENAMETOOLONG)}"
        assert expected.startswith(found[0].path) and len(str(root / found[0].path)) >= 4096 - 16


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


@given(st.lists(st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b),
                min_size=2, max_size=6, unique=True))
@example(names=[b"caf\xe9", b"caf\\xe9"])  # the byte 0xE9, and a typed backslash-x-e-9
@example(names=[b"a\x85", b"a\xc2\x85", b"a\\x85", b"a\n", b"a\\x0a"])  # a byte, U+0085, typed; a newline, typed
def test_different_file_names_never_print_alike(names):
    """Issue 22, item 6: the `path` column must tell any two file names apart, whatever their bytes
    (not UTF-8, a typed backslash-x sequence, a backslash of its own)."""
    from radscan.records import printable

    shown = [printable(os.fsdecode(name)) for name in names]
    assert len(set(shown)) == len(names)
    # nothing that moves a terminal or a line: control characters are written out (a new user's trial)
    assert not any(ch < " " or "\x7f" <= ch <= "\x9f" for text in shown for ch in text)
    assert all("\udc80" > ch or ch > "\udcff" for text in shown for ch in text)  # no lone surrogates left


def test_names_that_printed_alike_in_0_2_are_told_apart(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    for raw in (b"caf\xe9.dcm", b"caf\\xe9.dcm"):
        (studies / os.fsdecode(raw)).write_bytes(b"")
    paths = sorted(record.path for record, _ in iter_ingested(find_files([studies]), Policy(), workers=1))
    from radscan.records import printable

    assert sorted(printable(p) for p in paths) == ["caf\\\\xe9.dcm", "caf\\xe9.dcm"]


@given(st.text(alphabet=st.sampled_from(list(BIDI) + list("A1\\u2e ")), max_size=20))
def test_bidirectional_controls_are_written_out_never_kept(text):
    """Issue 22, item 8: an override in a value or a name reversed the rest of a study line."""
    from radscan.records import printable, visible_controls

    for shown in (visible_controls(text), printable(text)):
        assert not set(shown) & set(BIDI)
        assert shown.count("\\u") >= sum(text.count(ch) for ch in BIDI)


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


_WORKER_LOG = """
import logging, sys
from joblib import delayed
from radscan.ingest import _workers
from radscan.logs import configure

def warn(index):
    logging.getLogger("radscan.dicom").warning("worker %d warns", index)
    return index

configure(int(sys.argv[1]))
assert _workers(n_jobs=2)(delayed(warn)(index) for index in range(2)) == [0, 1]
"""


@pytest.mark.parametrize("level, shown", [(logging.WARNING, True), (logging.ERROR, False)])
def test_decoding_workers_log_as_the_command_does(level, shown, tmp_path):
    """A trial: a worker's warning reached stderr raw, with its traceback and no timestamp, even under
    -q. In a process of its own: the suite's workers, kept for reuse, write to the stderr they began with."""
    import subprocess
    import sys

    script = tmp_path / "workers.py"
    script.write_text(_WORKER_LOG)
    done = subprocess.run([sys.executable, str(script), str(level)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "warns" in line]
    assert len(lines) == (2 if shown else 0), done.stderr
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} radscan WARNING: worker \d warns$", line)
               for line in lines)


@pytest.mark.parametrize("fmt, name", [("TIFF", "TIFF"), ("BMP", "BMP"), ("GIF", "GIF"), ("WEBP", "WebP"),
                                       ("JPEG2000", "JPEG 2000")])
def test_an_image_in_a_format_radscan_does_not_read_says_which_and_what_to_do(tmp_path, fmt, name):
    """A trial: a site exporting TIFF saw every film "not a DICOM, JPEG or PNG file (... no image
    signature)" and nothing flagged. Its row names the format, whatever the file's name."""
    from radscan.ingest import READS_ONLY

    path = tmp_path / "film.dat"
    try:
        Image.fromarray(np.full((64, 64), 128, np.uint8)).save(path, fmt)
    except (KeyError, OSError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    record, image = ingest_one(path)
    assert image is None and record.status == "skipped" and record.reason == f"a {name} image: {READS_ONLY}"
    for start in ("BMI of the patient\n", "GIF89a is what I wrote\n", "II*\x00 text\n", "MM\x00* more text\n"):
        text = tmp_path / "notes.txt"  # text that begins like an image format is not called an image
        text.write_text(start * 3)
        assert "image:" not in ingest_one(text)[0].reason, start


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.one_of(st.integers(1, 300), st.integers(301, 3 << 20)),
       name=st.sampled_from(["IM00001", "film.dcm", "x.jpeg", "1.2.840.10008.5.1", "chest.png"]),
       stray=st.one_of(st.none(), st.integers(0, (1 << 20) - 1)))
@example(size=100, name="IM00001", stray=None)  # a DICOM cut within its zero preamble (a trial)
@example(size=(1 << 20) + 5, name="IM00001", stray=1 << 20)  # a byte past the first MiB: not looked at
def test_a_file_of_zero_bytes_is_an_unfinished_copy_not_a_skipped_one(tmp_path, size, name, stray):
    """A trial: a PACS export without extensions, a film zero-filled by a copy that did not finish,
    was skipped as "not a DICOM, JPEG or PNG file", and its study left the worklist with exit 0.
    A file that starts with a MiB of zero bytes (or is shorter and holds nothing else) is no file of
    any kind: an error, whatever its name. One non-zero byte in that MiB makes it some other file."""
    data = bytearray(size)
    if stray is not None and stray < size:
        data[stray] = 7
    path = tmp_path / name
    path.write_bytes(bytes(data))
    record, image = ingest_one(path)
    if stray is None or stray >= min(size, 1 << 20):
        assert image is None and record.status == "error", record
        assert "only zero bytes" in record.reason
    else:
        assert record.status in ("error", "skipped") and "only zero bytes" not in record.reason, record


@pytest.mark.parametrize("name", [".reserved", "notes.txt", "index.db", "._IM00001"])
def test_zero_filled_files_that_are_never_films_stay_skipped(tmp_path, name):
    """Hidden files and files named as text, databases or macOS resource forks are not films, so a
    zero-filled one is skipped as before, not an error that turns every night's exit code to 3."""
    (tmp_path / name).write_bytes(bytes(4096))
    record, _ = ingest_one(tmp_path / name)
    assert record.status == "skipped", record


def test_a_pipe_or_device_given_as_the_input_is_refused_not_opened(tmp_path):
    """A review's trial: `radscan score PIPE` hung (opening a pipe waits for a writer). A pipe or a
    device named on the command line is no input: exit 66 with the reason, at once."""
    import subprocess
    import sys

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-zero").symlink_to("/dev/zero")
    for name in ("pipe", "to-zero"):
        with pytest.raises(NoInputError, match="a device, socket or pipe"):
            check_inputs([tmp_path / name])
    done = subprocess.run([sys.executable, "-m", "radscan", "scan", str(tmp_path / "pipe"), "--out",
                           str(tmp_path / "i.csv")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 66 and "a device, socket or pipe" in done.stderr
