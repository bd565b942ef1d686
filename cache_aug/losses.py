"""Training math: the ahead-token loss at many augmentation points, one-pass and reference.

For a point p (prefix length) the loss is D's cross-entropy on the N_A ahead tokens
x_{p+1..p+N_A} given the augmented cache: the logits at the last latent predict x_{p+1}, the
logits at x_{p+k} predict x_{p+k+1} (method.md). Only N_A-1 ahead tokens are fed, since the
last one is only ever a target.

- `one_pass_loss`: three passes for all points of all rows (block-diagonal masks).
- `reference_loss`: the naive loop, one prefill per point, default causal masks; the
  specification the one-pass version must equal.
- `module=None` gives the "none" baseline: plain next-token loss at the same targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from cache_aug.decoder import Decoder
from cache_aug.kv import layer_kv, model_cache
from cache_aug.passes import logits_at, decoder_pass, latent_pass, prefill


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


def _reduce(logits: torch.Tensor, targets: torch.Tensor) -> AheadLoss:
    """logits (N, B, N_A, V), targets (N, B, N_A)."""
    ce = F.cross_entropy(logits.flatten(0, 2).float(), targets.flatten(), reduction="none").view(targets.shape)
    return AheadLoss(loss=ce.mean(), per_position=ce.mean(dim=(0, 1)), n_targets=ce.numel())


def one_pass_loss(
    decoder: Decoder, module, input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int
) -> AheadLoss:
    """The ahead loss at every point of every row with three passes; gradients reach `module` only.

    input_ids (N, T) unpadded blocks; points (N, B) prefix lengths with p + n_ahead <= T.
    """
    if module is None:
        return plain_ahead_loss(decoder, input_ids, points, n_ahead)
    N, B = points.shape
    targets = ahead_targets(input_ids, points, n_ahead)  # (N, B, N_A)

    L = module.n_latents
    block = L + n_ahead - 1
    prefix, _ = prefill(decoder, input_ids)  # T columns, no grad
    z = latent_pass(decoder, module, prefix, points)  # (N, B*L, d)
    ahead_in = decoder.embed(targets[:, :, : n_ahead - 1])  # (N, B, N_A-1, d)
    traces = torch.cat([z.view(N, B, L, -1).to(ahead_in.dtype), ahead_in], dim=2).view(N, B * block, -1)  # (N, B*block, d)
    keep = (torch.arange(B, device=points.device)[:, None] * block + L - 1 + torch.arange(n_ahead, device=points.device)).flatten()
    logits, _ = decoder_pass(decoder, prefix, points, traces, block, keep)  # (N, B*N_A, V)
    return _reduce(logits.view(N, B, n_ahead, -1), targets)


@torch.no_grad()
def plain_ahead_loss(decoder: Decoder, input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int) -> AheadLoss:
    """The 'none' baseline: D alone, same targets (logits at x_{p+k} predict x_{p+k+1})."""
    N, B = points.shape
    targets = ahead_targets(input_ids, points, n_ahead)  # (N, B, N_A)
    logits = decoder.model(input_ids=input_ids).logits  # (N, T, V)
    idx = (points[:, :, None] - 1 + torch.arange(n_ahead, device=points.device)).flatten(1)  # (N, B*N_A)
    picked = torch.gather(logits, 1, idx[:, :, None].expand(-1, -1, logits.shape[-1]))  # (N, B*N_A, V)
    return _reduce(picked.view(N, B, n_ahead, -1), targets)


def reference_loss(decoder: Decoder, module, input_ids: torch.Tensor, points: torch.Tensor, n_ahead: int) -> AheadLoss:
    """The naive loop: for each point, prefill the prefix, run C, run D over [z, ahead tokens].

    Uses the model's own cache classes and default causal masks, so it checks the block masks
    and positions of `one_pass_loss` independently.
    """
    model = decoder.model
    N, B = points.shape
    L = module.n_latents
    targets = ahead_targets(input_ids, points, n_ahead)  # (N, B, N_A)
    all_logits = []
    for n in range(N):
        for b in range(B):
            p = int(points[n, b])
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model.base_model(input_ids=input_ids[n : n + 1, :p], past_key_values=cache, use_cache=True)
            kv = layer_kv(cache)
            positions = torch.arange(p, p + L, device=input_ids.device)[None]  # (1, L)
            z = module(model_cache(kv, model.config, p), positions, None, n_blocks=1)  # (1, L, d)
            ahead_in = decoder.embed(targets[n : n + 1, b, : n_ahead - 1])  # (1, N_A-1, d)
            embeds = torch.cat([z.to(ahead_in.dtype), ahead_in], dim=1)  # (1, L+N_A-1, d)
            trace_pos = torch.arange(p, p + L + n_ahead - 1, device=input_ids.device)[None]
            keep = torch.arange(L - 1, L - 1 + n_ahead, device=input_ids.device)
            logits = logits_at(
                decoder,
                keep,
                inputs_embeds=embeds,
                past_key_values=model_cache(kv, model.config, p),
                position_ids=trace_pos,
                use_cache=True,
            )  # (1, N_A, V)
            all_logits.append(logits[0])
    logits = torch.stack(all_logits).view(N, B, n_ahead, -1)
    return _reduce(logits, targets)
