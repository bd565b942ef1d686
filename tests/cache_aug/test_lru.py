"""The serving replica's LRU of restored caches: its bounds in entries, bytes and time."""

from __future__ import annotations

from cache_aug.augment import augment
from cache_aug.lru import CacheLRU


def test_lru_holds_its_bounds(setup):
    dec, module, _ = setup
    caches = augment(dec, module, [[5, 6, 7, 8]] * 6)
    size = CacheLRU.nbytes(caches[0])
    lru = CacheLRU(max_entries=4, max_bytes=3 * size, ttl_s=60)
    for i, c in enumerate(caches):
        lru.put(f"d{i}", c, None)
        assert len(lru) <= 3 and lru.bytes <= 3 * size
    assert lru.get("d0") is None and lru.get("d5") is not None
    assert lru.bytes == sum(CacheLRU.nbytes(c) for c in caches[3:])
    expired = CacheLRU(max_entries=4, max_bytes=10 * size, ttl_s=0)
    expired.put("a", caches[0], None)
    assert expired.get("a") is None and expired.bytes == 0


def test_membership_says_what_get_would_find_without_counting(setup):
    dec, module, _ = setup
    cache = augment(dec, module, [[5, 6, 7, 8]])[0]
    lru = CacheLRU(max_entries=4, max_bytes=1 << 30, ttl_s=60)
    lru.put("a", cache, None)
    assert "a" in lru and "b" not in lru and (lru.hits, lru.misses) == (0, 0)
    expired = CacheLRU(max_entries=4, max_bytes=1 << 30, ttl_s=0)
    expired.put("a", cache, None)
    assert "a" not in expired and expired.get("a") is None  # the serve fast path never skips a needed read
