"""Every size and switch of the SimSID model, in one dataclass, with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from radscan.preprocess import is_box

__all__ = ["SimSIDConfig", "PRESETS", "preset", "SCORE_KINDS", "COMPONENTS", "FIELDS", "DEVICES"]

# where a model may run (`--device`; radscan.model.runtime.resolve_device): torch-free, for the command line
DEVICES = ("auto", "cpu", "cuda", "mps")

# The anomaly scores a model can report (high = anomalous), each z-scored on held-out normals.
SCORE_KINDS: dict[str, str] = {
    "critic": "the discriminator's verdict on the film itself, -D(I): how little it looks like the normal "
              "chests of training (averaged over the critics of the last epochs' snapshots)",
    "seed": "the discriminator's verdict on the student's reconstruction, -D(G_s(E(I))): the seed "
            "report's score, kept for comparison",
    "residual": "the mean absolute difference between the film and the student's reconstruction",
    "density": "how unlikely the critic's features of each region of the film are under a Gaussian model of "
               "the same region in the training normals (PaDiM-style), averaged over the regions: one "
               "discriminator pass, and a map of the regions that raise it",
}

# the columns of every kind's raw score (ScoreResult.components, the exported explain graph's output), in
# SCORE_KINDS order; models saved before "density" have three (radscan.model.io pads them)
COMPONENTS = tuple(SCORE_KINDS)

# What the networks see of a film (radscan.model.field).
FIELDS: dict[str, str] = {
    "film": "the whole film",
    "thorax": "the thorax of the training normals' mean film (lung fields, mediastinum and a margin); the rest "
              "is set to mid grey before the networks see the film, in training and scoring alike",
    "thorax-box": "the bounding box of the thorax of the training normals' mean film, cut from every film at its "
                  "own resolution and resized to 128 px (the chest gets more pixels, the film's edge none); the "
                  "density is averaged over the regions of the lung fields only",
}


@dataclass(frozen=True)
class SimSIDConfig:
    """Hyper-parameters of SimSID (Xiang et al., TPAMI 2024); defaults are the reference preset.

    Shapes for the reference: a 128x128 image is cut into a 2x2 grid of 64x64 patches; each patch
    is encoded to 512x4x4; the in-painting block works on 2048-d vectors (128 channels x 4 x 4).
    """

    image_size: int = 128
    patch_grid: int = 2  # patches per side (2 -> four 64x64 patches)
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)  # encoder stages; the first keeps resolution
    # in-painting block
    inpaint: bool = True  # False: the student decodes encoder features (ablation)
    inpaint_channels: int = 128  # bottleneck is projected to this many channels before the memory
    memory_slots: int = 200
    memory_topk: int = 4  # slots that survive the sparse read
    memory_kind: str = "queue"  # "queue": FIFO of recent training features; "learned": parameters
    memory_levels: tuple[str, ...] = ("patch",)  # add "image" for a memory shared by all patches
    attention_heads: int = 8
    ffn_dim: int = 512
    position_bits: int = 3  # binary code of the patch index, as constant channels
    mask_ratio: float = 1.0  # training: probability that a location takes the in-painted value
    # decoder memories (student only), one per sub-window position, at the two skip levels
    decoder_memory: bool = True
    decoder_memory_slots: int = 200
    decoder_windows: int = 2  # each patch map is cut into 2x2 sub-windows
    # discriminator
    d_widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    d_norm: str = "instance"  # "instance": per-sample (batch-invariant); "batch": BN, scored with running stats
    critic_blur_sigma: float = 0.0  # pixels, fixed Gaussian low-pass in front of the discriminator (0: none)
    # the critic's input with its fine detail (finer than a 1 px Gaussian) scaled to this mean absolute
    # value, model units (training normals: about 0.03), so that overall sharpness is no cue (0: as it is)
    critic_detail: float = 0.0
    # scoring (see SCORE_KINDS)
    score_kind: str = "critic"
    critic_snapshots: int = 1  # discriminators of the last K epochs whose z-scored critics are averaged
    critic_view_shift: float = 0.05  # fraction of the size: the critic averages 4 diagonally shifted views (0: none)
    # the feature density model (score kind "density"): a Gaussian per region of a grid x grid layout of the
    # critic's features from these stages (0 = the first convolution's output); grid 0: no density model
    density_grid: int = 0
    density_stages: tuple[int, ...] = (1, 2, 3)
    # what the networks see (FIELDS); the thorax is found when training starts and stored with the weights
    field: str = "film"
    # the box of field "thorax-box" as fractions of the film (left, top, right, bottom); found when training
    # starts (radscan.model.field.thorax_box), part of the preprocessing (radscan.preprocess.to_model_input)
    crop: tuple[float, ...] = ()
    # a thorax-box model's box follows the chest: moved per film to where its chest lies against the training
    # normals' mean film (radscan.preprocess.chest_offset; the reference is FOLLOW_FILE beside the weights)
    follow: bool = False
    # a box that follows the chest also chooses the film it is cut from: the image, or the image less its
    # padding (edge lines of one grey level), whichever the chest matches better (radscan.preprocess.film_bounds;
    # rule 20), before quality control, the box and the networks see it; models made before it read the image
    trim_padding: bool = False
    residual_blur_sigma: float = 2.0  # pixels, Gaussian blur of the residual map
    explanation_blur_sigma: float = 4.0  # pixels, Gaussian blur of the explanation map (regions, not pixels)

    def __post_init__(self) -> None:
        if self.image_size % (self.patch_grid * 2 ** (len(self.widths) - 1)):
            raise ValueError("image_size must be divisible by patch_grid * 2**(len(widths)-1)")
        if self.memory_kind not in ("queue", "learned"):
            raise ValueError(f"memory_kind must be 'queue' or 'learned', not {self.memory_kind!r}")
        if not set(self.memory_levels) <= {"patch", "image"} or not self.memory_levels:
            raise ValueError("memory_levels must be a non-empty subset of ('patch', 'image')")
        if self.d_norm not in ("instance", "batch"):
            raise ValueError(f"d_norm must be 'instance' or 'batch', not {self.d_norm!r}")
        if self.field not in FIELDS:
            raise ValueError(f"unknown field {self.field!r} (choose from {', '.join(FIELDS)})")
        if self.crop and self.field != "thorax-box":
            raise ValueError(f"a crop is a thorax-box model's setting, not a {self.field!r} field's")
        if self.follow and self.field != "thorax-box":
            raise ValueError(f"a box that follows the chest is a thorax-box model's setting, not a {self.field!r} "
                             "field's (radscan train: --fixed-box with --field film)")
        if not isinstance(self.trim_padding, bool):
            raise ValueError(f"trim_padding must be true or false, not {self.trim_padding!r}")
        if self.trim_padding and not self.follow:
            raise ValueError("trim_padding is a setting of a box that follows the chest (the chest decides what is "
                             "padding): radscan train without --fixed-box")
        if self.crop and not is_box(self.crop):
            raise ValueError(f"crop must be four fractions (left, top, right, bottom), not {self.crop!r}")
        if self.score_kind not in SCORE_KINDS:
            raise ValueError(f"unknown score_kind {self.score_kind!r} (choose from {', '.join(SCORE_KINDS)})")
        if not isinstance(self.critic_snapshots, int) or self.critic_snapshots < 1:
            raise ValueError("critic_snapshots must be a whole number >= 1")
        if not 0 <= self.critic_blur_sigma <= 8:
            raise ValueError("critic_blur_sigma must be in [0, 8] pixels")
        if not 0 <= self.critic_detail <= 0.5:
            raise ValueError("critic_detail must be in [0, 0.5]")
        if not 0 <= self.critic_view_shift < 0.5:
            raise ValueError("critic_view_shift must be in [0, 0.5)")
        if not self.density_stages or not set(self.density_stages) <= set(range(len(self.d_widths))):
            raise ValueError(f"density_stages must be discriminator stages in 0..{len(self.d_widths) - 1}")
        sides = [self.image_size // 2 ** (stage + 1) for stage in self.density_stages]
        if self.density_grid < 0 or any(side % self.density_grid for side in sides if self.density_grid):
            raise ValueError(f"density_grid must be 0 or divide the side of every density stage's map ({sides})")
        if self.score_kind == "density" and not self.density_grid:
            raise ValueError("score_kind 'density' needs a density model (density_grid > 0)")
        if 2**self.position_bits < self.patches:
            raise ValueError(f"position_bits={self.position_bits} cannot number {self.patches} patches")
        if self.memory_topk > min(self.memory_slots, self.decoder_memory_slots):
            raise ValueError("memory_topk must not exceed the number of memory slots")
        if self.inpaint_dim % self.attention_heads:
            raise ValueError("the in-painting width must be divisible by attention_heads")

    @property
    def patches(self) -> int:
        return self.patch_grid**2

    @property
    def patch_size(self) -> int:
        return self.image_size // self.patch_grid

    @property
    def bottleneck_size(self) -> int:
        """Side of the encoder's bottleneck map per patch (4 for 64x64 patches)."""
        return self.patch_size // 2 ** (len(self.widths) - 1)

    @property
    def inpaint_dim(self) -> int:
        """Length of the vector the memory and attention work on (2048 for the reference)."""
        return self.inpaint_channels * self.bottleneck_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SimSIDConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown model settings: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


PRESETS: dict[str, SimSIDConfig] = {
    # The published architecture (ZhangLab configuration), without its unused 2048x2048 conv.
    "reference": SimSIDConfig(),
    # A CPU-trainable model: quarter widths, 512-d in-painting, 100-slot memories.
    "small": SimSIDConfig(
        widths=(16, 32, 64, 128, 256),
        inpaint_channels=32,
        memory_slots=100,
        attention_heads=4,
        ffn_dim=256,
        decoder_memory_slots=100,
        d_widths=(8, 16, 32, 64, 128),
    ),
    # The smallest useful model: eighth widths, 256-d in-painting; for quick CPU runs and tests.
    "tiny": SimSIDConfig(
        widths=(8, 16, 32, 64, 128),
        inpaint_channels=16,
        memory_slots=100,
        attention_heads=4,
        ffn_dim=128,
        decoder_memory_slots=100,
        d_widths=(8, 16, 32, 64, 128),
    ),
}


def preset(name: str, **overrides: Any) -> SimSIDConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return replace(PRESETS[name], **overrides)

