"""The metadata half of a model directory (``model.json``), readable without importing torch:
a scoring run needs the model's identity before the weights are loaded (see radscan.score)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from radscan.errors import ModelError

__all__ = ["FORMAT", "WEIGHTS_FILE", "METADATA_FILE", "read_metadata", "sha256_file"]

FORMAT = "radscan-model/2"  # 2: critic score kinds, snapshot critics, explanation maps
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(directory: Path) -> dict[str, Any]:
    """``model.json`` of a model directory, checked for format only (load_model checks the rest)."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not directory.is_dir():
        raise ModelError(f"model directory not found: {directory}")
    if not path.is_file():
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
    return metadata
