"""The SimSID model on made-up inputs: sizes, memory semantics, the feature density, the thorax
field's refusals, frozen and repeatable scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radscan.model.config import PRESETS, SimSIDConfig, preset
from radscan.model.density import FeatureDensity
from radscan.model.memory import MemoryBank, sparse_read
from radscan.model.simsid import SimSID, merge_patches, split_patches


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_reference_preset_sizes_and_shapes():
    model = SimSID(PRESETS["reference"])
    # ~46 M as published without the unused 2048x2048 conv; most of it in the 2048-d attention
    assert 45_000_000 < _count(model) < 46_500_000
    assert 7_500_000 < _count(model.encoder) < 8_000_000
    assert 16_000_000 < _count(model.inpainter.attention) < 17_500_000
    assert 1_000_000 < _count(model.discriminator) < 1_200_000
    assert model.inpainter.memory.banks["patch"].slots.shape == (4, 200, 2048)  # a buffer: queue variant
    assert "inpainter.memory.banks.patch.slots" not in dict(model.named_parameters())
    images = torch.rand(2, 1, 128, 128) * 2 - 1
    out = model.generate(images)
    assert out.student.shape == out.teacher.shape == (2, 1, 128, 128)
    assert [tuple(t.shape) for t in out.student_levels] == [(8, 256, 8, 8), (8, 128, 16, 16), (2, 64, 64, 64),
                                                            (2, 32, 128, 128)]
    assert out.memory_query.shape == (2, 4, 2048)
    assert float(out.student.detach().abs().max()) <= 1.0  # tanh output


def test_learned_memory_is_a_parameter():
    model = SimSID(preset("tiny", memory_kind="learned"))
    assert "inpainter.memory.banks.patch.slots" in dict(model.named_parameters())


def test_no_dead_weights():
    """Every parameter receives a gradient from the training losses (no unused layers)."""
    model = SimSID(preset("tiny", memory_levels=("patch", "image")))
    images = torch.rand(2, 1, 128, 128) * 2 - 1
    out = model.generate(images)
    loss = (out.student - images).pow(2).mean() + (out.teacher - images).pow(2).mean()
    pairs = zip(out.student_levels, out.teacher_levels, strict=True)
    loss = loss + sum((s - t.detach()).pow(2).mean() for s, t in pairs)
    loss = loss + model.discriminator(out.student).mean()
    loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_patches_split_and_merge_row_major():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches = split_patches(image, 2)
    assert patches[:, 0, 0, 0].tolist() == [0.0, 2.0, 8.0, 10.0]  # top-left, top-right, bottom-left, bottom-right
    assert torch.equal(merge_patches(patches, 2), image)


def test_sparse_read_keeps_topk_weights_summing_to_one():
    torch.manual_seed(0)
    query, slots = torch.randn(5, 3, 16, requires_grad=True), torch.randn(3, 20, 16)
    read, weights = sparse_read(query, slots, topk=4)
    assert read.shape == (5, 3, 16)
    assert ((weights > 0).sum(-1) == 4).all()
    assert torch.allclose(weights.sum(-1), torch.ones(5, 3))
    dense = torch.softmax(torch.einsum("nkd,ksd->nks", query, slots), -1)
    assert torch.equal(weights.topk(4).indices.sort().values, dense.topk(4).indices.sort().values)
    assert torch.allclose(read, torch.einsum("nks,ksd->nkd", weights, slots))
    read.sum().backward()  # gradients flow as through the dense softmax: every slot weight has one
    assert query.grad is not None and query.grad.abs().sum() > 0


def test_queue_memory_is_written_only_in_training():
    bank = MemoryBank(banks=2, slots=5, dim=3, kind="queue", topk=2)
    before = bank.slots.clone()
    bank.eval()
    bank.push(torch.ones(4, 2, 3))
    assert torch.equal(bank.slots, before)
    bank.train()
    bank.push(torch.ones(4, 2, 3))
    assert (bank.slots[:, :4] == 1).all() and torch.equal(bank.slots[:, 4], before[:, 4])
    bank.push(2 * torch.ones(3, 2, 3))  # FIFO: wraps around, overwriting the oldest
    assert (bank.slots[:, 4] == 2).all() and (bank.slots[:, :2] == 2).all() and (bank.slots[:, 2:4] == 1).all()


def test_scoring_does_not_write_memory_and_is_repeatable():
    model = SimSID(preset("tiny")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(3, 1, 128, 128) * 2 - 1
    first, second = model.score(images), model.score(images)
    assert torch.equal(first.scores, second.scores) and torch.equal(first.residual_maps, second.residual_maps)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="eval"):
        model.train().score(images)


def test_feature_density_is_the_gaussian_of_each_region():
    """With no shrinkage, the fitted Gaussian is the sample one: a training sample's squared
    Mahalanobis distance averages C (N - 1) / N in every region, the mean itself is at 0, and a
    region moved along its own standard deviation by k is at k squared."""
    cfg = preset("tiny", density_grid=2, density_stages=(3,))
    density = FeatureDensity(cfg)
    generator = torch.Generator().manual_seed(0)
    channels, n = 64, 300
    mixing = torch.randn(4, channels, channels, generator=generator, dtype=torch.float64) / channels**0.5
    latent = torch.randn(n, 4, channels, generator=generator, dtype=torch.float64)
    features = (torch.einsum("nrc,rcd->nrd", latent, mixing) + 3.0).permute(0, 2, 1).reshape(n, channels, 2, 2)
    density.fit(features, shrinkage=0.0)
    distances = density.distances(features.float())
    assert distances.shape == (n, 2, 2)
    torch.testing.assert_close(distances.double().mean(0), torch.full((2, 2), channels * (n - 1) / n,
                                                                      dtype=torch.float64), rtol=1e-3, atol=0)
    mean = features.mean(0, keepdim=True)
    assert density.distances(mean.float()).abs().max() < 1e-3
    centred = features.flatten(2)[:, :, 0] - features.flatten(2)[:, :, 0].mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]  # a principal axis of region 0
    spread = (centred @ direction).std()
    moved = mean.clone()
    moved.view(1, channels, 4)[0, :, 0] += 2 * spread * direction
    torch.testing.assert_close(density.distances(moved.float())[0, 0, 0].double(),
                               torch.tensor(4.0, dtype=torch.float64),
                               rtol=1e-2, atol=0)
    with pytest.raises(ValueError, match="finite"):
        density.fit(torch.full((5, channels, 2, 2), float("nan")))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        SimSIDConfig(memory_kind="lstm")
    with pytest.raises(ValueError):
        SimSIDConfig(patch_grid=3)
    with pytest.raises(ValueError):
        SimSIDConfig.from_dict({"widths": [1, 2], "nonsense": 1})
    assert SimSIDConfig.from_dict(PRESETS["small"].to_dict()) == PRESETS["small"]


@pytest.mark.parametrize("what", ["flat", "noise", "one dark blob"])
def test_thorax_field_is_refused_when_the_mean_film_shows_no_lungs(what):
    from radscan.model.field import thorax_field

    rng = np.random.default_rng(0)
    film = {"flat": np.full((128, 128), 120.0), "noise": rng.uniform(0, 255, (128, 128)),
            "one dark blob": np.pad(np.zeros((40, 40)), 44, constant_values=200.0)}[what]
    with pytest.raises(ValueError, match="lung fields"):
        thorax_field(film)
