"""Training augmentation: what the networks are shown besides the normals as they are.

`augment` varies framing (shift, zoom, aspect), `vary_acquisition` the exposure and processing
(gamma, contrast, blur, noise), and `local_anomalies` gives films one generic local defect (for the
discriminator's optional third term, and for the label-free measure `--keep synthetic` chooses by,
radscan.epochs). All work on (B, 1, H, W) tensors in [-1, 1] and draw from the caller's generator,
so that a run is reproducible from its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from radscan.recipe import TrainConfig

__all__ = ["augment", "vary_acquisition", "local_anomalies"]


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
