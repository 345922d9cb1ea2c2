"""Give a trained model directory a feature density model (score kind "density") without retraining.

Fits the density on the model's own training split (`training_split.csv`, paths relative to the
training folder), recalibrates every score kind on its calibration split with the same threshold
rule as training, and saves the model to OUT with the chosen score kind (sealed and hashed like a
trained model). The live discriminator's features are used, as `radscan train` does. A model whose
box follows the chest keeps its reference film, re-saved for this radscan's matcher (FOLLOW_MATCHER;
a model made with an earlier matcher is then read, refitted and recalibrated with this one: the
shipped model, 2026-12-06, research log rule 13b).

    python benchmarks/add_density.py models/kermany-tiny ../shared/data/cxr/kermany_pediatric_224/train_normal \\
        --out /tmp/kermany-density [--score density] [--grid 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from splits import split_paths

from radscan.calibration import calibrate, fit_density
from radscan.ingest import load_images
from radscan.model.field import read_reference_film, save_follow
from radscan.model.io import load_model, save_model
from radscan.model.simsid import SimSID
from radscan.policy import Policy, for_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("train", type=Path, help="the folder the model was trained on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--score", default="density")
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    old, metadata = load_model(args.model)
    cfg = dataclasses.replace(old.cfg, density_grid=args.grid, score_kind=args.score)
    model = SimSID(cfg)
    model.load_state_dict(old.state_dict(), strict=False)  # everything but the (new) density buffers
    model.eval()
    split = {side: [str(path) for path in split_paths(args.model, args.train, side)]
             for side in ("train", "calibration")}
    found = read_reference_film(args.model, metadata)  # whatever matcher it was made for
    follow = found[0] if found else None
    fixed = {**metadata, "config": {**metadata["config"], "follow": False}}
    # a thorax-box model reads every film cut to its box, moved with the chest by this radscan's matcher
    reading = dataclasses.replace(for_model(Policy(), fixed, args.model), follow=follow)
    train_images = load_images(split["train"], reading, workers=2, progress=False)[0]
    calibration = load_images(split["calibration"], reading, workers=2, progress=False)[0]
    device = torch.device("cpu")
    fit_density(model, train_images, args.seed, device)
    target = metadata["calibration"].get("target_specificity", 0.95)
    calibrate(model, calibration, 64, device, target)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("training_split.csv", "training_inputs.csv", "qc.safetensors"):
        if (args.model / name).exists():
            (args.out / name).write_bytes((args.model / name).read_bytes())
    metadata = {key: value for key, value in metadata.items() if key not in ("weights", "config", "format")}
    kept = ("method", "n_calibration", "target_specificity")
    metadata["calibration"] = {key: metadata["calibration"][key] for key in kept
                               if key in metadata["calibration"]}
    metadata.pop("metrics", None)  # measured on the old score kind
    now = datetime.now(timezone.utc)
    metadata.update(previous_version=metadata.get("version"), version=now.strftime("%Y.%m.%d-%H%M%S"),
                    created_at=now.isoformat(timespec="seconds"))
    metadata["density"] = {"fitted_on": "training split", "added_after_training": True, "seed": args.seed}
    if follow is not None:  # before the weights, which seal its sha256
        metadata["follow"] = save_follow(follow, args.out)
    save_model(model, args.out, metadata)
    print(json.dumps({"out": str(args.out), "threshold": float(model.threshold)}))


if __name__ == "__main__":
    main()
