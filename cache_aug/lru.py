"""The serving replica's LRU of restored caches: bounded in entries and tensor bytes, with a time to live.

    lru = CacheLRU(max_entries, max_bytes, ttl_s)
    lru.put(doc_id, cache, content_sha256)      # a cache larger than max_bytes is not kept
    lru.get(doc_id)                             # (cache, content_sha256), or None (absent or expired)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from cache_aug.augment import AugmentedCache


class CacheLRU:
    """Restored caches by document id, bounded in entries and tensor bytes, with a time to live."""

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float):
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._items: OrderedDict[str, tuple[AugmentedCache, str | None, int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def nbytes(cache: AugmentedCache) -> int:
        tensors = [cache.input_ids, cache.next_logits, *(t for kv in cache.layers for t in kv)]
        if cache.latents is not None:
            tensors.append(cache.latents)
        return sum(t.numel() * t.element_size() for t in tensors)

    def get(self, doc_id: str) -> tuple[AugmentedCache, str | None] | None:
        with self._lock:
            item = self._items.get(doc_id)
            if item is None or time.monotonic() - item[3] > self.ttl_s:
                if item is not None:
                    self._drop(doc_id)
                self.misses += 1
                return None
            self._items.move_to_end(doc_id)
            self.hits += 1
            return item[0], item[1]

    def __contains__(self, doc_id: str) -> bool:
        """Whether `get` would find it now (does not count as a hit or a miss)."""
        with self._lock:
            item = self._items.get(doc_id)
            return item is not None and time.monotonic() - item[3] <= self.ttl_s

    def put(self, doc_id: str, cache: AugmentedCache, content_sha256: str | None) -> None:
        size = self.nbytes(cache)
        if size > self.max_bytes:
            return
        with self._lock:
            if doc_id in self._items:
                self._drop(doc_id)
            self._items[doc_id] = (cache, content_sha256, size, time.monotonic())
            self.bytes += size
            while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _drop(self, doc_id: str) -> None:
        self.bytes -= self._items.pop(doc_id)[2]

    def __len__(self) -> int:
        return len(self._items)
