"""The learning-rate schedules of `radscan train`: the discriminator's is constant unless
--d-schedule cosine, which anneals it as the generator's and survives a checkpoint."""

from __future__ import annotations

import pytest
import torch

from radscan.model.config import preset
from radscan.recipe import TrainConfig
from radscan.trainer import Trainer


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")  # no batch is trained here
@pytest.mark.parametrize("d_schedule", ["constant", "cosine"])
def test_the_discriminators_rate_follows_its_schedule_across_a_checkpoint(d_schedule):
    config = TrainConfig(d_schedule=d_schedule, cosine_t_max=10)
    trainer = Trainer(preset("tiny"), config, torch.device("cpu"))
    for _ in range(4):
        trainer.step_schedules()
    rate = trainer.opt_d.param_groups[0]["lr"]
    assert (rate < config.lr) == (d_schedule == "cosine")
    assert trainer.opt_g.param_groups[0]["lr"] < config.lr  # the generator's always anneals
    again = Trainer(preset("tiny"), config, torch.device("cpu"))
    again.restore(trainer.state(epoch=4))
    again.step_schedules()
    trainer.step_schedules()
    assert again.opt_d.param_groups[0]["lr"] == trainer.opt_d.param_groups[0]["lr"]
