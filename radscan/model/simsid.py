"""SimSID: space-aware memory, feature in-painting, teacher/student generators and a discriminator.

Implemented from the description in Xiang et al., "Exploiting Structural Consistency of Chest
Anatomy for Unsupervised Anomaly Detection in Radiography Images", IEEE TPAMI 2024 (SimSID), and
shared/design/SIMSID.md. No code of the published implementation is used.

Data flow for the reference preset (B images, P = 4 patches):

    image (B, 1, 128, 128) -> patches (B*P, 1, 64, 64) -> Encoder -> 32@64, 64@32, 128@16, 256@8, 512@4
    bottleneck 512@4 -> Inpainter (memory + attention over neighbours) -> 512@4
    student Decoder(in-painted, skips 256@8 and 128@16, decoder memories) -> (B, 1, 128, 128)
    teacher Decoder(detached bottleneck and skips, no memories)          -> (B, 1, 128, 128)
    Discriminator(image) -> one logit per image (high = looks real)

Scoring (radscan's choice, measured on validation; see docs/model.md "Score kinds"): the discriminator,
trained to tell normal films from reconstructions, learns features of what a normal chest looks
like. The default score ("density") asks how unlikely each region of the film is in those
features, under a Gaussian of the same region fitted to the training normals (radscan.model.density);
the discriminator's own verdict ("critic", averaged over snapshots and views) judges sharpness
first and is kept as a component.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from radscan.model.config import COMPONENTS, SimSIDConfig
from radscan.model.density import FeatureDensity, upsample_regions
from radscan.model.memory import MemoryBank, SpaceAwareMemory

__all__ = ["SimSID", "Generated", "ScoreResult", "COMPONENTS", "to_model_tensor"]


def to_model_tensor(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 128, 128) uint8 model inputs (see `radscan.preprocess`) -> (B, 1, 128, 128) in [-1, 1]."""
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    return (batch.float() / 127.5 - 1.0).unsqueeze(1)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ResBlock(nn.Module):
    """conv3x3-BN-ReLU (changes width/stride), then a residual unit conv-BN-ReLU-conv-BN, add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.entry = _conv_bn_relu(cin, cout, stride=stride)
        self.body = nn.Sequential(
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        return F.relu(x + self.body(x))


def split_patches(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*P, C, H/grid, W/grid), patches row-major, P fastest."""
    b, c, h, w = images.shape
    p = h // grid
    return images.reshape(b, c, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5).reshape(b * grid * grid, c, p, p)


