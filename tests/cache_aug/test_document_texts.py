"""Document texts by id from a Parquet corpus, for online augmentation."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from cache_aug.document_texts import DocumentTexts


def test_document_texts_with_integer_ids(tmp_path):
    # the corpus job accepts integer ids and stores them as str(id): the lookup must find them by that string
    pq.write_table(pa.table({"doc_id": pa.array([1, 2, 22], pa.int64()), "text": ["one", "two", "twenty-two"]}),
                   tmp_path / "int.parquet")
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["alpha", "beta"]}), tmp_path / "str.parquet")
    ints, strs = DocumentTexts([str(tmp_path / "int.parquet")]), DocumentTexts([str(tmp_path / "str.parquet")])
    assert [ints.get(i) for i in ("1", "2", "22", "3", "01")] == ["one", "two", "twenty-two", None, None]
    assert [strs.get(i) for i in ("a", "b", "c")] == ["alpha", "beta", None]
