"""Where the benchmarks find a model's films, without torch: the shared data's Kermany folder and
the films of one split of a model's `training_split.csv` (read by radscan.model.metadata.read_split,
the reader `radscan calibrate` uses)."""

from __future__ import annotations

from pathlib import Path

from radscan.model.metadata import read_split

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr" / "kermany_pediatric_224"


def split_paths(model_dir: Path, train: Path, split: str | None) -> list[Path]:
    """The files under `train` of one split of the model's training_split.csv ("train" or "calibration";
    None: every film it lists). Exits with a message when the model has no readable split file."""
    rows = read_split(model_dir)
    if rows is None:
        raise SystemExit(f"{model_dir} has no readable training_split.csv: which films it trained on is unknown")
    return [train / row["path"] for row in rows if split is None or row["split"] == split]
