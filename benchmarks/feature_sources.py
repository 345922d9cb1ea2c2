"""Which features' density ranks pneumonia: the trained discriminator's, an untrained one's, the
generator's encoder's (issue 20; validation data only).

    python benchmarks/feature_sources.py MODEL_DIR TRAIN_NORMALS VAL_ABNORMAL

For each source a Gaussian per region (radscan.model.density, 8 x 8 regions) is fitted to the
model's training normals plus two framed and two collimated copies of each (as `radscan train` fits
the density), and the AUC of the model's calibration normals against VAL_ABNORMAL is printed, with
the model's own weighting of the regions (a thorax-box model: its lung fields) and with all regions.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from radscan.ingest import load_images
from radscan.model.density import FeatureDensity, collimation_copies, framing_copies
from radscan.model.io import load_model
from radscan.model.simsid import Discriminator, SimSID, merge_patches, split_patches, to_model_tensor

sys.path.insert(0, str(Path(__file__).parent))
from shift import reading, split_films  # noqa: E402

GRID = 8


def pooled(stages_of: Callable[[torch.Tensor], list[torch.Tensor]], stages: tuple[int, ...],
           films: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N, C, GRID, GRID): the chosen stages' outputs, average-pooled and stacked."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(films), 64):
            outputs = stages_of(films[start:start + 64])
            out.append(torch.cat([F.adaptive_avg_pool2d(outputs[k].float(), GRID) for k in stages], 1))
    return torch.cat(out)


def sources(model: SimSID) -> dict[str, tuple[Callable[[torch.Tensor], list[torch.Tensor]], tuple[int, ...]]]:
    def encoder(films: torch.Tensor) -> list[torch.Tensor]:
        grid = model.cfg.patch_grid
        return [merge_patches(f, grid) for f in model.encoder(split_patches(model.restrict(films), grid))]

    torch.manual_seed(0)
    untrained = Discriminator(model.cfg).eval()
    return {
        "trained discriminator, stages 1-3 (the model's)": (
            lambda films: model.discriminator.stages(model.restrict(films)), (1, 2, 3)),
        "trained discriminator, stages 0-2": (lambda films: model.discriminator.stages(model.restrict(films)),
                                              (0, 1, 2)),
        "trained discriminator, stages 2-3": (lambda films: model.discriminator.stages(model.restrict(films)),
                                              (2, 3)),
        "trained discriminator, stages 0-3": (lambda films: model.discriminator.stages(model.restrict(films)),
                                              (0, 1, 2, 3)),
        "untrained discriminator, stages 1-3": (lambda films: untrained.stages(model.restrict(films)), (1, 2, 3)),
        "generator's encoder, stages 1-2": (encoder, (1, 2)),
        "generator's encoder, stages 1-3": (encoder, (1, 2, 3)),
    }


def main() -> None:
    model_dir, train_dir, abnormal_dir = map(Path, sys.argv[1:4])
    model = load_model(model_dir)[0].eval()
    train, normal = (to_model_tensor(split_films(model_dir, train_dir, split)) for split in ("train", "calibration"))
    abnormal = to_model_tensor(load_images([str(abnormal_dir)], reading(model_dir), workers=2, progress=False)[0])
    generator = torch.Generator().manual_seed(0)
    fit = torch.cat([train, framing_copies(train, 2, generator), collimation_copies(train, 2, generator)])
    labels = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
    print(f"{model_dir}: fitted on {len(train)} training normals and their copies ({len(fit)}); "
          f"{len(normal)} calibration normals against {len(abnormal)} films of {abnormal_dir}")
    for name, (stages_of, stages) in sources(model).items():
        started = time.perf_counter()
        features = pooled(stages_of, stages, fit)
        density = FeatureDensity(model.cfg)
        density.mean = torch.zeros(GRID * GRID, features.shape[1])
        density.precision = torch.zeros(GRID * GRID, features.shape[1], features.shape[1])
        density.grid = GRID
        density.fit(features)
        with torch.inference_mode():
            regions = torch.cat([density.distances(pooled(stages_of, stages, normal)),
                                 density.distances(pooled(stages_of, stages, abnormal))])
        weighted = roc_auc_score(labels, model.density_score(regions).numpy())
        plain = roc_auc_score(labels, regions.flatten(1).mean(1).numpy())
        print(f"{name:50s} {features.shape[1]:4d} channels: AUC {weighted:.3f} (all regions alike {plain:.3f}) "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
