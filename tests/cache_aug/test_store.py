"""The store with compaction: one current record per document, the newest run's; readers never see a mix of two
snapshots; a compaction killed at any step loses and duplicates nothing; a lookup reads one bucket's row group,
after one run or many. On a local disk and on S3 (SeaweedFS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cache_aug.compaction import KILL_AT_ENV, collect_garbage, compact
from cache_aug.config import CompactionConfig
from cache_aug.record_schema import RECORD_SCHEMA
from cache_aug.store import (
    POINTER,
    AugmentedCacheReader,
    bucket_of,
    current_files,
    done_documents,
    kind_files,
    read_kind,
    read_pointer,
    snapshot_files,
    unfolded_runs,
)

ROOT = Path(__file__).resolve().parents[2]
NB = 4  # buckets
RPG = 2  # rows per row group
FP = "fp-current"
OPTS = CompactionConfig(grace_s=3600, stale_run_s=3600)


# ---------------------------------------------------------------- a store written directly (no models, no Ray)


def run_id(i: int) -> str:
    return f"20260101T{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}Z-{i:08x}"


def payload(run: str, doc: str) -> bytes:
    return f"{run}/{doc}".encode()


def write_run(fs, root: str, run: str, docs, *, fingerprint: str = FP, manifest: bool = True,
              errors: tuple[str, ...] = ()) -> None:
    """A run as the corpus job leaves it: record files per bucket (with a run_id column), errors, a manifest."""
    by_bucket: dict[str, list[dict]] = {}
    for d in docs:
        by_bucket.setdefault(bucket_of(d, NB), []).append({
            "doc_id": d, "fingerprint": fingerprint, "mode": "latents", "dtype": "float32", "n_latents": 1,
            "doc_tokens": 1, "seq_len": 2, "shapes": "{}", "payload": payload(run, d), "format_version": 2,
            "content_sha256": f"h-{run}-{d}", "truncated": False, "position_rule": "shift"})
    for b, rows in by_bucket.items():
        table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA).append_column("run_id", pa.array([run] * len(rows)))
        base = f"{root}/runs/{run}/kind=record/bucket={b}"
        fs.create_dir(base, recursive=True)
        pq.write_table(table, f"{base}/{uuid.uuid4().hex[:6]}.parquet", filesystem=fs, row_group_size=RPG)
    if errors:
        base = f"{root}/runs/{run}/kind=error/bucket=-"
        fs.create_dir(base, recursive=True)
        pq.write_table(pa.table({"doc_id": list(errors), "reason": ["empty text"] * len(errors),
                                 "run_id": [run] * len(errors)}), f"{base}/e.parquet", filesystem=fs)
    if manifest:
        finish_run(fs, root, run)


def finish_run(fs, root: str, run: str) -> None:
    fs.create_dir(f"{root}/manifests", recursive=True)
    with fs.open_output_stream(f"{root}/manifests/{run}.json") as f:
        f.write(json.dumps({"run_id": run, "status": "succeeded",
                            "config": {"corpus": {"index_buckets": NB}}}).encode())


def do_compact(fs, root, options=OPTS, fingerprint=FP, **kw):
    return compact(fs, root, fingerprint=fingerprint, n_buckets=NB, options=options, rows_per_group=RPG,
                   max_rows_per_file=5, **kw)


def check(fs, root: str, expected: dict[str, bytes], absent=("no-such-doc",)) -> None:
    """Every document has exactly one current record, the newest run's, through a fresh reader and the current files;
    no (document, run) row is there twice; done_documents has the newest content of each."""
    reader = AugmentedCacheReader(fs, root, NB, list_ttl_s=0)
    got = {d: (r.payload if (r := reader.get(d)) is not None else None) for d in expected}
    assert got == expected
    for d in absent:
        assert reader.get(d) is None
    files = current_files(fs, root)
    tables = [pq.read_table(f, columns=["doc_id", "run_id", "payload"], filesystem=fs) for f in files]
    rows = pa.concat_tables(tables, promote_options="permissive").to_pylist() if tables else []
    pairs = Counter((r["doc_id"], r["run_id"]) for r in rows)
    assert not [p for p, n in pairs.items() if n > 1], "a record is current twice"
    newest: dict[str, dict] = {}
    for r in rows:
        if r["doc_id"] not in newest or r["run_id"] > newest[r["doc_id"]]["run_id"]:
            newest[r["doc_id"]] = r
    assert {d: r["payload"] for d, r in newest.items()} == expected
    assert {(d, f"h-{p.decode().split('/')[0]}-{d}") for d, p in expected.items()} <= done_documents(fs, root, FP)


# ---------------------------------------------------------------- local disk and S3


@pytest.fixture(scope="module")
def s3_bucket(s3_server):
    client = s3_server["client"]
    client.create_bucket(Bucket="store-tests")
    host = s3_server["endpoint"].split("://", 1)[1]
    return {"host": host, "key": s3_server["key"], "secret": s3_server["secret"]}


def _s3(spec) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=spec["host"], scheme="http", access_key=spec["key"],
                             secret_key=spec["secret"], region="us-east-1")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """(filesystem, root, a spec another process builds the same filesystem from)."""
    if request.param == "local":
        return pafs.LocalFileSystem(), str(tmp_path / "out"), {"kind": "local"}
    spec = request.getfixturevalue("s3_bucket")
    return _s3(spec), f"store-tests/{uuid.uuid4().hex[:8]}", {"kind": "s3", **spec}


# ---------------------------------------------------------------- the newest run wins


def test_every_document_has_one_current_record_the_newest_runs(store):
    fs, root, _ = store
    docs = [f"doc-{i}" for i in range(30)]
    r1, r2, r3, r4 = run_id(1), run_id(2), run_id(3), run_id(4)
    write_run(fs, root, r1, docs)
    write_run(fs, root, r2, docs[:10])  # re-augmented later
    expected = {d: payload(r2 if i < 10 else r1, d) for i, d in enumerate(docs)}
    check(fs, root, expected)  # before any compaction: the runs as they are
    first = do_compact(fs, root)
    assert first["status"] == "compacted" and first["folded"] == [r1, r2]
    assert first["counts"] == {"records": 30, "documents": 30, "dropped_fingerprint": 0, "superseded": 10}
    check(fs, root, expected)
    write_run(fs, root, r3, docs[5:15])  # a later run, not folded yet
    expected |= {d: payload(r3, d) for d in docs[5:15]}
    check(fs, root, expected)
    assert do_compact(fs, root)["folded"] == [r3]
    check(fs, root, expected)
    pointer = read_pointer(fs, root)
    assert list(pointer["runs"]) == [r1, r2, r3] and pointer["folded_through"] == r3
    # each bucket's snapshot files: sorted by doc_id across files, row groups of RPG rows
    for b in pointer["bucket_files"]:
        ids = []
        for path in snapshot_files(root, pointer, "record", b):
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                assert all(meta.row_group(i).num_rows <= RPG for i in range(meta.num_row_groups))
            ids += pq.read_table(path, columns=["doc_id"], filesystem=fs).column(0).to_pylist()
        assert ids == sorted(ids) and len(ids) == len(set(ids)) and {bucket_of(d, NB) for d in ids} == {b}
    assert do_compact(fs, root)["status"] == "unchanged"  # nothing new: nothing written
    write_run(fs, root, r4, docs[:3])
    expected |= {d: payload(r4, d) for d in docs[:3]}
    check(fs, root, expected)


def test_a_run_without_manifest_stops_the_fold_until_it_is_stale(store):
    fs, root, _ = store
    r1, r2, r3 = run_id(1), run_id(2), run_id(3)
    write_run(fs, root, r1, ["a", "b", "c"])
    write_run(fs, root, r2, ["b"], manifest=False)  # in progress (or killed): no manifest
    write_run(fs, root, r3, ["c"])
    expected = {"a": payload(r1, "a"), "b": payload(r2, "b"), "c": payload(r3, "c")}
    out = do_compact(fs, root)
    assert out["folded"] == [r1] and out["waiting_on"] == r2
    assert list(read_pointer(fs, root)["runs"]) == [r1]
    check(fs, root, expected)  # r2 and r3 still read, newest first
    out = do_compact(fs, root, options=CompactionConfig(grace_s=3600, stale_run_s=0))  # r2 crashed long ago
    assert out["folded"] == [r2, r3] and out["folded_as_crashed"] == [r2]
    check(fs, root, expected)


def test_a_run_that_starts_during_compaction_is_not_folded_and_stays_visible(store):
    fs, root, _ = store
    r1, r2, r3 = run_id(1), run_id(2), run_id(3)
    write_run(fs, root, r1, ["a", "b", "c"])

    def buckets_then_runs_start(fn, jobs):
        write_run(fs, root, r2, ["a"])  # starts and finishes while the buckets are written
        write_run(fs, root, r3, ["b"], manifest=False)  # starts, still running at the switch
        results = [fn(**job) for job in jobs]
        collect_garbage(fs, root, OPTS)  # a garbage-only call meanwhile: the snapshot being written is not garbage
        return results

    out = do_compact(fs, root, map_buckets=buckets_then_runs_start)
    assert out["folded"] == [r1] and list(read_pointer(fs, root)["runs"]) == [r1]
    expected = {"a": payload(r2, "a"), "b": payload(r3, "b"), "c": payload(r1, "c")}
    check(fs, root, expected)
    finish_run(fs, root, r3)
    assert do_compact(fs, root)["folded"] == [r2, r3]
    check(fs, root, expected)


def test_a_late_run_sorting_before_the_folded_ones_wins_only_where_newer(tmp_path):
    """A run whose id sorts before the newest folded run (its first file landed after the compaction listed the runs)
    is unfolded: it is current only for documents the snapshot holds from older runs."""
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    r1, late, r3 = run_id(1), run_id(2), run_id(3)
    write_run(fs, root, r1, ["a", "b"])
    write_run(fs, root, r3, ["b"])
    do_compact(fs, root)
    write_run(fs, root, late, ["a", "b"])
    expected = {"a": payload(late, "a"), "b": payload(r3, "b")}
    check(fs, root, expected)
    assert do_compact(fs, root)["folded"] == [late]
    check(fs, root, expected)


# ---------------------------------------------------------------- the switch and the grace period


def test_a_reader_never_sees_a_mix_of_two_snapshots(store):
    fs, root, _ = store
    docs = [f"d{i}" for i in range(12)]
    r1, r2 = run_id(1), run_id(2)
    write_run(fs, root, r1, docs)
    do_compact(fs, root)
    old = {d: payload(r1, d) for d in docs}
    held = AugmentedCacheReader(fs, root, NB, list_ttl_s=3600)  # reads the pointer once, then holds it
    assert held.get(docs[0]).payload == old[docs[0]]
    write_run(fs, root, r2, docs[::2])
    new = old | {d: payload(r2, d) for d in docs[::2]}
    do_compact(fs, root)
    # during the grace period the holder still reads the previous snapshot, whole: old values everywhere
    assert {d: held.get(d).payload for d in docs} == old
    assert collect_garbage(fs, root, OPTS, now=time.time() + 60) == {"deleted_runs": [], "deleted_snapshots": []}
    assert {d: held.get(d).payload for d in docs} == old
    check(fs, root, new)  # a reader that reads the pointer now: the new snapshot, whole
    gc = collect_garbage(fs, root, OPTS, now=time.time() + OPTS.grace_s + 60)
    assert sorted(gc["deleted_runs"]) == [r1, r2] and len(gc["deleted_snapshots"]) == 1
    assert kind_files(fs, root, "record") == [] and unfolded_runs(fs, root, read_pointer(fs, root)) == []
    assert read_pointer(fs, root)["runs"] == {} and read_pointer(fs, root)["deleted_runs"] == [r1, r2]
    check(fs, root, new)  # folded runs gone: the snapshot holds everything
    held.list_ttl_s = 0  # the holder refreshes: the new snapshot
    assert {d: held.get(d).payload for d in docs} == new


# ---------------------------------------------------------------- killed at any step


CHILD = textwrap.dedent("""
    import json, sys
    import pyarrow.fs as pafs
    from cache_aug.compaction import compact
    from cache_aug.config import CompactionConfig
    spec, root = json.loads(sys.argv[1]), sys.argv[2]
    fs = (pafs.LocalFileSystem() if spec["kind"] == "local" else
          pafs.S3FileSystem(endpoint_override=spec["host"], scheme="http", access_key=spec["key"],
                            secret_key=spec["secret"], region="us-east-1"))
    compact(fs, root, fingerprint=FP, n_buckets=NB, rows_per_group=RPG, max_rows_per_file=5,
            options=CompactionConfig(grace_s=0, stale_run_s=3600))
