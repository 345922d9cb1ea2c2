"""Where and how the model runs: device choice, mixed precision, batched frozen scoring."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from radscan.errors import SettingError
from radscan.model.simsid import COMPONENTS, ScoreResult, SimSID, to_model_tensor

__all__ = ["resolve_device", "autocast", "score_arrays"]


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; an explicit choice must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SettingError("--device mps was asked for, but Apple MPS is not available")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 mixed precision on CUDA; full precision elsewhere (CPU results stay exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def score_arrays(model: SimSID, images: np.ndarray, batch_size: int = 64,
                 device: torch.device | None = None, explain: bool = False, components: bool = True) -> ScoreResult:
    """Score (N, 128, 128) uint8 model inputs in batches; results concatenated on the CPU.
    `explain` computes the explanation maps too (a backward pass; zeros otherwise);
    `components=False` only what the configured score needs (see SimSID.score)."""
    device = device or next(model.parameters()).device
    parts = []
    for batch in iter_batches(images, batch_size):
        batch = torch.from_numpy(batch)
        if device.type == "cuda":
            batch = batch.pin_memory()  # lets the copy to the GPU run without blocking
        with autocast(device):
            result = model.score(to_model_tensor(batch, device), explain=explain, components=components)
        parts.append(ScoreResult(*(t.float().cpu() for t in result)))
    if not parts:
        empty, maps = torch.zeros(0), torch.zeros(0, *images.shape[1:])
        return ScoreResult(empty, empty, maps, maps, torch.zeros(0, len(COMPONENTS)))
    return ScoreResult(*(torch.cat(column) for column in zip(*parts, strict=True)))
