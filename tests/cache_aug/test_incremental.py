"""The corpus job's per-partition marking of duplicated ids and done documents, as plain table operations."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from cache_aug.documents import content_hash
from cache_aug.incremental import (
    DONE,
    DUPLICATES,
    KEY,
    PARTITION,
    QUEUED,
    TEXT,
    WANTED,
    key_input_rows,
    key_record_rows,
    key_wanted_rows,
    mark_partition,
    partition_of,
)
from cache_aug.wanted import WANTED_SCHEMA


def _inputs(rows: list[tuple]) -> pa.Table:
    texts = [t.encode() if isinstance(t, str) else t for _, t in rows]
    return pa.table({"doc_id": pa.array([d for d, _ in rows], pa.string()), "text": pa.array(texts, pa.binary())})


def _records(rows: list[tuple[str, str | None, str]]) -> pa.Table:
    return pa.table({"doc_id": [d for d, _, _ in rows],
                     "content_sha256": pa.array([h for _, h, _ in rows], pa.string()),
                     "fingerprint": [f for _, _, f in rows]})


def _marked(inputs: pa.Table, records: pa.Table, n_partitions: int) -> dict[tuple, tuple]:
    """Mark each partition apart, as the job does: (id, text) -> (duplicates, done) over all partitions."""
    both = pa.concat_tables([key_input_rows(inputs, id_column="doc_id", text_column="text", n_partitions=n_partitions),
                             key_record_rows(records, fingerprint="fp", n_partitions=n_partitions)])
    out = {}
    for p in range(n_partitions):
        part = both.filter(pc.equal(both.column(PARTITION), p))
        for row in mark_partition(part).to_pylist():
            key = (row[KEY], row[TEXT])
            assert key not in out, key
            out[key] = (row[DUPLICATES], row[DONE])
    return out


def test_duplicates_and_done_as_over_the_whole_input():
    inputs = _inputs([("a", "alpha"), ("b", "beta"), ("b", "beta 2"), ("c", "gamma"), (None, "no id"), ("", "blank 1"),
                      ("", "blank 2"), ("d", None), ("e", b"\xff bad"), ("f", "changed")])
    records = _records([("a", content_hash(b"alpha"), "fp"), ("a", content_hash(b"alpha"), "fp"),  # twice: one row out
                        ("c", content_hash(b"gamma"), "other-models"), ("f", content_hash(b"old text"), "fp"),
                        ("zz", content_hash(b"not in the input"), "fp"), ("d", None, "fp")])
    for n_partitions in (1, 3, 16):
        marked = _marked(inputs, records, n_partitions)
        assert len(marked) == inputs.num_rows  # every input row once, no record row
        assert marked[("a", b"alpha")] == (None, True)
        assert marked[("b", b"beta")] == marked[("b", b"beta 2")] == (2, False)  # every copy
        assert marked[("c", b"gamma")] == (None, False)  # only a record of other models
        assert marked[(None, b"no id")] == (None, False)  # a missing id is never a duplicate
        assert marked[("", b"blank 1")] == marked[("", b"blank 2")] == (2, False)  # as str(id) counted them
        assert marked[("d", None)] == (None, False)
        assert marked[("f", b"changed")] == (None, False)  # its record is of another text


def test_keys_are_the_ledgers_ids_and_partitions_are_stable():
    table = pa.table({"id": pa.array([7, None, 7], pa.int64()), "text": ["x", "y", "z"]})
    keyed = key_input_rows(table, id_column="id", text_column="text", n_partitions=5)
    assert keyed.column(KEY).to_pylist() == ["7", None, "7"]
    assert keyed.column(PARTITION).to_pylist() == [partition_of("7", 5), 0, partition_of("7", 5)]
    assert mark_partition(keyed).column(DUPLICATES).to_pylist().count(2) == 2
    empty = mark_partition(keyed.slice(0, 0))
    assert empty.num_rows == 0 and empty.column_names == [KEY, TEXT, DUPLICATES, DONE, WANTED, QUEUED]


def _wanted(rows: list[tuple]) -> pa.Table:
    """Queue entries (doc_id, text or None, reason, wanted_at); the hash is the text's, or of `doc_id` when None."""
    return pa.Table.from_pylist(
        [{"doc_id": d, "content_sha256": content_hash((t or f"unknown {d}").encode()), "reason": r, "text": t,
          "wanted_at": at, "replica": "r"} for d, t, r, at in rows], schema=WANTED_SCHEMA)


def _marked_wanted(inputs, records, wanted, n_partitions, wanted_only=False) -> list[dict]:
    sides = [key_input_rows(inputs, id_column="doc_id", text_column="text", n_partitions=n_partitions),
             key_record_rows(records, fingerprint="fp", n_partitions=n_partitions),
             key_wanted_rows(wanted, n_partitions=n_partitions)]
    both = pa.concat_tables(sides)
    out = []
    for p in range(n_partitions):
        part = both.filter(pc.equal(both.column(PARTITION), p))
        out += mark_partition(part, wanted_only=wanted_only).to_pylist()
    return out


def test_wanted_entries_merge_into_one_row_per_document():
    inputs = _inputs([("a", "alpha"), ("b", "beta"), ("b", "beta 2"), ("c", "gamma")])
    records = _records([("c", content_hash(b"gamma"), "fp"), ("q2", content_hash(b"queued two"), "fp")])
    wanted = _wanted([
        ("a", None, "missing", 1.0), ("a", "alpha", "missing", 2.0), ("a", "another alpha", "stale", 3.0),  # 3 replicas
        ("b", None, "missing", 1.0),  # a duplicated id of the input: marks one of its rows
        ("q1", "queued one", "missing", 1.0), ("q1", "queued one", "missing", 1.5),  # only the queue names it
        ("q1", None, "missing", 0.5),
        ("q2", "queued two", "refused", 1.0),  # only the queue, and already done
        ("q3", None, "missing", 1.0),  # only the queue, text unknown
    ])
    for n_partitions in (1, 4, 16):
        rows = _marked_wanted(inputs, records, wanted, n_partitions)
        assert len(rows) == inputs.num_rows + 3  # the input's rows, and one per id only the queue names
        by = {}
        for r in rows:
            by.setdefault(r[KEY], []).append(r)
        assert [r[WANTED] for r in by["a"]] == ["stale"] and by["a"][0][TEXT] == b"alpha"  # the input's text wins
        assert sorted(str(r[WANTED]) for r in by["b"]) == ["None", "missing"]  # one mark per id
        assert by["c"][0][WANTED] is None and by["c"][0][DONE]
        q1, q2, q3 = by["q1"], by["q2"], by["q3"]
        assert len(q1) == len(q2) == len(q3) == 1
        assert q1[0][TEXT] == b"queued one" and q1[0][QUEUED] and q1[0][WANTED] == "missing" and not q1[0][DONE]
        assert q2[0][DONE] and q2[0][WANTED] == "refused"
        assert q3[0][TEXT] is None and q3[0][QUEUED]
        assert all(r[QUEUED] is None for k in "abc" for r in by[k])
        only = _marked_wanted(inputs, records, wanted, n_partitions, wanted_only=True)
        assert sorted((r[KEY], r[WANTED]) for r in only) == [("a", "stale"), ("b", "missing"), ("q1", "missing"),
                                                             ("q2", "refused"), ("q3", "missing")]
