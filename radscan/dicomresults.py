"""DICOM results of a scored DICOM image, for the PACS (`radscan score --dicom-out DIR`).

Two objects per image, made with highdicom, both in the source's study (its Study Instance UID and
patient, a new series each) and both marked not for diagnostic use:

- a **Comprehensive 3D SR** holding a TID 1500 Imaging Measurement Report: one measurement group
  that references the source image (TID 1501), with the anomaly score and the threshold as
  measurements, the triage flag as a qualitative evaluation, and the algorithm's identity (TID
  4019: model name, version, sha256, score kind, radscan version); device observer radscan;
  VerificationFlag UNVERIFIED (no person has checked it);
- a **Secondary Capture** of the explanation picture with a burned-in banner
  "NOT FOR DIAGNOSTIC USE" (BurnedInAnnotation YES).

SOP Instance UIDs are name-based UUIDs under the 2.25 root (PS3.5 B.2) of what the object says:
the source's SOP Instance UID and scored frame, the model's sha256, the preprocessing version, the
score, threshold and flag. A rerun that finds the same result writes the same objects, so a PACS
that holds them sees no duplicates; a changed result (a new model, a changed file, another frame)
makes new objects, and its SR names the one it replaces (Predecessor Documents Sequence). Each
input file has its own two files in the folder, named by a hash of its path (like the pictures),
rewritten when their content is no longer the current result.
Codes that no standard coding scheme has (the score, its threshold, the flag) use the local scheme
99RADSCAN (PS3.16 8.2: designators beginning with "99" are private), declared in each SR.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import logging
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import PersonName

from radscan import __version__
from radscan.errors import SettingError
from radscan.qc import WARN_AGE, WARN_COLOUR, WARN_MIRRORED, WARN_OFF_CENTRE, WARN_SMALL, WARN_TRANSPARENT
from radscan.records import visible_controls
from radscan.report import atomic_output, cannot_write

__all__ = ["DicomResult", "ResultWriter", "require_highdicom", "SR_SERIES_NUMBER", "SC_SERIES_NUMBER",
           "NOT_FOR_DIAGNOSIS", "LOCAL_SCHEME"]

log = logging.getLogger(__name__)

LOCAL_SCHEME = "99RADSCAN"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902  # high numbers: listed after the site's own series
SR_SERIES = f"radscan anomaly score - {NOT_FOR_DIAGNOSIS}"
SC_SERIES = f"radscan anomaly map - {NOT_FOR_DIAGNOSIS}"
_BANNER = f"{NOT_FOR_DIAGNOSIS}  ·  radscan anomaly map: research and triage support only, not a diagnosis"
# highdicom asks for an orientation in the patient's coordinate system; the value is then emptied
_PANELS_ORIENTATION = ("L", "F")
_COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "radscan DICOM results")
# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that the
# results copy from the source: older files (ACR-NEMA style) may lack them
_IDENTITY = ("PatientID", "PatientName", "AccessionNumber", "IssuerOfPatientID")
_PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                      "ReferringPhysicianName", "StudyID", "AccessionNumber")


def require_highdicom() -> None:
    """Raise SettingError (exit 2) naming the install step when highdicom is missing."""
    if importlib.util.find_spec("highdicom") is None:
        raise SettingError("--dicom-out needs highdicom: pip install 'radscan[pacs]'")


@dataclass(frozen=True)
class DicomResult:
    """The two objects of one input file: where they are, what the PACS knows them by, and which
    of the files must be (re)written because they do not hold them yet."""

    sr_path: Path
    sr_uid: str
    sc_path: Path
    sc_uid: str
    predecessor: str = ""  # the SOP Instance UID of the SR this one replaces ("": none)
    write_sr: bool = True
    write_sc: bool = True

    @property
    def objects(self) -> tuple[tuple[Path, str], tuple[Path, str]]:
        return (self.sr_path, self.sr_uid), (self.sc_path, self.sc_uid)


def derived_uid(*parts: str) -> str:
    """A UID that is the same for the same parts: a name-based UUID (RFC 9562 version 5) under the
    2.25 root (PS3.5 B.2), at most 44 characters."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0).join(parts)).int}"


