"""Refit a trained model directory's QC reference (``qc.safetensors``) with the current rule
(`radscan.qc.fit_reference`: limits from held-out distances) without retraining.

Reads the model's own normals (`training_split.csv`, paths relative to the training folder),
fits the reference on all of them (training and calibration split) as `radscan train` does, and
saves the model to
OUT as a new version (the weights' tensors are unchanged; their sealed header carries the new
reference's sha256, so the old reference is refused with the new weights file and vice versa).

    python benchmarks/refit_qc.py models/kermany-tiny ../shared/data/cxr/kermany_pediatric_224/train_normal \\
        --out /tmp/kermany-qc
"""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from splits import split_paths

from radscan.ingest import load_images
from radscan.model.io import load_model, save_model
from radscan.policy import Policy
from radscan.qc import fit_reference, save_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("train", type=Path, help="the folder the model was trained on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists: choose a new directory")
    model, metadata = load_model(args.model)
    train = [str(path) for path in split_paths(args.model, args.train, None)]  # every film it lists
    images = load_images(train, Policy(), workers=2, progress=False)[0]
    shutil.copytree(args.model, args.out)
    old_limits = metadata["qc"]["limits"]
    metadata = {key: value for key, value in metadata.items()
                if key not in ("format", "radscan_version", "preprocess_version", "config", "parameters", "weights")}
    metadata["qc"] = save_reference(fit_reference(images), args.out)
    now = datetime.now(timezone.utc)
    metadata.update(previous_version=metadata.get("version"), version=now.strftime("%Y.%m.%d-%H%M%S"),
                    created_at=now.isoformat(timespec="seconds"))
    save_model(model, args.out, metadata)
    print(json.dumps({"out": str(args.out), "n_reference": len(images), "old_limits": old_limits,
                      "limits": metadata["qc"]["limits"]}, indent=1))


if __name__ == "__main__":
    main()
