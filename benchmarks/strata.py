"""Does an adult model's ranking hold inside each acquisition stratum? (issue 20, item 1)

The NIH adult set's normals and pneumonias were not drawn alike: by NIH's own metadata
(`View Position` in Data_Entry_2017.csv, copied for these files into
`benchmarks/data/nih_adult_512_views.csv`) 294 of the 400 normals are AP films and 104 of the 247
pneumonias whose view is known, and every normal comes from patients 1281-3966 (one part of NIH's
archive, about one period) while the pneumonias span patients 261-12229. A score that had learnt
the view or the period would rank well across strata and at chance inside them. This benchmark
gives, for the density score of each model, the AUC of its calibration normals (held out from
training) against the validation pneumonias: all of them, AP films against AP films, PA against
PA, and the pneumonias of the normals' patient range only; with a 95% bootstrap interval (2,000
resamples of each class) and the film's mean grey level as the acquisition baseline (an AUC far
from 0.5 either way is a confound).

Validation data only; nothing is chosen with it.

    python benchmarks/strata.py NIH_MODEL_DIR [NIH_MODEL_DIR ...]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

from radscan.ingest import load_images
from radscan.model.io import load_model
from radscan.model.simsid import to_model_tensor

sys.path.insert(0, str(Path(__file__).parent))
from regions import auc  # noqa: E402
from shift import reading  # noqa: E402
from splits import split_paths  # noqa: E402

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr" / "nih_adult_512"
VIEWS = Path(__file__).parent / "data" / "nih_adult_512_views.csv"


def interval(normal: np.ndarray, abnormal: np.ndarray, rng: np.random.Generator,
             resamples: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the AUC, each class resampled on its own."""
    draws = [auc(rng.choice(normal, len(normal)), rng.choice(abnormal, len(abnormal))) for _ in range(resamples)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def density_scores(model: torch.nn.Module, images: np.ndarray, batch: int = 128) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model.density_score(model.density_regions(to_model_tensor(images[i:i + batch])))
                          for i in range(0, len(images), batch)]).double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=NIH, help="the nih_adult_512 folder")
    args = parser.parse_args()
    view = {row["file"]: row["view_position"] for row in csv.DictReader(VIEWS.open())}
    rng = np.random.default_rng(0)
    for model_dir in args.models:
        model = load_model(model_dir)[0].eval()
        folder = args.data / "train_normal"
        normal_files = [str(path.relative_to(args.data)) for path in split_paths(model_dir, folder, "calibration")]
        abnormal_files = sorted(f"val_abnormal/{p.name}" for p in (args.data / "val_abnormal").glob("*.png"))
        films = {}
        for kind, files in (("normal", normal_files), ("abnormal", abnormal_files)):
            images = load_images([str(args.data / f) for f in files], reading(model_dir), workers=2,
                                 progress=False)[0]
            films[kind] = (density_scores(model, images), images.reshape(len(images), -1).mean(1),
                           np.array([view.get(f, "") for f in files]),
                           np.array([int(Path(f).name[:8]) for f in files]))
        (dn, gn, vn, _), (da, ga, va, pa) = films["normal"], films["abnormal"]
        # the patients of every normal the model was given, not only its calibration normals
        trained = [int(path.name[:8]) for path in split_paths(model_dir, folder, None)]
        first, last = min(trained), max(trained)
        band = (pa >= first) & (pa <= last)
        strata = {
            "all": (np.ones_like(dn, bool), np.ones_like(da, bool)),
            "AP against AP": (vn == "AP", va == "AP"),
            "PA against PA": (vn == "PA", va == "PA"),
            f"pneumonias of the normals' patients {first}-{last} only": (np.ones_like(dn, bool), band),
        }
        print(f"\n{model_dir}: density score, calibration normals against validation pneumonias")
        print("| stratum | normals / pneumonias | density AUC (95% CI) | mean grey AUC |")
        print("|---|---|---|---|")
        for name, (kn, ka) in strata.items():
            low, high = interval(dn[kn], da[ka], rng)
            print(f"| {name} | {kn.sum()} / {ka.sum()} | {auc(dn[kn], da[ka]):.3f} ({low:.3f}-{high:.3f}) "
                  f"| {auc(gn[kn], ga[ka]):.3f} |")


if __name__ == "__main__":
    main()
