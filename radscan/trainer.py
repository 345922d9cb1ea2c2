"""The optimisation of one training run (radscan.train runs it): the model, the generator's and the
discriminator's optimisers and learning-rate schedules, one step on a batch, and the checkpoint that
lets an interrupted run resume exactly (same seed, same data: the same model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from radscan.errors import ModelError, OutputError
from radscan.model.config import SimSIDConfig
from radscan.model.runtime import autocast
from radscan.model.simsid import Generated, SimSID
from radscan.recipe import TrainConfig
from radscan.report import atomic_output, cannot_write

__all__ = ["Trainer", "r1_penalty", "save_checkpoint", "load_checkpoint"]


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
        self.schedule_d = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_d, T_max=tcfg.cosine_t_max,
                                                                      eta_min=tcfg.cosine_eta_min)
                           if tcfg.d_schedule == "cosine" else None)
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
            real = batch.detach().requires_grad_(True) if t.r1 else batch
            d_real = model.discriminator(real)
            d_fake = model.discriminator(out.student.detach())
            d_loss = t.w_discriminator * (
                F.binary_cross_entropy_with_logits(d_real.float(), torch.ones_like(d_real, dtype=torch.float32))
                + F.binary_cross_entropy_with_logits(d_fake.float(), torch.zeros_like(d_fake, dtype=torch.float32))
            )
            if anomalies is not None:
                d_defect = model.discriminator(anomalies).float()
                d_loss = d_loss + t.w_discriminator * t.synthetic * F.binary_cross_entropy_with_logits(
                    d_defect, torch.zeros_like(d_defect))
            if t.r1:
                d_loss = d_loss + t.w_discriminator * t.r1 / 2 * r1_penalty(d_real, real)
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
        state = {"model": self.model.state_dict(), "opt_g": self.opt_g.state_dict(),
                 "opt_d": self.opt_d.state_dict(), "schedule": self.schedule.state_dict(), "epoch": epoch}
        if self.schedule_d is not None:
            state["schedule_d"] = self.schedule_d.state_dict()
        return state

    def step_schedules(self) -> None:
        """The end of an epoch: the learning rates move one step along their schedules."""
        self.schedule.step()
        if self.schedule_d is not None:
            self.schedule_d.step()

    def restore(self, state: dict[str, Any]) -> int:
        """Load a checkpoint; returns the number of epochs it had completed."""
        self.model.load_state_dict(state["model"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.schedule.load_state_dict(state["schedule"])
        if self.schedule_d is not None and "schedule_d" in state:
            self.schedule_d.load_state_dict(state["schedule_d"])
        return int(state["epoch"])


def r1_penalty(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared norm of d logit / d film at the real films (B, 1, H, W):
    a scalar that keeps its graph, so the discriminator's step descends it (double backpropagation)."""
    (gradient,) = torch.autograd.grad(logits.float().sum(), real, create_graph=True)
    return gradient.pow(2).flatten(1).sum(1).mean()


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomic and durable: a run killed or a machine losing power mid-write keeps the previous one.
    Raises OutputError (exit 73) when it cannot be written (a full disk: torch reports it as a
    RuntimeError of its C++ writer, which was exit 1 "a bug", a trial)."""
    try:
        with atomic_output(path, "wb") as handle:
            torch.save(state, handle)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    except RuntimeError as exc:  # torch's writer: "[enforce fail at inline_container.cc] ... file write failed"
        raise OutputError(f"cannot write the training checkpoint {path} (a full disk?): "
                          f"{str(exc).splitlines()[0][:200]}") from None


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
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