class ResultWriter:
    """Writes the SR and SC of scored DICOM images into `folder` (flat; file names are hashes of
    the input file's identity, which hold no patient information)."""

    def __init__(self, folder: Path, provenance: dict[str, Any], score_kind: str):
        self.folder, self.provenance, self.score_kind = folder, provenance, score_kind
        self._version = f"{provenance['model_sha256']}|{provenance['preprocess_version']}"

    def plan(self, file_key: bytes, row: dict[str, Any]) -> DicomResult:
        """The objects of the result in `row` of the input file stored under `file_key`, against
        what its files in the folder hold. An SR's UID is derived from the result and from the SR
        it replaces, so that a new verdict (even one equal to an older verdict) is always a new
        object that names the one before it, and a rewritten file never gives one UID two contents."""
        name = hashlib.sha256(b"radscan dicom results\0" + file_key).hexdigest()[:24]
        sr_path, sc_path = self.folder / f"SR_{name}.dcm", self.folder / f"SC_{name}.dcm"
        # everything the SR states: a new QC verdict alone (another --qc mode) is a new object too
        result = [str(row.get(key)) for key in ("SOPInstanceUID", "frame_used", "score", "threshold", "flag",
                                                "qc_status", "qc_reason")]
        # and the study it joins: one SOP Instance UID sent in two studies (a sender's error, or a study
        # merged) gets two results, not one UID for two objects; results derived before the study was part
        # of it (radscan 0.2) are still recognised as the current verdict, so an upgrade sends nothing again
        study = str(row.get("StudyInstanceUID", ""))
        earlier = _our_report(sr_path, row.get("StudyInstanceUID", ""))
        before = _predecessor_uid(earlier) if earlier is not None else ""
        if earlier is not None and earlier.SOPInstanceUID in (derived_uid("sr", self._version, *result, study, before),
                                                              derived_uid("sr", self._version, *result, before)):
            sr_uid, predecessor, write_sr = str(earlier.SOPInstanceUID), before, False  # the current verdict
        else:
            predecessor = str(earlier.SOPInstanceUID) if earlier is not None else ""
            sr_uid, write_sr = derived_uid("sr", self._version, *result, study, predecessor), True
        sc_uid = derived_uid("sc", sr_uid)
        return DicomResult(sr_path, sr_uid, sc_path, sc_uid, predecessor, write_sr,
                           write_sr or not _holds(sc_path, sc_uid))

    def write(self, source_path: Path, row: dict[str, Any], picture_path: Path, planned: DicomResult) -> int:
        """Write (atomically) the files of `planned` that must be written, for the image scored in
        `row` whose explanation picture is `picture_path`; returns how many. The source's header
        is read again (no pixels) and must still be the image scored (same SOP Instance UID).
        Raises ValueError with a reason in plain words when a result cannot be made (the source
        changed, lacks a valid UID or carries identifying values that are not valid DICOM, or
        highdicom refuses it); OutputError when a file cannot be written."""
        source = _source_header(source_path, row)
        picture = _picture(picture_path)
        predecessor = _our_report(planned.sr_path, source.StudyInstanceUID) if planned.predecessor else None
        if predecessor is not None and predecessor.SOPInstanceUID != planned.predecessor:
            raise ValueError(f"{planned.sr_path.name} changed while it was read; the next run writes it")
        with warnings.catch_warnings():  # e.g. person names of the source that are not in PN form
            warnings.simplefilter("ignore", UserWarning)
            try:
                objects = []
                if planned.write_sr:
                    objects.append((self._report(source, row, planned, predecessor), planned.sr_path))
                if planned.write_sc:
                    objects.append((self._capture(source, picture, planned), planned.sc_path))
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                raise ValueError(f"highdicom cannot make a result from this file's header: {exc}") from None
        for dataset, path in objects:
            dataset.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: whatever the source's names hold
            if dataset.get("InstanceNumber") is not None and source.get("InstanceNumber") is not None:
                dataset.InstanceNumber = source.InstanceNumber  # sorted like their sources in the series
            _carry_deidentification(dataset, source)
            if path.is_symlink() or (path.exists() and not path.is_file() and not path.is_dir()):
                path.unlink()  # a link or a FIFO radscan did not make: replaced, never followed or opened
            try:
                with atomic_output(path, "wb") as handle:
                    dataset.save_as(handle, enforce_file_format=True)
            except OSError as exc:  # a full disk or a lost share: this image's results, never the worklist
                raise cannot_write(path, exc) from None
        return len(objects)

    def _report(self, source: Dataset, row: dict[str, Any], result: DicomResult,
                predecessor: Dataset | None) -> Dataset:
        import highdicom as hd
        from pydicom.sr.codedict import codes

        algorithm = hd.sr.AlgorithmIdentification(
            name=f"radscan {self.provenance['model_name']}", version=str(self.provenance["model_version"]),
            parameters=[f"model sha256 {self.provenance['model_sha256']}", f"score kind {self.score_kind}",
                        f"preprocessing {self.provenance['preprocess_version']}",
                        f"radscan {self.provenance['radscan_version']}"],
            manufacturer="radscan")
        device = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=derived_uid("device", self._version), name="radscan", manufacturer_name="radscan",
                model_name=str(self.provenance["model_name"])))
        score, threshold, flag = float(row["score"]), float(row["threshold"]), row["flag"] is True
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("tracking", result.sr_uid),
                                                         identifier="radscan anomaly score"),
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(name=_code("ANOMALY-SCORE", "Anomaly score (0-1, high = unlike normal films)"),
                                  value=round(score, 6), unit=codes.UCUM.NoUnits, algorithm_id=algorithm),
                hd.sr.Measurement(name=_code("THRESHOLD", "Anomaly score threshold"), value=round(threshold, 6),
                                  unit=codes.UCUM.NoUnits)],
            qualitative_evaluations=_evaluations(flag, row.get("qc_status", ""), row.get("qc_reason", "")),
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(
                source, referenced_frame_numbers=_frames(source, row))])
        content = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=device),
            procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain X-ray of chest"),
            imaging_measurements=[group])
        report = hd.sr.Comprehensive3DSR(
            evidence=[source], content=content[0],
            series_instance_uid=derived_uid("sr-series", source.StudyInstanceUID, self._version),
            series_number=SR_SERIES_NUMBER, sop_instance_uid=result.sr_uid, instance_number=1,
            manufacturer="radscan", manufacturer_model_name=str(self.provenance["model_name"]),
            series_description=SR_SERIES, is_complete=True, is_verified=False, software_versions=__version__,
            previous_versions=[predecessor] if predecessor is not None else None,
            coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
                LOCAL_SCHEME, name="radscan local codes", responsible_organization="radscan")])
        return report

    def _capture(self, source: Dataset, picture: np.ndarray, result: DicomResult) -> Dataset:
        import highdicom as hd

        capture = hd.sc.SCImage.from_ref_dataset(
            source, picture, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
            series_instance_uid=derived_uid("sc-series", source.StudyInstanceUID, self._version),
            series_number=SC_SERIES_NUMBER, sop_instance_uid=result.sc_uid, instance_number=1,
            manufacturer="radscan", patient_orientation=_PANELS_ORIENTATION,
            transfer_syntax_uid=ExplicitVRLittleEndian, series_description=SC_SERIES, software_versions=__version__,
            manufacturer_model_name=str(self.provenance["model_name"]))
        # the picture sets panels and text side by side: no one direction of the patient runs across
        # it, so no orientation markers (PatientOrientation is Type 2C: present and empty)
        capture.PatientOrientation = ""
        capture.BurnedInAnnotation = "YES"
        capture.ImageComments = f"{NOT_FOR_DIAGNOSIS}: radscan anomaly map, research and triage support only"
        # General Series: Laterality is Type 2C, for paired body parts only; a chest is not one
        capture.BodyPartExamined = "CHEST"
        if source.get("StudyDescription"):
            capture.StudyDescription = source.StudyDescription
        return capture


