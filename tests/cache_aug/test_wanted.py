"""The wanted queue's writer on its own (local disk, and an S3 endpoint that refuses connections), and the engine's
misses reaching it. Consumption by the corpus job, with Ray and the S3 server: tests/pipelines/test_wanted.py."""

from __future__ import annotations

import socket

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from cache_aug.augment import augment
from cache_aug.config import ServeConfig
from cache_aug.engine import CompletionEngine, CompletionRequest
from cache_aug.records import encode_record
from cache_aug.wanted import (
    WANTED_SCHEMA,
    WantedQueue,
    consumed_names,
    file_time,
    queue_files,
    text_sha256,
)


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _entries(fs, root) -> list[dict]:
    rows = []
    for f in queue_files(fs, root):
        table = pq.read_table(f, filesystem=fs)
        assert table.schema == WANTED_SCHEMA
        rows += table.to_pylist()
    return rows


def test_batches_deduplicates_and_bounds(tmp_path):
    fs, root, clock = pafs.LocalFileSystem(), str(tmp_path / "out"), Clock()
    q = WantedQueue(fs, root, flush_rows=3, max_pending=4, requeue_s=60, clock=clock, start=False)
    assert q.add("a", text_sha256("alpha"), "missing", "alpha")
    assert not q.add("a", text_sha256("alpha"), "missing", "alpha")  # pending already
    assert q.add("a", text_sha256("alpha 2"), "stale", "alpha 2")  # another text of it: another entry
    assert q.add("b", text_sha256("beta"), "refused")
    assert q.flush() == 3 and q.flush() == 0  # nothing left: no empty file
    [f] = queue_files(fs, root)
    assert file_time(f) == pytest.approx(clock.t, abs=1)
    assert sorted((r["doc_id"], r["reason"], r["text"]) for r in _entries(fs, root)) == [
        ("a", "missing", "alpha"), ("a", "stale", "alpha 2"), ("b", "refused", None)]
    assert not q.add("a", text_sha256("alpha"), "missing", "alpha")  # written a moment ago: not again
    clock.t += 61
    assert q.add("a", text_sha256("alpha"), "missing", "alpha")  # requeue_s later it is
    for d in "cdef":
        q.add(d, text_sha256(d), "missing", d)
    s = q.stats()
    assert s["pending"] == 4 and s["dropped_full_buffer"] == 1 and s["duplicates"] == 2
    assert {r["replica"] for r in _entries(fs, root)} == {s["replica"]}  # /healthz names the replica its files do
    assert not q.add("x", "0" * 64, "not a reason")  # refused, never raised


