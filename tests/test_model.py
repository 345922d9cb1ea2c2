"""The SimSID model: sizes, memory semantics, frozen and batch-invariant scoring."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radscan.model.config import preset
from radscan.model.simsid import COMPONENTS, SimSID

from .conftest import CXR_DIR, REPO
from .support import calibrated_tiny, real_batch


@pytest.mark.parametrize(("d_norm", "score_kind"), [("instance", "critic"), ("batch", "seed"), ("instance", "density")])
def test_score_and_explanation_are_batch_invariant(d_norm, score_kind):
    model = calibrated_tiny(d_norm=d_norm, score_kind=score_kind, critic_snapshots=2, density_grid=8)
    batch = torch.cat([real_batch(16), real_batch(24)[8:]])  # 32 images
    together = model.score(batch)
    assert together.explanation_maps.shape == (32, 128, 128) and (together.explanation_maps >= 0).all()
    assert together.explanation_maps.abs().sum() > 0
    for index in (0, 7, 15, 31):
        alone = model.score(batch[index:index + 1])
        for field in ("scores", "components", "residual_maps", "explanation_maps"):
            torch.testing.assert_close(getattr(alone, field), getattr(together, field)[index:index + 1], rtol=0,
                                       atol=0, equal_nan=True, msg=field)
    shuffled = torch.randperm(32)
    assert torch.equal(model.score(batch[shuffled]).scores, together.scores[shuffled])
    assert torch.equal(model.score(batch[5:12]).scores, together.scores[5:12])


_SCORE_ON_CAPABILITY = """
import sys, torch
from tests.support import calibrated_tiny, real_batch
saved = {}
for kind in ("critic", "density"):
    result = calibrated_tiny(critic_snapshots=2, density_grid=8, score_kind=kind).score(real_batch(16))
    saved.update({f"{kind} {f}": getattr(result, f) for f in ("raw_scores", "residual_maps", "explanation_maps")})
