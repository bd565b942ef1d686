"""Payload checksums of stored records: chunked CRC32 ("crc32/<chunk>:<crc>,<crc>,..."), chunks checked in
parallel, so a large payload is verified at memory speed."""

from __future__ import annotations

import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor

CHECKSUM_CHUNK = 4 << 20  # bytes per CRC32 chunk written
_CHECKSUM_RE = re.compile(r"crc32/(\d+):([0-9a-f]{8}(?:,[0-9a-f]{8})*)")

_pool: ThreadPoolExecutor | None = None


def _crc_chunks(data, chunk: int) -> list[int]:
    """CRC32 of each `chunk`-byte piece of data, pieces checked in parallel when there are several."""
    global _pool
    view = memoryview(data)
    pieces = [view[i : i + chunk] for i in range(0, len(view), chunk)] or [view]
    if len(pieces) == 1:
        return [zlib.crc32(pieces[0])]
    if _pool is None:
        _pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="cache-aug-crc")
    return list(_pool.map(zlib.crc32, pieces))


def payload_checksum(data, chunk: int = CHECKSUM_CHUNK) -> str:
    """The format-2 checksum of a payload: "crc32/<chunk>:<crc>,<crc>,..." (8 hex digits each)."""
    return f"crc32/{chunk}:" + ",".join(f"{c:08x}" for c in _crc_chunks(data, chunk))


def checksum_matches(data, checksum: str) -> bool:
    """Whether `data` has the stored format-2 checksum (a malformed one never matches)."""
    m = _CHECKSUM_RE.fullmatch(checksum or "")
    if m is None:
        return False
    chunk, stored = int(m.group(1)), m.group(2).split(",")
    if not 1 << 16 <= chunk <= 1 << 30 or len(stored) != max(1, -(-len(data) // chunk)):
        return False
    return [f"{c:08x}" for c in _crc_chunks(data, chunk)] == stored
