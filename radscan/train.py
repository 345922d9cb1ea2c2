"""`radscan train`: fit SimSID on a site's normal studies, calibrate it, save a model directory.

Training follows the reference recipe (shared/design/SIMSID.md part B): random shift/scale
augmentation; the discriminator steps every batch and the generator every second batch on the
same forward pass; Adam (lr 1e-4, betas 0.5/0.999), weight decay and a cosine schedule on the
generator. A calibration split of the normals is never trained on: it gives the score's mean and
spread and the flag threshold.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from radscan.errors import NoInputError, RadscanError
from radscan.ingest import load_images
from radscan.model.config import SimSIDConfig
from radscan.model.io import save_model
from radscan.model.runtime import autocast, score_arrays
from radscan.model.simsid import Generated, SimSID, to_model_tensor
from radscan.policy import Policy
from radscan.report import CsvStream

__all__ = ["TrainConfig", "train", "TrainingResult", "recalibrate"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "checkpoint_best.pt"
LOG_FILE = "train_log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 300
    batch_size: int = 16
    max_minutes: float | None = None  # a time budget: stop after the iteration that crosses it
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    g_weight_decay: float = 1e-5
    cosine_t_max: int = 300  # epochs
    cosine_eta_min: float = 1e-5
    g_every: int = 2  # generator step every second batch, on the same forward pass
    w_student: float = 10.0
    w_teacher: float = 0.01
    w_distill: float = 0.001
    w_adversarial: float = 0.005
    w_discriminator: float = 0.005
    shift: float = 0.05  # augmentation: translation, fraction of the image size
    scale: tuple[float, float] = (0.95, 1.05)
    calibration_fraction: float = 0.15
    target_specificity: float = 0.95
    ema_decay: float | None = None  # validate and ship an exponential moving average of the weights
    seed: int = 0


@dataclass
class TrainingResult:
    model_dir: Path
    epochs_run: int
    best_epoch: int
    selection: str
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


def augment(images: torch.Tensor, generator: torch.Generator, shift: float, scale: tuple[float, float]) -> torch.Tensor:
    """Random translation (up to `shift` of the size) and zoom, nearest neighbour, black fill."""
    b = images.shape[0]
    rand = torch.rand(b, 3, generator=generator).to(images.device)
    zoom = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / zoom
    theta[:, :, 2] = (rand[:, 1:] * 2 - 1) * shift * 2  # normalised coordinates span 2
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False) - 1


class Trainer:
    """The optimisation state of one run: model, optimisers, schedule; checkpointable."""

    def __init__(self, cfg: SimSIDConfig, tcfg: TrainConfig, device: torch.device):
        torch.manual_seed(tcfg.seed)
        self.tcfg, self.device = tcfg, device
        # channels-last convolutions are about 25% faster on the CPU (oneDNN) and on tensor cores
        self.model = SimSID(cfg).to(device, memory_format=torch.channels_last)
        d_params = list(self.model.discriminator.parameters())
        d_ids = {id(p) for p in d_params}
        g_params = [p for p in self.model.parameters() if id(p) not in d_ids]
        self.opt_g = torch.optim.Adam(g_params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.g_weight_decay)
        self.opt_d = torch.optim.Adam(d_params, lr=tcfg.lr, betas=tcfg.betas)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_g, T_max=tcfg.cosine_t_max,
                                                                   eta_min=tcfg.cosine_eta_min)
        # The adversarial game moves the discriminator's view of "real" from batch to batch, so the
        # score of a single snapshot is noisy; an average of the weights is the usual remedy.
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if tcfg.ema_decay else None

    @property
    def evaluated(self) -> SimSID:
        """The weights that are validated, calibrated and shipped: the average when there is one."""
        return self.ema if self.ema is not None else self.model

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        for averaged, live in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            averaged.lerp_(live, 1.0 - self.tcfg.ema_decay)
        for averaged, live in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            averaged.copy_(live)  # normalisation statistics and the memory queue follow the live model

    def sync_ema(self) -> None:
        """Restart the average from the live weights (after loading weights from elsewhere)."""
        if self.ema is not None:
            self.ema.load_state_dict(self.model.state_dict())

    def step(self, batch: torch.Tensor, generator_step: bool) -> dict[str, float]:
        """One batch: a discriminator step, and a generator step when asked (same forward)."""
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
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        losses = {"d": d_loss.item()}
        if generator_step:
            losses.update(self._generator_step(out, batch))
        self._update_ema()
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

    def state(self, epoch: int, best: dict[str, Any]) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "opt_g": self.opt_g.state_dict(),
                 "opt_d": self.opt_d.state_dict(), "schedule": self.schedule.state_dict(),
                 "epoch": epoch, "best": best}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.model.load_state_dict(state["model"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        return int(state["epoch"]), dict(state["best"])


def _save_checkpoint(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    # weights_only: a checkpoint is tensors and plain containers; nothing is unpickled as code.
    return torch.load(path, map_location=device, weights_only=True)


def evaluate_epoch(model: SimSID, calibration: np.ndarray, validation: tuple[np.ndarray, np.ndarray] | None,
                   batch_size: int, device: torch.device) -> dict[str, float]:
    """Calibration statistics, and validation AUC of every score kind when labelled data is given."""
    model.eval()
    components = calibrate(model, calibration, batch_size, device, target_specificity=None)[1]
    metrics = {"calibration_discriminator_mean": float(components[:, 0].mean()),
               "calibration_residual_mean": float(components[:, 1].mean())}
    if validation is not None:
        normal, abnormal = validation
        components = score_arrays(model, np.concatenate([normal, abnormal]), batch_size, device).components
        labels = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
        for kind, z in model.z_scores(components).items():
            metrics[f"val_auc_{kind}"] = float(roc_auc_score(labels, z.numpy()))
    return metrics


def calibrate(model: SimSID, normals: np.ndarray, batch_size: int, device: torch.device,
              target_specificity: float | None) -> tuple[np.ndarray, torch.Tensor]:
    """Set the score's mean/std from held-out normals and, with a target specificity, the flag
    threshold as that quantile of their scores. Returns their scores and raw components."""
    components = score_arrays(model, normals, batch_size, device).components
    model.calibration_mean.copy_(components.mean(0))
    model.calibration_std.copy_(components.std(0).clamp_min(1e-6))
    scores = torch.sigmoid(model.calibrated(components)[1]).numpy()
    if target_specificity is not None:
        # the smallest threshold that keeps at least the target share of these normals unflagged
        kept = np.float32(np.quantile(scores, target_specificity, method="higher"))
        model.threshold.fill_(float(np.nextafter(kept, np.float32(np.inf))))
    return scores, components


def _youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


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
) -> TrainingResult:
    """Train, select the best epoch, calibrate and save a model directory at `out_dir`.

    `init_from` starts from the weights of an existing model directory of the same architecture
    (to continue training a model, e.g. the shipped one, on more epochs or a site's normals)."""
    started = time.monotonic()
    tcfg, policy, device = tcfg or TrainConfig(), policy or Policy(), device or torch.device("cpu")
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT_FILE
    if checkpoint_path.exists() and not resume:
        raise RadscanError(f"{out_dir} holds an unfinished training run: add --resume to continue it, "
                           "or choose another --out")
    if bool(val_normal) != bool(val_abnormal):
        raise RadscanError("--val-normal and --val-abnormal go together")
    out_dir.mkdir(parents=True, exist_ok=True)

    images, names, studies = load_images(normals, policy, workers, progress, out_dir / "training_inputs.csv",
                                         label="normals")
    is_calibration = split_calibration(studies, tcfg.calibration_fraction, tcfg.seed)
    with CsvStream(out_dir / "training_split.csv", ("path", "study_key", "split")) as split_csv:
        for path, study, held_out in zip(names, studies, is_calibration, strict=True):
            split_csv.write({"path": path, "study_key": study, "split": "calibration" if held_out else "train"})
    train_images, calibration = images[~is_calibration], images[is_calibration]
    if len(train_images) < tcfg.batch_size:
        raise NoInputError(f"only {len(train_images)} training images after the calibration split; "
                           f"need at least one batch of {tcfg.batch_size}")
    validation = None
    if val_normal:
        validation = (load_images(val_normal, policy, workers, progress, label="validation normals")[0],
                      load_images(val_abnormal, policy, workers, progress, label="validation abnormals")[0])
    log.info("training on %d images, calibrating on %d, device %s", len(train_images), len(calibration), device)

    trainer = Trainer(model_cfg, tcfg, device)
    if init_from is not None and not resume:
        from radscan.model.io import load_model

        start, start_metadata = load_model(init_from)
        if start.cfg != model_cfg:
            raise RadscanError(f"{init_from} has another architecture than the one asked for: use its preset and "
                               "settings (see radscan info)")
        trainer.model.load_state_dict(start.state_dict())
        trainer.sync_ema()
        log.info("starting from the weights of %s (%s)", init_from, start_metadata["weights"]["sha256"][:12])
    start_epoch, best = 0, {"epoch": -1, "metric": None, "state": None}
    if resume and checkpoint_path.exists():
        start_epoch, best = trainer.restore(_load_checkpoint(checkpoint_path, device))
        if (out_dir / BEST_FILE).exists():
            best["state"] = _load_checkpoint(out_dir / BEST_FILE, device)
        log.info("resumed after epoch %d", start_epoch)
    selection = f"val_auc_{model_cfg.score_kind}" if validation else "calibration_residual_mean"
    higher_is_better = validation is not None
    budget_s = tcfg.max_minutes * 60 if tcfg.max_minutes else math.inf
    stopped_by_budget = False
    epoch = start_epoch
    tensor_images = torch.from_numpy(train_images)
    batches_per_epoch = len(train_images) // tcfg.batch_size  # drop the ragged last batch

    with open(out_dir / LOG_FILE, "a", encoding="utf-8") as training_log:
        for epoch in range(start_epoch, tcfg.epochs):
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
                batch = augment(to_model_tensor(tensor_images[rows], device), generator, tcfg.shift, tcfg.scale)
                losses = trainer.step(batch, generator_step=index % tcfg.g_every == tcfg.g_every - 1)
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                bar.set_postfix({k: f"{sums[k] / counts[k]:.4f}" for k in ("d", "student") if k in sums})
                if time.monotonic() - started > budget_s:
                    stopped_by_budget = True
                    break
            bar.close()
            trainer.schedule.step()
            metrics = evaluate_epoch(trainer.evaluated, calibration, validation, 64, device)
            record = {"epoch": epoch + 1, "seconds": round(time.monotonic() - epoch_started, 2),
                      "lr": trainer.opt_g.param_groups[0]["lr"],
                      **{f"loss_{k}": sums[k] / counts[k] for k in sums}, **metrics}
            training_log.write(json.dumps(record) + "\n")
            training_log.flush()
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in record.items() if k != "epoch"})
            value = metrics[selection]
            if best["metric"] is None or (value > best["metric"] if higher_is_better else value < best["metric"]):
                weights = trainer.evaluated.state_dict()
                best = {"epoch": epoch + 1, "metric": value,
                        "state": copy.deepcopy({k: v.detach().cpu() for k, v in weights.items()})}
                _save_checkpoint(best["state"], out_dir / BEST_FILE)
            _save_checkpoint(trainer.state(epoch + 1, {k: v for k, v in best.items() if k != "state"}),
                             checkpoint_path)
            if stopped_by_budget:
                log.warning("time budget of %.1f minutes reached during epoch %d", tcfg.max_minutes, epoch + 1)
                break

    model = trainer.evaluated
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    metrics = finalize(model, calibration, validation, tcfg, device)
    metadata = {
        "name": name or out_dir.name,
        "version": datetime.now(timezone.utc).strftime("%Y.%m.%d-%H%M%S"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "calibration": {"method": metrics.pop("threshold_method"), "n_calibration": int(len(calibration)),
                        "target_specificity": tcfg.target_specificity},
        "training": {
            "inputs": [str(p) for p in normals],
            "n_images": int(len(images)), "n_train": int(len(train_images)),
            "validation": {"normal": [str(p) for p in val_normal], "abnormal": [str(p) for p in val_abnormal]},
            "epochs_run": epoch + 1, "best_epoch": best["epoch"], "selection": selection,
            "stopped_by_budget": stopped_by_budget, "minutes": round((time.monotonic() - started) / 60, 2),
            "device": str(device), "train_config": asdict(tcfg),
            "init_from": str(init_from) if init_from else None,
        },
        "metrics": metrics,
    }
    save_model(model, out_dir, metadata)
    for leftover in (checkpoint_path, out_dir / BEST_FILE):
        leftover.unlink(missing_ok=True)
    return TrainingResult(out_dir, epoch + 1, best["epoch"], selection, metrics, stopped_by_budget)


def finalize(model: SimSID, calibration: np.ndarray, validation: tuple[np.ndarray, np.ndarray] | None,
             tcfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Calibrate the chosen weights and set the threshold: on validation data when given (Youden's
    J), else at the target specificity on the calibration normals."""
    cal_scores = calibrate(model, calibration, 64, device, tcfg.target_specificity)[0]
    metrics: dict[str, Any] = {"threshold_method": f"calibration normals at specificity {tcfg.target_specificity}"}
    if validation is not None:
        normal, abnormal = validation
        scores = score_arrays(model, np.concatenate([normal, abnormal]), 64, device).scores.numpy()
        labels = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
        model.threshold.fill_(_youden_threshold(scores, labels))
        metrics["threshold_method"] = "validation set, Youden's J"
        metrics["val_auc"] = float(roc_auc_score(labels, scores))
        flagged = scores >= float(model.threshold)
        metrics["val_sensitivity"] = float(flagged[labels == 1].mean())
        metrics["val_specificity"] = float(1 - flagged[labels == 0].mean())
    metrics["calibration_specificity"] = float((cal_scores < float(model.threshold)).mean())
    return metrics


def recalibrate(model_dir: Path, normals: Sequence[str], out_dir: Path | None, target_specificity: float,
                policy: Policy | None = None, workers: int = -1, device: torch.device | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Re-derive a model's score scale and threshold from a site's own normal images (never from
    images it will be evaluated on), writing the model to `out_dir` (default: in place)."""
    import shutil

    from radscan.model.io import load_model

    device = device or torch.device("cpu")
    model, metadata = load_model(model_dir, device)
    images = load_images(normals, policy or Policy(), workers, progress, label="calibration normals")[0]
    scores = calibrate(model, images, 64, device, target_specificity)[0]
    out_dir = Path(out_dir or model_dir)
    if out_dir.resolve() != Path(model_dir).resolve():
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    kept = {k: v for k, v in metadata.items()
            if k not in ("format", "radscan_version", "preprocess_version", "config", "parameters", "weights")}
    kept["calibration"] = {"method": f"{len(images)} normals at specificity {target_specificity}",
                           "n_calibration": len(images), "target_specificity": target_specificity,
                           "normals": [str(p) for p in normals],
                           "recalibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    specificity = float((scores < float(model.threshold)).mean())
    # figures taken at the old threshold no longer describe the model; AUCs do not depend on it
    kept["metrics"] = {**{k: v for k, v in metadata.get("metrics", {}).items() if "auc" in k},
                       "calibration_specificity": specificity}
    save_model(model, out_dir, kept)
    return {"model": str(out_dir), "n_calibration": len(images), "threshold": float(model.threshold),
            "calibration_specificity": specificity}
