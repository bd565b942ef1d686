"""The one optimiser and learning-rate schedule: AdamW, linear warmup, then cosine decay to a floor.

Every training loop of the project takes its settings from one
:class:`~cache_aug.stage_config.OptimConfig` (the root ``optim`` section) and its rate from
:func:`learning_rate`: the Ray Train + DeepSpeed job (as DeepSpeed's client scheduler, :class:`Schedule`),
the local loop (:func:`cache_aug.training.train_local`), the sweep, and the tiny decoder's pretraining
(which caps its schedule by wall-clock time as well, through ``progress``).

    params = [p for p in module.parameters() if p.requires_grad]
    opt = adamw(params, cfg.optim)
    sched = Schedule(opt, cfg.optim)
    for step in range(cfg.optim.max_steps):
        optimizer_step(loss_fn(next(batches)), opt, params, cfg.optim.grad_clip, sched)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from cache_aug.stage_config import OptimConfig

__all__ = ["OptimConfig", "Schedule", "adamw", "learning_rate", "optimizer_step"]


def learning_rate(step: int, optim: OptimConfig, progress: float | None = None) -> float:
    """The rate of optimizer step `step` (from 0).

    ``progress`` in [0, 1] is how far the decay has got; by default the share of the post-warmup steps done,
    ``(step - warmup_steps) / (max_steps - warmup_steps)``. A loop with another budget (the tiny
    pretraining's wall-clock cap) passes its own.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return optim.lr
    if progress is None:
        progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
    p = min(1.0, max(0.0, progress))
    r = optim.min_lr_ratio
    return optim.lr * (r + (1 - r) * 0.5 * (1.0 + math.cos(math.pi * p)))


class Schedule(torch.optim.lr_scheduler.LRScheduler):
    """:func:`learning_rate` as a torch scheduler (every parameter group at that rate); saved and resumed
    with the optimizer (``state_dict``), and handed to DeepSpeed as its client scheduler."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, last_epoch: int = -1) -> None:
        self.optim = optim
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [learning_rate(self.last_epoch, self.optim) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "optim"}  # the config comes from the run


def adamw(params: Iterable[torch.nn.Parameter], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable ones of `params`: matrices decayed by ``weight_decay``, vectors not."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": params, "weight_decay": 0.0}]
    if optim.weight_decay:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate(0, optim), betas=tuple(optim.betas), eps=optim.eps)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                   grad_clip: float, schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """One training step: clear gradients, backpropagate `loss`, clip the norm of `params`' gradients, step
    (and the schedule). The norm is summed in the order of `params`, so pass them in a fixed order."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    if schedule is not None:
        schedule.step()
