"""Is the explanation map faithful to the score? A deletion test (Samek et al. 2017, "Evaluating
the visualization of what a deep neural network has learned"): replace the 10% of pixels that
the map ranks highest with the mean normal film (the model's `normal_mean`) and rescore; do the
same with a random 10% of pixels, and with a random square of 10% of the area (a random region,
the fairer baseline for a smoothed map: scattered replaced pixels look abnormal in themselves).
A faithful map lowers the score more than either.

    python benchmarks/explanation.py --model models/kermany-tiny

Runs on the validation pneumonias (never the test split) and prints the mean fall of the
calibrated z-score for the map and both baselines, and the share of films where the map's pixels
lower it more.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from radscan.ingest import load_images
from radscan.model.io import load_model
from radscan.model.simsid import to_model_tensor
from radscan.policy import Policy, for_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def z_scores(model, images: torch.Tensor) -> torch.Tensor:
    return model.calibrated(model.score(images, explain=False).components)[1]


def replace(images: torch.Tensor, chosen: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """images (B, 1, H, W); chosen (B, H*W) boolean -> those pixels taken from `reference` (H, W)."""
    flat = images.flatten(1).clone()
    flat[chosen] = reference.flatten().expand_as(flat)[chosen]
    return flat.view_as(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "kermany-tiny")
    parser.add_argument("--images", type=Path, default=DATA / "kermany_pediatric_224" / "val_abnormal")
    parser.add_argument("--fraction", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, metadata = load_model(args.model)
    # a thorax-box model's films are read cut to its box, as every command reads them
    images = to_model_tensor(load_images([str(args.images)], for_model(Policy(), metadata, args.model), workers=2,
                                         progress=False)[0])
    result = model.score(images)
    before = model.calibrated(result.components)[1]
    count = int(args.fraction * images[0, 0].numel())
    maps = result.explanation_maps.flatten(1)
    top = torch.zeros_like(maps, dtype=torch.bool).scatter_(1, maps.topk(count, dim=1).indices, True)
    rng = torch.Generator().manual_seed(args.seed)
    random = torch.zeros_like(top).scatter_(1, torch.rand(maps.shape, generator=rng).topk(count, dim=1).indices, True)
    side = round(count**0.5)
    corners = torch.randint(0, images.shape[-1] - side + 1, (len(images), 2), generator=rng)
    square = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    for index, (row, col) in enumerate(corners.tolist()):
        square[index, row:row + side, col:col + side] = True
    fall_top = before - z_scores(model, replace(images, top, model.normal_mean))
    fall_random = before - z_scores(model, replace(images, random, model.normal_mean))
    fall_square = before - z_scores(model, replace(images, square.flatten(1), model.normal_mean))
    print(f"{len(images)} films from {args.images}; {args.fraction:.0%} of pixels replaced by the mean normal film")
    print(f"mean z-score before                  {before.mean():.3f}")
    print(f"mean fall, top of the map             {fall_top.mean():.3f} (median {fall_top.median():.3f})")
    print(f"mean fall, random pixels              {fall_random.mean():.3f} (median {fall_random.median():.3f})")
    print(f"mean fall, a random square            {fall_square.mean():.3f} (median {fall_square.median():.3f})")
    print("films where the map's pixels lower it more: "
          f"than random pixels {(fall_top > fall_random).float().mean():.1%}, "
          f"than a random square {(fall_top > fall_square).float().mean():.1%}")
    share = np.percentile(result.explanation_maps.numpy(), [50, 99, 99.9])
    print(f"map values (z per image area): median {share[0]:.2f}, 99th percentile {share[1]:.2f}, "
          f"99.9th {share[2]:.2f}")


if __name__ == "__main__":
    main()
