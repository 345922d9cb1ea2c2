"""The metadata half of a model directory (``model.json``), readable without importing torch:
a scoring run needs the model's identity before the weights are loaded (see radscan.score)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from radscan.errors import ModelError
from radscan.preprocess import PREPROCESS_VERSION

__all__ = ["FORMAT", "WEIGHTS_FILE", "METADATA_FILE", "SPLIT_FILE", "SEAL_KEY", "ONNX_ENGINE", "ONNX_GRAPHS",
           "is_exported", "read_metadata", "sha256_file", "read_verified",
           "sealed_extras", "header_metadata", "sealed_settings", "read_sealed", "check_sealed_extras",
           "verify_without_loading",
           "films_it_knows", "read_split", "EARLIER_CALIBRATION",
           "ModelIdentity", "new_version", "recalibrated", "exported", "seal", "sealed_calibration"]

FORMAT = "radscan-model/2"  # 2: critic score kinds, snapshot critics, explanation maps
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
CHECKPOINT_FILE = "checkpoint.pt"  # radscan train's checkpoint, removed once the model is written
SPLIT_FILE = "training_split.csv"  # which normals were trained on and which calibrate
SEAL_KEY = "radscan"  # where the settings are sealed: the safetensors header, an ONNX graph's metadata
# an exported model (radscan.model.export): model.json's "engine", and its graphs' files
ONNX_ENGINE = "onnxruntime"
ONNX_GRAPHS = {"score": "score.onnx", "explain": "explain.onnx"}


def is_exported(metadata: dict[str, Any]) -> bool:
    """Whether a model directory scores with ONNX Runtime (radscan export) rather than torch."""
    return metadata.get("engine") == ONNX_ENGINE


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_verified(directory: Path, block: Any, name: str, what: str) -> bytes:
    """The bytes of the model directory's file `name` (the weights, the QC reference), checked
    against the block of model.json that names it ({"file": name, "sha256": ...}): the bytes
    returned are the bytes that were hashed, so nothing can change between check and use. Raises
    ModelError (exit 65) when the block names another file, the file is missing or unreadable, or its
    sha256 differs."""
    path = Path(directory) / name
    if not isinstance(block, dict) or block.get("file", name) != name:
        raise ModelError(f"{METADATA_FILE} names another {what} file than {name}: it was edited")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{what} missing: {path} ({METADATA_FILE} names it); restore it from the model's "
                         "release (or train, or export, the model again)") from None
    except OSError as exc:  # there, but not readable by this account (a model trained by another user)
        raise ModelError(f"{what} cannot be read: {path}: {exc.strerror or exc} (check its owner and "
                         "permissions)") from None
    if hashlib.sha256(data).hexdigest() != block.get("sha256"):
        raise ModelError(f"{path} does not match the sha256 in {METADATA_FILE}: the file was altered or "
                         "corrupted; restore it from the model's release (or train, or export, the model again)")
    return data


# How model.json changes, in one place: train writes a new one (radscan.train, completed by
# radscan.model.io.save_model with the format, settings, weights and calibration), `radscan calibrate`
# makes a new version of it (`recalibrated`), `radscan export` an exported copy (`exported`).

def new_version() -> str:
    """A model version: the UTC time it was made, e.g. 2026.12.04-121500."""
    return datetime.now(timezone.utc).strftime("%Y.%m.%d-%H%M%S")


def recalibrated(before: dict[str, Any], normals: list[str], n_calibration: int, target_specificity: float,
                 calibration_specificity: float) -> dict[str, Any]:
    """The model.json of `before` recalibrated on `n_calibration` site normals (save_model adds the
    format, settings, weights and the calibration values). A new version that names the one it came
    from; figures taken at the old threshold are dropped (AUCs do not depend on it)."""
    kept = {key: value for key, value in before.items()
            if key not in ("format", "radscan_version", "preprocess_version", "config", "parameters", "weights",
                           "previous_version")}  # recalibrated_from names the one predecessor
    return {**kept, "version": new_version(),
            "recalibrated_from": {"version": before.get("version"), "sha256": before["weights"]["sha256"]},
            "calibration": {"method": f"{n_calibration} normals at specificity {target_specificity}",
                            "n_calibration": n_calibration, "target_specificity": target_specificity,
                            "normals": list(normals),
                            "recalibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            "metrics": {**{k: v for k, v in before.get("metrics", {}).items() if "auc" in k},
                        "calibration_specificity": calibration_specificity}}


def exported(before: dict[str, Any], graphs: dict[str, dict[str, Any]], opset: int, chunk: int,
             torch_version: str) -> dict[str, Any]:
    """The model.json of `before` exported for ONNX Runtime: `graphs` maps "score" and "explain" to
    {"sha256", "bytes"}; the score graph stands where the weights did (what every output names as
    the model's sha256), and `exported_from` names the weights it came from."""
    return {**{key: value for key, value in before.items() if key != "weights"}, "engine": ONNX_ENGINE,
            "weights": {"file": ONNX_GRAPHS["score"], **graphs["score"]},
            "onnx": {"opset": opset, "chunk": chunk, "explain": {"file": ONNX_GRAPHS["explain"], **graphs["explain"]}},
            "exported_from": {"version": before.get("version"), "sha256": before["weights"]["sha256"],
                              "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch_version}}


# the calibration's values, held in the weights' tensors (checked by radscan.model.io) and as constants
# in an export's graphs (sealed there: sealed_calibration)
CALIBRATION_VALUES = ("threshold", "mean", "std", "critic_mean", "critic_std")
# what model.json tells people about how the model was made, calibrated and judged (radscan info, the card,
# the drift check's aimed share): sealed as one digest (described_sha256), so that an edit is refused (a
# trial raised a model's target specificity to 0.99, which moved the drift check, and its validation AUC to
# 0.999, and both were shown without a word). The name and version are labels a site may change.
DESCRIBED = ("calibration", "metrics", "training")
# what varies from run to run of the same command (a duration, a date) is a label too: left out of the digest,
# so that the same seed and data still give the same weights' bytes
UNSEALED = {"training": ("minutes",), "calibration": ("recalibrated_at",)}


def sealed_calibration(metadata: dict[str, Any]) -> dict[str, Any]:
    """The calibration values model.json shows people, which an export holds as constants in its graphs:
    sealed in them, so that an edit is refused as the torch model refuses it (radscan.model.io)."""
    calibration = metadata["calibration"]
    return {key: calibration.get(key) for key in CALIBRATION_VALUES}


def described_sha256(metadata: dict[str, Any]) -> str:
    """The sha256 of model.json's DESCRIBED blocks (the calibration's values left out: the weights hold
    them; and the UNSEALED labels), as JSON with sorted keys: the same text gives the same digest after
    any number of reads."""
    told = {key: metadata.get(key) for key in DESCRIBED}
    left_out = {**UNSEALED, "calibration": (*UNSEALED["calibration"], *CALIBRATION_VALUES)}
    for key, names in left_out.items():
        if isinstance(told[key], dict):
            told[key] = {k: v for k, v in told[key].items() if k not in names}
    as_read = json.loads(json.dumps(told))  # as model.json gives it back (an int key comes back a string)
    return hashlib.sha256(json.dumps(as_read, sort_keys=True).encode()).hexdigest()


def seal(config: dict[str, Any], metadata: dict[str, Any], **more: Any) -> str:
    """The JSON sealed in a weights file or an exported graph: what changes a result besides the
    tensors (format, preprocessing, model settings, sealed_extras, and `more`). Sorted keys: the
    same model gives the same bytes."""
    return json.dumps({"format": FORMAT, "preprocess_version": PREPROCESS_VERSION, "config": config,
                       **sealed_extras(metadata), **more}, sort_keys=True)


def sealed_extras(metadata: dict[str, Any]) -> dict[str, Any]:
    """Besides the settings, what else changes a result and is sealed in the weights file: the QC
    reference (its sha256: removing the "qc" block from model.json must not switch quality control
    off), the training population (the age warnings), the digest of what model.json says of the
    model's training, calibration and metrics (described_sha256) and the reference film of a box that
    follows the chest (radscan.model.field.FOLLOW_FILE)."""
    extras = {"qc_sha256": (metadata.get("qc") or {}).get("sha256"), "population": metadata.get("population"),
              "described_sha256": described_sha256(metadata)}
    if metadata.get("follow") is not None:  # only where there is one: the models made before it keep their seal
        extras["follow_sha256"] = (metadata.get("follow") or {}).get("sha256")
    return extras


def header_metadata(header: bytes) -> dict[str, Any]:
    """The "__metadata__" table of a safetensors file's header (pass at least its first 8 + n bytes,
    or the whole file), or {} when there is none or the header is not one."""
    try:
        metadata = json.loads(header[8:8 + int.from_bytes(header[:8], "little")]).get("__metadata__", {})
    except (ValueError, AttributeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def sealed_settings(header: bytes, key: str = SEAL_KEY) -> dict[str, Any]:
    """The settings sealed under `key` in a safetensors file's header (pass at least its first
    8 + n bytes, or the whole file), or {}."""
    try:
        sealed = json.loads(header_metadata(header).get(key, "{}"))
    except ValueError:
        return {}
    return sealed if isinstance(sealed, dict) else {}


def read_sealed(directory: Path) -> dict[str, Any]:
    """The sealed settings of a model directory's weights file, reading only its header (for
    commands that do not load the weights, such as `scan`)."""
    try:
        with open(Path(directory) / WEIGHTS_FILE, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            return sealed_settings(size.to_bytes(8, "little") + handle.read(min(size, 1 << 24)))
    except OSError as exc:
        raise ModelError(f"cannot read {Path(directory) / WEIGHTS_FILE}: {exc.strerror or exc}") from None


def check_sealed_extras(sealed: dict[str, Any], metadata: dict[str, Any]) -> None:
    """ModelError (exit 65) when model.json's QC reference, population, account of training,
    calibration and metrics (described_sha256) or reference film of a box that follows the chest
    differs from the sealed one (or is missing where one is sealed)."""
    stated = sealed_extras(metadata)
    names = {"qc_sha256": "QC reference", "population": "training population",
             "follow_sha256": "reference film of the box that follows the chest",
             "described_sha256": "account of its training, calibration and metrics"}
    for key, what in names.items():
        if key in sealed and sealed[key] != stated.get(key):  # weights sealed before radscan 0.3 carry none
            raise ModelError(f"the {what} in {METADATA_FILE} differs from the one sealed in the model's weights (or "
                             "graphs): the metadata was edited; restore it")


def read_metadata(directory: Path) -> dict[str, Any]:
    """``model.json`` of a model directory, checked for format only (load_model checks the rest)."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not directory.is_dir():
        raise ModelError(f"model directory not found: {directory}")
    if not path.is_file():
        if (directory / CHECKPOINT_FILE).is_file():  # a training run not finished yet
            raise ModelError(f"{directory} is an unfinished training run (a checkpoint, no {METADATA_FILE} yet): "
                             "finish it with radscan train ... --resume, or wait for the run that is training it")
        raise ModelError(f"{directory} is not a radscan model: {METADATA_FILE} is missing")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        older = str(found).startswith("radscan-model/")
        hint = " (made by another radscan version: retrain it with this one)" if older else ""
        raise ModelError(f"{path} is not a {FORMAT} file{hint}")
    _check_shape(metadata, path)
    return metadata


@dataclass(frozen=True)
class ModelIdentity:
    """What every output says about the model that made it, read once from a model.json that
    `read_metadata` checked (small and picklable: Dask sends it with each batch).

    threshold : the calibrated flag threshold on the 0..1 score (model.json calibration.threshold).
    target_specificity : the share of calibration normals the threshold keeps unflagged, or None.
    """

    name: str
    version: str
    sha256: str  # of the weights file
    score_kind: str
    threshold: float
    target_specificity: float | None
    calibrated_by: str  # how the threshold was chosen, in words

    @classmethod
    def of(cls, metadata: dict[str, Any]) -> ModelIdentity:
        calibration = metadata["calibration"]
        return cls(name=str(metadata.get("name", "")), version=str(metadata.get("version", "")),
                   sha256=metadata["weights"]["sha256"], score_kind=str(metadata["config"].get("score_kind", "")),
                   threshold=float(calibration["threshold"]), target_specificity=calibration.get("target_specificity"),
                   calibrated_by=str(calibration.get("method", "")))

    def provenance(self) -> dict[str, str]:
        """The model's columns of every worklist row."""
        return {"model_name": self.name, "model_version": self.version, "model_sha256": self.sha256}


# What every reader of model.json relies on, with the type it must have: a file edited by hand
# must fail here with one line (exit 65), not later with a KeyError or a TypeError.
_REQUIRED: dict[str, tuple[type, ...]] = {
    "config": (dict,), "weights": (dict,), "weights.sha256": (str,), "weights.file": (str,),
    "calibration": (dict,), "calibration.threshold": (int, float), "preprocess_version": (str,),
}
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "name": (str,), "version": (str,), "qc": (dict,), "follow": (dict,), "population": (dict,),
    "population.age_years": (list,), "metrics": (dict,), "training": (dict,),
}


def _check_shape(metadata: dict[str, Any], path: Path) -> None:
    """ModelError for a missing required key or a value of the wrong type (model.json edited)."""
    for table, required in ((_REQUIRED, True), (_OPTIONAL, False)):
        for dotted, types in table.items():
            value: Any = metadata
            for part in dotted.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                if required:
                    raise ModelError(f"{path} has no {dotted!r}: the file is damaged or was edited; restore it")
                continue
            if not isinstance(value, types) or isinstance(value, bool):
                raise ModelError(f"{path}: {dotted!r} must be {' or '.join(t.__name__ for t in types)}, not "
                                 f"{type(value).__name__}: the file was edited; restore it")
    ages = (metadata.get("population") or {}).get("age_years")
    if ages is not None and (len(ages) != 2 or not all(isinstance(a, (int, float)) for a in ages) or ages[0] > ages[1]):
        raise ModelError(f"{path}: population.age_years must be [min, max] in years")


def verify_without_loading(directory: Path, metadata: dict[str, Any]) -> None:
    """What load_model verifies of the files, without torch and without loading the weights, for
    commands that use a model's settings but not its network (`radscan scan`): the weights file's
    sha256 is the one model.json names, and the settings sealed in it are model.json's. Raises
    ModelError (exit 65) otherwise. An exported model's graphs: radscan.model.engine.verify_files."""
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"weights file missing: {weights}")
    if sha256_file(weights) != metadata["weights"]["sha256"]:
        raise ModelError(f"{weights} does not match the sha256 in {METADATA_FILE}: the file was altered or corrupted; "
                         "restore it or retrain")
    sealed = read_sealed(directory)
    if (sealed.get("format"), sealed.get("preprocess_version"), sealed.get("config")) != \
            (metadata.get("format"), metadata.get("preprocess_version"), metadata.get("config")):
        raise ModelError(f"the model settings in {METADATA_FILE} differ from those sealed in the weights file: "
                         "the metadata was edited; retrain or restore it")
    check_sealed_extras(sealed, metadata)


def read_split(model_dir: Path) -> list[dict[str, str]] | None:
    """The rows (path, study_key, split) of a model's SPLIT_FILE, or None when it is missing or not
    radscan's (unreadable, not UTF-8, malformed, without a path or split column)."""
    try:
        with open(Path(model_dir) / SPLIT_FILE, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, strict=True))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    return rows if all(isinstance(row.get("path"), str) and isinstance(row.get("split"), str) for row in rows) \
        else None


# the split of a recalibrated model's former calibration normals (radscan.calibration): neither trained
# on nor setting its threshold any more
EARLIER_CALIBRATION = "earlier calibration"


def films_it_knows(model_dir: Path, paths: Iterable[str]) -> Counter[str] | None:
    """How many of `paths` are films the model was made with, by split ("train", "calibration",
    EARLIER_CALIBRATION), as its SPLIT_FILE names them (a path relative to the folder it was given,
    matched against the end of each path, so that another copy of that folder is found too; a link is
    matched by its own name and by its target's). Names, not contents: a renamed copy is not found.
    Counts only (a name may carry a patient's). None when the model has no readable SPLIT_FILE, or one
    that does not list as many training and calibration films as model.json counts (a model from
    elsewhere, a file removed, emptied, cut or edited): then nobody can tell."""
    rows = read_split(model_dir)
    try:
        metadata = read_metadata(Path(model_dir))
        stated = {"train": metadata["training"]["n_train"], "calibration": metadata["calibration"]["n_calibration"]}
    except (KeyError, TypeError, ModelError):
        return None
    listed = Counter(row["split"] for row in rows or [])
    if rows is None or any(listed[split] != count for split, count in stated.items()):
        return None  # emptied, cut or relabelled: a list that says "none of these" would be false comfort
    splits = {row["path"]: row["split"] for row in rows}
    depth = max((path.count("/") + 1 for path in splits), default=0)

    def split_of(path: str) -> str | None:
        parts = Path(path).as_posix().split("/")
        return next((splits[tail] for k in range(1, depth + 1) if (tail := "/".join(parts[-k:])) in splits), None)

    found: Counter[str] = Counter()
    for path in paths:
        split = split_of(path)
        if split is None and Path(path).is_symlink():
            split = split_of(os.path.realpath(path))
        if split is not None:
            found[split] += 1
    return found
