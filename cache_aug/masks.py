"""Block-diagonal attention masks and position ids for many augmentation points in one pass.

A *block* is a run of new queries that belongs to one augmentation point p (the prefix length):
N_L soft tokens for the coprocessor pass, or a trace [z, x_{p+1..}] for the decoder pass
(method.md, "Many augmentation points in one pass"). Block b of a row

- sees cache columns j < p_b (the prefix x_1..x_{p_b}),
- sees its own earlier queries (causal within the block),
- never sees another block,

and its queries take positions p_b, p_b+1, ... (0-indexed), so the next real token after N_L
latents sits at position p + N_L: the position rule training and serving share.

Masks are additive floats (0 / finfo.min): eager attention gave silently wrong results with
boolean 4-D masks (platform-notes.md). Models whose layers mix attention kinds (Gemma2, Qwen2
with sliding layers) take a dict keyed by layer type; sliding-window limits are applied on
positions, the way transformers applies them.
"""

from __future__ import annotations

import torch


class UnsupportedArchitecture(ValueError):
    """The decoder cannot take the custom positions/masks that cache augmentation needs."""


def attention_kinds(config) -> tuple[bool, dict[str, int | None]]:
    """How a model wants its 4-D masks: (as_dict, {layer kind: sliding window or None}).

    as_dict=False means one tensor for every layer (Llama, GPT-2, Mistral, ...), stored
    under the key "all".
    """
    config = config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kinds: dict[str, int | None] = {}
        for kind in set(layer_types):
            if kind == "full_attention":
                kinds[kind] = None
            elif kind == "sliding_attention":
                kinds[kind] = int(config.sliding_window)
            else:
                raise UnsupportedArchitecture(
                    f"{config.model_type}: layer type {kind!r} has no block-mask equivalent here "
                    "(supported: full_attention, sliding_attention)"
                )
        return True, kinds
    # Models without layer_types use one mask; Mistral-style configs slide every layer.
    window = getattr(config, "sliding_window", None)
    return False, {"all": int(window) if window else None}


def block_position_ids(points: torch.Tensor, block_len: int) -> torch.Tensor:
    """Positions of B blocks of `block_len` queries starting at each point.

    points: (N, B) prefix lengths. Returns (N, B*block_len): p_b + 0, ..., p_b + block_len-1.
    """
    offsets = torch.arange(block_len, device=points.device)  # (L,)
    return (points[:, :, None] + offsets).flatten(1)  # (N, B*L)


def block_attention_mask(
    points: torch.Tensor,
    cache_len: int,
    block_len: int,
    dtype: torch.dtype,
    window: int | None = None,
) -> torch.Tensor:
    """Additive mask (N, 1, Q, cache_len + Q) with Q = B*block_len for the block layout above.

    The cache holds positions 0..cache_len-1 (padding beyond a row's point is never visible,
    since every block only sees columns < its own point).
    """
    N, B = points.shape
    device = points.device
    Q = B * block_len
    q_block = torch.arange(Q, device=device) // block_len  # (Q,)
    q_off = torch.arange(Q, device=device) % block_len  # (Q,)
    q_point = points[:, q_block]  # (N, Q)
    q_pos = q_point + q_off  # (N, Q)

    cols = torch.arange(cache_len, device=device)  # (C,)
    see_cache = cols[None, None, :] < q_point[:, :, None]  # (N, Q, C)
    see_self = (q_block[:, None] == q_block[None, :]) & (q_off[None, :] <= q_off[:, None])  # (Q, Q)
    allowed = torch.cat([see_cache, see_self.expand(N, Q, Q)], dim=-1)  # (N, Q, C+Q)

    if window is not None:
        kv_pos = torch.cat([cols.expand(N, cache_len), q_pos], dim=-1)  # (N, C+Q)
        allowed &= (q_pos[:, :, None] - kv_pos[:, None, :]) < window

    mask = torch.zeros(N, 1, Q, cache_len + Q, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)  # (N, 1, Q, C+Q)


def block_masks_for(
    config, points: torch.Tensor, cache_len: int, block_len: int, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The block mask in the form the model's forward takes (tensor, or dict by layer type)."""
    as_dict, kinds = attention_kinds(config)
    masks = {kind: block_attention_mask(points, cache_len, block_len, dtype, window) for kind, window in kinds.items()}
    return masks if as_dict else masks["all"]
