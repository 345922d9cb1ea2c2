"""The default recipe of `radscan train`: what the shipped model was made with, in one place.

`radscan train NORMALS --out DIR` with no other option trains this recipe; the CLI's defaults and
help are read from here, and the model card's command is this one plus paths. Every value was
chosen on validation data (docs/research-log.md "Ablation"). Imports nothing heavy: `radscan --help` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TrainConfig", "PRESET", "MODEL_SETTINGS"]

PRESET = "tiny"  # the architecture (radscan.model.config.PRESETS); 30 epochs, 1,000 films: ~16 min on 2 cores
# settings over the preset: five snapshot critics; the score is the feature density of the last epoch's
# critic on an 8 x 8 grid of regions (docs/model.md "Score kinds"), over the lung fields of the thorax's
# bounding box, cut from each film (docs/model.md "The thorax box"; chosen by rule 4 of
# docs/research-log.md "2026-12-04 (evening)", with r1 below), the box moved with each film's chest
# (radscan.preprocess.chest_offset; rules 10-12 of docs/research-log.md "2026-12-05 (eighth)"). Not
# `trim_padding` (the chest deciding what is padding): it mends padded films on every seed, but over three
# children's seeds the shift benchmark's worst change fell 0.012, past its rule's 0.01 (rule 20b, "2026-12-06
# (rule 20b, the children's part)")
MODEL_SETTINGS: dict[str, Any] = {"critic_snapshots": 5, "density_grid": 8, "score_kind": "density",
                                  "field": "thorax-box", "follow": True}


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained. The defaults are the recipe of the shipped model (docs/research-log.md "Ablation":
    recipe C, 30 epochs at lr 1e-3 with the cosine over the same 30, acquisition and aspect
    augmentation; the R1 penalty from "2026-12-04 (evening)"), so `radscan train NORMALS --out DIR`
    makes what was validated."""

    epochs: int = 30
    batch_size: int = 16
    max_minutes: float | None = None  # a time budget: no epoch begun that would end past it
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    g_weight_decay: float = 1e-5
    cosine_t_max: int = 30  # epochs
    cosine_eta_min: float = 1e-5
    # the discriminator's learning rate: "constant" (the shipped recipe), or "cosine", annealed as the
    # generator's is, so that the critic's features stop moving as the generator settles
    d_schedule: str = "constant"
    g_every: int = 2  # generator step every second batch, on the same forward pass
    w_student: float = 10.0
    w_teacher: float = 0.01
    w_distill: float = 0.001
    w_adversarial: float = 0.005
    w_discriminator: float = 0.005
    shift: float = 0.05  # augmentation: translation, fraction of the image size
    scale: tuple[float, float] = (0.95, 1.05)
    aspect: float = 0.15  # width/height ratio changed by a factor drawn log-uniformly in [1/(1+a), 1+a]
    # augmentation of the acquisition (see vary_acquisition); 0 turns each off
    gamma: float = 0.3  # gamma drawn log-uniformly in [1/(1+g), 1+g]
    contrast: float = 0.3  # contrast factor drawn log-uniformly in [1/(1+c), 1+c], about the image mean
    blur: float = 1.0  # on half the images, a Gaussian blur of sigma uniform in [0, 2 * blur] pixels (mean blur)
    noise: float = 0.02  # Gaussian noise of standard deviation uniform in [0, noise] (image range 0..1)
    # weight of a third discriminator term: films with one local synthetic anomaly count as fake
    # (see local_anomalies); 0 turns it off
    synthetic: float = 0.0
    # R1 penalty (Mescheder et al. 2018, "Which training methods for GANs do actually converge?"): the
    # discriminator's squared input gradient on real films, times r1 / 2, added to its loss; it makes the
    # adversarial game settle instead of circling and stops the critic from keying on pixel-level detail
    # (0 turns it off; 1 with the thorax box passed rule 4 of docs/research-log.md "2026-12-04 (evening)")
    r1: float = 1.0
    # which epoch's model is kept: the "last", the "best" by the validation AUC of the model's score kind
    # (needs labelled validation abnormals; the epoch is then chosen on them, so judge it on other films),
    # or without labels by the density's AUC on synthetic defects ("synthetic"; radscan.epochs.KEEP_RULES)
    keep: str = "last"
    calibration_fraction: float = 0.15
    # a regular expression whose match in a file's name (its first group, if it has one) names the
    # patient, for films whose headers name none (JPEG, PNG): the calibration split then keeps each
    # patient's films on one side (None: DICOM studies, else folders, else single files)
    patient_pattern: str | None = None
    target_specificity: float = 0.95
    seed: int = 0
