"""The Arrow schema of one stored cache record (`RECORD_SCHEMA`), apart from the code that makes and checks records.

Kept free of torch so that reading the store's layout (listing, compaction, accounting) stays cheap;
`cache_aug.records` documents every column and re-exports the schema.
"""

from __future__ import annotations

import pyarrow as pa

RECORD_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("n_latents", pa.int32(), nullable=False),
        pa.field("doc_tokens", pa.int32(), nullable=False),
        pa.field("seq_len", pa.int32(), nullable=False),
        pa.field("shapes", pa.string(), nullable=False),
        pa.field("payload", pa.large_binary(), nullable=False),
        pa.field("payload_checksum", pa.string()),
        pa.field("format_version", pa.int16(), nullable=False),
        pa.field("content_sha256", pa.string()),
        pa.field("truncated", pa.bool_()),
        pa.field("payload_sha256", pa.string()),
        pa.field("position_rule", pa.string()),
        pa.field("gain", pa.float64()),
    ]
)
