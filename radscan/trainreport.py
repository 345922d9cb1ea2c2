"""The training report: what a research group looks at to judge a model it trained.

`radscan train` writes it into the model directory, and `radscan report MODEL_DIR` redraws it from
the files there (train_log.jsonl, model.json, calibration_scores.csv, training_samples.png):

- training_curves.png: every loss the trainer has, per epoch (discriminator, adversarial,
  student, teacher, distillation), as in the method's report (seed-report chapter 5);
- training_fidelity.png: the reconstructions' mean squared error and the KL divergence between
  the grey-level histograms of inputs and reconstructions (held-out calibration normals), and the
  validation AUC of every score kind per epoch when labelled validation data was given;
- calibration_histogram.png: the calibration normals' scores with the flag threshold;
- training_samples.png (made at training time, when the images are at hand): calibration normals
  with the teacher's and the student's reconstructions on the patch grid, the difference,
  and the memory slots one patch was rebuilt from;
- training_report.html: all of them with warnings in plain words.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radscan.report import atomic_output

if TYPE_CHECKING:  # torch only where a model is drawn: `radscan report` redraws from files without it
    import torch

__all__ = ["reconstruction_fidelity", "draw_samples", "write_training_report", "CALIBRATION_SCORES_FILE",
           "SAMPLES_FILE"]

log = logging.getLogger(__name__)

CALIBRATION_SCORES_FILE = "calibration_scores.csv"
SAMPLES_FILE = "training_samples.png"
REPORT_FILE = "training_report.html"
LOSSES = {"d": "discriminator", "adversarial": "adversarial (generator)", "student": "student reconstruction (MSE)",
          "teacher": "teacher reconstruction (MSE)", "distill": "distillation (teacher -> student)"}
MIN_CALIBRATION_ADVISED = 100
HISTOGRAM_BINS = 64


def reconstruction_fidelity(inputs: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, float]:
    """Mean squared error (grey range 0..1) and KL(inputs || reconstructions) of the grey-level
    histograms (HISTOGRAM_BINS bins over 0..1, pooled over the batch, +1e-6 smoothing), for
    (B, 1, H, W) tensors in the model range -1..1: how closely, and with which grey levels, the
    generator redraws normal films (the method's report measures both)."""
    import torch

    x, y = ((t.float().clamp(-1, 1) + 1) / 2 for t in (inputs, reconstructions))
    p = torch.histc(x, bins=HISTOGRAM_BINS, min=0.0, max=1.0) + 1e-6
    q = torch.histc(y, bins=HISTOGRAM_BINS, min=0.0, max=1.0) + 1e-6
    p, q = p / p.sum(), q / q.sum()
    return {"mse": float(((x - y) ** 2).mean()), "kl": float((p * (p / q).log()).sum())}


def draw_samples(model: Any, images: np.ndarray, path: Path, patch: tuple[int, int] = (1, 1)) -> None:
    """training_samples.png from up to four calibration normals ((N, 128, 128) uint8): rows of
    input, teacher reconstruction, student reconstruction (from the in-painted features; the
    patch grid drawn) and |input - student|; below, the memory slots that patch `patch` (row, column)
    of the first film was read from and their weights."""
    import torch
    from matplotlib.figure import Figure

    from radscan.model.simsid import split_patches, to_model_tensor

    batch = to_model_tensor(images[:4], next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(batch)
        weights = None
        if model.inpainter is not None:
            features = model.encoder(split_patches(batch, model.cfg.patch_grid))[-1]
            query = model.inpainter.project(features).reshape(len(batch), model.cfg.patches, model.cfg.inpaint_dim)
            weights = _memory_weights(model.inpainter.memory, query)
    grid = model.cfg.patch_grid
    rows = [("input", batch), ("teacher", out.teacher), ("student (in-painted)", out.student),
            ("|input - student|", (batch - out.student).abs() - 1)]
    figure = Figure(figsize=(2.2 * len(batch), 2.2 * len(rows) + 2.2), dpi=90, layout="constrained")
    panels = figure.subfigures(2, 1, height_ratios=[len(rows), 1.1])
    axes = panels[0].subplots(len(rows), len(batch), squeeze=False)
    side = batch.shape[-1]
    for r, (title, tensor) in enumerate(rows):
        for c in range(len(batch)):
            ax = axes[r][c]
            ax.imshow(tensor[c, 0].float().cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=9)
            if r == 2:
                for k in range(1, grid):
                    ax.axhline(k * side / grid - 0.5, color="#1a73e8", linewidth=0.6)
                    ax.axvline(k * side / grid - 0.5, color="#1a73e8", linewidth=0.6)
    top, left = patch
    axes[2][0].add_patch(_square(left * side / grid - 0.5, top * side / grid - 0.5, side / grid))
    ax = panels[1].subplots()
    if weights is not None:
        index = patch[0] * grid + patch[1]
        row = weights[0, index].float().cpu().numpy()
        chosen = np.flatnonzero(row > 0)
        ax.bar([str(s) for s in chosen], row[chosen], color="#1a73e8")
        ax.set(xlabel=f"memory slot of patch row {patch[0] + 1}, column {patch[1] + 1} of {grid} (outlined above)",
               ylabel="read weight", title="the normal-anatomy memory slots this patch was rebuilt from")
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "this model has no in-painting memory", ha="center")
    with atomic_output(path, "wb") as handle:
        figure.savefig(handle, format="png")


def _square(x: float, y: float, size: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), size, size, fill=False, edgecolor="#d93025", linewidth=1.5)


