"""cache_aug.evaluate's document reading: duplicate ids and non-text columns refused, unusable texts counted; its
output: a local directory.

`cache-aug eval` end to end (report schema, identical points, values re-derived) is tests/jobs/test_eval_command.py.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cache_aug.config import CacheAugConfig, EvalConfig
from cache_aug.evaluate import document_rows, read_documents, run_eval


def test_duplicate_ids_and_non_text_columns_are_refused_naming_them(tmp_path):
    ev = EvalConfig(paths=[str(tmp_path / "docs")])
    (tmp_path / "docs").mkdir()
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["one text", "two"]}), tmp_path / "docs" / "part-0.parquet")
    pq.write_table(pa.table({"doc_id": ["c", "a"], "text": ["three", "another text"]}),
                   tmp_path / "docs" / "part-1.parquet")
    with pytest.raises(ValueError, match="eval.id_column 'doc_id': 1 ids name more than one row: 'a' \\(2 rows\\)"):
        read_documents(ev)
    skipped = Counter()
    rows = {"doc_id": ["a", "b", "c", "d"], "text": ["fine", None, b"\xff", "\t"]}
    assert document_rows(rows, ev, skipped) == [("a", "fine")]
    assert skipped == {"null text": 1, "text is not valid UTF-8": 1, "empty text": 1}
    with pytest.raises(ValueError, match="column 'text' holds a int"):
        document_rows({"doc_id": ["a", "b"], "text": ["fine", 12]}, ev)


def test_run_eval_writes_a_local_directory_only():
    """Object storage is the caller's: an s3:// output is refused before anything is loaded."""
    cfg = CacheAugConfig(eval=EvalConfig(output="s3://bucket/report"))
    with pytest.raises(ValueError, match="run_eval writes a local directory, not 's3://bucket/report'"):
        run_eval(cfg)