def test_the_queue_on_storage_is_bounded(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    q = WantedQueue(fs, root, max_files=2, start=False)
    for i in range(3):
        q.add(f"d{i}", text_sha256(str(i)), "missing")
        q.flush()
    assert len(queue_files(fs, root)) == 2 and q.stats()["dropped_full_queue"] == 1 and q.pending() == 0


def test_text_is_left_to_the_document_store_that_holds_it(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    held = {"in-store"}

    def has(doc_id: str) -> bool:
        if doc_id == "broken":
            raise OSError("document store down")
        return doc_id in held

    q = WantedQueue(fs, root, has_document=has, max_text_bytes=16, start=False)
    q.add("in-store", text_sha256("t1"), "missing", "t1")
    q.add("elsewhere", text_sha256("t2"), "missing", "t2")
    q.add("broken", text_sha256("t3"), "missing", "t3")
    q.add("huge", text_sha256("x" * 17), "missing", "x" * 17)
    q.flush()
    assert {r["doc_id"]: r["text"] for r in _entries(fs, root)} == {
        "in-store": None, "elsewhere": "t2", "broken": "t3", "huge": None}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections are refused


def test_a_store_outage_keeps_the_entries_and_never_raises(tmp_path):
    down = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{_closed_port()}", scheme="http", access_key="k",
                             secret_key="s", region="us-east-1", connect_timeout=1, request_timeout=1,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    q = WantedQueue(down, "bucket/out", start=False)
    assert q.add("a", text_sha256("alpha"), "missing", "alpha")
    assert q.flush() == 0  # refused: kept, counted
    s = q.stats()
    assert s["pending"] == 1 and s["write_errors"] == 1 and s["last_error"]
    q.fs = pafs.LocalFileSystem()  # the store is back (here: another one)
    q.root = str(tmp_path / "out")
    assert q.flush() == 1 and q.stats()["last_error"] is None
    assert [r["doc_id"] for r in _entries(q.fs, q.root)] == ["a"]


def test_background_writer_flushes_and_close_writes_the_rest(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    q = WantedQueue(fs, root, flush_s=0.05, flush_rows=2)
    q.add("a", text_sha256("a"), "missing")
    q.add("b", text_sha256("b"), "missing")  # flush_rows: written without waiting
    import time

    deadline = time.time() + 10
    while q.stats()["written"] < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert q.stats()["written"] == 2
    q.add("c", text_sha256("c"), "missing")
    q.close()
    assert sorted(r["doc_id"] for r in _entries(fs, root)) == ["a", "b", "c"]
    assert not any(".tmp" in i.path for i in fs.get_file_info(pafs.FileSelector(f"{root}/wanted")))


def test_consumed_names_reads_the_succeeded_manifests_that_can_name_them(tmp_path):
    import json

    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    files = [f"{root}/wanted/20261201T100000Z-aaaa.parquet", f"{root}/wanted/20261201T110000Z-bbbb.parquet"]
    (tmp_path / "out" / "manifests").mkdir(parents=True)
    for run, status, names in [("20261201T105000Z-1", "succeeded", ["20261201T100000Z-aaaa.parquet"]),
                               ("20261201T115000Z-2", "failed", ["20261201T110000Z-bbbb.parquet"]),
                               ("20261101T000000Z-0", "succeeded", ["20261201T110000Z-bbbb.parquet"])]:  # too old
        (tmp_path / "out" / "manifests" / f"{run}.json").write_text(
            json.dumps({"run_id": run, "status": status, "wanted": {"files": names}}))
    assert consumed_names(fs, root, files, "manifests") == {"20261201T100000Z-aaaa.parquet"}
    assert consumed_names(fs, root, [], "manifests") == set()


def _req(**kw) -> CompletionRequest:
    return CompletionRequest(**({"model": "m", "prompts": [[5, 6]], "max_tokens": 4, "temperature": 0.0} | kw))


class Records:
    def __init__(self, records, fail: bool = False):
        self.records, self.fail = records, fail

    def get(self, doc_id):
        if self.fail:
            raise OSError("store down")
        return self.records.get(doc_id)


class Queue:
    def __init__(self):
        self.entries = []

    def add(self, *entry) -> bool:
        self.entries.append(entry)
        return True


def test_the_engine_queues_each_kind_of_miss_whose_text_is_known(setup):
    dec, module, fp = setup
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (9,), generator=g).tolist()
    aug = augment(dec, module, [ids])[0]
    good = encode_record(aug, doc_id="d0", fingerprint=fp, mode="latent_kv", dtype="float32", spec=dec.cache_spec,
                         content_sha256=text_sha256("stored text"))
    forged = encode_record(aug, doc_id="d1", fingerprint="0" * 32, mode="latent_kv", dtype="float32",
                           spec=dec.cache_spec, content_sha256=text_sha256("t1"))
    texts = {"d1": "t1", "d3": "t3"}
    docs = type("Docs", (), {"get": staticmethod(lambda i: texts.get(i))})()
    q = Queue()
    eng = CompletionEngine(dec, module, fp, ServeConfig(max_tokens=64), records=Records({"d0": good, "d1": forged}),
                           documents=docs, wanted=q)
    assert eng.plan(_req(document_id="d0")).source == "stored"
    assert eng.plan(_req(document_id="d0", document="another text")).source == "online"  # stale, text sent
    assert eng.plan(_req(document_id="d1")).source == "online"  # refused, text from the document store
    assert eng.plan(_req(document_id="d2", document="t2")).source == "online"  # missing, text sent
    assert eng.plan(_req(document_id="d3")).source == "online"  # missing, text from the document store
    assert eng.plan(_req(document_id="d4")).source == "none"  # missing, text unknown: nothing to queue
    assert eng.plan(_req(document_id="d0")).source == "stored"  # an LRU hit
    assert q.entries == [("d0", text_sha256("another text"), "stale", "another text"),
                         ("d1", text_sha256("t1"), "refused", None), ("d2", text_sha256("t2"), "missing", "t2"),
                         ("d3", text_sha256("t3"), "missing", None)]
    down = CompletionEngine(dec, module, fp, ServeConfig(max_tokens=64), records=Records({}, fail=True),
                            documents=docs, wanted=q)
    plan = down.plan(_req(document_id="d3"))
    assert plan.source == "online" and "unreadable" in plan.reason and len(q.entries) == 4  # an outage is no miss