""").replace("FP", repr(FP)).replace("NB", str(NB)).replace("RPG", str(RPG))

STEPS = ["gc_deleted", "planned", "bucket_row_group:3", "bucket_file:2", "buckets_written", "errors_written",
         "before_switch", "pointer_temp_written", "switched"]


def _kill_case(fs, root, spec, step):
    docs = [f"k{i}" for i in range(16)]
    write_run(fs, root, run_id(1), docs, errors=("bad-1",))
    write_run(fs, root, run_id(2), docs[:6])
    do_compact(fs, root, options=CompactionConfig(grace_s=0, stale_run_s=3600))  # a previous snapshot to merge with
    write_run(fs, root, run_id(3), docs[4:12], errors=("bad-3",))
    write_run(fs, root, run_id(4), docs[10:], errors=("bad-4",))
    write_run(fs, root, run_id(9), docs[:2], manifest=False)  # in progress all along: never folded
    expected = ({d: payload(run_id(1), d) for d in docs} | {d: payload(run_id(2), d) for d in docs[:6]}
                | {d: payload(run_id(3), d) for d in docs[4:12]} | {d: payload(run_id(4), d) for d in docs[10:]}
                | {d: payload(run_id(9), d) for d in docs[:2]})
    before = read_pointer(fs, root)["snapshot_id"]
    env = os.environ | {KILL_AT_ENV: step, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec), root], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, (step, proc.returncode, proc.stderr[-2000:])  # killed there, not finished
    switched = read_pointer(fs, root)["snapshot_id"] != before
    assert switched == (step == "switched")
    check(fs, root, expected)
    # a run starts right after the kill: the next compaction leaves it unfolded, and it is read
    write_run(fs, root, run_id(10), docs[:1], manifest=False)
    expected[docs[0]] = payload(run_id(10), docs[0])
    out = do_compact(fs, root, options=CompactionConfig(grace_s=0, stale_run_s=3600))
    assert out["status"] == ("unchanged" if switched else "compacted")
    assert set(read_pointer(fs, root)["runs"]).isdisjoint({run_id(9), run_id(10)})
    check(fs, root, expected)
    errors = read_kind(fs, root, "error", ["doc_id"]).column("doc_id").to_pylist()
    assert errors == ["bad-4"]  # the newest finished folded run's errors, once
    # the half-written snapshot is collected once stale; only the current one stays
    collect_garbage(fs, root, CompactionConfig(grace_s=0, stale_run_s=0), now=time.time() + 5)
    snaps = {i.path.split("/snapshots/")[1].split("/")[0]
             for i in fs.get_file_info(pafs.FileSelector(f"{root}/snapshots", recursive=True))
             if i.type == pafs.FileType.File and "/snapshots/" + POINTER not in i.path}
    assert snaps == {read_pointer(fs, root)["snapshot_id"]}
    check(fs, root, expected)


@pytest.mark.parametrize("step", STEPS)
def test_compaction_killed_at_any_step_loses_and_duplicates_nothing(tmp_path, step):
    _kill_case(pafs.LocalFileSystem(), str(tmp_path / "out"), {"kind": "local"}, step)


@pytest.mark.parametrize("step", ["bucket_row_group:3", "buckets_written", "before_switch", "switched"])
def test_compaction_killed_on_s3_loses_and_duplicates_nothing(s3_bucket, step):
    _kill_case(_s3(s3_bucket), f"store-tests/kill-{uuid.uuid4().hex[:8]}", {"kind": "s3", **s3_bucket}, step)


# ---------------------------------------------------------------- what a lookup reads


class CountingFS(pafs.FileSystemHandler):
    """A local filesystem that counts the files opened for reading and the listings made."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()
        self.opened: list[str] = []
        self.listings = 0

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        self.listings += 1
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        self.opened.append(path)
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        self.opened.append(path)
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


