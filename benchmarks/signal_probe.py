"""How much of a population's pneumonia signal lies in the lung fields once the grey levels are taken
away (issue 20; validation data only).

    python benchmarks/signal_probe.py MODEL_DIR TRAIN_NORMALS VAL_ABNORMAL

The films are read as the model reads them (a thorax-box model: cut to its box, 128 px). Each film is
described by a fixed filter bank (Gaussian smoothing, gradient magnitude and |Laplacian| at 1, 2 and
4 px), averaged over the 8 x 8 regions that lie mostly (> 30%) in the model's lung fields, in three
renderings: the grey levels as they are, each film standardised (mean 0, sd 1: invariant to
brightness and contrast), and each film's grey levels replaced by their ranks (invariant to any
monotone change: gamma, window, histogram equalisation). Beside them, the film's mean grey alone and
the model's own discriminator features of the same regions.

For each description two AUCs of the model's training and calibration normals against VAL_ABNORMAL:
- unsupervised: a Gaussian per region fitted to the training normals, the lung-weighted mean of the
  calibration normals' and the pneumonias' Mahalanobis distances (as radscan's density score);
- linear probe: a logistic regression (standardised, 50 principal components, C 0.1) on every normal
  and pneumonia, 5-fold cross-validated: what the labels themselves find in that description by a
  linear rule. A reference, not a strict ceiling (a density can beat a linear probe of the same
  features), that tells a description with little signal from one a score fails to use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from radscan.ingest import load_images
from radscan.model.io import load_model
from radscan.model.simsid import SimSID, to_model_tensor

sys.path.insert(0, str(Path(__file__).parent))
from shift import reading, split_films  # noqa: E402

GRID = 8
SCALES = (1, 2, 4)


def rendering(image: np.ndarray, kind: str) -> np.ndarray:
    """(H, W) grey in [0, 1] -> the same film as `kind` renders it (see the module docstring)."""
    if kind == "standardised":
        return (image - image.mean()) / (image.std() + 1e-6)
    if kind == "ranks":
        return np.argsort(np.argsort(image.ravel(), kind="stable")).reshape(image.shape) / image.size
    return image


def filter_bank(films: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 9, GRID, GRID): smoothing, gradient and |Laplacian| at SCALES, per region."""
    out = []
    for image in films[:, 0].double().numpy():
        image = rendering(image, kind)
        channels = []
        for sigma in SCALES:
            channels += [ndimage.gaussian_filter(image, sigma), ndimage.gaussian_gradient_magnitude(image, sigma),
                         np.abs(ndimage.gaussian_laplace(image, sigma))]
        out.append(np.stack(channels))
    return F.adaptive_avg_pool2d(torch.from_numpy(np.stack(out)), GRID)


def discriminator_features(model: SimSID, films: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N, C, GRID, GRID): the model's density features."""
    with torch.inference_mode():
        return torch.cat([model.density_features(films[start:start + 64]) for start in range(0, len(films), 64)]
                         ).double()


def unsupervised_auc(train: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor,
                     weights: torch.Tensor) -> float:
    """A Gaussian per region (shrinkage 0.1) fitted to `train`; AUC of the lung-weighted mean distance."""
    fit = train.flatten(2).permute(2, 0, 1)  # (R, N, C)
    mean, sd = fit.mean(1, keepdim=True), fit.std(1, keepdim=True) + 1e-9
    fit = (fit - mean) / sd
    covariance = fit.transpose(1, 2) @ fit / (fit.shape[1] - 1)
    precision = torch.linalg.inv(0.9 * covariance + 0.1 * torch.eye(covariance.shape[-1], dtype=torch.float64))
    query = (torch.cat([normal, abnormal]).flatten(2).permute(2, 0, 1) - mean) / sd
    distance = torch.einsum("rmc,rcd,rmd->rm", query, precision, query)
    score = (distance * weights[:, None]).sum(0) / weights.sum()
    return roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(abnormal))], score.numpy())


def supervised_auc(normal: torch.Tensor, abnormal: torch.Tensor, lungs: torch.Tensor) -> float:
    """5-fold cross-validated AUC of a linear probe on the lung regions' features."""
    features = torch.cat([normal, abnormal])[:, :, lungs].flatten(1).numpy()
    labels = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
    reduce = PCA(50, random_state=0) if features.shape[1] > 50 else "passthrough"
    probe = make_pipeline(StandardScaler(), reduce, LogisticRegression(C=0.1, max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return roc_auc_score(labels, cross_val_predict(probe, features, labels, cv=folds, method="decision_function"))


def main() -> None:
    model_dir, train_dir, abnormal_dir = map(Path, sys.argv[1:4])
    model = load_model(model_dir)[0].eval()
    train, normal = (to_model_tensor(split_films(model_dir, train_dir, split)) for split in ("train", "calibration"))
    abnormal = to_model_tensor(load_images([str(abnormal_dir)], reading(model_dir), workers=2, progress=False)[0])
    weights = F.adaptive_avg_pool2d(model.lung_mask[None, None].double(), GRID)[0, 0]
    lungs = weights > 0.3
    describe = {
        "mean grey of the film": lambda x: x.double().mean((1, 2, 3))[:, None, None, None].expand(-1, 1, GRID, GRID),
        "filter bank, grey levels as they are": lambda x: filter_bank(x, "as read"),
        "filter bank, each film standardised": lambda x: filter_bank(x, "standardised"),
        "filter bank, grey levels as ranks": lambda x: filter_bank(x, "ranks"),
        "the model's discriminator features": lambda x: discriminator_features(model, x),
    }
    print(f"{model_dir}: {len(train)} training and {len(normal)} calibration normals, {len(abnormal)} films of "
          f"{abnormal_dir}; {int(lungs.sum())} lung regions of {GRID * GRID}")
    for name, of in describe.items():
        fit, held_out, sick = of(train), of(normal), of(abnormal)
        unsupervised = unsupervised_auc(fit, held_out, sick, weights.flatten())
        supervised = supervised_auc(torch.cat([fit, held_out]), sick, lungs)
        print(f"{name:40s} unsupervised {unsupervised:.3f}   linear probe with labels {supervised:.3f}", flush=True)


if __name__ == "__main__":
    main()