# The flag as the SR states it (code value <= 16 characters, a DICOM SH; meaning <= 64), and quality control's verdict
# on the input beside it (issue 21 item 8): a worklist engine that acts on the flag alone must not
# read a film quality control warned about (an adult under a children's model, a mirrored film) as
# one the model judged with confidence, nor an unflagged one as a sign of normal.
_FLAGS = {(True, False): ("FLAGGED", "Flagged for priority reading"),
          (False, False): ("NOT-FLAGGED", "Not flagged"),
          (True, True): ("FLAGGED-QCWARN", "Flagged for priority reading; quality control warning"),
          (False, True): ("NOT-FLAGGED-QCW", "Not flagged; quality control warning: not a sign of normal")}
_QC_VERDICTS = {"pass": ("QC-PASS", "Passed: the film suits the model"),
                "warn": ("QC-WARNING", "Warning: check the film before acting on the flag"),
                "fail": ("QC-FAIL", "Failed, scored under --qc warn: the score may not apply")}


# what a warning is about, coded, so that an engine can tell a film to check (mirrored) from a
# patient the model was not made for (age) without parsing the worklist's words
_QC_FINDINGS = {WARN_MIRRORED: ("QC-MIRRORED", "May be mirrored left to right: check the side marker"),
                WARN_AGE: ("QC-AGE", "Patient age outside the model's population, or unreadable"),
                WARN_SMALL: ("QC-SMALL", "Smaller than the model's input: enlarged, score not comparable"),
                WARN_COLOUR: ("QC-COLOUR", "A colour image shown as grey: score not comparable"),
                WARN_TRANSPARENT: ("QC-TRANSPARENT", "Partly transparent, shown over white: score not comparable"),
                WARN_OFF_CENTRE: ("QC-OFF-CENTRE", "Chest off the training films' centre: score not comparable")}