def _lookup_costs(tmp_path, n_runs: int, monkeypatch) -> list[tuple[int, int, int]]:
    handler = CountingFS()
    fs, root = pafs.PyFileSystem(handler), str(tmp_path / f"runs-{n_runs}")
    docs = [f"doc-{i:03d}" for i in range(40)]
    write_run(pafs.LocalFileSystem(), root, run_id(0), docs)
    for i in range(1, n_runs):  # each later run re-augments a few documents
        write_run(pafs.LocalFileSystem(), root, run_id(i), docs[i % 40 : i % 40 + 3])
    do_compact(fs, root)
    reader = AugmentedCacheReader(fs, root, NB, list_ttl_s=3600)
    groups = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: groups.append(i) or real(self, i, *a, **k))
    for d in docs:  # the first lookup of each bucket reads its footers
        reader.get(d)
    costs = []
    for d in docs:
        opened, listed, read = len(handler.opened), handler.listings, len(groups)
        assert reader.get(d).doc_id == d
        costs.append((len(handler.opened) - opened, handler.listings - listed, len(groups) - read))
    return costs


def test_a_lookup_reads_one_row_group_of_one_bucket_after_one_run_or_many(tmp_path, monkeypatch):
    one, many = _lookup_costs(tmp_path, 1, monkeypatch), _lookup_costs(tmp_path, 30, monkeypatch)
    assert set(one) == {(1, 0, 1)}  # one file opened, no listing, one row group read
    assert many == one


