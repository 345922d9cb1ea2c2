"""What each epoch of `radscan train` is measured by, and how `--keep` chooses the epoch saved.

After every epoch the density is fitted and the model calibrated as if it were the last
(radscan.calibration), then measured: reconstruction fidelity, two label-free measures of the
density, and with labelled validation films the AUC of every score kind. The measures go into
the training log; a `KEEP_RULES` rule keeps the epoch whose measure is best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from radscan.augment import local_anomalies
from radscan.calibration import calibrate, fit_density, in_batches
from radscan.model.runtime import iter_batches, score_arrays
from radscan.model.simsid import COMPONENTS, SimSID, to_model_tensor

__all__ = ["KeepRule", "KEEP_RULES", "better_epoch", "evaluate_epoch", "label_free_measures"]


@dataclass(frozen=True)
class KeepRule:
    """How `--keep` chooses the epoch whose model is saved: the epoch's training-log entry `measure`,
    highest (`sign` 1) or lowest (-1) wins; ties keep the earlier epoch."""

    measure: str  # a key of the training log; "{kind}" stands for the model's score kind
    sign: int
    says: str  # what the kept epoch had, for model.json and the report: "... (0.836)"
    needs_labels: bool


KEEP_RULES = {
    "best": KeepRule("val_auc_{kind}", 1, "the highest validation AUC of the {kind} score", True),
    "synthetic": KeepRule("synthetic_auc_density", 1, "the highest AUC of the density on synthetic defects", False),
}


def better_epoch(best: dict[str, Any] | None, model: SimSID, epoch: int, metrics: dict[str, float],
                 rule: KeepRule) -> dict[str, Any] | None:
    """`best` (weights, epoch, the rule's measure as "auc"), or this epoch's model when its measure is
    better (ties keep the earlier epoch)."""
    value = metrics[rule.measure.format(kind=model.cfg.score_kind)]
    if best is not None and rule.sign * value <= rule.sign * best["auc"]:
        return best
    return {"model": {key: value.detach().clone() for key, value in model.state_dict().items()},
            "epoch": epoch, "auc": float(value)}


def evaluate_epoch(model: SimSID, train_images: np.ndarray, calibration: np.ndarray,
                   validation: tuple[np.ndarray, np.ndarray] | None, batch_size: int, device: torch.device,
                   seed: int = 0) -> dict[str, float]:
    """Fit the feature density to the training normals, calibrate on the held-out normals, then,
    with labelled validation data, the validation AUC of every score kind the model computes, and
    of the live discriminator alone (no snapshots)."""
    model.eval()
    fit_density(model, train_images, seed, device, batch_size)
    components = calibrate(model, calibration, batch_size, device, target_specificity=None, explanation=False)[1]
    metrics = {f"calibration_{kind}_mean": float(components[:, column].mean())
               for column, kind in enumerate(COMPONENTS) if kind != "critic" and components[:, column].isfinite().all()}
    metrics.update({f"calibration_{key}": value for key, value in _fidelity(model, calibration, device).items()})
    if model.density is not None:
        metrics.update(label_free_measures(model, train_images, calibration, batch_size, device, seed))
    if validation is not None:
        normal, abnormal = validation
        images = np.concatenate([normal, abnormal])
        components = score_arrays(model, images, batch_size, device).components
        labels = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
        for kind, z in model.z_scores(components).items():
            if z.isfinite().all():
                metrics[f"val_auc_{kind}"] = float(roc_auc_score(labels, z.numpy()))
        live = in_batches(lambda films: model.discriminator(model.restrict(films)), images, batch_size, device)
        metrics["val_auc_critic_live"] = float(roc_auc_score(labels, -live.numpy()))
    return metrics


def label_free_measures(model: SimSID, train_images: np.ndarray, calibration: np.ndarray, batch_size: int,
                        device: torch.device, seed: int = 0) -> dict[str, float]:
    """Two measures of how well an epoch's fitted feature density will rank abnormal films, with no
    labels, logged for every epoch; `--keep synthetic` chooses by the second (docs/research-log.md,
    "choosing the epoch without labels": the first, the rule fixed first, kept too early an epoch on
    children's films).

    - `density_gap`: the held-out calibration normals' mean raw density over the training normals'
      (>= about 1; the smaller, the less the density is fitted to the very films it was fitted on).
    - `synthetic_auc_density`: the AUC of the raw density separating the calibration normals from the
      same films each given one generic local defect (`local_anomalies`, a fixed draw per seed).

    `train_images`, `calibration`: (N, 128, 128) uint8. The model's density must be fitted."""
    def density(films: torch.Tensor) -> torch.Tensor:
        return model.density_score(model.density_regions(films))

    with torch.inference_mode():
        trained = torch.cat([density(to_model_tensor(batch, device)).cpu()
                             for batch in iter_batches(train_images, batch_size)])
        generator = torch.Generator().manual_seed(seed * 100_003 + 7)
        normal, defect = [], []
        for batch in iter_batches(calibration, batch_size):
            films = to_model_tensor(batch, device)
            normal.append(density(films).cpu())
            defect.append(density(local_anomalies(films, generator)).cpu())
    normal_scores, defect_scores = torch.cat(normal).double(), torch.cat(defect).double()
    labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(defect_scores))]
    return {"train_density_mean": float(trained.double().mean()),
            "density_gap": float(normal_scores.mean() / trained.double().mean().clamp_min(1e-12)),
            "synthetic_auc_density": float(roc_auc_score(labels, torch.cat([normal_scores, defect_scores]).numpy()))}


def _fidelity(model: SimSID, images: np.ndarray, device: torch.device) -> dict[str, float]:
    """Reconstruction MSE and histogram KL of the student on (up to 256 of) the calibration normals."""
    from radscan.trainreport import reconstruction_fidelity

    batch = model.restrict(to_model_tensor(images[:256], device))
    with torch.inference_mode():
        return reconstruction_fidelity(batch, model.generate(batch, with_teacher=False).student)
