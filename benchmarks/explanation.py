"""Is the explanation map faithful to the score? A deletion test (Samek et al. 2017, "Evaluating
the visualization of what a deep neural network has learned"): replace the 10% of pixels that
the map ranks highest with the mean normal film (the model's `normal_mean`) and rescore; do the
same with a random 10% of pixels, and with a random square of 10% of the area (a random region,
the fairer baseline for a smoothed map: scattered replaced pixels look abnormal in themselves).
A faithful map lowers the score more than either.

    python benchmarks/explanation.py --model models/kermany-tiny
    python benchmarks/explanation.py --model models/kermany-tiny --regions --images HALF_A

With --regions (rule 19 of docs/research-log.md; a density model with a lung mask), the test is
asked at the scale the density's map is made of, with a fill its features know: the k regions of
the density's grid (of those at least half inside the lung mask) where the shown map has most mass
take the same place of a calibration normal (held out from training; brightness matched over the
lung mask, blended in with the regions' mask smoothed by a Gaussian of FEATHER_SIGMA px; the mean
over DONORS normals drawn at random), against k such regions drawn at random with the same donors,
and, for information, the k with least mass.

Runs on the validation pneumonias (never the test split) and prints the mean fall of the
calibrated z-score for the map and both baselines, and the share of films where the map's pixels
lower it more.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from radscan.ingest import load_images
from radscan.model.io import load_model
from radscan.model.simsid import to_model_tensor
from radscan.policy import Policy, for_model

sys.path.insert(0, str(Path(__file__).parent))
from shift import calibration_normals  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
# rule 19: regions replaced (10% of an 8 x 8 grid, the pixel test's share), normals drawn as fill per
# film, and the blend's smoothing in pixels at 128 px
REGIONS = 6
DONORS = 5
FEATHER_SIGMA = 4.0


def z_scores(model, images: torch.Tensor) -> torch.Tensor:
    return model.calibrated(model.score(images, explain=False).components)[1]


def replace(images: torch.Tensor, chosen: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """images (B, 1, H, W); chosen (B, H*W) boolean -> those pixels taken from `reference` (H, W)."""
    flat = images.flatten(1).clone()
    flat[chosen] = reference.flatten().expand_as(flat)[chosen]
    return flat.view_as(images)


def region_deletion(model, images: torch.Tensor, normals: torch.Tensor, k: int = REGIONS,
                    donors: int = DONORS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rule 19's deletion test at the scale of the density's regions. `images` (B, 1, H, W) and
    `normals` (M, 1, H, W) model inputs in [-1, 1] -> (B,) falls of the calibrated z-score for the
    map's k regions ("map"), k random ones ("random"), the map's regions moved together to another
    place of the lungs ("moved": as clustered as the map's, so as much seam; information; random
    regions where no such place exists, flagged in "moved_found") and the k
    with least mass ("least"), each the mean over `donors` calibration normals (drawn without
    replacement) as fill. Regions: the density grid's, those at least half inside the model's lung
    mask; k = 0 takes them all. Each film's draws come from its own generator (seeded by `seed` and
    its pixels), so a film gets the same draws in any set. Raises ValueError for a model without a
    density or lung mask."""
    if model.density is None or model.cfg.field != "thorax-box":
        raise ValueError("the region test needs a density model with a lung mask (a thorax-box model)")
    grid, size = model.cfg.density_grid, images.shape[-1]
    side = size // grid
    lungs = model.lung_mask.float()
    candidates = (F.avg_pool2d(lungs[None, None], side)[0, 0] >= 0.5).numpy()  # (g, g)
    k = k or int(candidates.sum())
    with torch.inference_mode():
        result = model.score(images, explain=True, components=False)
        before = model.calibrated(result.components)[1]
        distance = model.density_regions(images).flatten(1)
    mass = F.avg_pool2d(result.explanation_maps[:, None], side).flatten(1)
    # most mass first, ties (regions the map leaves blank) by the region's own distance
    by_distance = distance.argsort(dim=1, descending=True)
    order = by_distance.gather(1, mass.gather(1, by_distance).argsort(dim=1, descending=True, stable=True))
    inside = candidates.ravel().nonzero()[0]
    chosen: dict[str, list[list[int]]] = {"map": [], "random": [], "moved": [], "least": []}
    fill, found = [], []
    for film, row in zip(images, order.numpy(), strict=True):
        rng = np.random.default_rng([seed, zlib.crc32(film.numpy().tobytes())])
        ranked = [int(r) for r in row if candidates.ravel()[r]]
        chosen["map"].append(ranked[:k])
        chosen["least"].append(ranked[-k:])
        chosen["random"].append(rng.choice(inside, k, replace=False).tolist())
        moved = _moved_pattern(ranked[:k], candidates, rng)
        found.append(bool(moved))
        chosen["moved"].append(moved or chosen["random"][-1])
        fill.append(rng.choice(len(normals), donors, replace=False))
    fill = np.array(fill)
    weights = lungs.flatten()

    def lung_mean(films: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) -> (B,) mean over the lung mask
        return (films.flatten(1) * weights).sum(1) / weights.sum()

    # each donor's film, brightness matched to the film it fills: the same for every choice of regions
    matched = []
    for j in range(donors):
        donor = normals[torch.from_numpy(fill[:, j])]
        matched.append((donor + (lung_mean(images) - lung_mean(donor))[:, None, None, None]).clamp(-1, 1))
    falls = {}
    for name, regions in chosen.items():
        blend = np.zeros((len(images), size, size), np.float32)
        for b, picked in enumerate(regions):
            for r in picked:
                row, col = divmod(int(r), grid)
                blend[b, row * side:(row + 1) * side, col * side:(col + 1) * side] = 1.0
            blend[b] = ndimage.gaussian_filter(blend[b], FEATHER_SIGMA, mode="constant")
        alpha = torch.from_numpy(blend)[:, None]
        after = []
        for donor in matched:
            with torch.inference_mode():
                changed = model.score(alpha * donor + (1 - alpha) * images, explain=False, components=False)
                after.append(model.calibrated(changed.components)[1])
        falls[name] = before - torch.stack(after).mean(0)
    falls["moved_found"] = torch.tensor(found, dtype=torch.float32)  # films whose pattern could be moved
    return falls


