"""`radscan train`: fit SimSID on a site's normal studies, calibrate it, save a model directory.

Training follows the reference recipe (shared/design/SIMSID.md part B): random shift/scale
augmentation; the discriminator steps every batch and the generator every second batch on the
same forward pass; Adam (betas 0.5/0.999), weight decay and a cosine schedule on the generator.
radscan adds, each measured on validation (docs/research-log.md "Ablation"): variation of the acquisition
(gamma, contrast, blur, noise) so the critic judges anatomy rather than exposure, and snapshot
critics: the discriminators of the last K epochs travel with the model and their z-scored
verdicts are averaged, so the score does not hang on one epoch of the adversarial game.

The saved weights are those of the last epoch, or of the epoch a `--keep` rule chose (`KEEP_RULES`:
by validation AUC, which needs labelled films, or by one of two label-free measures of the feature
density). A calibration split of the normals is never trained on: it gives each
score's mean and spread, the mean normal film and the flag threshold. Labelled validation
images, when given, are only measured, epoch by epoch, into the training log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from radscan.errors import ModelError, NoInputError, OutputError, SettingError
from radscan.ingest import check_outputs_apart, load_images
from radscan.model.config import SimSIDConfig
from radscan.model.density import collimation_copies, framing_copies
from radscan.model.field import lungs_in_box, thorax_box, thorax_field
from radscan.model.io import METADATA_FILE, WEIGHTS_FILE, save_model, sha256_file
from radscan.model.runtime import autocast, iter_batches, score_arrays
from radscan.model.simsid import COMPONENTS, Generated, SimSID, to_model_tensor
from radscan.policy import Policy, for_model
from radscan.qc import DEFAULT_VIEWS, apply_qc, fit_reference, quality_control, save_reference
from radscan.recipe import TrainConfig
from radscan.records import counted
from radscan.report import CsvStream, atomic_output, cannot_write

__all__ = ["TrainConfig", "train", "TrainingResult", "recalibrate"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_LOCK = "train.lock"  # held while a run trains into the folder; removed when it ends
LOG_FILE = "train_log.jsonl"
INPUTS_FILE = "training_inputs.csv"  # every file found among the normals, with its status
SPLIT_FILE = "training_split.csv"  # which normals were trained on and which calibrate
EXPLANATION_NORMAL_QUANTILE = 0.95
MIN_CALIBRATION = 5
FRAMING_COPIES = 2  # framings of each training normal in the feature density's fit (validation: 2 and 4 alike)
COLLIMATION_COPIES = 2  # and collimations (radscan.model.density.COLLIMATION)


@dataclass
class TrainingResult:
    model_dir: Path
    epochs_run: int
    metrics: dict[str, Any] = field(default_factory=dict)
    stopped_by_budget: bool = False


def split_calibration(studies: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the calibration images. Whole studies go to one side when there are enough
    of them (no study in both); a flat folder of images (one "study") is split by image."""
    rng = np.random.default_rng(seed)
    groups = sorted(set(studies))
    if len(groups) >= 20:
        chosen = set(rng.permutation(groups)[: max(1, round(fraction * len(groups)))])
        return np.array([s in chosen for s in studies])
    mask = np.zeros(len(studies), dtype=bool)
    mask[rng.permutation(len(studies))[: max(1, round(fraction * len(studies)))]] = True
    return mask


def augment(images: torch.Tensor, generator: torch.Generator, tcfg: TrainConfig) -> torch.Tensor:
    """Random translation (up to `shift` of the size), zoom and, with `aspect`, a change of the
    width/height ratio (films are squashed to a square from many shapes); nearest neighbour,
    black fill. (B, 1, H, W) in [-1, 1] -> same."""
    b = images.shape[0]
    rand = torch.rand(b, 3, generator=generator).to(images.device)
    zoom = tcfg.scale[0] + (tcfg.scale[1] - tcfg.scale[0]) * rand[:, 0]
    stretch = torch.ones_like(zoom)
    if tcfg.aspect:
        stretch = torch.exp((2 * torch.rand(b, generator=generator).to(images.device) - 1) * math.log1p(tcfg.aspect))
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = 1.0 / (zoom * stretch.sqrt())
    theta[:, 1, 1] = stretch.sqrt() / zoom
    theta[:, :, 2] = (rand[:, 1:] * 2 - 1) * tcfg.shift * 2  # normalised coordinates span 2
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False) - 1


def vary_acquisition(images: torch.Tensor, generator: torch.Generator, tcfg: TrainConfig) -> torch.Tensor:
    """Per-image random gamma, contrast, blur and noise: how exposure, processing and detector
    differ between sites and years. (B, 1, H, W) in [-1, 1] -> same shape and range.

    Without it the critic learns the training site's grey levels along with the anatomy, and a
    normal film from another setting looks abnormal to it (docs/research-log.md "Ablation")."""
    if not (tcfg.gamma or tcfg.contrast or tcfg.blur or tcfg.noise):
        return images
    b, device = images.shape[0], images.device
    draw = torch.rand(b, 5, generator=generator).to(device)
    x = (images + 1) / 2
    if tcfg.gamma:
        x = x.clamp_min(1e-6) ** torch.exp((2 * draw[:, 0] - 1) * math.log1p(tcfg.gamma)).view(b, 1, 1, 1)
    if tcfg.contrast:
        factor = torch.exp((2 * draw[:, 1] - 1) * math.log1p(tcfg.contrast)).view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factor + mean).clamp(0, 1)
    if tcfg.blur:
        sigma = torch.where(draw[:, 2] < 0.5, draw[:, 3] * 2 * tcfg.blur, torch.zeros_like(draw[:, 3]))
        x = _blur_each(x, sigma, radius=max(1, math.ceil(3 * tcfg.blur)))
    if tcfg.noise:
        level = draw[:, 4].view(b, 1, 1, 1) * tcfg.noise
        x = (x + level * torch.randn(x.shape, generator=generator).to(device)).clamp(0, 1)
    return x * 2 - 1


