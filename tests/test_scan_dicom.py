"""`radscan scan` over the 69 real DICOM files of ../shared/data/dicom (see its manifest.csv)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radscan.policy import Policy
from radscan.scan import scan

from .support import assert_plain

HAVE_LIBJPEG = importlib.util.find_spec("libjpeg") is not None

# Under the default policy (CR/DX chest, single frame, for presentation) these are used ...
DEFAULT_OK = {
    "fo-dicom/CR-MONO1-10-chest",  # no preamble, no meta, no extension
    "fo-dicom/CR-ModalitySequenceLUT.dcm",  # CR without BodyPartExamined (a dental panoramic)
    "highdicom/dx_image.dcm",
    "nih-cxr14-udacity/test1_no_finding.dcm",
    "nih-cxr14-udacity/test2_cardiomegaly.dcm",
    "nih-cxr14-udacity/test3_effusion.dcm",
    "nih-cxr14-udacity/test6_position_XX.dcm",
    "pydicom-data/RG1_J2KI.dcm",
    "pylibjpeg-data/RG1_JLSN.dcm",
    "pylibjpeg-data/966_fixed.dcm",
    "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "torchxrayvision/Fake_MONOHR1.dcm",
}
# ... these should have been usable but are not (a user must look at them) ...
DEFAULT_ERROR = {
    "pylibjpeg-data/966.dcm",  # chest DX with a corrupt J2K stream
    "fo-dicom/GH177_D_CLUNIE_CT1_IVRLE_BigEndian_undefined_length.dcm",  # unparseable header
    "not-dicom/html_page_named_test1.dcm",  # HTML named .dcm
    "pydicom/no_meta.dcm",  # named .dcm, starts with a stray byte: no recognisable DICOM
}
# ... and everything else is skipped by policy (non-image, other modality or body part).

# With every selection rule opened up, these fail to decode, whatever the policy.
WIDE_ERROR = DEFAULT_ERROR | {
    "fo-dicom/GH1376.dcm",  # pixel data shorter than Rows x Columns
    "fo-dicom/genFile.dcm",  # undecodable JPEG stream
    "nema-wg04/RG3_JPLY.dcm",  # 12-bit JPEG extended with an invalid SOS
    "pylibjpeg-data/RG2_JPLY.dcm",
    "pydicom/JPEG2000-embedded-sequence-delimiter.dcm",
    "pydicom/MR_truncated.dcm",
    "pydicom/badVR.dcm",
    "pydicom/meta_missing_tsyntax.dcm",  # no Bits Allocated
    "pydicom-data/liver_deflate.dcm",  # Deflated Image Frame Compression: no decoder exists
    "fo-dicom/GH1339.dcm",  # an MR image truncated before its pixel data
    "pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm",  # an enhanced MR without its pixel data
}
if not HAVE_LIBJPEG:  # 12-bit JPEG extended needs the GPL decoder (radscan[codecs-gpl])
    WIDE_ERROR |= {"pydicom/JPGExtended.dcm", "pylibjpeg-data/RG2_JPLY_fixed.dcm"}
WIDE = Policy(modalities=None, body_parts=None, frames="middle", for_processing=True)


def _scan_rows(tmp_path: Path, root: Path, policy: Policy, workers: int) -> dict[str, dict[str, str]]:
    out = tmp_path / "inventory.csv"
    summary = scan([str(root)], out, tmp_path / "previews", policy, workers=workers, progress=False)
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:  # preview links are relative to the inventory's folder
        row["preview_png"] = str(out.parent / row["preview_png"]) if row["preview_png"] else ""
    assert summary.files == len(rows)
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "a file was listed twice"
    return {row["path"]: row for row in rows}


@pytest.fixture(scope="module")
def default_rows(tmp_path_factory, dicom_dir):
    return _scan_rows(tmp_path_factory.mktemp("default"), dicom_dir, Policy(), workers=2)


@pytest.fixture(scope="module")
def wide_rows(tmp_path_factory, dicom_dir):
    return _scan_rows(tmp_path_factory.mktemp("wide"), dicom_dir, WIDE, workers=1)


def test_every_manifest_file_gets_one_row_with_the_right_status(default_rows, dicom_manifest):
    manifest = {row["file"] for row in dicom_manifest}
    assert len(manifest) == 69
    assert set(default_rows) == manifest | {"manifest.csv"}
    for path in manifest:
        row = default_rows[path]
        expected = "ok" if path in DEFAULT_OK else "error" if path in DEFAULT_ERROR else "skipped"
        assert row["status"] == expected, (path, row["reason"])
        assert (row["reason"] == "") == (expected == "ok"), (path, row["reason"])


def test_skip_reasons_name_the_rule_and_the_option(default_rows):
    assert default_rows["pydicom/test-SR.dcm"]["reason"].startswith("no pixel data")
    assert default_rows["fo-dicom/DICOMDIR"]["reason"].startswith("DICOMDIR")
    assert "--modalities" in default_rows["nih-cxr14-udacity/test5_modality_CT.dcm"]["reason"]
    assert "RIBCAGE" in default_rows["nih-cxr14-udacity/test4_bodypart_RIBCAGE.dcm"]["reason"]
    assert "Modality XA" in default_rows["fo-dicom/HasFragmentSequence.dcm"]["reason"]


def test_qc_fields_of_chest_files(default_rows):
    mono1 = default_rows["fo-dicom/CR-MONO1-10-chest"]
    assert (mono1["photometric"], mono1["inverted"]) == ("MONOCHROME1", "true")
    assert mono1["voi_source"] == "window"
    assert [mono1[key] for key in ("bits_stored", "rows", "columns", "frames")] == ["10", "440", "440", "1"]
    j2k = default_rows["pydicom-data/RG1_J2KI.dcm"]
    assert j2k["transfer_syntax"] == "1.2.840.10008.1.2.4.91"
    assert j2k["Modality"] == "CR" and j2k["BodyPartExamined"] == "CHEST" and j2k["ViewPosition"] == "PA"
    nih = default_rows["nih-cxr14-udacity/test1_no_finding.dcm"]
    assert (nih["inverted"], nih["voi_source"]) == ("false", "full-range")
    assert nih["study_key"] == nih["StudyInstanceUID"] != ""


def test_previews_are_the_8bit_model_input(default_rows):
    for row in default_rows.values():
        if row["status"] != "ok":
            assert row["preview_png"] == ""
            continue
        preview = Path(row["preview_png"])
        assert preview.suffix == ".png" and len(preview.stem) == 24  # a hash: no identifiers
        image = Image.open(preview)
        assert (image.size, image.mode) == ((128, 128), "L")
        assert not image.info.get("text") and not getattr(image, "text", {})


def test_wide_policy_decodes_every_syntax_that_has_a_decoder(wide_rows):
    for path, row in wide_rows.items():
        if path == "manifest.csv":
            continue
        if path in WIDE_ERROR:
            assert row["status"] == "error", (path, row["reason"])
        elif row["status"] != "ok":
            # only objects that are not images (SR, RT, ECG, DICOMDIR) are left out
            assert row["reason"].startswith(("no pixel data", "DICOMDIR")), (path, row["reason"])
    assert wide_rows["pydicom-data/HTJ2KLossless_08_RGB.dcm"]["status"] == "ok"
    assert wide_rows["fo-dicom/HasFragmentSequence.dcm"]["frame_used"] == "48"  # middle of 96


def test_decode_errors_say_what_to_do(wide_rows):
    assert "no decoder exists" in wide_rows["pydicom-data/liver_deflate.dcm"]["reason"]
    assert "too little pixel data" in wide_rows["pydicom/MR_truncated.dcm"]["reason"]
    if not HAVE_LIBJPEG:
        assert "radscan[codecs-gpl]" in wide_rows["pydicom/JPGExtended.dcm"]["reason"]


def test_reasons_are_plain_words(default_rows, wide_rows):
    # decoders' and Python's own messages go to the log; a row's reason is for a PACS admin
    checked = 0
    for rows in (default_rows, wide_rows):
        for row in rows.values():
            if row["status"] in ("error", "skipped"):
                assert_plain(row["reason"])
                checked += 1
    assert checked >= 10  # the collection holds damaged, foreign and unsupported files: the test has work


def _lungs_darker_than_mediastinum(preview: np.ndarray) -> bool:
    """On a frontal chest film shown correctly, the lung fields are darker than the spine and
    mediastinum between them."""
    lungs = np.concatenate([preview[35:85, 18:45].ravel(), preview[35:85, 83:110].ravel()])
    centre = preview[35:85, 57:71]
    return lungs.mean() + 15 < centre.mean()


FRONTAL_CHESTS = sorted(DEFAULT_OK - {
    "highdicom/dx_image.dcm",  # a dog, lateral
    "fo-dicom/CR-ModalitySequenceLUT.dcm",  # a dental panoramic
    "torchxrayvision/Fake_MONOHR1.dcm",  # mislabelled MONOCHROME1: checked below
})


@pytest.mark.parametrize("path", FRONTAL_CHESTS)
def test_chest_previews_have_dark_lungs(default_rows, path):
    row = default_rows[path]
    preview = np.asarray(Image.open(row["preview_png"]))
    assert preview.shape == (128, 128) and preview.dtype == np.uint8
    assert _lungs_darker_than_mediastinum(preview), (path, row["photometric"], row["inverted"])


def test_monochrome1_label_is_honoured_even_when_wrong(default_rows):
    # Fake_MONOHR1 holds MONOCHROME2 pixels under a MONOCHROME1 label: following the header (the
    # standard) inverts it exactly once, so its lungs come out bright. The header is what we trust.
    row = default_rows["torchxrayvision/Fake_MONOHR1.dcm"]
    preview = np.asarray(Image.open(row["preview_png"]))
    assert row["inverted"] == "true"
    assert not _lungs_darker_than_mediastinum(preview)


def test_same_header_different_tags_give_identical_previews(default_rows):
    a = np.asarray(Image.open(default_rows["nih-cxr14-udacity/test1_no_finding.dcm"]["preview_png"]))
    b = np.asarray(Image.open(default_rows["nih-cxr14-udacity/test6_position_XX.dcm"]["preview_png"]))
    assert np.array_equal(a, b)


def test_lossy_jpeg2000_and_jpegls_of_one_film_agree(default_rows):
    j2k = np.asarray(Image.open(default_rows["pydicom-data/RG1_J2KI.dcm"]["preview_png"]), dtype=float)
    jls = np.asarray(Image.open(default_rows["pylibjpeg-data/RG1_JLSN.dcm"]["preview_png"]), dtype=float)
    assert np.abs(j2k - jls).mean() < 1.0  # two lossy encodings of the same NEMA RG1 film


@pytest.mark.parametrize("value, expected", [
    ("20261129", "2026-11-29"), ("2026.11.29", "2026-11-29"), (" 20240229 ", "2024-02-29"),
    ("20230229", ""), ("20261399", ""), ("00000000", ""), ("yesterday", ""), ("", ""),
])
def test_study_dates_are_iso_or_empty_never_wrong(value, expected):
    """StudyDate (DA, PS3.5 6.2) reaches the worklist as ISO 8601 or not at all: a column that is
    sorted and filtered on must not carry 2026-13-99."""
    from radscan.dicom import iso_date

    assert iso_date(value) == expected


def test_decoder_messages_go_to_the_log_with_the_file_not_to_stderr(dicom_dir, capfd, caplog):
    """OpenJPEG writes "Stream too short" from C straight to the process's stderr, past -q."""
    import logging

    from radscan.dicom import read_dicom
    from radscan.records import ImageRecord

    path = dicom_dir / "pylibjpeg-data" / "966.dcm"
    record = ImageRecord(path="966.dcm", root=str(path.parent), kind="dicom")
    with caplog.at_level(logging.DEBUG, logger="radscan.dicom"):
        image = read_dicom(path, record, Policy())
    assert image is None and "cannot decode the pixel data" in record.reason
    assert capfd.readouterr().err == ""
    assert any("966.dcm" in message and "Stream too short" in message for message in caplog.messages)


@pytest.mark.parametrize("said", [b"", b"x", b"Failed to decode tile 1/1\n" * 3, "\u00e9\u20ac\n".encode(),
                                  b"\xff\xfe not text", b"y" * 10_000])
def test_anything_a_codec_writes_to_stderr_while_decoding_is_caught(said, capfd, caplog):
    import logging
    import os

    from radscan.dicom import _decoder_messages

    with caplog.at_level(logging.DEBUG, logger="radscan.dicom"), _decoder_messages("film.dcm"):
        os.write(2, said)
    os.write(2, b"after\n")  # stderr is the terminal's again
    assert capfd.readouterr().err == "after\n"
    assert bool([m for m in caplog.messages if "film.dcm" in m]) == bool(said.strip())