def _memory_weights(memory: Any, query: torch.Tensor) -> torch.Tensor | None:
    """The sparse read weights (B, P, S) of the per-position ("patch") memory, or None without one."""
    from radscan.model.memory import sparse_read

    bank = memory.banks["patch"] if "patch" in memory.banks else None
    return None if bank is None else sparse_read(query, bank.slots.to(query.dtype), bank.topk)[1]


def _read_log(model_dir: Path) -> list[dict[str, Any]]:
    path = model_dir / "train_log.jsonl"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _calibration_scores(model_dir: Path) -> np.ndarray:
    path = model_dir / CALIBRATION_SCORES_FILE
    if not path.exists():
        return np.empty(0)
    with open(path, newline="", encoding="utf-8") as handle:
        return np.array([float(row["score"]) for row in csv.DictReader(handle)])


def warnings_for(metadata: dict[str, Any], epochs: list[dict[str, Any]], n_calibration: int) -> list[str]:
    """What a reader must know before trusting the model: a small calibration set, another score
    kind that validated better than the chosen one, a run stopped early."""
    notes = []
    if n_calibration and n_calibration < MIN_CALIBRATION_ADVISED:
        notes.append(f"The threshold rests on {n_calibration} calibration normals: with fewer than "
                     f"{MIN_CALIBRATION_ADVISED} it moves a lot with other normals; train on more normals or "
                     "recalibrate on a site's own (radscan calibrate).")
    chosen = metadata.get("config", {}).get("score_kind", "critic")
    last = epochs[-1] if epochs else {}
    aucs = {key[len("val_auc_"):]: value for key, value in last.items() if key.startswith("val_auc_")
            and key != "val_auc_critic_live"}
    if chosen in aucs:
        better = {kind: auc for kind, auc in aucs.items() if auc > aucs[chosen] + 0.01}
        for kind, auc in better.items():
            notes.append(f"On the validation data, the {kind} score (AUC {auc:.3f}) beat the chosen {chosen} score "
                         f"(AUC {aucs[chosen]:.3f}) at the last epoch.")
    elif epochs and "val_auc" not in metadata.get("metrics", {}):  # measured since by radscan evaluate, or not
        notes.append("No labelled validation data was given (--val-abnormal): the report cannot say how well the "
                     "model ranks abnormal films.")
    training = metadata.get("training", {})
    shipped = str(training.get("shipped", "last epoch"))
    if shipped != "last epoch":
        keep = training.get("train_config", {}).get("keep", "best")
        notes.append(f"The model is that of {shipped} (radscan train --keep {keep}), not of the last epoch shown "
                     "below" + (": the validation data chose it, so its validation figures are optimistic; measure "
                                "it on other films (radscan evaluate)." if keep == "best" else
                                ", chosen without labels."))
    not_used = (metadata.get("training") or {}).get("inputs_not_used") or {}
    if not_used:
        said = {"error": "could not be read", "rejected": "were rejected by quality control",
                "skipped": "were skipped (not a film to train on)"}
        parts = [f"{count} {said.get(status, status)}" for status, count in not_used.items()]
        notes.append(f"{sum(not_used.values())} of the files given as normals were not trained on: "
                     f"{', '.join(parts)} (training_inputs.csv gives each with its reason).")
    if metadata.get("training", {}).get("stopped_by_budget"):
        notes.append("Training stopped at its time budget (--max-minutes), before the planned epochs.")
    if "qc" not in metadata:
        notes.append("No quality control reference (it needs at least 50 normals): films the wrong way round and "
                     "images that are not chest films will not be caught when this model scores.")
    recalibrated = metadata.get("recalibrated_from")
    if recalibrated:
        calibration = metadata.get("calibration", {})
        notes.append(f"Recalibrated (radscan calibrate, {calibration.get('recalibrated_at', '')}) on "
                     f"{calibration.get('n_calibration', '?')} normals, from version {recalibrated.get('version')}: "
                     "the threshold and the calibration histogram are the new ones; the curves and validation "
                     "figures are the training run's.")
    return notes


