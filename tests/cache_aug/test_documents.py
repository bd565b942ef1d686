"""Corpus rows as untrusted input: each bad case gets a reason, truncation only when allowed."""

import pytest

from cache_aug.documents import DocumentError, content_hash, prepare_document
from cache_aug.testing import byte_tokenizer

TOK = byte_tokenizer()  # one token per character


@pytest.mark.parametrize(
    "doc_id, text, reason",
    [
        (None, "text", "missing doc_id"),
        ("  ", "text", "missing doc_id"),
        ("a", None, "null text"),
        ("a", "", "empty text"),
        ("a", " \n\t ", "empty text"),
        ("a", b"\xc3\x28 broken", "not valid UTF-8 \\(byte 0"),
        ("a", "x" * 11, "too long: 11 tokens > max_tokens 10"),
    ],
)
def test_bad_rows_have_reasons(doc_id, text, reason):
    with pytest.raises(DocumentError, match=reason):
        prepare_document(doc_id, text, TOK, max_tokens=10, truncate=False)


def test_valid_and_truncated():
    doc = prepare_document("a", "héllo".encode(), TOK, max_tokens=10, truncate=False)
    assert doc.content_sha256 == content_hash("héllo".encode()) and not doc.truncated and doc.n_tokens == 5
    assert doc == prepare_document("a", "héllo", TOK, max_tokens=10, truncate=False)  # bytes and str agree
    cut = prepare_document("a", "x" * 11, TOK, max_tokens=10, truncate=True)
    assert cut.truncated and len(cut.input_ids) == 10 and cut.n_tokens == 11
    assert cut.content_sha256 == content_hash(b"x" * 11)  # the hash is of the full text
