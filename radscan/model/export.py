"""`radscan export`: a model directory that scores with ONNX Runtime instead of torch.

A density-score model (the default) needs no gradient to score or to explain: its score and its
map are the region distances of one discriminator pass, so both can be written as ONNX graphs
(opset 18, the TorchScript exporter). Two graphs, as torch runs two paths
(SimSID._score_chunk): `score.onnx` computes only what the score needs (the raw density, its
calibrated z, the region map), `explain.onnx` that and the reconstruction difference a picture
shows beside the map. Both take a chunk of CHUNK films, (CHUNK,
128, 128) uint8, as torch scores them in chunks of that size (radscan.model.runtime pads the last
one): so a film's result does not depend on what else is in its batch.

The graphs carry the settings that change a result (format, preprocessing version, model
settings, threshold, QC reference and population) sealed in their metadata, and model.json
names their sha256: radscan.model.engine refuses a graph that was altered or a model.json that
was edited, as load_model does for the weights. Kinds whose map is a gradient (critic, seed,
residual) and the `thorax` field (whose picture needs the field's mask) are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from radscan.errors import ModelError, OutputError, SettingError
from radscan.model.field import load_follow
from radscan.model.io import load_model
from radscan.model.metadata import (
    METADATA_FILE,
    ONNX_ENGINE,
    ONNX_GRAPHS,
    SEAL_KEY,
    WEIGHTS_FILE,
    exported,
    seal,
    sealed_calibration,
)
from radscan.model.simsid import COMPONENTS, SimSID
from radscan.report import head_card, sync_files, write_bytes

__all__ = ["export_model", "CHUNK", "OPSET"]

CHUNK = 16  # films per graph call: the CPU chunk of SimSID.score, so that results match torch's
OPSET = 18


def _model_input(model: SimSID, films: torch.Tensor) -> torch.Tensor:
    """(B, 128, 128) uint8 -> (B, 1, 128, 128) in [-1, 1] in the model's field (to_model_tensor, restrict)."""
    return model.restrict((films.float() / 127.5 - 1.0).unsqueeze(1))


