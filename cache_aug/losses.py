"""Training math: the ahead-token loss at many augmentation points, one-pass and reference.

For a point p (prefix length) the loss is D's cross-entropy on the N_A ahead tokens
x_{p+1..p+N_A} given the augmented cache: the logits at the last latent predict x_{p+1}, the
logits at x_{p+k} predict x_{p+k+1} (method.md). Only N_A-1 ahead tokens are fed, since the
last one is only ever a target. A module with `reread = 1` (first_ahead_from="last_token") is
fed x_p once more right after its latents, and x_p's logits there predict x_{p+1}: the trace is
[z, x_p, x_{p+1}, .., x_{p+N_A-1}]. Positions follow the module's `layout.position_rule` (masks.py, layout.py).
A module with latent_channel="kv" puts its own keys and values at the z slots of every layer instead
of feeding z (`passes.kv_decoder_pass`); the trace, positions and targets are the same.

The `*_ce` functions return every target's cross-entropy (N, B, N_A), for evaluation; the
`*_loss` functions reduce it for training.

- `one_pass_loss`: three passes for all points of all rows (block-diagonal masks).
- `reference_loss`: the naive loop, one prefill per point, default causal masks; the
  specification the one-pass version must equal.
- `module=None` gives the "none" baseline: plain next-token loss at the same targets.
- `ahead_sums`: held-out evaluation, the module vs none summed over batches (every evaluator's core).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from cache_aug.architecture import with_cache
from cache_aug.config import AugmentationConfig
from cache_aug.decoder import Decoder
from cache_aug.kv import layer_kv, model_cache
from cache_aug.passes import (
    decoder_pass,
    kv_decoder_pass,
    latent_pass,
    logits_at,
    prefill,
)


@dataclass
class AheadLoss:
    """Mean ahead-token cross-entropy, and its mean per ahead position."""

    loss: torch.Tensor  # () mean over all N*B*N_A targets
    per_position: torch.Tensor  # (N_A,) mean over points, position k predicts x_{p+k+1}
    n_targets: int


def sample_points(
    n_seqs: int, seq_len: int, n_points: int, n_ahead: int, min_prefix: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(N, B) sorted prefix lengths, uniform without replacement over [min_prefix, seq_len - n_ahead]."""
    lo, hi = min_prefix, seq_len - n_ahead
    if hi - lo + 1 < n_points:
        raise ValueError(
            f"points_per_sequence={n_points} does not fit: a sequence of {seq_len} tokens with min_prefix={min_prefix} "
            f"and n_ahead={n_ahead} has only {max(hi - lo + 1, 0)} possible points"
        )
    scores = torch.rand(n_seqs, hi - lo + 1, generator=generator)
    return scores.topk(n_points, dim=1).indices.sort(dim=1).values + lo  # (N, B)