def _moved_pattern(regions: list[int], candidates: np.ndarray, rng: np.random.Generator) -> list[int]:
    """`regions` (indices into the (g, g) grid) moved together by a whole number of regions, to a
    place where every one is a candidate and at most half of them where the map put them; [] when
    there is none."""
    grid = candidates.shape[0]
    rows, cols = np.divmod(np.array(regions), grid)
    moves = [(dy, dx) for dy in range(-grid + 1, grid) for dx in range(-grid + 1, grid) if (dy, dx) != (0, 0)]
    for index in rng.permutation(len(moves)):
        dy, dx = moves[index]
        y, x = rows + dy, cols + dx
        if ((y >= 0) & (y < grid) & (x >= 0) & (x < grid)).all() and candidates[y, x].all() \
                and len(set((y * grid + x).tolist()) & set(regions)) <= len(regions) // 2:
            return (y * grid + x).tolist()
    return []


def main_regions(model, images: torch.Tensor | None, model_dir: Path, train: Path, seed: int, k: int) -> None:
    """Print rule 19's figures; `images` None: the calibration normals themselves (what the fill alone
    does to a normal film)."""
    normals = to_model_tensor(calibration_normals(model_dir, train))
    images = normals if images is None else images
    falls = region_deletion(model, images, normals, k=k, seed=seed)
    print(f"{len(images)} films; {k or 'all'} regions of the lung mask replaced by {DONORS} calibration normals' "
          f"({len(normals)} normals), blended over {FEATHER_SIGMA:g} px")
    found = falls.pop("moved_found")
    for name, fall in falls.items():
        print(f"mean fall of z, {name:<7} {fall.mean():+.3f} (median {fall.median():+.3f})")
    print(f"the map's pattern could be moved in {found.mean():.0%} of films (else random regions stand in)")
    beats = (falls["map"] > falls["random"]).float().mean()
    passed = falls["map"].mean() > falls["random"].mean() and beats > 0.5
    print(f"films where the map's regions lower it more than random regions: {beats:.1%}; than the map's "
          f"regions moved: {(falls['map'] > falls['moved']).float().mean():.1%}; than the least-mass regions: "
          f"{(falls['map'] > falls['least']).float().mean():.1%}")
    print(f"rule 19: {'passes' if passed else 'fails'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "kermany-tiny")
    parser.add_argument("--images", type=Path, default=DATA / "kermany_pediatric_224" / "val_abnormal")
    parser.add_argument("--fraction", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regions", action="store_true", help="rule 19: the map's regions against random ones")
    parser.add_argument("--k", type=int, default=REGIONS, help="regions replaced (--regions; 0: every lung region)")
    parser.add_argument("--on-normals", action="store_true",
                        help="--regions on the calibration normals themselves (what the fill alone does)")
    parser.add_argument("--train", type=Path, default=DATA / "kermany_pediatric_224" / "train_normal",
                        help="where the model's calibration normals are (--regions)")
    args = parser.parse_args()

    model, metadata = load_model(args.model)
    # a thorax-box model's films are read cut to its box, as every command reads them
    images = to_model_tensor(load_images([str(args.images)], for_model(Policy(), metadata, args.model), workers=2,
                                         progress=False)[0])
    model.eval()
    if args.regions:
        main_regions(model, None if args.on_normals else images, args.model, args.train, args.seed, args.k)
        return
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
