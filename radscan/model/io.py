"""Model directories: safetensors weights + JSON metadata, verified on every load.

A model directory holds ``model.safetensors`` (weights and calibration buffers: a format that
loads without executing code) and ``model.json`` (architecture, preprocessing version,
calibration, training summary, metrics, radscan version, sha256 of the weights). Loading refuses,
with a one-line reason and exit code 65, anything that does not check out: a missing or altered
weights file, a pickle, another preprocessing version, keys that do not match the architecture.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from radscan import __version__
from radscan.errors import ModelError, SettingError
from radscan.model.config import SimSIDConfig
from radscan.model.metadata import (
    FORMAT,
    METADATA_FILE,
    SEAL_KEY,
    WEIGHTS_FILE,
    check_sealed_extras,
    is_exported,
    read_metadata,
    read_verified,
    seal,
    sealed_settings,
    sha256_file,
)
from radscan.model.simsid import COMPONENTS, SimSID
from radscan.preprocess import PREPROCESS_VERSION
from radscan.report import remove_stale_temporaries, write_bytes

__all__ = ["FORMAT", "WEIGHTS_FILE", "METADATA_FILE", "save_model", "load_model", "read_metadata", "sha256_file"]

_PICKLE_SIGNATURES = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; torch.save's zip archive


def save_model(model: SimSID, directory: Path, metadata: dict[str, Any]) -> Path:
    """Write weights then metadata, each atomically and fsynced (radscan.report.write_bytes); returns
    the metadata path. Raises OutputError (exit 73) when either cannot be written (a full disk)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, METADATA_FILE):  # a killed save's (the weights: 20 MB); callers hold the lock
        remove_stale_temporaries(directory, name)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    # what changes scores besides the tensors (format, preprocessing, settings) is sealed inside the
    # hashed weights file too, so an edit of model.json alone is refused by load_model. One metadata
    # key: safetensors writes several in a random order, and the same seed must give the same bytes.
    data = safetensors.torch.save(state, metadata={SEAL_KEY: seal(model.cfg.to_dict(), metadata)})
    write_bytes(weights, data)
    calibration = metadata.setdefault("calibration", {})
    calibration.update(_calibration_copy(model))
    full = {
        "format": FORMAT,
        "radscan_version": __version__,
        "preprocess_version": PREPROCESS_VERSION,
        "config": model.cfg.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        **metadata,
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
    }
    write_bytes(directory / METADATA_FILE, (json.dumps(full, indent=2, sort_keys=False) + "\n").encode())
    return directory / METADATA_FILE


def _looks_like_safetensors(data: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header."""
    return len(data) >= 9 and int.from_bytes(data[:8], "little") < len(data) and data[8:9] == b"{"


def load_model(directory: Path, device: torch.device | str = "cpu") -> tuple[SimSID, dict[str, Any]]:
    """Load and verify a model directory; the model is returned in eval mode on `device`.

    The weights file is read once: the bytes that are hashed are the bytes that are loaded.
    Raises ModelError (exit 65) with a one-line reason for anything that does not check out."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    if is_exported(metadata):
        source = metadata.get("exported_from") or {}
        # a valid model given to the wrong command: a usage error (2), not a damaged model (65)
        raise SettingError(f"{directory} is a model exported for ONNX Runtime (radscan export): it scores, but "
                         "training, calibration and export need the torch model it was exported from (version "
                         f"{source.get('version')}, weights sha256 {str(source.get('sha256'))[:12]}...)")
    if metadata.get("preprocess_version") != PREPROCESS_VERSION:
        raise ModelError(
            f"model made for preprocessing {metadata.get('preprocess_version')!r}, but this radscan "
            f"preprocesses with {PREPROCESS_VERSION!r}: retrain it, or use the radscan version that made it "
            f"({metadata.get('radscan_version')})"
        )
    weights = directory / WEIGHTS_FILE
    data = read_verified(directory, metadata.get("weights", {}), WEIGHTS_FILE, "weights")
    if not _looks_like_safetensors(data):
        kind = ("a pickle (torch.save) file: radscan never unpickles model files"
                if data.startswith(_PICKLE_SIGNATURES) else "not safetensors")
        raise ModelError(f"{weights} is {kind}")
    try:
        config = SimSIDConfig.from_dict(metadata["config"])
        state = safetensors.torch.load(data)
        sealed = sealed_settings(data)
    except (KeyError, TypeError, ValueError, AttributeError, SafetensorError, OSError) as exc:
        raise ModelError(f"cannot load {directory}: {exc}") from None
    if (sealed.get("format"), sealed.get("preprocess_version")) != (FORMAT, PREPROCESS_VERSION) \
            or _config_or_none(sealed.get("config")) != config:
        raise ModelError(f"the model settings in {METADATA_FILE} differ from those sealed in the weights file: "
                         "the metadata was edited; retrain or restore it")
    check_sealed_extras(sealed, metadata)
    model = SimSID(config)
    _pad_older_calibration(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"weights do not fit the architecture in {METADATA_FILE}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    _check_calibration(model, metadata)
    # channels-last convolutions: 30% faster scoring on the CPU (oneDNN), same results to 1e-6
    return model.to(device, memory_format=torch.channels_last).eval(), metadata


def _pad_older_calibration(state: dict[str, torch.Tensor]) -> None:
    """Models saved before the density score kind calibrate three kinds; the fourth column (density,
    which such a model cannot compute) gets mean 0 and spread 1, as calibrate() gives a kind without
    values. Anything else of the wrong shape is left for load_state_dict to refuse."""
    kinds = len(COMPONENTS)
    for key, fill in (("calibration_mean", 0.0), ("calibration_std", 1.0)):
        value = state.get(key)
        if value is not None and value.ndim == 1 and value.shape[0] == kinds - 1:
            state[key] = torch.cat([value, value.new_full((1,), fill)])


def _config_or_none(values: Any) -> SimSIDConfig | None:
    try:
        return SimSIDConfig.from_dict(values)
    except (TypeError, ValueError, AttributeError):
        return None


def _calibration_copy(model: SimSID) -> dict[str, Any]:
    """The calibration values that model.json repeats for people (the mean normal film is not)."""
    return {"threshold": float(model.threshold), "mean": model.calibration_mean.tolist(),
            "std": model.calibration_std.tolist(), "critic_mean": model.critic_mean.tolist(),
            "critic_std": model.critic_std.tolist()}


def _check_calibration(model: SimSID, metadata: dict[str, Any]) -> None:
    """The calibration lives in the (hashed) weights; the JSON copy is for people. They must agree."""
    stated = metadata.get("calibration", {})
    for key, value in _calibration_copy(model).items():
        expected = stated.get(key)
        if key in ("mean", "std") and isinstance(expected, list) and len(expected) == len(COMPONENTS) - 1:
            value = value[:-1]  # a model saved before the density kind: its JSON lists three kinds
        same = expected is not None and torch.allclose(torch.tensor(value, dtype=torch.float64),
                                                       torch.tensor(expected, dtype=torch.float64),
                                                       rtol=1e-6, atol=1e-7)
        if not same:
            raise ModelError(f"calibration {key} in {METADATA_FILE} ({expected}) differs from the weights "
                             f"({value}): the metadata was edited; recalibrate instead")