def merge_patches(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """Inverse of `split_patches`."""
    n, c, p, _ = patches.shape
    b = n // (grid * grid)
    return patches.reshape(b, grid, grid, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * p, grid * p)


class Encoder(nn.Module):
    """Residual stages; the first keeps the resolution, each later one halves it."""

    def __init__(self, cfg: SimSIDConfig):
        super().__init__()
        widths = cfg.widths
        self.stages = nn.ModuleList(
            ResBlock(1 if i == 0 else widths[i - 1], width, stride=1 if i == 0 else 2)
            for i, width in enumerate(widths)
        )

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """(B*P, 1, p, p) -> the output of every stage, finest first."""
        features = []
        for stage in self.stages:
            patches = stage(patches)
            features.append(patches)
        return features


class Inpainter(nn.Module):
    """Rebuilds each patch's bottleneck from memory reads of its 8 grid neighbours (zero-padded),
    attended to by the patch's own projected feature, plus a binary code of its position."""

    def __init__(self, cfg: SimSIDConfig):
        super().__init__()
        self.cfg = cfg
        dim, channels = cfg.inpaint_dim, cfg.inpaint_channels
        self.project = _conv_bn_relu(cfg.widths[-1], channels, kernel=1)
        self.memory = SpaceAwareMemory(cfg.patches, cfg.memory_slots, dim, cfg.memory_kind, cfg.memory_topk,
                                       cfg.memory_levels)
        self.attention = NeighbourAttention(dim, cfg.attention_heads)
        self.norm_attention = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.ReLU(inplace=True),
                                          nn.Linear(cfg.ffn_dim, dim))
        self.norm_feed_forward = nn.LayerNorm(dim)
        self.restore = _conv_bn_relu(channels + cfg.position_bits, cfg.widths[-1], kernel=1)
        self.register_buffer("neighbours", _grid_neighbours(cfg.patch_grid), persistent=False)
        self.register_buffer("position_code", _position_code(cfg), persistent=False)

    def forward(self, bottleneck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*P, C, s, s) -> in-painted (B*P, C, s, s) and the projected features (B, P, D) that
        training pushes into a queue memory."""
        cfg = self.cfg
        n, _, side, _ = bottleneck.shape
        b = n // cfg.patches
        query = self.project(bottleneck).reshape(b, cfg.patches, cfg.inpaint_dim)
        reads = self.memory(query)  # (B, P, D)
        padded = torch.cat([reads, reads.new_zeros(b, 1, cfg.inpaint_dim)], dim=1)
        context = padded[:, self.neighbours].reshape(n, 8, cfg.inpaint_dim)  # (B*P, 8, D)
        attended = self.attention(query.reshape(n, -1), context)
        hidden = F.relu(self.norm_attention(attended + reads.reshape(n, -1)))
        hidden = F.relu(self.norm_feed_forward(hidden + self.feed_forward(hidden)))
        hidden = hidden.reshape(n, cfg.inpaint_channels, side, side)
        code = self.position_code.repeat(b, 1, 1, 1).to(hidden.dtype)
        inpainted = self.restore(torch.cat([hidden, code], dim=1))
        if self.training and cfg.mask_ratio < 1.0:  # masked shortcut: some locations keep the encoder value
            keep = torch.rand(n, 1, side, side, device=bottleneck.device) < cfg.mask_ratio
            inpainted = torch.where(keep, inpainted, bottleneck)
        return inpainted, query


class NeighbourAttention(nn.Module):
    """Multi-head attention of one query per patch over its neighbours' memory reads.

    Written out rather than nn.MultiheadAttention: its fused inference kernel gives a sample a
    slightly different result depending on its position in the batch, and radscan's scores must
    not depend on the batch at all. Same parameters and arithmetic as the standard layer.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """query (N, D), context (N, K, D) -> (N, D)."""
        n, k, dim = context.shape
        head = dim // self.heads
        q = self.query(query).view(n, self.heads, 1, head)
        keys, values = self.key_value(context).view(n, k, 2, self.heads, head).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q * head**-0.5) @ keys.transpose(-1, -2), dim=-1)  # (N, H, 1, K)
        return self.out((weights @ values).reshape(n, dim))


def _grid_neighbours(grid: int) -> torch.Tensor:
    """(P, 8) indices of each patch's 8 neighbours; P (one past the last) marks padding."""
    pad = grid * grid
    table = []
    for row in range(grid):
        for col in range(grid):
            table.append([
                (row + dr) * grid + (col + dc) if 0 <= row + dr < grid and 0 <= col + dc < grid else pad
                for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)
            ])
    return torch.tensor(table, dtype=torch.long)


def _position_code(cfg: SimSIDConfig) -> torch.Tensor:
    """(P, bits, s, s): patch index in binary, one constant channel per bit."""
    bits = [[(index >> bit) & 1 for bit in range(cfg.position_bits)] for index in range(cfg.patches)]
    code = torch.tensor(bits, dtype=torch.float32)[:, :, None, None]
    return code.expand(-1, -1, cfg.bottleneck_size, cfg.bottleneck_size).contiguous()


class DecoderMemory(nn.Module):
    """Cuts each patch's feature map into w x w sub-windows; every sub-window position has a
    learned memory shared by all patches, whose sparse read replaces the features."""

    def __init__(self, channels: int, side: int, cfg: SimSIDConfig):
        super().__init__()
        self.windows = cfg.decoder_windows
        window = side // self.windows
        self.bank = MemoryBank(self.windows**2, cfg.decoder_memory_slots, channels * window * window,
                               "learned", cfg.memory_topk)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, c, side, _ = features.shape
        w, window = self.windows, side // self.windows
        tiles = features.reshape(n, c, w, window, w, window).permute(0, 2, 4, 1, 3, 5).reshape(n, w * w, -1)
        read = self.bank(tiles)
        return read.reshape(n, w, w, c, window, window).permute(0, 3, 1, 4, 2, 5).reshape(n, c, side, side)