def _evaluations(flag: bool, qc_status: str, qc_reason: str = "") -> list[Any]:
    """The SR's qualitative evaluations of one scored film: the triage flag, said with the quality
    control warning when there is one, the quality control verdict itself (absent when quality
    control did not run: --qc off), and what each warning is about (`_QC_FINDINGS`)."""
    import highdicom as hd

    evaluations = [hd.sr.QualitativeEvaluation(name=_code("TRIAGE", "Triage flag"),
                                               value=_code(*_FLAGS[flag, qc_status in ("warn", "fail")]))]
    if qc_status in _QC_VERDICTS:
        evaluations.append(hd.sr.QualitativeEvaluation(name=_code("QC", "Input quality control"),
                                                       value=_code(*_QC_VERDICTS[qc_status])))
    if qc_status == "warn":
        evaluations += [hd.sr.QualitativeEvaluation(name=_code("QC-FINDING", "Quality control finding"),
                                                    value=_code(*finding))
                        for opening, finding in _QC_FINDINGS.items()
                        if any(part.strip().startswith(opening) for part in qc_reason.split(";"))]
    return evaluations


def _code(value: str, meaning: str) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value, LOCAL_SCHEME, meaning)


def _source_header(path: Path, row: dict[str, Any]) -> Dataset:
    """The source's header, checked to be the file that was scored and to carry the UIDs every
    reference needs (PS3.3 C.17.2: SOP Class, SOP Instance, Series and Study Instance UIDs)."""
    try:
        source = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # an unreadable header: a reason, not a crashed night
        raise ValueError(f"cannot read the header again: {exc}") from None
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        value = str(source.get(keyword, "") or "")
        if not value or not UID(value).is_valid or value[0] not in "012":  # PS3.5 9.1: roots 0, 1, 2 (ISO 9834)
            raise ValueError(f"the file's {keyword} is missing or not a valid UID")
    if str(source.SOPInstanceUID) != row.get("SOPInstanceUID"):
        raise ValueError("the file changed since it was scored: it is scored again by the next run")
    # every text decoded by the source's character set, then said as UTF-8, which the results are written
    # in: highdicom refused legal sets such as "\ISO 2022 IR 87" (an empty first value: the default
    # repertoire with code extensions; a trial: every Japanese film had no results)
    unknown = _unknown_character_sets(source.get("SpecificCharacterSet"))
    if unknown:  # pydicom would read it as its default (Latin-1), and an identifier as another's (a review)
        raise ValueError(f"the header declares a character set DICOM does not define ({unknown}): its text "
                         "cannot be decoded with certainty")
    try:
        source.decode()
    except (LookupError, ValueError) as exc:
        raise ValueError(f"cannot decode the header's text: {exc}") from None
    source.SpecificCharacterSet = "ISO_IR 192"
    _drop_invalid_values(source)
    for keyword in _PATIENT_AND_STUDY:  # Type 2: present, and empty when the source does not know them
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def _unknown_character_sets(declared: Any) -> str:
    """The terms of a Specific Character Set (0008,0005) that pydicom cannot decode by, as printable text
    joined by ", " ("" when it knows every one): a term DICOM defines (PS3.3 C.12.1.1.2), the misspellings
    pydicom corrects ("ISO-IR 100"), or a Python codec's name. pydicom only warns on any other and
    decodes by its default, Latin-1, so that a PatientID in another set reads as different text."""
    from pydicom.charset import python_encoding

    terms = [declared] if isinstance(declared, str) else list(declared or [])
    unknown = []
    for index, term in enumerate(str(term).strip() for term in terms):
        corrected = re.sub(r"^ISO[^_]IR", "ISO_IR", term)
        corrected = re.sub(r"^ISO.2022.IR.", "ISO 2022 IR ", corrected)
        if (index == 0 and not term) or term in python_encoding or corrected in python_encoding:
            continue
        try:
            codecs.lookup(term)
        except LookupError:
            unknown.append(visible_controls(term)[:40])
    return ", ".join(unknown)