def test_the_reader_holds_at_most_max_buckets_indexes(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    docs = [f"doc-{i}" for i in range(20)]
    write_run(fs, root, run_id(1), docs)
    do_compact(fs, root)
    write_run(fs, root, run_id(2), docs)
    reader = AugmentedCacheReader(fs, root, NB, max_buckets=2)
    for d in docs:
        assert reader.get(d).payload == payload(run_id(2), d)
    assert len(reader._index) <= 2 and len(reader._snapshot) <= 2
    assert len({bucket_of(d, NB) for d in docs}) > 2  # more buckets were read than are held


# ---------------------------------------------------------------- other fingerprints, errors


def test_other_fingerprints_are_dropped_or_kept_as_configured(tmp_path):
    fs = pafs.LocalFileSystem()
    for keep in (False, True):
        root = str(tmp_path / f"keep-{keep}")
        write_run(fs, root, run_id(1), ["a", "b"], fingerprint=FP)
        write_run(fs, root, run_id(2), ["a", "c"], fingerprint="fp-old-models")
        out = do_compact(fs, root, options=CompactionConfig(keep_other_fingerprints=keep))
        rows = read_kind(fs, root, "record", ["doc_id", "fingerprint", "run_id"]).to_pylist()
        got = sorted((r["doc_id"], r["fingerprint"], r["run_id"]) for r in rows)
        ours = [("a", FP, run_id(1)), ("b", FP, run_id(1))]
        if keep:
            assert got == sorted(ours + [("a", "fp-old-models", run_id(2)), ("c", "fp-old-models", run_id(2))])
            # the newest record of a document comes first, whatever made it
            assert AugmentedCacheReader(fs, root, NB).get("a").fingerprint == "fp-old-models"
        else:
            assert got == ours and out["counts"]["dropped_fingerprint"] == 2
            assert AugmentedCacheReader(fs, root, NB).get("a").payload == payload(run_id(1), "a")
            assert AugmentedCacheReader(fs, root, NB).get("c") is None


def test_errors_are_kept_or_dropped_as_configured(tmp_path):
    fs = pafs.LocalFileSystem()
    for keep in (True, False):
        root = str(tmp_path / f"errors-{keep}")
        write_run(fs, root, run_id(1), ["a"], errors=("x", "y"))
        write_run(fs, root, run_id(2), ["a"], errors=("y",))
        do_compact(fs, root, options=CompactionConfig(keep_errors=keep))
        collect_garbage(fs, root, CompactionConfig(grace_s=0), now=time.time() + 1)
        assert kind_files(fs, root, "record") == []
        errors = read_kind(fs, root, "error", ["doc_id"]).column("doc_id").to_pylist()
        assert errors == (["y"] if keep else [])