class Decoder(nn.Module):
    """Up-path: two skip levels per patch (with optional decoder memories), merge the patches,
    then full-image levels up to the input size; tanh output in [-1, 1]."""

    def __init__(self, cfg: SimSIDConfig, memories: bool):
        super().__init__()
        w, side = cfg.widths, cfg.bottleneck_size
        self.grid = cfg.patch_grid
        self.skip_blocks = nn.ModuleList([ResBlock(w[-1] + w[-2], w[-2]), ResBlock(w[-2] + w[-3], w[-3])])
        self.memories = nn.ModuleList(
            [DecoderMemory(w[-2], side * 2, cfg), DecoderMemory(w[-3], side * 4, cfg)] if memories else []
        )
        self.image_blocks = nn.ModuleList(ResBlock(w[i], w[i - 1]) for i in range(len(w) - 3, 0, -1))
        self.head = nn.Conv2d(w[0], 1, 1)

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """bottleneck (B*P, C, s, s), skips [finer: (B*P, ., 4s, 4s), coarser: (B*P, ., 2s, 2s)]
        -> image (B, 1, H, W) and the feature map of each level (for distillation)."""
        levels = []
        x = bottleneck
        for index, (block, skip) in enumerate(zip(self.skip_blocks, reversed(skips), strict=True)):
            x = block(torch.cat([_upsample(x), skip], dim=1))
            if self.memories:
                x = self.memories[index](x)
            levels.append(x)
        x = merge_patches(x, self.grid)
        for block in self.image_blocks:
            x = block(_upsample(x))
            levels.append(x)
        return torch.tanh(self.head(x)), levels


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class Discriminator(nn.Module):
    """Five 5x5 stride-2 convolutions with LeakyReLU(0.2), normalised from the second on, and a
    linear layer to one logit. "instance" normalisation makes each image's logit independent of
    the rest of its batch; "batch" is the reference's BatchNorm (scored with running statistics).

    With `critic_blur_sigma` > 0 the critic sees its input through a fixed Gaussian low-pass
    (replicated edges). Reconstructions are smoother than films, so an unrestricted critic learns
    sharpness as its main cue, and a normal film that is a little softer (another detector, another
    resizing) then looks as abnormal as pneumonia (docs/research-log.md "Robustness to the acquisition")."""

    def __init__(self, cfg: SimSIDConfig):
        super().__init__()
        self.register_buffer("low_pass", _gaussian_kernel(cfg.critic_blur_sigma) if cfg.critic_blur_sigma else
                             torch.ones(1, 1, 1, 1), persistent=False)
        self.detail = cfg.critic_detail
        self.register_buffer("detail_kernel", _gaussian_kernel(1.0), persistent=False)
        layers: list[nn.Module] = []
        cin = 1
        for index, cout in enumerate(cfg.d_widths):
            layers.append(nn.Conv2d(cin, cout, 5, 2, 2, bias=index == 0))
            if index:
                norm = nn.InstanceNorm2d(cout, affine=True) if cfg.d_norm == "instance" else nn.BatchNorm2d(cout)
                layers.append(norm)
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.d_widths)
        self.logit = nn.Linear(cfg.d_widths[-1] * side * side, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B,) logits, high = real."""
        return self.logit(self.stages(images)[-1].flatten(1)).squeeze(1)

    def stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, H, W) -> the output of every stage (after its activation), finest first: what the
        verdict is made from, and what the feature density model (radscan.model.density) describes."""
        if self.detail:
            images = self._equalise_detail(images)
        if self.low_pass.shape[-1] > 1:
            radius = self.low_pass.shape[-1] // 2
            images = F.conv2d(F.pad(images, (radius,) * 4, mode="replicate"), self.low_pass.to(images.dtype))
        outputs = []
        for layer in self.features:
            images = layer(images)
            if isinstance(layer, nn.LeakyReLU):
                outputs.append(images)
        return outputs


    def _equalise_detail(self, images: torch.Tensor) -> torch.Tensor:
        """Each image's fine detail (the image minus its 1 px Gaussian blur) scaled to a mean
        absolute value of `critic_detail` (gain 0.25-4): a softer or sharper acquisition, or a
        smoother reconstruction, stops being a cue; where the detail is (or is missing) still is."""
        radius = self.detail_kernel.shape[-1] // 2
        smooth = F.conv2d(F.pad(images, (radius,) * 4, mode="replicate"), self.detail_kernel.to(images.dtype))
        detail = images - smooth
        energy = detail.abs().mean(dim=(1, 2, 3), keepdim=True)
        return smooth + detail * (self.detail / energy.clamp_min(1e-6)).clamp(0.25, 4.0)