def ahead_targets(input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int) -> torch.Tensor:
    """(N, B, N_A): x_{p+1..p+N_A} (0-indexed ids[p .. p+N_A-1]) for every point."""
    idx = points[:, :, None] + torch.arange(n_ahead, device=points.device)  # (N, B, N_A)
    return torch.gather(input_ids[:, None, :].expand(-1, points.shape[1], -1), 2, idx)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (N, B, N_A, V), targets (N, B, N_A) -> per-target cross-entropy (N, B, N_A), float32."""
    return F.cross_entropy(logits.flatten(0, 2).float(), targets.flatten(), reduction="none").view(targets.shape)


def _reduce(ce: torch.Tensor) -> AheadLoss:
    """ce (N, B, N_A)."""
    return AheadLoss(loss=ce.mean(), per_position=ce.mean(dim=(0, 1)), n_targets=ce.numel())


def one_pass_ce(decoder: Decoder, module, input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int) -> torch.Tensor:
    """Cross-entropy (N, B, N_A) of every ahead target at every point, with three passes.

    input_ids (N, T) unpadded blocks; points (N, B) prefix lengths with p + n_ahead <= T.
    `module=None` is the plain decoder. Gradients reach `module` only.
    """
    if module is None:
        return plain_ahead_ce(decoder, input_ids, points, n_ahead)
    N, B = points.shape
    targets = ahead_targets(input_ids, points, n_ahead)  # (N, B, N_A)

    layout = module.layout
    L, r = layout.n_latents, layout.reread
    block = L + r + n_ahead - 1
    prefix, _ = prefill(decoder, input_ids)  # T columns, no grad
    z = latent_pass(decoder, module, prefix, points)  # (N, B*L, d), or per layer (N, H, B*L, D) for the kv channel
    fed = ahead_targets(input_ids, points - r, n_ahead - 1 + r)  # (N, B, r+N_A-1): [x_p if r,] x_{p+1..p+N_A-1}
    ahead_in = decoder.embed(fed)  # (N, B, r+N_A-1, d)
    if layout.writes_kv:  # text only; block b's text reads block b's latent KV (r == 1)
        q = r + n_ahead - 1
        keep = (torch.arange(B, device=points.device)[:, None] * q + r - 1
                + torch.arange(n_ahead, device=points.device)).flatten()
        positions = layout.position_ids(points, block).view(N, B, block)[:, :, L:].flatten(1)  # (N, B*q)
        # (N, B*N_A, V)
        logits, _ = kv_decoder_pass(decoder, prefix, z, points, ahead_in.flatten(1, 2), q, keep, positions)
        return _cross_entropy(logits.view(N, B, n_ahead, -1), targets)
    # (N, B*block, d)
    traces = torch.cat([z.view(N, B, L, -1).to(ahead_in.dtype), ahead_in], dim=2).view(N, B * block, -1)
    first = L - 1 + r  # index in a trace of the query that predicts x_{p+1}
    keep = (torch.arange(B, device=points.device)[:, None] * block + first
            + torch.arange(n_ahead, device=points.device)).flatten()
    # (N, B*N_A, V)
    logits, _ = decoder_pass(decoder, prefix, points, traces, block, keep, layout.position_ids(points, block))
    return _cross_entropy(logits.view(N, B, n_ahead, -1), targets)


def one_pass_loss(
    decoder: Decoder, module, input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int
) -> AheadLoss:
    """The ahead loss at every point of every row with three passes; gradients reach `module` only."""
    return _reduce(one_pass_ce(decoder, module, input_ids, points, n_ahead))


@torch.no_grad()
def plain_ahead_ce(decoder: Decoder, input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int) -> torch.Tensor:
    """The 'none' baseline (N, B, N_A): D alone, same targets (logits at x_{p+k} predict x_{p+k+1})."""
    N, B = points.shape
    targets = ahead_targets(input_ids, points, n_ahead)  # (N, B, N_A)
    idx = (points[:, :, None] - 1 + torch.arange(n_ahead, device=points.device)).flatten(1)  # (N, B*N_A)
    keep = torch.unique(idx)  # only the positions some target needs go through the LM head
    logits = logits_at(decoder, keep, input_ids=input_ids)  # (N, |keep|, V)
    col = torch.searchsorted(keep, idx)  # (N, B*N_A)
    picked = torch.gather(logits, 1, col[:, :, None].expand(-1, -1, logits.shape[-1]))  # (N, B*N_A, V)
    return _cross_entropy(picked.view(N, B, n_ahead, -1), targets)


def plain_ahead_loss(decoder: Decoder, input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int) -> AheadLoss:
    """The 'none' baseline, reduced."""
    return _reduce(plain_ahead_ce(decoder, input_ids, points, n_ahead))


def conditions_ce(decoder: Decoder, modules: dict[str, object], input_ids: torch.Tensor, points: torch.Tensor,
                  n_ahead: int) -> dict[str, torch.Tensor]:
    """Every target's cross-entropy (N, B, N_A) per condition (name -> module, None: D alone), at the same points."""
    return {name: one_pass_ce(decoder, m, input_ids, points, n_ahead) for name, m in modules.items()}