def _density(model: SimSID, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw density score (B,), its calibrated z (B,) and its region map (B, 128, 128)."""
    regions = model.density_regions(images)
    raw = model.density_score(regions)
    column = COMPONENTS.index("density")
    return raw, (raw - model.calibration_mean[column]) / model.calibration_std[column], model.density_map(regions)


class _ScoreGraph(torch.nn.Module):
    """uint8 films (CHUNK, 128, 128) -> raw density (CHUNK,), its z (CHUNK,), region map (CHUNK, 128, 128)."""

    def __init__(self, model: SimSID):
        super().__init__()
        self.model = model

    def forward(self, films: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _density(self.model, _model_input(self.model, films))


class _ExplainGraph(torch.nn.Module):
    """uint8 films -> what a picture adds to the score: the raw density (CHUNK,), its z, its region map,
    and the smoothed reconstruction difference (CHUNK, 128, 128) of the student generator (the
    picture's second panel). The other kinds' raw values (torch's `components`) are not exported:
    nothing an exported model writes uses them, and their critics would double the graph."""

    def __init__(self, model: SimSID):
        super().__init__()
        self.model = model

    def forward(self, films: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = _model_input(self.model, films)
        raw, z, regions_map = _density(self.model, images)
        student = self.model.generate(images, with_teacher=False).student
        residual = (images - student).abs().squeeze(1)
        return raw, z, regions_map, self.model.smooth(residual, self.model.blur_band)


_OUTPUTS = {"score": ["raw", "z", "map"], "explain": ["raw", "z", "map", "residual"]}


def export_model(model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write `model_dir`'s model as ONNX graphs into `out_dir` (a new or empty folder), with its QC
    reference, model card and reports, and a model.json that names the graphs and their sha256.
    Returns the export's summary (the folder, the engine, the graphs' paths and their bytes).

    Raises ModelError (65) for a model that does not verify, SettingError (2) for a score kind or
    field the graphs cannot compute, or an `out_dir` that holds something, OutputError (73) when
    it cannot be written."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, metadata = load_model(model_dir)
    load_follow(model_dir, metadata)  # copied below: an export that could never score is not made
    config = model.cfg
    if config.score_kind != "density" or model.density is None:
        raise SettingError(f"radscan export writes models whose score is the feature density (the default); "
                           f"{model_dir} scores with {config.score_kind!r}, whose map needs a gradient: score it "
                           "with torch")
    if config.field == "thorax":
        raise SettingError(f"{model_dir} sees the thorax field of its mean film (--field thorax): export supports "
                           "the whole film and the thorax box")
    if out_dir.resolve() == model_dir.resolve() or model_dir.resolve() in out_dir.resolve().parents:
        raise SettingError(f"{out_dir} is inside the model {model_dir}: export it beside the model, not into it")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SettingError(f"{out_dir} is not an empty folder: radscan export never overwrites a model; choose "
                           "another --out")
    sealed = seal(config.to_dict(), metadata, calibration=sealed_calibration(metadata))
    made = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        graphs = {name: _write_graph(graph(model).eval(), out_dir / ONNX_GRAPHS[name], sealed)
                  for name, graph in (("score", _ScoreGraph), ("explain", _ExplainGraph))}
        for name in sorted(os.listdir(model_dir)):  # the QC reference, the card, the reports, the split
            source = model_dir / name
            if name not in (WEIGHTS_FILE, METADATA_FILE) and source.is_file() and not name.startswith("."):
                shutil.copy2(source, out_dir / name)
        sync_files(out_dir)  # the copies (a copy does not sync), before the model.json that lists them
        written = exported(metadata, graphs, OPSET, CHUNK, torch.__version__)
        write_bytes(out_dir / METADATA_FILE, (json.dumps(written, indent=2) + "\n").encode())
        _head_the_card(out_dir, written)
    except BaseException as exc:  # a full disk, a failed trace, Ctrl-C: a rerun finds the folder as it was
        _remove_partial_export(out_dir, made)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write the exported model to {out_dir}: {exc.strerror or exc}") from None
        raise
    return {"model": str(out_dir), "engine": ONNX_ENGINE, "graphs": {k: str(out_dir / ONNX_GRAPHS[k]) for k in graphs},
            "bytes": sum(g["bytes"] for g in graphs.values())}


def _remove_partial_export(out_dir: Path, made: bool) -> None:
    """Remove what a failed export wrote in `out_dir`: all of it, since export only writes into a new or
    empty folder (a half-made one was refused by the rerun as "not an empty folder"); the folder too
    if the export made it."""
    with contextlib.suppress(OSError):
        for path in out_dir.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if made:
            out_dir.rmdir()


def _head_the_card(out_dir: Path, written: dict[str, Any]) -> None:
    """The copied model card (README.md), headed by what the export changed: its files and sha256."""
    source = written["exported_from"]
    head_card(out_dir / "README.md",
              f"> **Exported for ONNX Runtime** ({source['at'][:10]}, `radscan export`): this folder scores with "
              f"`{ONNX_GRAPHS['score']}` (sha256 `{written['weights']['sha256']}`) and `{ONNX_GRAPHS['explain']}` "
              f"(sha256 `{written['onnx']['explain']['sha256']}`), exported from the weights `{WEIGHTS_FILE}` "
              f"(sha256 `{source['sha256']}`, version {source['version']}) that the card below describes; the "
              "scores are the same (within 1e-6). Training and `radscan calibrate` need that torch model.")


def _write_graph(graph: torch.nn.Module, path: Path, sealed: str) -> dict[str, Any]:
    """Export `graph` on a chunk of films, seal the settings into its metadata, write it atomically."""
    import onnx

    films = torch.randint(0, 256, (CHUNK, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tmp = path.with_name(f".{path.name}.export")
    names = _OUTPUTS["score" if isinstance(graph, _ScoreGraph) else "explain"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes taken as constants: the chunk is fixed
        torch.onnx.export(graph, (films,), str(tmp), input_names=["films"], output_names=names,
                          opset_version=OPSET, dynamo=False)
    proto = onnx.load(str(tmp))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = SEAL_KEY, sealed
    tmp.unlink()
    data = proto.SerializeToString()
    if not data:
        raise ModelError(f"the exported graph {path} is empty")
    write_bytes(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