class Generated(NamedTuple):
    student: torch.Tensor  # (B, 1, H, W)
    teacher: torch.Tensor | None
    student_levels: list[torch.Tensor]
    teacher_levels: list[torch.Tensor]
    memory_query: torch.Tensor | None  # (B, P, D), for the queue memory


class ScoreResult(NamedTuple):
    scores: torch.Tensor  # (B,) sigmoid of the configured kind's z-score, in 0..1, high = anomalous
    raw_scores: torch.Tensor  # (B,) the configured kind before calibration, high = anomalous
    explanation_maps: torch.Tensor  # (B, H, W) >= 0: where the film raises the score (see SimSID._score_chunk)
    residual_maps: torch.Tensor  # (B, H, W) smoothed |input - student reconstruction|, in 0..2
    components: torch.Tensor  # (B, 4) raw scores of every kind, columns in COMPONENTS order (NaN: not computed)



# Images per model call when scoring: CPU, GPU (larger chunks keep a GPU busy).
_SCORE_CHUNK = (16, 128)


class SimSID(nn.Module):
    """The whole model. `generate` is for training; `score` is the frozen inference API."""

    def __init__(self, cfg: SimSIDConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.inpainter = Inpainter(cfg) if cfg.inpaint else None
        self.student = Decoder(cfg, memories=cfg.decoder_memory)
        self.teacher = Decoder(cfg, memories=False)
        self.discriminator = Discriminator(cfg)
        # Frozen copies of the discriminator from the epochs before the last (newest first): the
        # adversarial game moves any one critic's view from epoch to epoch; their average does not.
        self.snapshot_critics = nn.ModuleList(Discriminator(cfg) for _ in range(cfg.critic_snapshots - 1))
        # the live discriminator's features, region by region, against the training normals' (fitted after training)
        self.density = FeatureDensity(cfg) if cfg.density_grid else None
        # Calibration travels with the weights (all set by radscan.calibration.calibrate on held-out normals):
        # each critic's logit mean/spread, then mean/spread of every score kind's raw value, the flag
        # threshold on the 0..1 score, the mean normal film (the explanation's reference) and, per
        # pixel, the 95th percentile of the normals' explanation maps (what a normal film shows).
        critics = cfg.critic_snapshots
        self.register_buffer("critic_mean", torch.zeros(critics))
        self.register_buffer("critic_std", torch.ones(critics))
        self.register_buffer("calibration_mean", torch.zeros(len(COMPONENTS)))
        self.register_buffer("calibration_std", torch.ones(len(COMPONENTS)))
        self.register_buffer("threshold", torch.tensor(0.5))
        self.register_buffer("normal_mean", torch.zeros(cfg.image_size, cfg.image_size))
        self.register_buffer("explanation_normal", torch.zeros(cfg.image_size, cfg.image_size))
        # the thorax field (cfg.field "thorax"): 1 inside, 0 outside; set by radscan.train from the training
        # normals' mean film before the first epoch, stored and sealed with the weights (radscan.model.field)
        if cfg.field == "thorax":
            self.register_buffer("field_mask", torch.ones(cfg.image_size, cfg.image_size))
        # the thorax box (cfg.field "thorax-box"; the box itself is cut in preprocessing): 1 on the lung fields
        # of the training normals' mean film as the box shows them, where the density is averaged and its
        # map drawn; set by radscan.train, stored and sealed with the weights (radscan.model.field.lungs_in_box)
        if cfg.field == "thorax-box":
            self.register_buffer("lung_mask", torch.ones(cfg.image_size, cfg.image_size))
        self.register_buffer("blur_kernel", _gaussian_kernel(cfg.residual_blur_sigma), persistent=False)
        self.register_buffer("explanation_kernel", _gaussian_kernel(cfg.explanation_blur_sigma), persistent=False)
        # the same smoothing as (size, size) matrices (`smooth`)
        self.register_buffer("blur_band", _band(self.blur_kernel, cfg.image_size), persistent=False)
        self.register_buffer("explanation_band", _band(self.explanation_kernel, cfg.image_size), persistent=False)

    @property
    def critics(self) -> list[Discriminator]:
        """The live discriminator, then the snapshots, newest first."""
        return [self.discriminator, *self.snapshot_critics]

    def restrict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [-1, 1] -> the same with everything outside the model's field set to 0 (mid
        grey); the films themselves for a model that sees the whole film. Idempotent, so every entry
        point applies it (generate, the critics, the density, score) and the training step too."""
        if self.cfg.field != "thorax":  # the whole film, or a thorax box already cut in preprocessing
            return images
        return images * self.field_mask.to(images)

    def generate(self, images: torch.Tensor, with_teacher: bool = True) -> Generated:
        """(B, 1, H, W) in [-1, 1] -> student (and teacher) reconstructions of the films in the
        model's field (`restrict`)."""
        images = self.restrict(images)
        features = self.encoder(split_patches(images, self.cfg.patch_grid))
        bottleneck, skips = features[-1], features[-3:-1]
        query = None
        inpainted = bottleneck
        if self.inpainter is not None:
            inpainted, query = self.inpainter(bottleneck)
        student, student_levels = self.student(inpainted, skips)
        teacher, teacher_levels = None, []
        if with_teacher:
            teacher, teacher_levels = self.teacher(bottleneck.detach(), [s.detach() for s in skips])
        return Generated(student, teacher, student_levels, teacher_levels, query)

    def critic_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The views the critics judge: the film shifted by `critic_view_shift` of its size along
        each diagonal, black fill (within the training's shift augmentation), or the film itself.

        Test-time views: one film seen four ways is judged more steadily than one view (validation
        AUC 0.886 -> 0.960 for the shipped model, docs/research-log.md "Ablation")."""
        step = round(self.cfg.critic_view_shift * int(images.shape[-1]))  # int(): a plain number when traced
        if step == 0:
            return [images]
        padded = F.pad(images, (step, step, step, step), value=-1.0)  # -1 is black
        side_h, side_w = images.shape[-2:]
        return [padded[..., top:top + side_h, left:left + side_w]
                for top in (0, 2 * step) for left in (0, 2 * step)]

    def critic_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, K) negated logit of every critic, averaged over the views (high =
        does not look like a normal film)."""
        views = self.critic_views(self.restrict(images))
        return torch.stack([sum(-critic(view).float() for view in views) / len(views) for critic in self.critics],
                           dim=1)

    def critic_score(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B,) mean over the K critics of their z-scored negated logits."""
        logits = self.critic_logits(images)
        return ((logits - self.critic_mean.to(logits)) / self.critic_std.to(logits)).mean(dim=1)

    def density_regions(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, g, g): how unlikely each region of the film is under the training
        normals' Gaussian of that region (squared Mahalanobis distance of the live discriminator's
        pooled features; radscan.model.density). `density_score` averages them."""
        return self.density.distances(self.density_features(images))

    def density_score(self, regions: torch.Tensor) -> torch.Tensor:
        """(B, g, g) region distances -> (B,) the raw density score: their mean, or for a thorax-box
        model their mean weighted by each region's share of the lung fields (`lung_mask`), so that
        only the lungs count."""
        if self.cfg.field != "thorax-box":
            return regions.flatten(1).mean(1)
        # the grid from the settings, not from regions.shape: an ONNX trace makes a shape a tensor
        weights = F.adaptive_avg_pool2d(self.lung_mask[None, None].to(regions), self.cfg.density_grid)[0, 0]
        return (regions * weights).flatten(1).sum(1) / weights.sum().clamp_min(1e-6)

    def density_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, C, g, g) the live discriminator's pooled features of the films in the
        model's field: what the density is fitted to and scores."""
        return self.density.features(self.discriminator.stages(self.restrict(images)))

    def raw_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, 1, H, W) -> raw scores (B, 4) of every kind (COMPONENTS order; high = anomalous; the
        density is NaN in a model without a density model), the unsmoothed residual |input - student|
        (B, H, W) and the density's region distances (B, g, g), or None.

        The generator runs without autograd unless the configured score depends on it, so the
        explanation's gradient of the critic score does not traverse the generator."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.score_kind in ("seed", "residual")):
            student = self.generate(images, with_teacher=False).student
        residual = (images - student).abs().squeeze(1)
        seed = -self.discriminator(student).float()  # D says "real" for normal reconstructions
        regions = self.density_regions(images) if self.density is not None else None
        density = self.density_score(regions) if regions is not None else torch.full_like(seed, torch.nan)
        return torch.stack([self.critic_score(images), seed, residual.flatten(1).mean(1).float(), density],
                           dim=1), residual, regions

    def score(self, images: torch.Tensor, explain: bool = True, components: bool = True) -> ScoreResult:
        """Frozen scoring of (B, 1, H, W) images in [-1, 1]: no memory writes, no randomness, and
        each image's result bit-identical whatever else is in the batch. Call `eval()` first.
        `explain=False` skips the explanation maps (returned as zeros), which need a backward pass
        (the density kind's do not). `components=False` computes only what the configured score
        needs: for the critic and the density, the generator does not run (without maps about 30x
        faster on a CPU: the density needs one discriminator pass, the critic's its snapshots' and
        views'); the other kinds' raw components are then NaN and the residual maps zeros. Scores
        and explanation maps are the same either way (maps to float rounding).

        Every normalisation is per sample, but convolution and matrix kernels pick their blocking
        by batch size, which moves results in the last float bits; the calibration's division by a
        small spread can make that visible. So the model always runs on chunks of the same size
        (zero-padded), and a sample's result never depends on how the caller batched it. Every
        batched operation, the smoothing of the maps included, runs inside those chunks: on a CPU
        without AVX-512 a (B, 1, H, W) convolution's result depends on B.

        Where the guarantee stops: it holds on one machine with one torch build. Another instruction
        set (torch picks its kernels by CPU capability) gives other last bits, so scores from two
        machines agree to float rounding (about 1e-6 relative; explanation maps, through every kink
        of the network, to about 1% of their peak), not bit for bit.
        """
        if self.training:
            raise RuntimeError("call model.eval() before scoring")
        if explain and self.cfg.score_kind != "density" and torch.is_inference_mode_enabled():
            raise RuntimeError("explanation maps need a gradient: call score(..., explain=False) "
                               "inside torch.inference_mode()")
        images = self.restrict(images)
        count, chunk = images.shape[0], _SCORE_CHUNK[images.device.type == "cuda"]
        padded = F.pad(images, (0, 0, 0, 0, 0, 0, 0, (-count) % chunk))
        parts = [self._score_chunk(padded[start:start + chunk], explain, components)
                 for start in range(0, padded.shape[0], chunk)]
        components, residual, explanation = (torch.cat(column)[:count] for column in zip(*parts, strict=True))
        raw, z = self.calibrated(components)
        return ScoreResult(torch.sigmoid(z), raw, explanation, residual, components)

    def _score_chunk(self, images: torch.Tensor, explain: bool, components: bool = True) -> tuple[torch.Tensor, ...]:
        """Components (B, 4), smoothed residual (B, H, W) and explanation maps (B, H, W) of one chunk.

        The density kind's explanation is its own region map (`density_map`). The others' is
        gradient x (input - reference) (Shrikumar et al. 2016; the one-step form
        of integrated gradients, Sundararajan et al. 2017) of the calibrated score, against the mean
        normal film of the calibration normals: each pixel's first-order share of how much the
        z-score would fall if that pixel looked like the average normal chest, in z-score units per
        image area (before the negative part is dropped, the map's mean is that fall). Gradients of
        a critic are speckled pixel to pixel, so the map is smoothed over regions
        (`explanation_blur_sigma`). Normal films too have regions that push their score up, so
        what is shown is the excess over the 95th percentile of the calibration normals' maps at
        that pixel (`explanation_normal`); the rest, and what makes the film look more normal, is
        zero: >= 0.
        """
        kind = self.cfg.score_kind
        if not explain or kind == "density":  # the density's map is its own regions: no gradient
            with torch.inference_mode():
                zeros = images.new_zeros(images.shape[0], *images.shape[2:])
                if not components and kind in ("critic", "density"):  # what the score needs alone: no generator
                    values = torch.full((len(images), len(COMPONENTS)), torch.nan, device=images.device)
                    regions = self.density_regions(images) if kind == "density" else None
                    values[:, COMPONENTS.index(kind)] = (self.density_score(regions) if regions is not None
                                                         else self.critic_score(images).float())
                    return values, zeros, self.density_map(regions) if explain else zeros
                components, residual, regions = self.raw_scores(images)
                residual = self.smooth(residual, self.blur_band)
            return components, residual, self.density_map(regions) if explain else zeros
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)
            if not components and kind == "critic":  # the map of the critics alone: no generator pass
                values = torch.full((len(images), len(COMPONENTS)), torch.nan, device=images.device)
                values[:, COMPONENTS.index(kind)] = self.critic_score(images).float()
                residual = None
            else:
                values, residual, _ = self.raw_scores(images)
            z = self.calibrated(values)[1]
            (gradient,) = torch.autograd.grad(z.sum(), images)
        # per pixel, times the pixel count: a map that is c everywhere means the film is c z-units
        # above the mean normal film (to first order), whatever the image size
        attribution = (gradient * (images - self.normal_mean.to(images))).squeeze(1) * images[0, 0].numel()
        smoothed = self.smooth(attribution, self.explanation_band)
        explanation = (smoothed - self.explanation_normal.to(smoothed)).clamp_min(0)
        residual = (images.new_zeros(images.shape[0], *images.shape[2:]) if residual is None
                    else self.smooth(residual.detach(), self.blur_band))
        return values.detach(), residual, explanation.detach()

    def density_map(self, regions: torch.Tensor) -> torch.Tensor:
        """The density kind's explanation: (B, g, g) region distances -> (B, H, W) >= 0.

        Each region's distance calibrated like the score (so a map that is c everywhere belongs to a
        film of z-score c: the map's mean is the film's z), enlarged bilinearly, smoothed over
        regions (`explanation_blur_sigma`), and shown where it exceeds the 95th percentile of the
        calibration normals' maps at that pixel (`explanation_normal`); zero outside the model's field
        (the networks saw nothing there) and, for a thorax-box model, outside the lung fields (the score
        counts nothing there)."""
        column = COMPONENTS.index("density")
        z = (regions - self.calibration_mean[column]) / self.calibration_std[column]
        smoothed = self.smooth(upsample_regions(z.float(), self.cfg.image_size), self.explanation_band)
        shown = (smoothed - self.explanation_normal.to(smoothed)).clamp_min(0)
        if self.cfg.field == "film":
            return shown
        return shown * (self.field_mask if self.cfg.field == "thorax" else self.lung_mask).to(shown)

    @staticmethod
    def smooth(maps: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, H, W) convolved with a Gaussian, zero padding, given as its (H, H) band
        matrix (`_band`; H == W): band @ map @ band, a Gaussian being the outer product of its
        marginals. The same result as a 2-D convolution to float rounding, and on a CPU 6-12x faster
        (0.13 against 0.8-1.6 ms per map): torch's convolution of one channel is slow."""
        band = band.to(maps.dtype)
        return band @ maps @ band

    def z_scores(self, components: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw (B, 3) components -> the calibrated z-score of every score kind."""
        z = (components - self.calibration_mean.to(components)) / self.calibration_std.to(components)
        return dict(zip(COMPONENTS, z.unbind(dim=1), strict=True))

    def calibrated(self, components: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw score, z-score) of the configured score kind; the score is sigmoid(z)."""
        column = COMPONENTS.index(self.cfg.score_kind)
        return components[:, column], self.z_scores(components)[self.cfg.score_kind]


def _band(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """A (1, 1, k, k) separable, symmetric kernel -> the (size, size) matrix that convolves a
    column (or, on the right, a row) of `size` values with its marginal, zero padding: entry (i, j)
    is the marginal's weight at offset j - i, zero beyond its radius. Symmetric."""
    marginal, radius = kernel[0, 0].sum(dim=0), kernel.shape[-1] // 2
    offsets = torch.arange(size)[None, :] - torch.arange(size)[:, None]
    near = offsets.abs() <= radius
    return torch.where(near, marginal[(offsets + radius).clamp(0, 2 * radius)], torch.zeros(()))


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2)) if sigma > 0 else (x == 0).float()
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]
