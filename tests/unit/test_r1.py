"""The R1 penalty of `radscan train --r1`: the squared input gradient of the discriminator at real
films, which its step descends, so the critic stops keying on pixel-level detail."""

from __future__ import annotations

import torch

from radscan.model.config import preset
from radscan.recipe import TrainConfig
from radscan.trainer import Trainer, r1_penalty


def test_the_penalty_is_the_mean_squared_input_gradient():
    weights = torch.randn(3, 1, 8, 8)
    films = torch.randn(3, 1, 8, 8, requires_grad=True)
    logits = (films * weights).flatten(1).sum(1) + (films**2).flatten(1).sum(1)  # gradient: weights + 2 films
    expected = (weights + 2 * films.detach()).pow(2).flatten(1).sum(1).mean()
    penalty = r1_penalty(logits, films)
    assert torch.allclose(penalty, expected)
    assert penalty.requires_grad  # the discriminator's step can descend it


def _input_gradient_norm(trainer: Trainer, films: torch.Tensor) -> float:
    films = films.clone().requires_grad_(True)
    return r1_penalty(trainer.model.discriminator(films), films).item()


def test_training_with_the_penalty_makes_the_critic_less_sensitive_to_pixels():
    generator = torch.Generator().manual_seed(0)
    films = torch.rand(8, 1, 128, 128, generator=generator) * 2 - 1
    norms = {}
    for r1 in (0.0, 10.0):
        trainer = Trainer(preset("tiny"), TrainConfig(r1=r1, batch_size=8), torch.device("cpu"))
        for index in range(4):
            losses = trainer.step(films, generator_step=index % 2 == 1)
            assert all(torch.isfinite(torch.tensor(value)) for value in losses.values())
        norms[r1] = _input_gradient_norm(trainer, films)
    assert norms[10.0] < 0.5 * norms[0.0]