def _drop_invalid_values(source: Dataset) -> None:
    """Remove the values that break their VR or VM (PS3.5 6.2; pydicom's validators), such as a
    PatientAge of "62" or a StudyDate of 19401305, so that the results copy only valid ones:
    radscan reads such archives leniently, but writes nothing invalid into the PACS. An invalid
    identifying value (PatientID, PatientName, AccessionNumber) cannot be left out, or the results
    would not join their patient: ValueError, and no results for this image."""
    _drop_invalid_in(source, top=True)


def _drop_invalid_in(dataset: Dataset, top: bool) -> bool:
    """`_drop_invalid_values` over one dataset and the items of its sequences (a trial: a code meaning
    holding a BEL, inside a sequence, reached the PACS). At the top level an invalid value is removed;
    inside a sequence the item that holds it is (a code without its meaning is no code), and a
    sequence that loses all its items goes too. Returns whether `dataset` held no invalid value."""
    valid = True
    for element in list(dataset):
        if element.tag.group < 0x0008:
            continue
        if element.VR == "SQ":
            items = list(element.value or [])
            element.value = [item for item in items if _drop_invalid_in(item, top=False)]
            if items and not element.value:  # an empty sequence as the source had it stays (Type 2)
                del dataset[element.tag]
            continue
        problem = _value_problem(element)
        if problem and top and element.keyword in _IDENTITY:
            raise ValueError(f"the file's {element.keyword} is not valid DICOM ({problem}): results that copy it "
                             "would not validate, and results without it would not join the patient")
        if problem:
            valid = False
            if top:
                del dataset[element.tag]
    return valid


def _value_problem(element: pydicom.DataElement) -> str:
    """Why a data element's value breaks its VR or VM, or ""."""
    values = list(element.value) if isinstance(element.value, pydicom.multival.MultiValue) else [element.value]
    if len(values) > 1 and pydicom.datadict.dictionary_has_tag(element.tag) and \
            pydicom.datadict.dictionary_VM(element.tag) == "1":
        return f"{len(values)} values where one is allowed"
    for value in values:
        text = getattr(value, "original_string", None) or (str(value) if element.VR in ("IS", "DS") else value)
        try:
            pydicom.valuerep.validate_value(element.VR, text, pydicom.config.RAISE)
        except (ValueError, TypeError) as exc:
            return str(exc).split(". ")[0]
        if element.VR == "PN" and any(len(part) > 64 for group in str(value).split("=") for part in group.split("^")):
            return "a name component longer than 64 characters"
        if isinstance(value, str | PersonName) and (bad := _control_characters(element.VR, str(value))):
            return f"{'bytes its character set cannot decode' if bad == chr(0xFFFD) else 'control character'} {bad!r}"
    return ""


