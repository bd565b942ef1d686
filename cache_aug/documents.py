"""Corpus documents as untrusted input: validation, content hashes, and the length policy.

Every input row of the corpus job ends in exactly one place (a cache record, "skipped: up to
date", or the errors table with a reason); `prepare_document` decides which, per row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


class DocumentError(ValueError):
    """A document that cannot be augmented; the message is the reason stored in the errors table."""


@dataclass(frozen=True)
class PreparedDocument:
    doc_id: str
    content_sha256: str  # of the text's UTF-8 bytes
    input_ids: list[int]
    truncated: bool  # True when the text was cut to max_tokens (only if the config allows it)
    n_tokens: int  # before truncation


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_text(raw: bytes | str | None) -> str:
    """Strict UTF-8 text of a raw cell, or DocumentError naming the problem."""
    if raw is None:
        raise DocumentError("null text")
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"text is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def usable_text(raw, column: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable training / evaluation cell, (None, reason) for one to skip and count.

    Null (or NaN, as pandas reads a missing JSON value), empty and invalid UTF-8 cells are skipped with
    their reason; a cell that is not text at all (a number, a list) means the column is the wrong one,
    and raises ValueError naming it.
    """
    if raw is None or (isinstance(raw, float) and raw != raw):
        return None, "null text"
    if not isinstance(raw, (str, bytes, bytearray, memoryview)):
        raise ValueError(f"column {column!r} holds a {type(raw).__name__} ({str(raw)[:40]!r}), not text: "
                         "is it the right text column?")
    try:
        text = decode_text(raw)
    except DocumentError as e:
        return None, str(e).split(" (")[0]
    return (text, None) if text.strip() else (None, "empty text")


def prepare_document(doc_id, raw_text, tokenizer, *, max_tokens: int, truncate: bool) -> PreparedDocument:
    """Validate one row and tokenize it; raises DocumentError with the reason otherwise."""
    if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()):
        raise DocumentError("missing doc_id")
    text = decode_text(raw_text)
    if not text.strip():
        raise DocumentError("empty text")
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = len(ids)
    if n > max_tokens:
        if not truncate:
            raise DocumentError(f"too long: {n} tokens > max_tokens {max_tokens} (truncation is off)")
        ids = ids[:max_tokens]
    return PreparedDocument(str(doc_id), content_hash(text.encode("utf-8")), ids, n > max_tokens, n)
