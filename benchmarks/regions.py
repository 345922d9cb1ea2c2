"""Where does the score's ranking come from, and where does its map put its mass? (issue 20, items 1 and 5)

On validation data only: the model's calibration normals (held out from training, listed in
`training_split.csv`) against a folder of validation abnormal films. Three measurements:

1. **Per region**: the AUC of each region's density distance alone (the 8 x 8 grid the density
   score averages), printed as a grid. Regions outside the body that rank well mean the score reads
   the acquisition (collimation, positioning, markers), not the chest.
2. **Inside against outside the thorax**: the density score computed over the regions of the lung
   fields and the mediastinum between them only, weighted by how much of each region they cover,
   and over the rest only.
3. **The map's mass**: the share of each abnormal film's explanation map that lies inside the lung
   fields (issue 20's goal: at least 80%; the lung fields' share of the area is the chance level).

The lung fields are those of the model's mean normal film (`normal_mean`;
radscan.model.field.lung_fields); the thorax closes the gap between them (20 px). A thorax-box
model's are its own `lung_mask` (found on the whole film's mean when it was trained, as the box
shows them), and the first line gives its score as computed (over the lung fields only).

    python benchmarks/regions.py models/kermany-tiny
    python benchmarks/regions.py MODEL --train ../shared/data/cxr/nih_adult_512/train_normal \\
        --val-abnormal ../shared/data/cxr/nih_adult_512/val_abnormal
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from radscan.ingest import load_images
from radscan.model.field import lung_fields
from radscan.model.io import load_model
from radscan.model.simsid import to_model_tensor

sys.path.insert(0, str(Path(__file__).parent))
from shift import calibration_normals, reading  # noqa: E402
from splits import DATA  # noqa: E402


def auc(normal: np.ndarray, abnormal: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(abnormal))], np.r_[normal, abnormal]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--train", type=Path, default=DATA / "train_normal")
    parser.add_argument("--val-abnormal", type=Path, default=DATA / "val_abnormal")
    args = parser.parse_args()
    model = load_model(args.model)[0].eval()
    if model.density is None:
        raise SystemExit(f"{args.model} has no feature density (score kind 'density')")
    normals = to_model_tensor(calibration_normals(args.model, args.train))
    abnormal = to_model_tensor(load_images([str(args.val_abnormal)], reading(args.model), workers=2,
                                           progress=False)[0])
    with torch.inference_mode():
        regions_n, regions_a = model.density_regions(normals), model.density_regions(abnormal)
        shipped = auc(model.density_score(regions_n).numpy(), model.density_score(regions_a).numpy())
        regions_n, regions_a = regions_n.flatten(1).double().numpy(), regions_a.flatten(1).double().numpy()
        maps = model.score(abnormal).explanation_maps.double().numpy()
    if model.cfg.field == "thorax-box":  # found on the whole film's mean when training (none shows inside the box)
        lungs = model.lung_mask.bool().numpy()
    else:
        lungs = lung_fields((model.normal_mean.squeeze().double().numpy() + 1) * 127.5)
    thorax = ndimage.binary_closing(lungs, iterations=20)
    grid = model.density.grid
    side = lungs.shape[0] // grid

    print(f"\n{args.model}: {len(normals)} calibration normals against {len(abnormal)} films of {args.val_abnormal}")
    print(f"the density score as the model computes it: AUC {shipped:.3f}")
    print(f"score over all {grid * grid} regions: AUC {auc(regions_n.mean(1), regions_a.mean(1)):.3f}")
    per_region = np.array([auc(regions_n[:, r], regions_a[:, r]) for r in range(grid * grid)]).reshape(grid, grid)
    print("AUC of each region alone (rows top to bottom; the film's edges are the outer rows and columns):")
    for row in per_region:
        print("  " + " ".join(f"{value:.2f}" for value in row))
    cover = thorax.reshape(grid, side, grid, side).mean((1, 3)).ravel()
    for name, weight in (("inside the thorax (lung fields and mediastinum)", cover), ("outside it", 1 - cover)):
        if weight.sum() == 0:  # a film cropped to the thorax has no region outside it
            print(f"score over the regions {name}: none")
            continue
        weight = weight / weight.sum()
        print(f"score over the regions {name} ({(weight > 0).sum()} regions): "
              f"AUC {auc(regions_n @ weight, regions_a @ weight):.3f}")
    totals = maps.reshape(len(maps), -1).sum(1)
    inside = (maps * lungs).reshape(len(maps), -1).sum(1)
    drawn = totals > 0
    share = inside[drawn] / totals[drawn]
    print(f"map mass inside the lung fields ({lungs.mean():.0%} of the area): mean {share.mean():.1%}, "
          f"median {np.median(share):.1%} over the {drawn.sum()} abnormal films with a map (goal: >= 80%)")


if __name__ == "__main__":
    main()
