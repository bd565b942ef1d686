"""Block-diagonal attention masks and position ids for many augmentation points in one pass.

A *block* is a run of new queries that belongs to one augmentation point p (the prefix length):
N_L soft tokens for the coprocessor pass, or a trace [z, x_{p+1..}] for the decoder pass
(method.md, "Many augmentation points in one pass"). Block b of a row

- sees cache columns j < p_b (the prefix x_1..x_{p_b}),
- sees its own earlier queries (causal within the block),
- never sees another block,

and its queries take the positions of the module's position rule (`block_position_ids`): under the
paper's rule p_b, p_b+1, ... (0-indexed), so the next real token after N_L latents sits at position
p + N_L. Training and serving share the rule.

Masks are additive floats (0 / finfo.min): eager attention gave silently wrong results with
boolean 4-D masks (platform-notes.md). Models whose layers mix attention kinds (Gemma2, Qwen2
with sliding layers) take a dict keyed by layer type; sliding-window limits are applied on
the order of entries in the cache (what a sliding cache layer keeps), the way transformers applies them.
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


POSITION_RULES = ("shift", "keep")


def block_position_ids(points: torch.Tensor, block_len: int, rule: str = "shift", n_latents: int = 0,
                       reread: int = 0) -> torch.Tensor:
    """RoPE positions of B blocks of `block_len` queries at each point (CoprocessorConfig.position_rule).

    points: (N, B) prefix lengths. A block is [N_L latents, (re-read last token), following tokens];
    `block_len` may stop inside it (N_L alone for the coprocessor pass). Returns (N, B*block_len):
    - "shift": p + 0, ..., p + block_len-1: the latents after the prefix, the text after them;
    - "keep": latent j at max(0, p - N_L + j) (the prefix's last N_L positions), then the re-read token
      at p-1 and the following tokens at p, p+1, ...: the text keeps its own positions.
    Masks never read these: which entries a query sees (and sliding windows) follow the cache order,
    as a model's own decoding does, so only the rotary/absolute positions differ between the rules.
    """
    offsets = torch.arange(block_len, device=points.device)  # (L,)
    if rule == "shift":
        rel = offsets
    elif rule == "keep":
        rel = torch.where(offsets < n_latents, offsets - n_latents, offsets - n_latents - reread)  # (L,)
    else:
        raise ValueError(f"position rule {rule!r} not in {POSITION_RULES}")
    return (points[:, :, None] + rel).clamp_(min=0).flatten(1)  # (N, B*L)


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
    q_idx = q_point + q_off  # (N, Q) index in the cache order of one augmentation (not the RoPE position)

    cols = torch.arange(cache_len, device=device)  # (C,)
    see_cache = cols[None, None, :] < q_point[:, :, None]  # (N, Q, C)
    see_self = (q_block[:, None] == q_block[None, :]) & (q_off[None, :] <= q_off[:, None])  # (Q, Q)
    allowed = torch.cat([see_cache, see_self.expand(N, Q, Q)], dim=-1)  # (N, Q, C+Q)

    if window is not None:
        kv_idx = torch.cat([cols.expand(N, cache_len), q_idx], dim=-1)  # (N, C+Q)
        allowed &= (q_idx[:, :, None] - kv_idx[:, None, :]) < window

    mask = torch.zeros(N, 1, Q, cache_len + Q, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)  # (N, 1, Q, C+Q)


def block_masks_for(
    config, points: torch.Tensor, cache_len: int, block_len: int, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The block mask in the form the model's forward takes (tensor, or dict by layer type)."""
    as_dict, kinds = attention_kinds(config)
    masks = {kind: block_attention_mask(points, cache_len, block_len, dtype, window) for kind, window in kinds.items()}
    return masks if as_dict else masks["all"]


def kv_channel_layout(points: torch.Tensor, cache_len: int, n_latents: int,
                      text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a latent_channel="kv" pass finds things in the block layout of traces [N_L latents, text_len tokens].

    In that pass the latents are not queries: the B*N_L latent entries come from the coprocessor and sit in
    the cache right after the cache_len prefix columns, and the queries are the B*text_len text tokens.
    Returns (text query indices (B*text_len,), key columns (cache_len + B*N_L + B*text_len,)) into the
    block layout's (Q, C+Q) mask, so the kv pass sees exactly what the trace layout would.
    """
    B, device = points.shape[1], points.device
    start = torch.arange(B, device=device)[:, None] * (n_latents + text_len)  # (B, 1)
    latents = (start + torch.arange(n_latents, device=device)).flatten()  # (B*N_L,)
    text = (start + n_latents + torch.arange(text_len, device=device)).flatten()  # (B*text_len,)
    cols = torch.cat([torch.arange(cache_len, device=device), cache_len + latents, cache_len + text])
    return text, cols


def kv_block_masks_for(
    config, points: torch.Tensor, cache_len: int, n_latents: int, text_len: int, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Masks for a latent_channel="kv" decoder pass: cache = [prefix (cache_len), B*N_L latent entries],
    queries = B blocks of text_len tokens; each (N, 1, B*text_len, cache_len + B*N_L + B*text_len).

    Taken from the trace layout's mask (`block_masks_for`) by `kv_channel_layout`: block b's text sees
    the prefix before p_b, block b's latents and its own earlier text, with the same sliding windows.
    """
    full = block_masks_for(config, points, cache_len, n_latents + text_len, dtype)
    rows, cols = kv_channel_layout(points, cache_len, n_latents, text_len)
    pick = lambda m: m[:, :, rows][:, :, :, cols]  # noqa: E731
    return {k: pick(m) for k, m in full.items()} if isinstance(full, dict) else pick(full)