def write_training_report(model_dir: Path, out_dir: Path | None = None) -> Path:
    """Draw the figures and the page for the model in `model_dir` into `out_dir` (default: the
    model directory) and return the page's path. Raises ModelError (exit 65) when model.json is
    missing or unreadable."""
    from radscan.htmlreport import write_training_html
    from radscan.model.metadata import read_metadata

    model_dir = Path(model_dir)
    out_dir = Path(out_dir or model_dir)
    metadata = read_metadata(model_dir)
    epochs = _read_log(model_dir)
    calibration = _calibration_scores(model_dir)
    threshold = float(metadata["calibration"]["threshold"])
    figures = {}
    if epochs:
        _save(_loss_figure(epochs), out_dir / "training_curves.png")
        _save(_fidelity_figure(epochs), out_dir / "training_fidelity.png")
        figures.update(curves="training_curves.png", fidelity="training_fidelity.png")
    if len(calibration):
        _save(_calibration_figure(calibration, threshold), out_dir / "calibration_histogram.png")
        figures["calibration"] = "calibration_histogram.png"
    samples = model_dir / SAMPLES_FILE
    if samples.exists():
        figures["samples"] = SAMPLES_FILE if out_dir.resolve() == model_dir.resolve() else str(samples.resolve())
    n_calibration = int(metadata.get("calibration", {}).get("n_calibration") or len(calibration))
    page = out_dir / REPORT_FILE
    write_training_html(page, metadata, epochs[-1] if epochs else {}, figures,
                        warnings_for(metadata, epochs, n_calibration), len(epochs))
    return page


def _loss_figure(epochs: list[dict[str, Any]]):
    from matplotlib.figure import Figure

    present = [key for key in LOSSES if f"loss_{key}" in epochs[0]]
    figure = Figure(figsize=(9, 2.2 * ((len(present) + 1) // 2) + 0.4), dpi=90, layout="constrained")
    axes = figure.subplots((len(present) + 1) // 2, 2, squeeze=False).ravel()
    x = [e["epoch"] for e in epochs]
    for ax, key in zip(axes, present, strict=False):
        ax.plot(x, [e.get(f"loss_{key}", np.nan) for e in epochs], color="#1a73e8")
        ax.set(title=LOSSES[key], xlabel="epoch", yscale="log")
        ax.grid(alpha=0.3)
    for ax in axes[len(present):]:
        ax.set_axis_off()
    return figure


def _fidelity_figure(epochs: list[dict[str, Any]]):
    from matplotlib.figure import Figure

    x = [e["epoch"] for e in epochs]
    kinds = sorted({k[len("val_auc_"):] for e in epochs for k in e if k.startswith("val_auc_")})
    figure = Figure(figsize=(9, 3.0), dpi=90, layout="constrained")
    left, middle, right = figure.subplots(1, 3)
    left.plot(x, [e.get("calibration_mse", np.nan) for e in epochs], color="#1a73e8")
    left.set(title="reconstruction MSE (grey 0..1)", xlabel="epoch")
    middle.plot(x, [e.get("calibration_kl", np.nan) for e in epochs], color="#e37400")
    middle.set(title="KL divergence of grey histograms", xlabel="epoch")
    for kind in kinds:
        right.plot(x, [e.get(f"val_auc_{kind}", np.nan) for e in epochs], label=kind)
    synthetic = [e.get("synthetic_auc_density", np.nan) for e in epochs]
    if np.isfinite(synthetic).any():  # what --keep synthetic chooses by: no labels
        right.plot(x, synthetic, color="black", linestyle="--", label="density, synthetic defects")
    right.axhline(0.5, color="grey", linestyle=":")
    right.set(title="validation AUC by score kind", xlabel="epoch", ylim=(0, 1))
    if right.get_lines()[:-1]:
        right.legend(fontsize=7)
    for ax in (left, middle, right):
        ax.grid(alpha=0.3)
        if not any(np.isfinite(line.get_ydata()).any() for line in ax.get_lines() if len(line.get_ydata()) > 2):
            ax.text(0.5, 0.5, "not recorded\nby this training run", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    return figure


def _calibration_figure(scores: np.ndarray, threshold: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.0), dpi=90, layout="constrained")
    ax = figure.add_subplot()
    ax.hist(scores, bins=np.linspace(0, 1, 41), color="#1a73e8", alpha=0.8,
            label=f"calibration normals ({len(scores)})")
    ax.axvline(threshold, color="black", linestyle="--",
               label=f"threshold {threshold:.3f} ({(scores >= threshold).mean():.1%} above)")
    ax.set(xlabel="anomaly score (0-1)", ylabel="images", title="held-out normals and the flag threshold")
    ax.legend(fontsize=8, loc="upper left")
    return figure


def _save(figure, path: Path) -> None:
    with atomic_output(path, "wb") as handle:
        figure.savefig(handle, format="png")