# control characters a text value may hold (PS3.5 6.1.3, 6.2) once decoded and written in UTF-8 (no ISO 2022
# code extension, so no ESC): the long text VRs hold line and page breaks and tabs, the others none
_TEXT_CONTROLS = {"LT": "\r\n\f\t", "ST": "\r\n\f\t", "UT": "\r\n\f\t"}


def _control_characters(vr: str, text: str) -> str:
    """The first character that `vr` does not allow in `text` once decoded, or "": a C0 or C1 control
    or DEL, or U+FFFD, which stands for bytes the declared character set could not decode (a trial: a
    PatientID of P\xe9ID01 under UTF-8 reached the PACS as another patient). pydicom has already
    removed a value's trailing NUL padding."""
    allowed = _TEXT_CONTROLS.get(vr, "")
    return next((char for char in text if (char < " " or "\x7f" <= char <= "\x9f" or char == "\ufffd")
                 and char not in allowed), "")


def _frames(source: Dataset, row: dict[str, Any]) -> list[int] | None:
    """The frame that was scored (1-based, PS3.3 C.7.6.6) for a multi-frame source."""
    frames = int(source.get("NumberOfFrames", 1) or 1)
    return [int(row.get("frame_used") or 0) + 1] if frames > 1 else None


def _holds(path: Path, uid: str) -> bool:
    """Whether `path` is a regular file holding the DICOM object `uid`."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        found = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception:  # noqa: BLE001 - a damaged or foreign file is simply not the planned one
        return False
    return str(found.get("SOPInstanceUID", "")) == uid


def sop_instance_uid(path: Path) -> str:
    """The SOP Instance UID of the DICOM file in `path` (its header only), or "" when it has none or
    cannot be read."""
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                   .get("SOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - a damaged file names no object
        return ""


def _our_report(path: Path, study_uid: str) -> Dataset | None:
    """The header of the SR in `path` when it is one of radscan's, of the same study (the only
    kind a new SR may name as replaced, PS3.3 C.17.2.3), else None."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        earlier = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - a damaged file has no successor to name
        return None
    if earlier.get("SOPClassUID") != _COMPREHENSIVE_3D_SR or earlier.get("Manufacturer") != "radscan" or \
            earlier.get("StudyInstanceUID") != study_uid or not earlier.get("SOPInstanceUID"):
        return None
    return earlier


def _predecessor_uid(report: Dataset) -> str:
    """The SOP Instance UID that an SR names in its Predecessor Documents Sequence ("": none)."""
    try:
        return str(report.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
                   .ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    except (AttributeError, IndexError):
        return ""


def _carry_deidentification(result: Dataset, source: Dataset) -> None:
    """PatientIdentityRemoved YES needs the method (Type 1C, PS3.3 C.7.1.1): carried with it from
    the source, or, where the source does not say how, not claimed."""
    if result.get("PatientIdentityRemoved") != "YES":
        return
    methods = [keyword for keyword in ("DeidentificationMethod", "DeidentificationMethodCodeSequence")
               if source.get(keyword)]
    for keyword in methods:
        setattr(result, keyword, source[keyword].value)
    if not methods:
        del result.PatientIdentityRemoved


def _picture(path: Path) -> np.ndarray:
    """The explanation picture (RGB, uint8, height x width x 3) with the banner burned in on top."""
    try:
        with Image.open(path) as image:
            picture = image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read its explanation picture {path.name}: {exc}") from None
    banner_height = 34
    canvas = Image.new("RGB", (picture.width, picture.height + banner_height), (150, 0, 0))
    canvas.paste(picture, (0, banner_height))
    ImageDraw.Draw(canvas).text((8, 7), _BANNER, fill="white", font=ImageFont.load_default(size=18))
    return np.asarray(canvas)
