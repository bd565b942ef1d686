"""KV-cache plumbing over transformers 5 `DynamicCache` (cache.layers[i].keys / .values).

Two kinds of cache are used:
- *plain* caches (every layer a full `DynamicLayer`), for the block-masked passes: the masks
  themselves apply any sliding window, so every layer keeps every column;
- *model* caches (`DynamicCache(config=...)`), for decoding: sliding layers keep only their
  window, exactly as the model's own `generate` would.

A forward that receives a cache appends to it, so every pass gets its own shallow copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cache_aug.architecture import with_cache

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (N, H_kv, S, D)


def layer_kv(cache: DynamicCache) -> list[KV]:
    """Per-layer (keys, values) of a cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def plain_cache(layers: list[KV]) -> DynamicCache:
    """A fresh cache of full layers over the given tensors (the tensors are shared, not copied)."""
    return DynamicCache(ddp_cache_data=list(layers))


def model_cache(layers: list[KV], config, seq_len: int) -> DynamicCache:
    """A cache shaped the way the model itself builds one, holding `seq_len` positions.

    Sliding-window layers may be given only their last window-1 columns; their true length is
    restored so masks and positions continue at `seq_len` (platform-notes.md, Gemma2).
    Full layers take the given tensors as they are, without a copy: a layer's `update` concatenates
    into a new tensor, so the tensors (e.g. a cached document's) are never written to.
    """
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(layers):
        raise ValueError(f"cache has {len(layers)} layers, the model has {len(cache.layers)}")
    for layer, (k, v) in zip(cache.layers, layers, strict=True):
        if type(layer) is DynamicLayer:
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            continue
        layer.update(k, v)
        if getattr(layer, "is_sliding", False):
            layer.cumulative_length = seq_len
    return cache


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer stores per position."""

    kv_heads: int
    head_dim: int
    sliding_window: int | None  # None: the layer keeps every position


@dataclass(frozen=True)
class CacheSpec:
    """The shape of a decoder's KV cache, read off the model itself (works for any architecture)."""

    layers: tuple[LayerSpec, ...]
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype

    @classmethod
    def from_model(cls, model) -> CacheSpec:
        """Probe the model with one token; cheap, and exact for every architecture."""
        param = next(model.parameters())
        cache = DynamicCache(config=model.config)
        ids = torch.zeros(1, 1, dtype=torch.long, device=param.device)
        with torch.no_grad():
            out = model(**with_cache(model, cache, input_ids=ids, use_cache=True))
        layers = tuple(
            LayerSpec(
                kv_heads=layer.keys.shape[1],
                head_dim=layer.keys.shape[-1],
                sliding_window=int(layer.sliding_window) if getattr(layer, "is_sliding", False) else None,
            )
            for layer in cache.layers
        )
        embed = model.get_input_embeddings()
        return cls(layers=layers, hidden_size=embed.embedding_dim, vocab_size=out.logits.shape[-1], dtype=param.dtype)

    def stored_len(self, layer: int, seq_len: int) -> int:
        """How many positions a model cache of `seq_len` keeps in this layer."""
        window = self.layers[layer].sliding_window
        return seq_len if window is None else min(seq_len, window - 1)

    def kv_shape(self, layer: int, seq_len: int) -> tuple[int, int, int]:
        """(H_kv, S, D) of one layer's keys (and values) for one sequence."""
        spec = self.layers[layer]
        return (spec.kv_heads, seq_len, spec.head_dim)