torch.save(saved, sys.argv[1])
"""


def test_scores_agree_across_cpu_instruction_sets(tmp_path):
    """What holds between two machines (a Dask worker on another CPU, a site's server and CI): torch
    picks its kernels by CPU capability, so the last bits differ, but scores and residual maps agree
    to float rounding, the density's maps too, and gradient maps to 2% of their peak. The generic kernels
    (ATEN_CPU_CAPABILITY=default, no oneDNN ISA beyond SSE4.1) stand
    for the oldest x86-64 CPU."""
    import subprocess
    import sys

    results = {}
    generic = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    for name, env in {"native": {}, "generic": generic}.items():
        out = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _SCORE_ON_CAPABILITY, str(out)], check=True, cwd=REPO,
                       env={**os.environ, **env})
        results[name] = torch.load(out)
    native, generic = results["native"], results["generic"]
    for field in ("critic raw_scores", "critic residual_maps", "density raw_scores", "density explanation_maps"):
        scale = native[field].abs().max().item()
        torch.testing.assert_close(generic[field], native[field], rtol=1e-5, atol=1e-5 * scale)
    # a gradient map goes through every kink of the network: measured 0.8% of its peak on generic kernels
    peak = native["critic explanation_maps"].abs().max()
    assert (generic["critic explanation_maps"] - native["critic explanation_maps"]).abs().max() <= 0.02 * peak


@pytest.mark.parametrize("score_kind", ["critic", "seed", "density"])
def test_scoring_without_the_other_components_gives_the_same_scores(score_kind):
    """Without pictures, radscan score asks only for the configured score (for the critic, no
    generator pass): the scores must be bit-identical to the full computation."""
    model = calibrated_tiny(score_kind=score_kind, critic_snapshots=2, density_grid=8)
    batch = real_batch(16)
    full = model.score(batch, explain=False)
    lean = model.score(batch, explain=False, components=False)
    assert torch.equal(lean.scores, full.scores) and torch.equal(lean.raw_scores, full.raw_scores)
    column = COMPONENTS.index(score_kind)
    if score_kind in ("critic", "density"):  # no generator: the other kinds are not computed
        others = [c for c in range(len(COMPONENTS)) if c != column]
        assert torch.isnan(lean.components[:, others]).all() and not lean.residual_maps.any()
        assert torch.equal(lean.components[:, column], full.components[:, column])
    else:  # the seed score needs the generator: everything is computed
        assert torch.equal(lean.components, full.components)
    if score_kind in ("critic", "density"):  # a picture's map needs no generator: the lean path gives the same
        explained = model.score(batch, explain=True, components=False)
        assert torch.equal(explained.scores, full.scores)
        torch.testing.assert_close(explained.explanation_maps, model.score(batch).explanation_maps, rtol=0, atol=1e-5)
        assert explained.explanation_maps.any() and not explained.residual_maps.any()


def test_density_score_is_the_mean_of_its_region_map_in_z_units():
    model = calibrated_tiny(score_kind="density", density_grid=8)
    model.calibration_std.fill_(7.0)
    model.explanation_normal.fill_(-1000.0)  # nothing subtracted, nothing clamped: the map as it is
    batch = real_batch(4)
    result = model.score(batch, components=False)
    with torch.no_grad():
        regions = model.density_regions(batch)
    torch.testing.assert_close(result.raw_scores, regions.flatten(1).mean(1))
    # the map is the regions' z, enlarged and smoothed (zero padding): its mean is about the film's z,
    # and its peak sits over the most unlikely region
    z = (result.raw_scores - model.calibration_mean[COMPONENTS.index("density")]) / 7.0
    shown = result.explanation_maps - 1000.0
    assert torch.allclose(shown.mean((1, 2)), z, atol=0.15 * z.abs().max().item())
    peak = regions.flatten(1).argmax(1)
    for image, region in enumerate(peak.tolist()):
        row, col = divmod(region, 8)
        cell = shown[image, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
        assert cell.mean() >= shown[image].mean()


def test_critic_score_is_the_negated_calibrated_discriminator_of_the_input():
    model = SimSID(preset("tiny", critic_view_shift=0.0)).eval()  # one view: D(I) itself
    images = real_batch(4)
    with torch.no_grad():
        logits = model.discriminator(images)
    model.critic_mean.fill_(-logits.mean())
    model.critic_std.fill_(logits.std())
    components = model.score(images).components
    model.calibration_mean.copy_(components.mean(0))
    model.calibration_std.copy_(components.std(0))
    result = model.score(images)
    critic_z = (-logits - model.critic_mean) / model.critic_std
    z = (critic_z - model.calibration_mean[0]) / model.calibration_std[0]
    torch.testing.assert_close(result.scores, torch.sigmoid(z))  # high -D(I) -> high score
    torch.testing.assert_close(result.raw_scores, critic_z)
    assert ((result.scores > 0) & (result.scores < 1)).all()
    assert result.residual_maps.shape == (4, 128, 128) and (result.residual_maps >= 0).all()


def test_seed_and_residual_kinds_are_computed_as_documented():
    images = real_batch(4)
    for kind in ("seed", "residual"):
        model = SimSID(preset("tiny", score_kind=kind)).eval()
        with torch.no_grad():
            student = model.generate(images, with_teacher=False).student
        expected = -model.discriminator(student) if kind == "seed" else (images - student).abs().mean((1, 2, 3))
        torch.testing.assert_close(model.score(images, explain=False).raw_scores, expected.detach())


def test_snapshot_critics_average_their_z_scores():
    model = SimSID(preset("tiny", critic_snapshots=3, critic_view_shift=0.0)).eval()
    images = real_batch(4)
    with torch.no_grad():
        for critic in model.snapshot_critics:  # each snapshot its own weights, as after training
            for weight in critic.parameters():
                weight.add_(0.05 * torch.randn_like(weight))
        logits = torch.stack([-critic(images) for critic in model.critics], dim=1)
    model.critic_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    model.critic_std.copy_(torch.tensor([1.0, 2.0, 0.5]))
    expected = ((logits - model.critic_mean) / model.critic_std).mean(1)
    torch.testing.assert_close(model.score(images, explain=False).components[:, 0], expected)


def test_critic_judges_four_diagonally_shifted_views():
    model = SimSID(preset("tiny", critic_view_shift=0.05)).eval()
    images = real_batch(2)
    step = round(0.05 * 128)  # 6 pixels
    padded = torch.nn.functional.pad(images, (step,) * 4, value=-1.0)
    views = [padded[..., top:top + 128, left:left + 128] for top in (0, 2 * step) for left in (0, 2 * step)]
    assert views[0][..., :step, :].eq(-1).all()
    assert torch.equal(views[0][..., step:, step:], images[..., :-step, :-step])
    with torch.no_grad():
        expected = torch.stack([-model.discriminator(v) for v in views]).mean(0)
        torch.testing.assert_close(model.critic_logits(images)[:, 0], expected)
        unshifted = SimSID(preset("tiny", critic_view_shift=0.0)).eval()
        unshifted.load_state_dict(model.state_dict())
        torch.testing.assert_close(unshifted.critic_logits(images)[:, 0], -model.discriminator(images))


def test_critic_low_pass_hides_detail_finer_than_its_sigma():
    """critic_blur_sigma: the discriminator sees the film through a Gaussian of that sigma, so a
    pixel-scale pattern (a checkerboard at 0.5 cycles/px away from the edges, which the truncated
    Gaussian of sigma 1.5 attenuates to about 4e-6) barely moves its verdict, while the film's
    layout still does."""
    torch.manual_seed(0)
    images = real_batch(2)
    checker = 0.2 * (torch.arange(128)[:, None] + torch.arange(128)[None, :]).remainder(2).float().mul(2).sub(1)
    checker = torch.nn.functional.pad(checker[8:-8, 8:-8], (8,) * 4)
    sharp = SimSID(preset("tiny")).eval()
    blurred = SimSID(preset("tiny", critic_blur_sigma=1.5)).eval()
    blurred.load_state_dict(sharp.state_dict())
    with torch.no_grad():
        moved_sharp = (sharp.discriminator(images + checker) - sharp.discriminator(images)).abs()
        moved_blurred = (blurred.discriminator(images + checker) - blurred.discriminator(images)).abs()
        turned = (blurred.discriminator(images.flip(-2)) - blurred.discriminator(images)).abs()
    assert (moved_blurred < 0.02 * moved_sharp).all()
    assert (turned > 10 * moved_blurred).all()


class _LeftHalfCritic(torch.nn.Module):
    """A critic that only looks at the left half of the film: the further from mid-grey, the less real."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return -(images[..., :64] ** 2).mean(dim=(1, 2, 3))


def test_explanation_is_zero_where_the_score_does_not_depend_on_the_pixels():
    model = SimSID(preset("tiny", critic_view_shift=0.0)).eval()
    model.discriminator = _LeftHalfCritic()
    maps = model.score(real_batch(3)).explanation_maps
    radius = model.explanation_kernel.shape[-1] // 2
    assert (maps[..., 64 + radius:] == 0).all()
    assert (maps[..., :64 - radius] > 0).float().mean() > 0.2


def _mean_normal_film(count: int = 64) -> np.ndarray:
    from PIL import Image

    from radscan.preprocess import to_model_input

    files = sorted((CXR_DIR / "kermany_pediatric_224/train_normal").iterdir())[:count]
    return np.stack([to_model_input(np.asarray(Image.open(f).convert("L"))) for f in files]).astype(float).mean(0)


def test_thorax_field_of_real_normals_holds_both_lungs_and_not_the_film_edge():
    from radscan.model.field import lung_fields, thorax_field

    mean = _mean_normal_film()
    lungs, field = lung_fields(mean), thorax_field(mean)
    assert lungs.shape == field.shape == (128, 128) and (field | ~lungs).all()  # the field holds the lungs
    assert lungs[:, :64].sum() > 200 and lungs[:, 64:].sum() > 200  # a lung field each side of the midline
    assert 0.15 < field.mean() < 0.6 and field[:, 60:68].any(0).all()  # joined over the mediastinum
    assert not field[0].any() and not field[-1].any() and not field[:, 0].any() and not field[:, -1].any()


@settings(max_examples=12, deadline=None)
@given(top=st.integers(0, 127), left=st.integers(0, 127), height=st.integers(1, 128), width=st.integers(1, 128),
       grey=st.integers(0, 255))
def test_nothing_outside_the_thorax_field_moves_the_score_or_the_map(top, left, height, width, grey):
    """Whatever lies outside the field (collimation, arms, markers, text) cannot raise a score."""
    model = _thorax_model()
    films = real_batch(2)
    outside = ~model.field_mask.bool()
    patch = torch.zeros_like(outside)
    patch[top:top + height, left:left + width] = True
    changed = films.clone()
    changed[:, 0][:, patch & outside] = grey / 127.5 - 1
    before, after = model.score(films), model.score(changed)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.explanation_maps, after.explanation_maps)
    assert (after.explanation_maps[:, outside] == 0).all()


_THORAX: list[SimSID] = []


def _thorax_model() -> SimSID:
    """A tiny density model with the thorax field of real normals, its density fitted through it."""
    if not _THORAX:
        from radscan.model.field import thorax_field

        torch.manual_seed(0)
        model = SimSID(preset("tiny", score_kind="density", density_grid=8, field="thorax"))
        model.field_mask.copy_(torch.from_numpy(thorax_field(_mean_normal_film()).astype(np.float32)))
        model.train()
        model.generate(real_batch(16))
        model.eval()
        from radscan.calibration import fit_density

        fit_density(model, (real_batch(24).squeeze(1).numpy() * 127.5 + 127.5).round().astype(np.uint8), 0,
                    torch.device("cpu"))
        model.explanation_normal.fill_(-5.0)  # show the whole map, so that zero means "nothing there"
        _THORAX.append(model)
    return _THORAX[0]
