"""`radscan evaluate`: how well a model separates labelled normal and abnormal images.

Metrics come from scikit-learn. AUC gets a 95% interval from a stratified bootstrap (normals and
abnormals resampled separately, so every replicate has both classes). Sensitivity, specificity and
F1 are reported at the model's stored threshold; accuracy and F1 at the threshold that is best on
the evaluated set itself are reported too, clearly labelled, for comparison with papers that
report that way (it is optimistic: the threshold is tuned on the test data).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from radscan.ingest import check_outputs_apart, load_images
from radscan.model.io import load_model
from radscan.model.runtime import resolve_device, score_arrays
from radscan.policy import Policy
from radscan.report import atomic_output

__all__ = ["evaluate", "metrics_at", "bootstrap_auc", "draw_roc"]


def metrics_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, precision, F1 and accuracy when `score >= threshold` is flagged."""
    predicted = scores >= threshold
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {
        "threshold": float(threshold),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "precision": float(tp / (tp + fp)) if tp + fp else float("nan"),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "accuracy": float((tp + tn) / len(labels)),
        "flagged_normals": float(fp / (tn + fp)) if tn + fp else float("nan"),
    }


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the AUC, resampling each class separately."""
    rng = np.random.default_rng(seed)
    normal, abnormal = scores[labels == 0], scores[labels == 1]
    both = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
    aucs = [roc_auc_score(both, np.r_[rng.choice(normal, len(normal)), rng.choice(abnormal, len(abnormal))])
            for _ in range(rounds)]
    low, high = np.percentile(aucs, [2.5, 97.5])
    return float(low), float(high)


def _best_accuracy_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    candidates = np.unique(scores)
    accuracy = [((scores >= t) == labels).mean() for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def evaluate(normal: Sequence[str], abnormal: Sequence[str], model_dir: Path, batch_size: int = 64,
             device: str = "auto", workers: int = -1, policy: Policy | None = None, progress: bool = True,
             roc_png: Path | None = None, bootstrap_rounds: int = 2000) -> dict[str, Any]:
    policy = policy or Policy()
    check_outputs_apart([*normal, *abnormal], [roc_png])  # the picture must not overwrite a radiograph
    torch_device = resolve_device(device)
    model, metadata = load_model(model_dir, torch_device)
    normals = load_images(normal, policy, workers, progress, label="normals")[0]
    abnormals = load_images(abnormal, policy, workers, progress, label="abnormals")[0]
    scores = score_arrays(model, np.concatenate([normals, abnormals]), batch_size, torch_device).scores.numpy()
    labels = np.r_[np.zeros(len(normals), dtype=int), np.ones(len(abnormals), dtype=int)]
    auc = float(roc_auc_score(labels, scores))
    result = {
        "model": str(model_dir), "model_name": metadata.get("name"), "model_sha256": metadata["weights"]["sha256"],
        "normal": len(normals), "abnormal": len(abnormals),
        "auc": auc, "auc_ci95": bootstrap_auc(labels, scores, bootstrap_rounds),
        "average_precision": float(average_precision_score(labels, scores)),
        "at_model_threshold": metrics_at(labels, scores, float(model.threshold)),
        "at_best_accuracy_threshold_on_this_set": metrics_at(labels, scores,
                                                             _best_accuracy_threshold(labels, scores)),
    }
    if roc_png is not None:
        fpr, tpr, _ = roc_curve(labels, scores)
        at = result["at_model_threshold"]
        draw_roc(fpr, tpr, (1 - at["specificity"], at["sensitivity"]), auc, result["auc_ci95"],
                 str(metadata.get("name")), roc_png)
        result["roc_png"] = str(roc_png)
    return result


def draw_roc(fpr: np.ndarray, tpr: np.ndarray, point: tuple[float, float], auc: float,
             interval: tuple[float, float], title: str, path: Path) -> None:
    """The ROC curve with the chance line and the model's operating point, as a PNG."""
    size, margin = 560, 64
    span = size - 2 * margin
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)

    def xy(x: float, y: float) -> tuple[float, float]:
        return margin + x * span, size - margin - y * span

    for tick in np.linspace(0, 1, 6):
        draw.line([xy(tick, 0), xy(tick, 1)], fill=(230, 230, 230))
        draw.line([xy(0, tick), xy(1, tick)], fill=(230, 230, 230))
        draw.text((xy(tick, 0)[0] - 8, size - margin + 6), f"{tick:.1f}", fill="black")
        draw.text((margin - 30, xy(0, tick)[1] - 6), f"{tick:.1f}", fill="black")
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for start in np.arange(0, 1, 0.04):
        draw.line([xy(start, start), xy(start + 0.02, start + 0.02)], fill="grey")
    draw.line([xy(x, y) for x, y in zip(fpr, tpr, strict=True)], fill=(31, 119, 180), width=3)
    px, py = xy(*point)
    draw.ellipse([px - 6, py - 6, px + 6, py + 6], outline=(214, 39, 40), width=3)
    draw.text((px + 10, py + 4), "model threshold", fill=(214, 39, 40))
    draw.text((margin, 20), f"{title}: AUC {auc:.3f} (95% CI {interval[0]:.3f}-{interval[1]:.3f})", fill="black")
    draw.text((size // 2 - 70, size - 30), "1 - specificity (FPR)", fill="black")
    draw.text((8, margin - 24), "sensitivity (TPR)", fill="black")
    with atomic_output(path, "wb") as handle:
        image.save(handle, format="PNG")
