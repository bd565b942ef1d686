"""A training step and held-out evaluation for the latent module, without any distributed glue.

The Ray Train + DeepSpeed loop (pipelines/) calls the same `one_pass_loss`; this module is the
plain-torch version used for local runs, tests and as the reference for the distributed loop.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cache_aug.config import AugmentationConfig, OptimConfig
from cache_aug.decoder import Decoder
from cache_aug.losses import ahead_sums, one_pass_loss, sample_points
from cache_aug.optim import Schedule, adamw, optimizer_step


@dataclass
class EvalResult:
    """Held-out ahead-token loss with and without augmentation, at the same points."""

    loss_augmented: float
    loss_none: float
    per_position_augmented: list[float]
    per_position_none: list[float]
    n_targets: int

    @property
    def ppl_augmented(self) -> float:
        return math.exp(self.loss_augmented)

    @property
    def ppl_none(self) -> float:
        return math.exp(self.loss_none)


def evaluate(decoder: Decoder, module, blocks: torch.Tensor, aug: AugmentationConfig, *, batch_size: int = 8,
             seed: int = 1234) -> EvalResult:
    """Mean ahead loss over held-out blocks at fixed (seeded) points, augmented vs none."""
    if blocks.shape[0] == 0:
        raise ValueError("held-out data: the held-out text packs into no block of seq_len tokens; "
                         "add held-out text or lower seq_len")
    loss, per_position, count = ahead_sums(decoder, module, blocks.split(batch_size), aug,
                                           torch.Generator().manual_seed(seed))
    return EvalResult(loss_augmented=loss["augmented"] / count, loss_none=loss["none"] / count,
                      per_position_augmented=(per_position["augmented"] / count).tolist(),
                      per_position_none=(per_position["none"] / count).tolist(), n_targets=count)


def train_local(
    decoder: Decoder,
    module,
    batches: Iterator[torch.Tensor],
    aug: AugmentationConfig,
    optim: OptimConfig,
    *,
    seed: int = 0,
    log_every: int = 10,
    log: Callable[[str], None] = print,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """`optim.max_steps` steps of the project's one optimiser and schedule (:mod:`cache_aug.optim`) on the
    module's trainable parameters; returns the training loss per step.

    With `checkpoint_path`, the module, optimizer, schedule, point sampler and losses are saved every
    `checkpoint_every` steps and at the end, and a call that finds the file resumes from it (the batch
    stream is advanced past the batches already used, so a resumed run sees the same data as an unbroken
    one). `on_step(step)` runs after each optimizer step (held-out curves).
    """
    steps = optim.max_steps
    params = [p for p in module.parameters() if p.requires_grad]
    opt = adamw(params, optim)
    sched = Schedule(opt, optim)
    g = torch.Generator().manual_seed(seed)
    module.train()
    losses: list[float] = []
    start = 0
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        state = torch.load(checkpoint_path, map_location=decoder.device, weights_only=True)
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        g.set_state(state["sampler"])
        losses, start = state["losses"], state["step"]
        for _ in range(start):  # the batches the saved steps consumed
            next(batches)
        log(f"resumed at step {start} from {checkpoint_path}")

    def save(step: int) -> None:
        tmp = f"{checkpoint_path}.tmp"
        torch.save({"module": module.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                    "sampler": g.get_state(), "losses": losses, "step": step}, tmp)
        os.replace(tmp, checkpoint_path)  # atomic: a crash never leaves half a checkpoint

    t0 = time.perf_counter()
    for step in range(start, steps):
        batch = next(batches).to(decoder.device)
        points = sample_points(batch.shape[0], batch.shape[1], aug.points_per_sequence, aug.n_ahead, aug.min_prefix,
                               g).to(decoder.device)
        loss = one_pass_loss(decoder, module, batch, points, aug.n_ahead).loss
        optimizer_step(loss, opt, params, optim.grad_clip, sched)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{time.perf_counter() - t0:.1f}s")
        if on_step is not None:
            on_step(step + 1)
        if checkpoint_path is not None and (
            (checkpoint_every and (step + 1) % checkpoint_every == 0) or step + 1 == steps):
            save(step + 1)
    return losses
