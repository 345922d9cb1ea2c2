"""A trained model scored with another number of critic views, recalibrated on its own
calibration normals: validation only (the model's held-out calibration normals against the 400
validation pneumonias), so that the views can be chosen without the test split.

One view (shift 0) costs a quarter of four (the shipped models' 0.05): the critics are most of
what scoring a film without a picture costs (benchmarks/README.md).

    python benchmarks/views.py MODEL_DIR OUT_DIR [--view-shift 0]
    python benchmarks/shift.py OUT_DIR          # its robustness to acquisition changes
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from shift import calibration_normals, reading  # noqa: E402
from splits import DATA  # noqa: E402

from radscan.calibration import calibrate  # noqa: E402
from radscan.ingest import load_images  # noqa: E402
from radscan.model.io import load_model, save_model  # noqa: E402
from radscan.model.runtime import score_arrays  # noqa: E402
from radscan.model.simsid import SimSID  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--view-shift", type=float, default=0.0)
    args = parser.parse_args()
    model, metadata = load_model(args.model)
    viewed = SimSID(replace(model.cfg, critic_view_shift=args.view_shift))
    viewed.load_state_dict(model.state_dict())
    viewed.eval()
    normals = calibration_normals(args.model, DATA / "train_normal")
    target = float(metadata["calibration"].get("target_specificity", 0.95))
    calibrate(viewed, normals, 64, torch.device("cpu"), target)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("training_split.csv", "training_inputs.csv", "qc.safetensors"):
        if (args.model / name).exists():
            shutil.copy(args.model / name, args.out / name)
    kept = {k: v for k, v in metadata.items()
            if k not in ("format", "radscan_version", "preprocess_version", "config", "parameters", "weights")}
    kept["name"] = f"{metadata.get('name')}-shift{args.view_shift:g}"
    save_model(viewed, args.out, kept)
    pneumonia = load_images([str(DATA / "val_abnormal")], reading(args.model), workers=2, progress=False)[0]
    scores = score_arrays(viewed, np.concatenate([normals, pneumonia])).scores.numpy()
    labels = np.r_[np.zeros(len(normals)), np.ones(len(pneumonia))]
    print(f"{args.model} with critic_view_shift {args.view_shift:g}: validation AUC "
          f"{roc_auc_score(labels, scores):.3f} ({len(normals)} calibration normals, {len(pneumonia)} pneumonias); "
          f"written to {args.out}")
    with open(args.out / "views.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["model", "view_shift", "val_auc"],
                                      [str(args.model), args.view_shift, roc_auc_score(labels, scores)]])


if __name__ == "__main__":
    main()
