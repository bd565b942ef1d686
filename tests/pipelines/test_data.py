"""Ray Data reading and packing: exact against local tokenization, for every shard format."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from cache_aug.config import S3Config
from pipelines.data import TokenizeAndPack, is_heldout, pack_dataset, read_documents

pytestmark = pytest.mark.usefixtures("ray_cluster")

DOCS = [f"Document {i}: " + " ".join(f"word{j}" for j in range(i % 7 + 3)) for i in range(40)]


def _expected_blocks(tok, texts, seq_len):
    flat = []
    for t in texts:
        flat += tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
    n = len(flat) // seq_len
    return np.asarray(flat[: n * seq_len]).reshape(n, seq_len)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "text"])
def test_read_and_pack_equals_local_tokenization(fmt, tiny_default_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_default_dir)
    path = tmp_path / f"docs.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"body": DOCS}), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    else:
        path.write_text("\n".join(DOCS) + "\n")
    ds = read_documents([str(path)], fmt, "body", S3Config())
    assert ds.columns() == ["text"]
    packed = pack_dataset(ds, tok, seq_len=16, docs_per_batch=len(DOCS)).take_all()
    got = np.stack([row["input_ids"] for row in packed])
    assert np.array_equal(got, _expected_blocks(tok, DOCS, 16))


def test_hash_split_is_disjoint_and_stable(tiny_default_dir):
    tok = AutoTokenizer.from_pretrained(tiny_default_dir)
    held = [d for d in DOCS if is_heldout(d, 0.3)]
    assert 0 < len(held) < len(DOCS)
    assert held == [d for d in DOCS if is_heldout(d, 0.3)]
    train_fn = TokenizeAndPack(tok, 8, "train", 0.3)
    held_fn = TokenizeAndPack(tok, 8, "heldout", 0.3)
    batch = {"text": np.asarray(DOCS + [None, ""], dtype=object)}  # nulls and empties are skipped
    assert np.array_equal(held_fn(batch)["input_ids"], _expected_blocks(tok, held, 8))
    assert np.array_equal(train_fn(batch)["input_ids"], _expected_blocks(tok, [d for d in DOCS if d not in held], 8))


def test_missing_column_and_mixed_locations_fail_clearly(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(Exception, match="text"):
        read_documents([str(path)], "parquet", "text", S3Config()).take_all()
    with pytest.raises(ValueError, match="mix local and s3"):
        read_documents([str(path), "s3://b/x.parquet"], "parquet", "text", S3Config())


def test_unusable_rows_are_skipped_and_counted_a_non_text_column_fails(tiny_default_dir, capsys):
    tok = AutoTokenizer.from_pretrained(tiny_default_dir)
    fn = TokenizeAndPack(tok, 8, column="body")
    good = DOCS[:10]
    batch = {"text": np.asarray(good[:5] + [None, "", float("nan"), b"\xff\xfe bad", good[5].encode()] + good[6:],
                                dtype=object)}
    # bytes are text; the rest is left out
    assert np.array_equal(fn(batch)["input_ids"], _expected_blocks(tok, good, 8))
    assert ("skipped 4 of 14 documents of a batch: 1 empty text, 2 null text, 1 text is not valid UTF-8"
            in capsys.readouterr().out)
    for wrong in (7, [1, 2]):
        with pytest.raises(ValueError, match=f"column 'body' holds a {type(wrong).__name__}.*not text"):
            fn({"text": np.asarray(["fine", wrong], dtype=object)})


def test_empty_input_fails_naming_the_paths(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="no rows could be read from .*empty.jsonl"):
        read_documents([str(path)], "jsonl", "text", S3Config())