def local_anomalies(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each film with one generic local defect in a soft-edged ellipse: a haze (blur of 2-4 px), a
    brighter or darker region (0.15-0.4 of the grey range), lost contrast (towards the region's
    mean) or added noise. (B, 1, H, W) in [-1, 1] -> same shape and range.

    Shown to the discriminator as fake, next to whole films that vary_acquisition blurred,
    brightened or flattened as real, they teach the critic that a film differing from itself in
    one region is abnormal and one differing from the training site everywhere is not (the
    global-sharpness confound of docs/research-log.md "Robustness to the acquisition"). The defects are generic
    (the family of CutPaste, NSA and DRAEM's synthetic anomalies), not modelled on any test film."""
    b, _, h, w = images.shape
    device = images.device
    draw = torch.rand(b, 8, generator=generator).to(device)
    ys = torch.linspace(-1, 1, h, device=device).view(1, h, 1)
    xs = torch.linspace(-1, 1, w, device=device).view(1, 1, w)
    centre_y, centre_x = (draw[:, 0] * 1.2 - 0.6).view(b, 1, 1), (draw[:, 1] * 1.2 - 0.6).view(b, 1, 1)
    radius_y, radius_x = (0.12 + 0.38 * draw[:, 2]).view(b, 1, 1), (0.12 + 0.38 * draw[:, 3]).view(b, 1, 1)
    distance = ((ys - centre_y) / radius_y) ** 2 + ((xs - centre_x) / radius_x) ** 2
    mask = ((1.3 - distance) / 0.6).clamp(0, 1).unsqueeze(1)  # 1 inside, soft rim, 0 outside
    mask = mask * mask * (3 - 2 * mask)  # smoothstep: no sharp edge for the critic to find
    x = (images + 1) / 2
    kind = (draw[:, 4] * 4).long().view(b, 1, 1, 1)
    strength = draw[:, 5].view(b, 1, 1, 1)
    hazy = _blur_each(x, 2 + 2 * draw[:, 5], radius=12)
    sign = torch.where(draw[:, 6] < 0.5, -1.0, 1.0).view(b, 1, 1, 1)
    shifted = x + sign * (0.15 + 0.25 * strength)
    region_mean = (x * mask).sum(dim=(2, 3), keepdim=True) / mask.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    flattened = region_mean + (x - region_mean) * (0.2 + 0.4 * strength)
    noisy = x + (0.03 + 0.07 * strength) * torch.randn(x.shape, generator=generator).to(device)
    defect = torch.where(kind == 0, hazy, torch.where(kind == 1, shifted, torch.where(kind == 2, flattened, noisy)))
    return ((x + mask * (defect - x)).clamp(0, 1)) * 2 - 1


def _blur_each(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with its own sigma (pixels; 0 = unchanged) for each image."""
    b = images.shape[0]
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    weights = torch.exp(-(offsets**2) / (2 * sigma.clamp_min(1e-3).view(b, 1) ** 2))
    weights = (weights / weights.sum(dim=1, keepdim=True)).view(b, 1, 1, -1)
    flat = F.pad(images.transpose(0, 1), (radius, radius, radius, radius), mode="replicate")  # (1, B, H, W)
    flat = F.conv2d(flat, weights, groups=b)
    return F.conv2d(flat, weights.transpose(-1, -2), groups=b).transpose(0, 1)


class Trainer:
    """The optimisation state of one run: model, optimisers, schedule; checkpointable."""

    def __init__(self, cfg: SimSIDConfig, tcfg: TrainConfig, device: torch.device):
        torch.manual_seed(tcfg.seed)
        self.tcfg, self.device = tcfg, device
        # channels-last convolutions are about 25% faster on the CPU (oneDNN) and on tensor cores
        self.model = SimSID(cfg).to(device, memory_format=torch.channels_last)
        d_params = list(self.model.discriminator.parameters())
        not_generator = {id(p) for p in [*d_params, *self.model.snapshot_critics.parameters()]}
        g_params = [p for p in self.model.parameters() if id(p) not in not_generator]
        self.opt_g = torch.optim.Adam(g_params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.g_weight_decay)
        self.opt_d = torch.optim.Adam(d_params, lr=tcfg.lr, betas=tcfg.betas)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_g, T_max=tcfg.cosine_t_max,
                                                                   eta_min=tcfg.cosine_eta_min)
        self.model.snapshot_critics.requires_grad_(False)

    @torch.no_grad()
    def take_snapshot(self) -> None:
        """Push the discriminator as it is now onto the snapshot critics (newest first, oldest
        dropped). Called before each epoch, so after epoch e the model carries D_e (live) and
        D_{e-1} .. D_{e-K+1}; the snapshots are weights of the model, so checkpoints keep them."""
        critics = self.model.critics
        for newer, older in zip(critics[-2::-1], critics[:0:-1], strict=True):
            older.load_state_dict(newer.state_dict())

    def step(self, batch: torch.Tensor, generator_step: bool,
             anomalies: torch.Tensor | None = None) -> dict[str, float]:
        """One batch: a discriminator step, and a generator step when asked (same forward).
        `anomalies` (the batch with local synthetic defects) are a second kind of fake."""
        t, model = self.tcfg, self.model
        model.train()
        with autocast(self.device):
            out = model.generate(batch)
            d_real = model.discriminator(batch)
            d_fake = model.discriminator(out.student.detach())
            d_loss = t.w_discriminator * (
                F.binary_cross_entropy_with_logits(d_real.float(), torch.ones_like(d_real, dtype=torch.float32))
                + F.binary_cross_entropy_with_logits(d_fake.float(), torch.zeros_like(d_fake, dtype=torch.float32))
            )
            if anomalies is not None:
                d_defect = model.discriminator(anomalies).float()
                d_loss = d_loss + t.w_discriminator * t.synthetic * F.binary_cross_entropy_with_logits(
                    d_defect, torch.zeros_like(d_defect))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        losses = {"d": d_loss.item()}
        if generator_step:
            losses.update(self._generator_step(out, batch))
        return losses

    def _generator_step(self, out: Generated, batch: torch.Tensor) -> dict[str, float]:
        """Student, teacher, distillation and adversarial losses on the discriminator step's forward."""
        t, model = self.tcfg, self.model
        with autocast(self.device):
            student = F.mse_loss(out.student.float(), batch)
            teacher = F.mse_loss(out.teacher.float(), batch)
            distill = sum(F.mse_loss(s.float(), t_.detach().float())
                          for s, t_ in zip(out.student_levels, out.teacher_levels, strict=True))
            fooled = model.discriminator(out.student).float()
            adversarial = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
            g_loss = (t.w_student * student + t.w_teacher * teacher + t.w_distill * distill
                      + t.w_adversarial * adversarial)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        if out.memory_query is not None and model.inpainter is not None:
            model.inpainter.memory.push(out.memory_query)
        return {"g": g_loss.item(), "student": student.item(), "teacher": teacher.item(),
                "distill": distill.item(), "adversarial": adversarial.item()}

    def state(self, epoch: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(), "schedule": self.schedule.state_dict(), "epoch": epoch}

    def restore(self, state: dict[str, Any]) -> int:
        """Load a checkpoint; returns the number of epochs it had completed."""
        self.model.load_state_dict(state["model"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.schedule.load_state_dict(state["schedule"])
        return int(state["epoch"])


def _save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomic and durable: a run killed or a machine losing power mid-write keeps the previous one."""
    with atomic_output(path, "wb") as handle:
        torch.save(state, handle)


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint of an interrupted run. weights_only: a checkpoint is tensors and plain
    containers, and nothing in it is unpickled as code. Raises ModelError (exit 65) for a file that
    is not one (damaged, or replaced by something else)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not {"model", "opt_g", "opt_d", "schedule", "epoch"} <= state.keys():
            raise ValueError("not a radscan training checkpoint")
        return state
    except Exception as exc:  # torch raises many kinds for a damaged file; none is worth a traceback
        raise ModelError(f"the training checkpoint {path} cannot be read ({type(exc).__name__}): delete it to "
                         "train from the start, or choose another --out") from None


def fit_density(model: SimSID, train_images: np.ndarray, seed: int, device: torch.device,
                batch_size: int = 64) -> None:
    """Fit the model's feature density (if it has one) to the training normals ((N, 128, 128)
    uint8), FRAMING_COPIES framings and COLLIMATION_COPIES collimations of each
    (radscan.model.density), with the live discriminator as it is now. Raises ModelError when its
    features are not finite (a diverged discriminator)."""
    if model.density is None:
        return
    generator = torch.Generator().manual_seed(seed)
    parts = []
    with torch.inference_mode():
        for batch in iter_batches(train_images, batch_size):
            films = to_model_tensor(batch, device)
            films = torch.cat([films, framing_copies(films, FRAMING_COPIES, generator),
                               collimation_copies(films, COLLIMATION_COPIES, generator)])
            # copies framed before the field is applied: the field stays where it is, the chest moves
            parts.append(model.density_features(films).cpu())
    try:
        model.density.fit(torch.cat(parts).to(device))
    except ValueError as exc:
        raise ModelError(f"cannot fit the feature density: {exc} (the discriminator diverged?)") from None


def set_thorax_field(model: SimSID, train_images: np.ndarray) -> None:
    """Set the model's thorax field from the mean of the training normals ((N, 128, 128) uint8;
    radscan.model.field). Raises SettingError when the mean shows no lung fields (not frontal chest
    films framed alike: train with --field film)."""
    try:
        field = thorax_field(train_images.mean(axis=0, dtype=np.float64))
    except ValueError as exc:
        raise SettingError(f"cannot find the thorax field: {exc}; or train with --field film") from None
    model.field_mask.copy_(torch.from_numpy(field.astype(np.float32)))
    log.info("thorax field: %.0f%% of the film (the rest is mid grey to the model)", 100 * field.mean())


def find_thorax_box(normals: Sequence[str], model_cfg: SimSIDConfig, policy: Policy, workers: int,
                    progress: bool) -> tuple[SimSIDConfig, Policy, np.ndarray, np.ndarray]:
    """A first pass over the normals, as whole films: the thorax box of their mean film
    (radscan.model.field.thorax_box) set in the model settings and the reading policy, and the lung
    fields as the box shows them ((128, 128) bool, the model's `lung_mask`), and the whole films
    ((N, 128, 128) uint8: quality control's reference is fitted to them, as it judges whole films).
    Every normal serves, the calibration ones too: the box is part of the preprocessing, found
    without labels. Raises SettingError when the mean shows no lung fields."""
    films = load_images(normals, replace(policy, crop=None), workers, progress, label="normals (whole films)")[0]
    mean = films.mean(axis=0, dtype=np.float64)
    try:
        box = thorax_box(mean)
        lungs = lungs_in_box(mean, box, model_cfg.image_size)
    except ValueError as exc:
        raise SettingError(f"cannot find the thorax box: {exc}; or train with --field film") from None
    log.info("thorax box: %.0f-%.0f%% across, %.0f-%.0f%% down the film; lung fields %.0f%% of it",
             100 * box[0], 100 * box[2], 100 * box[1], 100 * box[3], 100 * lungs.mean())
    return replace(model_cfg, crop=box), replace(policy, crop=box), lungs, films


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


def _better(best: dict[str, Any] | None, model: SimSID, epoch: int, metrics: dict[str, float],
            rule: KeepRule) -> dict[str, Any] | None:
    """`best` (weights, epoch, the rule's measure as "auc"), or this epoch's model when its measure is
    better (ties keep the earlier epoch)."""
    value = metrics[rule.measure.format(kind=model.cfg.score_kind)]
    if best is not None and rule.sign * value <= rule.sign * best["auc"]:
        return best
    return {"model": {key: value.detach().clone() for key, value in model.state_dict().items()},
            "epoch": epoch, "auc": float(value)}


def _stop_if_diverged(losses: dict[str, float], epoch: int, batch: int, tcfg: TrainConfig) -> None:
    """A loss that is not finite means the weights are lost (too high a learning rate, or a
    checkpoint whose weights are NaN): stop before anything is saved. Raises ModelError."""
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if bad:
        raise ModelError(f"training diverged in epoch {epoch + 1}, batch {batch + 1}: the "
                         f"{', '.join(f'{name} loss is {value}' for name, value in bad.items())}; no model was "
                         f"written. Start again with a lower --lr (this run: {tcfg.lr:g}) in a new --out")


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
        live = _in_batches(lambda films: model.discriminator(model.restrict(films)), images, batch_size, device)
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


def _in_batches(network: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int,
                device: torch.device) -> torch.Tensor:
    """`network` over (N, 128, 128) uint8 model inputs, batch by batch, without autograd; results
    concatenated as float32 on the CPU."""
    with torch.inference_mode():
        return torch.cat([network(to_model_tensor(batch, device)).float().cpu()
                          for batch in iter_batches(images, batch_size)])


def calibrate(model: SimSID, normals: np.ndarray, batch_size: int, device: torch.device,
              target_specificity: float | None, explanation: bool = True) -> tuple[np.ndarray, torch.Tensor]:
    """Calibrate `model` in place on held-out normal images ((N, 128, 128) uint8):

    1. the mean normal film (the explanation maps' reference);
    2. each critic's negated-logit mean and spread, so the snapshot critics average as z-scores;
    3. mean and spread of every score kind's raw value (each kind's z-score is relative to them);
    4. with `explanation`, per pixel, the 95th percentile of the normals' explanation maps (the
       maps show only what exceeds it);
    5. with a target specificity, the flag threshold: that quantile of the normals' 0..1 scores.

    Returns the normals' 0..1 scores (N,) and raw components (N, 4). Raises NoInputError for fewer
    than MIN_CALIBRATION normals (a spread and a quantile need more than a handful)."""
    if len(normals) < MIN_CALIBRATION:
        raise NoInputError(f"only {len(normals)} usable calibration normals; at least {MIN_CALIBRATION} are needed "
                           "(a few hundred give a threshold that transfers)")
    model.normal_mean.copy_(to_model_tensor(normals.mean(axis=0, dtype=np.float64)[None].astype(np.float32),
                                            model.normal_mean.device)[0, 0])
    with autocast(device):  # the same precision as scoring
        logits = _in_batches(model.critic_logits, normals, batch_size, device)
    model.critic_mean.copy_(logits.mean(0))
    model.critic_std.copy_(logits.std(0).clamp_min(1e-6))
    components = score_arrays(model, normals, batch_size, device).components
    computed = [c for c, kind in enumerate(COMPONENTS) if kind != "density" or model.density is not None]
    if not (components[:, computed].isfinite().all() and model.critic_std.isfinite().all()
            and model.critic_mean.isfinite().all()):
        raise ModelError("the model's scores are not finite on the calibration normals: its weights are lost "
                         "(training diverged: start again with a lower --lr); no model was written")
    # a kind the model cannot compute (NaN: the density of a model without one) keeps mean 0, spread 1
    model.calibration_mean.copy_(components.mean(0).nan_to_num(0.0))
    model.calibration_std.copy_(components.std(0).nan_to_num(1.0).clamp_min(1e-6))
    if explanation:
        model.explanation_normal.zero_()
        maps = score_arrays(model, normals, batch_size, device, explain=True).explanation_maps
        model.explanation_normal.copy_(torch.quantile(maps, EXPLANATION_NORMAL_QUANTILE, dim=0))
    scores = torch.sigmoid(model.calibrated(components)[1]).numpy()
    if target_specificity is not None:
        # the smallest threshold that keeps at least the target share of these normals unflagged
        kept = np.float32(np.quantile(scores, target_specificity, method="higher"))
        model.threshold.fill_(float(np.nextafter(kept, np.float32(np.inf))))
        _warn_if_unsupported(scores, float(model.threshold), target_specificity)
    return scores, components


def _warn_if_unsupported(scores: np.ndarray, threshold: float, target_specificity: float) -> None:
    """A threshold at specificity s is a quantile of the normals' scores: with fewer than 5 normals
    expected above it, it is mostly noise; and ties can make it flag more normals than intended."""
    expected_above = len(scores) * (1 - target_specificity)
    if expected_above < 5:
        log.warning("the threshold rests on %d calibration normals, so only %.1f are expected above it at "
                    "specificity %.2f: it will move a lot with other normals; use at least %d",
                    len(scores), expected_above, target_specificity, int(np.ceil(5 / (1 - target_specificity) - 1e-9)))
    flagged = float((scores >= threshold).mean())
    if flagged > 2 * (1 - target_specificity):
        log.warning("the threshold flags %.0f%% of the calibration normals, more than twice the %.0f%% aimed for",
                    100 * flagged, 100 * (1 - target_specificity))


def train(
    normals: Sequence[str],
    out_dir: Path,
    model_cfg: SimSIDConfig,
    tcfg: TrainConfig | None = None,
    val_normal: Sequence[str] = (),
    val_abnormal: Sequence[str] = (),
    policy: Policy | None = None,
    device: torch.device | None = None,
    workers: int = -1,
    resume: bool = False,
    progress: bool = True,
    name: str | None = None,
    init_from: Path | None = None,
    age_range: tuple[float, float] | None = None,
) -> TrainingResult:
    """Train for `tcfg.epochs` epochs, calibrate the last epoch's model and save it at `out_dir`.

    Validation (labelled abnormal images, with `val_normal` or else the calibration normals as
    the normal class) is measured every epoch into the training log and on the final model into
    its metadata; it never changes the model. `init_from` starts from the weights of an existing
    model directory of the same architecture (to continue training, e.g., the shipped one).

    Raises SettingError (exit 2) for an unfinished run without `resume`, or fewer epochs than critic
    snapshots; NoInputError when there are too few normals for one batch; LockHeldError (exit 75)
    while another run trains into the same `out_dir` (two runs would interleave checkpoints)."""
    from radscan.state import hold_lock

    out_dir = Path(out_dir)
    fresh = not out_dir.exists()
    lock = out_dir / TRAIN_LOCK
    try:
        with hold_lock(lock):
            try:
                return _train(normals, out_dir, model_cfg, tcfg, val_normal, val_abnormal, policy, device, workers,
                              resume, progress, name, init_from, age_range)
            except BaseException:
                _remove_unfinished(out_dir)
                raise
            finally:
                lock.unlink(missing_ok=True)
    finally:
        if fresh:  # a refused or failed first run leaves no folder behind (a folder with files stays)
            with contextlib.suppress(OSError):
                out_dir.rmdir()


def _remove_unfinished(out_dir: Path) -> None:
    """A run that stops before its first checkpoint (refused: too few normals, no lung fields; or
    interrupted) leaves no inventory or split behind: they describe a model that does not exist.
    Called only while holding the run's lock; a checkpoint (to --resume) or a model keeps them."""
    if not (out_dir / CHECKPOINT_FILE).exists() and not (out_dir / METADATA_FILE).exists():
        for name in (INPUTS_FILE, SPLIT_FILE):
            (out_dir / name).unlink(missing_ok=True)


def _train(normals: Sequence[str], out_dir: Path, model_cfg: SimSIDConfig, tcfg: TrainConfig | None,
           val_normal: Sequence[str], val_abnormal: Sequence[str], policy: Policy | None,
           device: torch.device | None, workers: int, resume: bool, progress: bool, name: str | None,
           init_from: Path | None, age_range: tuple[float, float] | None) -> TrainingResult:
    started = time.monotonic()
    tcfg, policy, device = tcfg or TrainConfig(), policy or Policy(), device or torch.device("cpu")
    _refuse_settings(out_dir, model_cfg, tcfg, resume, val_normal, val_abnormal, init_from)
    # a model written among the normals would be read back as training images next time
    check_outputs_apart([*normals, *val_normal, *val_abnormal], [out_dir])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(out_dir, exc) from None
    data = _read_films(normals, out_dir, model_cfg, tcfg, policy, val_normal, val_abnormal, workers, progress)
    log.info("training on %d images, calibrating on %d, device %s", len(data.train_images), len(data.calibration),
             device)
    trainer = Trainer(data.model_cfg, tcfg, device)
    run = _start(trainer, data, out_dir, tcfg, device, resume, init_from)
    _run_epochs(trainer, data, run, out_dir, tcfg, device, progress, started)
    if run.epochs < data.model_cfg.critic_snapshots and init_from is None:
        raise SettingError(f"stopped after {counted(run.epochs, 'epoch')}, fewer than the "
                           f"{data.model_cfg.critic_snapshots} critic snapshots: raise --max-minutes and rerun with "
                           "--resume")
    model = _kept_model(trainer, data, run, tcfg, device)
    metrics, calibration_scores = finalize(model, data.calibration, data.validation, tcfg, device)
    metadata = {
        "name": name or out_dir.name,
        "version": datetime.now(timezone.utc).strftime("%Y.%m.%d-%H%M%S"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "calibration": {"method": f"calibration normals at specificity {tcfg.target_specificity}",
                        "n_calibration": int(len(data.calibration)), "target_specificity": tcfg.target_specificity},
        "training": {
            "inputs": [str(p) for p in normals],
            "n_images": int(len(data.images)), "n_train": int(len(data.train_images)),
            "validation": {"normal": [str(p) for p in val_normal] or ["the calibration normals"],
                           "abnormal": [str(p) for p in val_abnormal]} if data.validation else None,
            "epochs_run": run.epochs,
            "shipped": (f"epoch {run.best['epoch']}: "
                        f"{KEEP_RULES[tcfg.keep].says.format(kind=model.cfg.score_kind)} ({run.best['auc']:.3f})"
                        if run.best else "last epoch"),
            "stopped_by_budget": run.stopped_by_budget, "minutes": round((time.monotonic() - started) / 60, 2),
            "device": str(device), "train_config": asdict(tcfg),
            "init_from": str(init_from) if init_from else None,
        },
        "metrics": metrics,
    }
    if age_range:
        metadata["population"] = {"age_years": list(age_range)}
    # the QC step's reference: what an upright frontal film of this site looks like. Every normal
    # serves (the calibration ones too: its limits are cross-validated), so a site with 50 normals
    # gets one, where the training split alone would fall short of 50
    if len(data.images) >= 50:  # of whole films, whatever part of them the model reads (ingest_file)
        metadata["qc"] = save_reference(fit_reference(data.images if data.whole_films is None else data.whole_films),
                                        out_dir)
    else:
        log.warning("only %d normal images: no QC reference (needs 50); wrong-way-round and non-chest "
                    "images will not be caught when this model scores", len(data.images))
    save_model(model, out_dir, metadata)
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    _write_report(model, out_dir, [name for name, held in zip(data.names, data.is_calibration, strict=True) if held],
                  data.calibration, calibration_scores)
    return TrainingResult(out_dir, run.epochs, metrics, run.stopped_by_budget)


def _refuse_settings(out_dir: Path, model_cfg: SimSIDConfig, tcfg: TrainConfig, resume: bool,
                     val_normal: Sequence[str], val_abnormal: Sequence[str], init_from: Path | None) -> None:
    """Raise SettingError (exit 2) for a run that cannot start: a finished model or an unfinished run
    in `out_dir` (without --resume), or settings that do not fit together."""
    checkpoint_path = out_dir / CHECKPOINT_FILE
    if (out_dir / METADATA_FILE).exists() and not checkpoint_path.exists():
        raise SettingError(f"{out_dir} already holds a trained model: choose another --out (radscan never "
                           "overwrites a model)")
    if checkpoint_path.exists() and not resume:
        raise SettingError(f"{out_dir} holds an unfinished training run: add --resume to continue it, "
                           "or choose another --out")
    if tcfg.keep != "last" and tcfg.keep not in KEEP_RULES:
        raise SettingError(f"keep must be one of last, {', '.join(KEEP_RULES)}, not {tcfg.keep!r}")
    if tcfg.keep == "best" and not val_abnormal:
        raise SettingError("--keep best chooses the epoch by validation AUC: it needs --val-abnormal")
    if tcfg.keep == "synthetic" and model_cfg.score_kind != "density":
        raise SettingError(f"--keep {tcfg.keep} chooses the epoch by the feature density: it needs the density "
                           f"score kind, not {model_cfg.score_kind!r}")
    if val_normal and not val_abnormal:
        raise SettingError("--val-normal needs --val-abnormal (without --val-normal, the calibration normals "
                           "are the validation normals)")
    if tcfg.epochs < model_cfg.critic_snapshots and init_from is None:  # init_from brings trained snapshots
        raise SettingError(f"{counted(tcfg.epochs, 'epoch')} cannot fill {model_cfg.critic_snapshots} critic "
                           "snapshots: train longer or keep fewer snapshots")


@dataclass
class _Films:
    """What a run trains, calibrates and validates on, read as the model will read films."""

    images: np.ndarray  # (N, 128, 128) uint8: every usable normal
    names: list[str]  # their paths relative to the inputs
    is_calibration: np.ndarray  # (N,) bool: held out to calibrate (split by study)
    validation: tuple[np.ndarray, np.ndarray] | None  # (normal, abnormal) films, with --val-abnormal
    model_cfg: SimSIDConfig  # the settings asked for, with a thorax box's crop once found
    lungs: np.ndarray | None  # a thorax-box model's lung fields as its box shows them, (128, 128) bool
    whole_films: np.ndarray | None = None  # a thorax-box model's normals as whole films, for quality control

    @property
    def train_images(self) -> np.ndarray:
        return self.images[~self.is_calibration]

    @property
    def calibration(self) -> np.ndarray:
        return self.images[self.is_calibration]


def _read_films(normals: Sequence[str], out_dir: Path, model_cfg: SimSIDConfig, tcfg: TrainConfig, policy: Policy,
                val_normal: Sequence[str], val_abnormal: Sequence[str], workers: int, progress: bool) -> _Films:
    """Read the normals (listed in INPUTS_FILE), split them by study into training and calibration
    (SPLIT_FILE), and read the validation films. Raises NoInputError when either side of the split
    is too small, SettingError when a thorax field's normals show no lung fields."""
    lungs = whole_films = None
    if model_cfg.field == "thorax-box":  # every film below, validation films too, is read cut to the box
        model_cfg, policy, lungs, whole_films = find_thorax_box(normals, model_cfg, policy, workers, progress)
    images, names, studies = load_images(normals, policy, workers, progress, out_dir / INPUTS_FILE, label="normals")
    is_calibration = split_calibration(studies, tcfg.calibration_fraction, tcfg.seed)
    # study keys are UIDs or absolute folders: a model directory is shared, so it records only a
    # digest of each, enough to see which images went to one side together
    with CsvStream(out_dir / SPLIT_FILE, ("path", "study_key", "split")) as split_csv:
        for path, study, held_out in zip(names, studies, is_calibration, strict=True):
            split_csv.write({"path": path, "study_key": hashlib.sha256(study.encode("utf-8", "surrogateescape"))
                             .hexdigest()[:16], "split": "calibration" if held_out else "train"})
    films = _Films(images, names, is_calibration, None, model_cfg, lungs, whole_films)
    if len(films.train_images) < tcfg.batch_size:
        raise NoInputError(f"only {len(films.train_images)} training images after the calibration split; "
                           f"need at least one batch of {tcfg.batch_size}")
    if len(films.calibration) < MIN_CALIBRATION:  # refused now, not after the epochs (calibrate needs them)
        raise NoInputError(f"only {len(films.calibration)} calibration normals after the split "
                           f"(--calibration-fraction {tcfg.calibration_fraction:g} of {len(images)}); at least "
                           f"{MIN_CALIBRATION} are needed: give more normals or a larger --calibration-fraction")
    if val_abnormal:
        validation_normals = (load_images(val_normal, policy, workers, progress, label="validation normals")[0]
                              if val_normal else films.calibration)
        films.validation = (validation_normals,
                            load_images(val_abnormal, policy, workers, progress, label="validation abnormals")[0])
    return films


@dataclass
class _Run:
    """Where a run stands: epochs completed, and what the epochs leave for the end."""

    epochs: int = 0
    stopped_by_budget: bool = False
    density_fitted: bool = False  # evaluate_epoch fits it to each epoch's weights
    best: dict[str, Any] | None = None  # with a --keep rule: the weights, epoch and measure of the best epoch so far


def _start(trainer: Trainer, films: _Films, out_dir: Path, tcfg: TrainConfig, device: torch.device, resume: bool,
           init_from: Path | None) -> _Run:
    """The weights to start from: a checkpoint to resume (it holds the model's field), an existing
    model's (--init-from), or new ones with the field found from the normals. Raises ModelError for a
    checkpoint that is not this run's, SettingError for an --init-from of another architecture."""
    checkpoint_path = out_dir / CHECKPOINT_FILE
    if resume and checkpoint_path.exists():
        try:
            checkpoint = _load_checkpoint(checkpoint_path, device)
            epochs = trainer.restore(checkpoint)
        except (RuntimeError, ValueError, KeyError) as exc:  # tensors of another preset or settings
            raise ModelError(f"the training checkpoint {checkpoint_path} is of another model ({str(exc)[:120]}): "
                             "resume with the settings it was started with, or choose another --out") from None
        if not 0 <= epochs <= tcfg.epochs:  # edited, or from a run with more epochs: it is not this run
            raise ModelError(f"the training checkpoint {checkpoint_path} says {epochs} epochs were run, outside "
                             f"0..{tcfg.epochs} (--epochs): resume with the --epochs it was started with, or delete it")
        log.info("resumed after epoch %d", epochs)
        return _Run(epochs=epochs, best=checkpoint.get("best") if checkpoint.get("keep", "best") == tcfg.keep
                    and tcfg.keep != "last" else None)
    if init_from is not None:
        from radscan.model.io import load_model

        start, start_metadata = load_model(init_from)
        if start.cfg != films.model_cfg:
            raise SettingError(f"{init_from} has another architecture than the one asked for: use its preset and "
                               "settings (see radscan info)")
        trainer.model.load_state_dict(start.state_dict())
        log.info("starting from the weights of %s (%s)", init_from, start_metadata["weights"]["sha256"][:12])
        return _Run()
    if films.model_cfg.field == "thorax":
        set_thorax_field(trainer.model, films.train_images)
    if films.lungs is not None:
        trainer.model.lung_mask.copy_(torch.from_numpy(films.lungs.astype(np.float32)))
    return _Run()


def _run_epochs(trainer: Trainer, films: _Films, run: _Run, out_dir: Path, tcfg: TrainConfig, device: torch.device,
                progress: bool, started: float) -> None:
    """Train from `run.epochs` to `tcfg.epochs` (or until the time budget), evaluating each epoch into
    the training log and writing a checkpoint after it; updates `run`."""
    budget_s = tcfg.max_minutes * 60 if tcfg.max_minutes else math.inf
    train_images = films.train_images
    tensor_images = torch.from_numpy(train_images)
    batches_per_epoch = len(train_images) // tcfg.batch_size  # drop the ragged last batch
    with open(out_dir / LOG_FILE, "a", encoding="utf-8") as training_log:
        for epoch in range(run.epochs, tcfg.epochs):
            trainer.take_snapshot()
            generator = torch.Generator().manual_seed(tcfg.seed * 100_003 + epoch)
            torch.manual_seed(tcfg.seed * 100_003 + epoch)
            order = torch.randperm(len(train_images), generator=generator)
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            bar = tqdm(range(batches_per_epoch), desc=f"epoch {epoch + 1}/{tcfg.epochs}", unit="batch",
                       leave=False, disable=None if progress else True)
            epoch_started = time.monotonic()
            for index in bar:
                rows = order[index * tcfg.batch_size:(index + 1) * tcfg.batch_size]
                batch = augment(to_model_tensor(tensor_images[rows], device), generator, tcfg)
                batch = trainer.model.restrict(vary_acquisition(batch, generator, tcfg))
                anomalies = trainer.model.restrict(local_anomalies(batch, generator)) if tcfg.synthetic else None
                losses = trainer.step(batch, generator_step=index % tcfg.g_every == tcfg.g_every - 1,
                                      anomalies=anomalies)
                _stop_if_diverged(losses, epoch, index, tcfg)
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                bar.set_postfix({k: f"{sums[k] / counts[k]:.4f}" for k in ("d", "student") if k in sums})
                if time.monotonic() - started > budget_s:
                    run.stopped_by_budget = True
                    break
            bar.close()
            trainer.schedule.step()
            metrics = evaluate_epoch(trainer.model, train_images, films.calibration, films.validation, 64, device,
                                     tcfg.seed)
            run.epochs, run.density_fitted = epoch + 1, True
            record = {"epoch": epoch + 1, "seconds": round(time.monotonic() - epoch_started, 2),
                      "lr": trainer.opt_g.param_groups[0]["lr"],
                      **{f"loss_{k}": sums[k] / counts[k] for k in sums}, **metrics}
            training_log.write(json.dumps(record) + "\n")
            training_log.flush()
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in record.items() if k != "epoch"})
            if tcfg.keep != "last":
                run.best = _better(run.best, trainer.model, epoch + 1, metrics, KEEP_RULES[tcfg.keep])
            _save_checkpoint({**trainer.state(epoch + 1),
                              **({"best": run.best, "keep": tcfg.keep} if run.best else {})},
                             out_dir / CHECKPOINT_FILE)
            if run.stopped_by_budget:
                log.warning("time budget of %.1f minutes reached during epoch %d", tcfg.max_minutes, epoch + 1)
                break


def _kept_model(trainer: Trainer, films: _Films, run: _Run, tcfg: TrainConfig, device: torch.device) -> SimSID:
    """The model to save, in eval mode: the last epoch's, or with --keep best the best epoch's, its
    feature density fitted."""
    model = trainer.model.eval()
    if run.best is not None:  # its density was fitted and its calibration set when it was evaluated
        model.load_state_dict(run.best["model"])
        log.info("keeping epoch %d of %d: %s (%.3f)", run.best["epoch"], run.epochs,
                 KEEP_RULES[tcfg.keep].says.format(kind=model.cfg.score_kind), run.best["auc"])
    elif not run.density_fitted:  # resumed after the last epoch: nothing was fitted in this process
        fit_density(model, films.train_images, tcfg.seed, device)
    return model


def _write_report(model: SimSID, out_dir: Path, names: Sequence[str], calibration: np.ndarray,
                  scores: np.ndarray) -> None:
    """The training report beside the model (radscan.trainreport). The model is saved before: a
    report that cannot be drawn costs a warning, not the trained model."""
    from radscan.trainreport import CALIBRATION_SCORES_FILE, SAMPLES_FILE, draw_samples, write_training_report

    with CsvStream(out_dir / CALIBRATION_SCORES_FILE, ("path", "score")) as table:
        for name, score in zip(names, scores, strict=True):
            table.write({"path": name, "score": round(float(score), 6)})
    try:
        draw_samples(model, calibration[:4], out_dir / SAMPLES_FILE)
        log.info("training report: %s", write_training_report(out_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("the training report could not be drawn (%s): the model is saved; run radscan report %s",
                    exc, out_dir)


def finalize(model: SimSID, calibration: np.ndarray, validation: tuple[np.ndarray, np.ndarray] | None,
             tcfg: TrainConfig, device: torch.device) -> tuple[dict[str, Any], np.ndarray]:
    """Calibrate the final weights with the threshold at the target specificity on the calibration
    normals; with validation data, its AUC and the sensitivity/specificity at that threshold.
    Returns the metrics and the calibration normals' 0..1 scores."""
    cal_scores = calibrate(model, calibration, 64, device, tcfg.target_specificity)[0]
    metrics: dict[str, Any] = {"calibration_specificity": float((cal_scores < float(model.threshold)).mean())}
    if validation is not None:
        normal, abnormal = validation
        scores = score_arrays(model, np.concatenate([normal, abnormal]), 64, device).scores.numpy()
        labels = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
        flagged = scores >= float(model.threshold)
        metrics.update(val_auc=float(roc_auc_score(labels, scores)),
                       val_sensitivity=float(flagged[labels == 1].mean()),
                       val_specificity=float(1 - flagged[labels == 0].mean()))
    return metrics, cal_scores


def recalibrate(model_dir: Path, normals: Sequence[str], out_dir: Path | None, target_specificity: float,
                policy: Policy | None = None, workers: int = -1, device: torch.device | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Re-derive a model's score scale and threshold from a site's own normal images (never from
    images it will be evaluated on), writing the model to `out_dir` (default: in place)."""
    import shutil

    from radscan.model.io import load_model

    device = device or torch.device("cpu")
    check_outputs_apart(normals, [out_dir or model_dir])
    model, metadata = load_model(model_dir, device)
    # the normals a threshold is set on are the films the model would score: what quality control
    # rejects when scoring (turned, inverted, foreign) is not one of them
    qc = quality_control(Path(model_dir), metadata, "strict", DEFAULT_VIEWS)
    images, names, _ = load_images(normals, for_model(policy or Policy(), metadata), workers, progress,
                                   label="calibration normals",
                                   judge=lambda records, films: apply_qc(qc, records, films))
    scores = calibrate(model, images, 64, device, target_specificity)[0]
    out_dir = Path(out_dir or model_dir)
    if out_dir.resolve() != Path(model_dir).resolve():
        try:
            shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
        except (OSError, shutil.Error) as exc:
            raise OutputError(f"cannot write the recalibrated model to {out_dir}: {exc}") from None
    kept = {k: v for k, v in metadata.items()
            if k not in ("format", "radscan_version", "preprocess_version", "config", "parameters", "weights",
                         "previous_version")}  # recalibrated_from names the one predecessor
    # a recalibrated model scores differently: it is another version of the model
    kept["version"] = datetime.now(timezone.utc).strftime("%Y.%m.%d-%H%M%S")
    kept["recalibrated_from"] = {"version": metadata.get("version"), "sha256": metadata["weights"]["sha256"]}
    kept["calibration"] = {"method": f"{len(images)} normals at specificity {target_specificity}",
                           "n_calibration": len(images), "target_specificity": target_specificity,
                           "normals": [str(p) for p in normals],
                           "recalibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    specificity = float((scores < float(model.threshold)).mean())
    # figures taken at the old threshold no longer describe the model; AUCs do not depend on it
    kept["metrics"] = {**{k: v for k, v in metadata.get("metrics", {}).items() if "auc" in k},
                       "calibration_specificity": specificity}
    try:
        save_model(model, out_dir, kept)
    except OSError as exc:
        raise OutputError(f"cannot write the recalibrated model to {out_dir}: {exc.strerror or exc}") from None
    _describe_recalibration(model, out_dir, names, scores, metadata)
    return {"model": str(out_dir), "n_calibration": len(images), "threshold": float(model.threshold),
            "calibration_specificity": specificity}


def _describe_recalibration(model: SimSID, out_dir: Path, names: Sequence[str], scores: np.ndarray,
                            before: dict[str, Any]) -> None:
    """Make the model directory tell one story after `recalibrate`: the calibration scores and the
    training report redrawn with the new normals and threshold, and a model card (README.md), when
    there is one, headed by what changed. The model is saved before: a description that cannot be
    written costs a warning."""
    from radscan.trainreport import CALIBRATION_SCORES_FILE, write_training_report

    threshold = float(model.threshold)
    try:
        with CsvStream(out_dir / CALIBRATION_SCORES_FILE, ("path", "score")) as table:
            for name, score in zip(names, scores, strict=True):
                table.write({"path": name, "score": round(float(score), 6)})
        write_training_report(out_dir)
        card = out_dir / "README.md"
        if card.is_file():
            old = float(before.get("calibration", {}).get("threshold", float("nan")))
            notice = (f"> **Recalibrated** on {len(names)} normals of a site "
                      f"({datetime.now(timezone.utc).date().isoformat()}, `radscan calibrate`): threshold "
                      f"**{threshold:.4f}** (was {old:.4f}), weights sha256 `{sha256_file(out_dir / WEIGHTS_FILE)}`, "
                      "version in `model.json`. Everything below describes the model before, version "
                      f"{before.get('version')} (its threshold, weights sha256, flagged shares, sensitivity and "
                      "specificity); AUCs do not depend on the threshold.\n\n")
            text = card.read_text(encoding="utf-8")
            title, _, rest = text.partition("\n\n")
            with atomic_output(card, "w") as handle:
                handle.write(f"{title}\n\n{notice}{rest}")
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("the recalibrated model was saved, but its report could not be redrawn: %s", exc)
