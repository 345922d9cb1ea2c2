"""What scores the films: the torch model, or its export for ONNX Runtime (`radscan export`).

Both are an `Engine`: (N, 128, 128) uint8 model inputs in, numpy `Scores` out, with the threshold
and the settings the outputs need. `load_engine` picks by the model directory's model.json
("engine": "onnxruntime" for an export) and verifies the files before anything is scored. This
module imports neither torch nor onnxruntime until an engine of that kind is loaded, so that a
scoring run on an exported model never imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radscan.errors import ModelError, SettingError
from radscan.model.config import SimSIDConfig
from radscan.model.metadata import (
    FORMAT,
    METADATA_FILE,
    ONNX_GRAPHS,
    SEAL_KEY,
    check_sealed_extras,
    is_exported,
    read_metadata,
    read_verified,
    sealed_calibration,
    verify_without_loading,
)
from radscan.preprocess import PREPROCESS_VERSION

__all__ = ["Scores", "Engine", "TorchEngine", "OnnxEngine", "load_engine", "import_engine", "check_device",
           "require_torch", "verify_files"]


@dataclass(frozen=True)
class Scores:
    """The results of N films, as numpy arrays (float32).

    scores : (N,) sigmoid of the model's score kind's z, 0..1, high = anomalous
    z : (N,) that z (how many spreads of the calibration normals above their mean)
    raw : (N,) the score kind before calibration
    explanation_maps : (N, 128, 128) >= 0, where the film raises the score (zeros unless asked for)
    residual_maps : (N, 128, 128) smoothed |film - reconstruction| in 0..2 (zeros unless asked for)
    """

    scores: np.ndarray
    z: np.ndarray
    raw: np.ndarray
    explanation_maps: np.ndarray
    residual_maps: np.ndarray


class Engine:
    """A loaded, verified model that scores films. `threshold` is the flag threshold on the 0..1
    score; `config` the model settings of model.json; `field_mask` the (128, 128) thorax field of a
    `--field thorax` model, else None."""

    threshold: float
    config: dict[str, Any]
    field_mask: np.ndarray | None = None

    @property
    def score_kind(self) -> str:
        return str(self.config.get("score_kind", ""))

    @property
    def field(self) -> str:
        return str(self.config.get("field", "film"))

    @property
    def crop(self) -> list[float] | None:
        return self.config.get("crop")

    def score(self, images: np.ndarray, explain: bool = False, components: bool = True) -> Scores:
        """Score (N, 128, 128) uint8 films. `explain`: the explanation maps too; `components`: every
        score kind's raw value and the reconstruction difference (the picture's second panel), not
        only what the score needs. The score is the same either way."""
        raise NotImplementedError


class TorchEngine(Engine):
    """The torch model (radscan.model.simsid), on a device."""

    def __init__(self, model: Any):
        self.model, self.config = model, model.cfg.to_dict()
        self.threshold = float(model.threshold)
        self.field_mask = model.field_mask.cpu().numpy() > 0 if self.field == "thorax" else None

    def score(self, images: np.ndarray, explain: bool = False, components: bool = True) -> Scores:
        from radscan.model.runtime import score_arrays

        result = score_arrays(self.model, images, batch_size=max(1, len(images)), explain=explain,
                              components=components)
        z = self.model.calibrated(result.components)[1] if len(images) else result.scores
        return Scores(result.scores.numpy(), z.numpy(), result.raw_scores.numpy(),
                      result.explanation_maps.numpy(), result.residual_maps.numpy())


class OnnxEngine(Engine):
    """An exported model's graphs (radscan.model.export) in ONNX Runtime, on the CPU. Each call runs
    on chunks of the export's size, the last one padded, as torch does."""

    def __init__(self, directory: Path, metadata: dict[str, Any], threads: int = 0):
        ort = _onnxruntime()
        graphs = _graphs(directory, metadata)  # first: an export whose model.json lost its blocks is refused (65)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's choice (the physical cores)
        self.sessions = {name: ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
                         for name, graph in graphs.items()}
        self.threshold = _check_seal(self.sessions, metadata)
        self.chunk = int(self.sessions["score"].get_inputs()[0].shape[0])  # the graphs' own, whatever model.json says
        self.config = _settings(metadata["config"]) or {}

    @classmethod
    def verify(cls, directory: Path, metadata: dict[str, Any]) -> None:
        """Raise ModelError unless the graphs are the ones model.json names, with its settings sealed."""
        cls(directory, metadata, threads=1)

    def score(self, images: np.ndarray, explain: bool = False, components: bool = True) -> Scores:
        count, empty = len(images), np.zeros((len(images), *images.shape[1:]), np.float32)
        if not count:
            return Scores(*(np.zeros(0, np.float32),) * 3, empty, empty)
        name = "explain" if components else "score"  # the fast graph computes only what the score needs
        padded = np.zeros((-(-count // self.chunk) * self.chunk, *images.shape[1:]), np.uint8)
        padded[:count] = images
        parts = [self.sessions[name].run(None, {"films": padded[start:start + self.chunk]})
                 for start in range(0, len(padded), self.chunk)]
        columns = [np.concatenate(column)[:count] for column in zip(*parts, strict=True)]
        raw, z, maps = columns[:3]
        residual = columns[3] if name == "explain" else empty
        return Scores(_sigmoid(z), z.astype(np.float32), raw.astype(np.float32), maps if explain else empty,
                      residual)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise SettingError("this model was exported for ONNX Runtime, which is not installed: pip install "
                           "'radscan[onnx]' (or score the model it was exported from with torch)") from None
    return onnxruntime


def _graphs(directory: Path, metadata: dict[str, Any]) -> dict[str, bytes]:
    """The graphs' bytes, each checked against the sha256 model.json names."""
    onnx = metadata.get("onnx")
    if not isinstance(onnx, dict) or not isinstance(onnx.get("explain"), dict):
        raise ModelError(f"{METADATA_FILE} of {directory} names no ONNX graphs: it was edited; export the model again")
    return {"score": read_verified(directory, metadata["weights"], ONNX_GRAPHS["score"], "score graph"),
            "explain": read_verified(directory, onnx.get("explain"), ONNX_GRAPHS["explain"], "explain graph")}


def _check_seal(sessions: dict[str, Any], metadata: dict[str, Any]) -> float:
    """The threshold sealed in the graphs, after checking that what they seal is model.json's."""
    if metadata.get("preprocess_version") != PREPROCESS_VERSION:
        raise ModelError(f"model made for preprocessing {metadata.get('preprocess_version')!r}, but this radscan "
                         f"preprocesses with {PREPROCESS_VERSION!r}: export it again with this radscan")
    stated = (FORMAT, PREPROCESS_VERSION, _settings(metadata.get("config")), sealed_calibration(metadata))
    for name, session in sessions.items():
        try:
            sealed = json.loads(session.get_modelmeta().custom_metadata_map.get(SEAL_KEY, "{}"))
        except ValueError:
            sealed = {}
        found = (sealed.get("format"), sealed.get("preprocess_version"), _settings(sealed.get("config")),
                 sealed.get("calibration"))
        if found != stated:
            raise ModelError(f"the model settings in {METADATA_FILE} (its threshold, calibration or preprocessing) "
                             f"differ from the ones its exported file {ONNX_GRAPHS[name]} was made with: "
                             f"{METADATA_FILE} was edited; restore it, or export the model again")
        check_sealed_extras(sealed, metadata)
    return float(metadata["calibration"]["threshold"])


def _settings(values: Any) -> dict[str, Any] | None:
    """Model settings as SimSIDConfig reads them (defaults filled in for keys older models lack), or None."""
    try:
        return SimSIDConfig.from_dict(values).to_dict()
    except (TypeError, ValueError, AttributeError):
        return None


def verify_files(directory: Path, metadata: dict[str, Any]) -> None:
    """Verify a model directory's files without scoring (`radscan scan`): the weights or the graphs
    are the ones model.json names, with its settings sealed in them. Raises ModelError (65)."""
    if is_exported(metadata):
        OnnxEngine.verify(Path(directory), metadata)
    else:
        verify_without_loading(directory, metadata)


def require_torch(purpose: str) -> None:
    """SettingError (exit 2) that says how to install torch when it is not installed: an
    installation with the onnx extra alone scores exported models only."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SettingError(f"{purpose} needs torch, which is not installed here: pip install 'radscan[torch]' "
                           "(this installation scores models exported for ONNX Runtime: radscan export)") from None


def import_engine(metadata: dict[str, Any]) -> None:
    """Import what `load_engine` will need for this model (torch and the model code, or ONNX
    Runtime), so that a caller can do it at a moment of its choosing (radscan.score: before any
    other thread starts)."""
    if is_exported(metadata):
        _onnxruntime()
    else:
        require_torch(f"the model {metadata.get('name', '')} (torch weights)")
        import radscan.model.io
        import radscan.model.runtime  # noqa: F401


def check_device(metadata: dict[str, Any], device: str) -> None:
    """SettingError (exit 2) for a device an exported model cannot run on: ONNX Runtime scores on the CPU."""
    if is_exported(metadata) and device not in ("auto", "cpu"):
        raise SettingError(f"an exported model scores with ONNX Runtime on the CPU: --device {device} needs the "
                           "torch model it was exported from")


def load_engine(directory: Path, device: str = "auto", threads: int = 0) -> tuple[Engine, dict[str, Any]]:
    """The verified engine of a model directory and its model.json: ONNX Runtime for an exported model
    (on the CPU; `device` must be auto or cpu), else torch on `device`. Raises ModelError (65) for
    files that do not verify, SettingError (2) for an engine or device that is not available."""
    metadata = read_metadata(Path(directory))
    check_device(metadata, device)
    if is_exported(metadata):
        return OnnxEngine(Path(directory), metadata, threads), metadata
    require_torch(f"the model at {directory} (torch weights)")
    from radscan.model.io import load_model
    from radscan.model.runtime import resolve_device

    model, metadata = load_model(Path(directory), resolve_device(device))
    return TorchEngine(model), metadata