@torch.no_grad()
def ahead_sums(decoder: Decoder, module, batches: Iterable[torch.Tensor], aug: AugmentationConfig,
               generator: torch.Generator) -> tuple[dict[str, float], dict[str, torch.Tensor], int]:
    """Held-out ahead losses of the module ("augmented", in eval mode meanwhile) and of D alone ("none"), summed.

    Each (N, T) batch gets its points from `generator`; both conditions are measured at them. Returns per condition
    the summed loss and the (N_A,) per-position sums (each batch's means weighted by its targets), and the number of
    targets: the sums add over batches and ranks, and divided by that number they are the means.
    """
    conditions = {"augmented": module, "none": None}
    was_training = module.training
    module.eval()
    loss, per_position, count = dict.fromkeys(conditions, 0.0), {c: torch.zeros(aug.n_ahead) for c in conditions}, 0
    for batch in batches:
        ids = batch.to(decoder.device)
        points = sample_points(ids.shape[0], ids.shape[1], aug.points_per_sequence, aug.n_ahead, aug.min_prefix,
                               generator).to(decoder.device)
        for c, ce in conditions_ce(decoder, conditions, ids, points, aug.n_ahead).items():
            loss[c] += float(ce.mean()) * ce.numel()
            per_position[c] += ce.mean(dim=(0, 1)).cpu() * ce.numel()
        count += ce.numel()
    module.train(was_training)
    return loss, per_position, count


def reference_loss(decoder: Decoder, module, input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int) -> AheadLoss:
    """The naive loop: for each point, prefill the prefix, run C, run D over [z, ahead tokens].

    Uses the model's own cache classes and default causal masks, so it checks the block masks
    and positions of `one_pass_loss` independently.
    """
    model = decoder.model
    N, B = points.shape
    layout = module.layout
    L, r = layout.n_latents, layout.reread
    targets = ahead_targets(input_ids, points, n_ahead)  # (N, B, N_A)
    all_logits = []
    for n in range(N):
        for b in range(B):
            p = int(points[n, b])
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model.base_model(**with_cache(model.base_model, cache, input_ids=input_ids[n : n + 1, :p],
                                              use_cache=True))
            kv = layer_kv(cache)
            dev = input_ids.device
            # written out per position (layout.latent_positions / text_positions), not by masks.block_position_ids:
            # "keep" puts the latents over the prefix's last L positions and the text at its own, "shift" (the
            # paper's rule) everything after the prefix, in order
            positions = torch.tensor(layout.latent_positions(p), dtype=torch.long, device=dev)[None]  # (1, L)
            # (1, r+N_A-1)
            text_pos = torch.tensor(layout.text_positions(p, r + n_ahead - 1), dtype=torch.long, device=dev)[None]
            ahead_in = decoder.embed(input_ids[n : n + 1, p - r : p + n_ahead - 1])  # (1, r+N_A-1, d)
            if layout.writes_kv:  # C's own KV at the latent slots joins D's cache; D reads the text only
                latent = module(model_cache(kv, model.config, p), positions, None, n_blocks=1)  # per layer (1, H, L, D)
                joined = [(torch.cat([k, lk.to(k.dtype)], 2), torch.cat([v, lv.to(v.dtype)], 2))
                          for (k, v), (lk, lv) in zip(kv, latent, strict=True)]
                logits = logits_at(
                    decoder,
                    torch.arange(r - 1, r - 1 + n_ahead, device=dev),
                    inputs_embeds=ahead_in,
                    cache=model_cache(joined, model.config, p + L),
                    position_ids=text_pos,
                    use_cache=True,
                )  # (1, N_A, V)
                all_logits.append(logits[0])
                continue
            z = module(model_cache(kv, model.config, p), positions, None, n_blocks=1)  # (1, L, d)
            embeds = torch.cat([z.to(ahead_in.dtype), ahead_in], dim=1)  # (1, L+r+N_A-1, d)
            trace_pos = torch.cat([positions, text_pos], dim=1)  # (1, L+r+N_A-1)
            keep = torch.arange(L - 1 + r, L - 1 + r + n_ahead, device=dev)
            logits = logits_at(
                decoder,
                keep,
                inputs_embeds=embeds,
                cache=model_cache(kv, model.config, p),
                position_ids=trace_pos,
                use_cache=True,
            )  # (1, N_A, V)
            all_logits.append(logits[0])
    logits = torch.stack(all_logits).view(N, B, n_ahead, -1)
    return _reduce(_cross_entropy(logits, targets))
