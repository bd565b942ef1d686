"""The three passes of cache augmentation (method.md), shared by inference and training.

1. `prefill`: D over the real tokens, causal, no grad -> D's cache K.
2. `latent_pass`: C over B blocks of N_L soft tokens on top of K -> latents z (or, for a module with
   latent_channel="kv", C's own per-layer keys and values at the latent slots).
3. `decoder_pass`: D over B blocks of input embeddings ([z] or [z, x_{p+1..}]) on top of K;
   `kv_decoder_pass`: D over B blocks of text only, on top of K and the latents' KV.

With B = 1 and the points set to the document lengths, passes 2-3 are exactly one augmentation
per row; with many points they are the one-pass training layout.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from cache_aug.architecture import with_cache
from cache_aug.decoder import Decoder
from cache_aug.kv import KV, layer_kv, plain_cache
from cache_aug.masks import block_masks_for, kv_block_masks_for


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def logits_at(decoder: Decoder, keep: torch.Tensor | None, cache=None, **kwargs) -> torch.Tensor:
    """Run the LM (on top of `cache`, if given) and return logits at sequence indices `keep` (all when None):
    (N, len(keep), V)."""
    model = decoder.model
    if cache is not None:
        kwargs = with_cache(model, cache, **kwargs)
    if keep is not None and _takes_logits_to_keep(model):
        return model(**kwargs, logits_to_keep=keep).logits
    logits = model(**kwargs).logits
    return logits if keep is None else logits[:, keep]


def prefill(
    decoder: Decoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[list[KV], torch.Tensor | None]:
    """Pass 1. input_ids (N, T), right-padded where attention_mask (N, T) says so.

    Returns every layer's (keys, values) over all T columns (a plain cache: sliding layers keep
    everything; masks apply windows later), and logits at `keep` (None: no LM head is run).
    """
    cache = DynamicCache()
    with torch.no_grad():
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        if keep is None:
            trunk = decoder.model.base_model
            trunk(**with_cache(trunk, cache, **kwargs))
            logits = None
        else:
            logits = logits_at(decoder, keep, cache, **kwargs)
    return layer_kv(cache), logits


def latent_pass(decoder: Decoder, module, prefix: list[KV], points: torch.Tensor) -> torch.Tensor | list[KV]:
    """Pass 2. points (N, B): prefix lengths. Returns z (N, B*N_L, d), or for latent_channel="kv" the
    latent slots' keys and values per layer, (N, H_kv, B*N_L, D) each, block b's N_L after block b-1's."""
    n_latents = module.n_latents
    positions = module.position_ids(points, n_latents)  # (N, B*N_L)
    if not module.uses_cache:  # pause tokens do not read the cache
        return module(None, positions, None, n_blocks=points.shape[1])
    cache_len = prefix[0][0].shape[2]
    mask = block_masks_for(decoder.config, points, cache_len, n_latents, decoder.dtype)
    return module(plain_cache(prefix), positions, mask, n_blocks=points.shape[1])


def decoder_pass(
    decoder: Decoder,
    prefix: list[KV],
    points: torch.Tensor,
    embeds: torch.Tensor,
    block_len: int,
    keep: torch.Tensor | None,
    position_ids: torch.Tensor,
) -> tuple[torch.Tensor, list[KV]]:
    """Pass 3. embeds (N, B*block_len, d) laid out in blocks, block b after the first p_b cache columns.

    position_ids (N, B*block_len): where the queries sit, by the module's position rule
    (`LatentModule.position_ids`, `masks.block_position_ids`).
    Returns logits at the query indices `keep` (N, len(keep), V) and the cache layers extended by
    the B*block_len new columns (cache_len + B*block_len columns).
    """
    mask = block_masks_for(decoder.config, points, prefix[0][0].shape[2], block_len, decoder.dtype)
    return _extend(decoder, prefix, embeds, mask, keep, position_ids)


def _extend(decoder: Decoder, layers: list[KV], embeds: torch.Tensor, mask, keep: torch.Tensor | None,
            position_ids: torch.Tensor) -> tuple[torch.Tensor, list[KV]]:
    """D over embeds on top of the given cache layers: logits at `keep`, and the extended layers."""
    cache = plain_cache(layers)
    logits = logits_at(decoder, keep, inputs_embeds=embeds, cache=cache, position_ids=position_ids,
                       attention_mask=mask, use_cache=True)
    return logits, layer_kv(cache)


def kv_decoder_pass(
    decoder: Decoder,
    prefix: list[KV],
    latent_kv: list[KV],
    points: torch.Tensor,
    embeds: torch.Tensor,
    text_len: int,
    keep: torch.Tensor | None,
    position_ids: torch.Tensor,
) -> tuple[torch.Tensor, list[KV]]:
    """Pass 3 for latent_channel="kv". embeds (N, B*text_len, d): block b's text ([x_p, x_{p+1}, ..]).

    The cache is the prefix (C columns) followed by every block's N_L latent entries (latent_kv, from
    `latent_pass`); block b's text sees the prefix before p_b, block b's latents and its own earlier
    text (`masks.kv_block_masks_for`). position_ids (N, B*text_len): the text slots' positions under the
    module's rule. Returns logits at query indices `keep` (N, len(keep), V) and the cache layers
    (C + B*N_L + B*text_len columns, in that order).
    """
    cache_len = prefix[0][0].shape[2]
    n_latents = latent_kv[0][0].shape[2] // points.shape[1]
    mask = kv_block_masks_for(decoder.config, points, cache_len, n_latents, text_len, decoder.dtype)
    layers = [(torch.cat([k, lk.to(k.dtype)], 2), torch.cat([v, lv.to(v.dtype)], 2))
              for (k, v), (lk, lv) in zip(prefix, latent_kv, strict=True)]
    return _extend(decoder, layers, embeds, mask, keep, position_ids)
