"""The on-storage layout of precomputed caches, and reading one document's record back.

    <output>/runs/<run_id>/kind=record/bucket=<b>/*.parquet   cache records (RECORD_SCHEMA + ledger columns)
    <output>/runs/<run_id>/kind=error/bucket=-/*.parquet      the errors table: doc_id, reason
    <output>/runs/<run_id>/kind=skipped/bucket=-/*.parquet    documents already up to date
    <output>/manifests/<run_id>.json                          what a run read, wrote, skipped, failed
    <output>/snapshots/<snapshot_id>/bucket=<b>/part-<k>.parquet   compacted records, sorted by doc_id
    <output>/snapshots/<snapshot_id>/errors/part-<k>.parquet       the errors of the newest run it folded (optional)
    <output>/snapshots/CURRENT.json                           the pointer: which snapshot is current, which runs
                                                              it folded (`cache_aug.compaction` writes it)

Every input row of a run lands in exactly one of the three kinds. Records are partitioned by a
hash of doc_id (`bucket_of`), so looking one document up reads one bucket, never the whole dataset.
Run ids sort by start time; the newest run's record of a document is its current one. A run with
no manifest is in progress or was killed. Files that cannot be read (a write cut short by a crash)
are ignored, so a half-written file is never taken for data: its documents are simply not done yet.

Compaction (`cache_aug.compaction`) folds finished runs into a snapshot: the newest record of each
document, per bucket, in files sorted by doc_id with small row groups. The current records are then
the current snapshot's plus those of the runs it has not folded (`current_files`); a folded run's
directory stays until a grace period has passed, and is skipped by every reader meanwhile. A lookup
(`AugmentedCacheReader.get`) reads, in the unfolded runs (few: those since the last compaction) one
bucket each as before, and in the snapshot one row group of one bucket's file, found by the row
groups' doc_id statistics: the same cost after one run or a thousand.
"""

from __future__ import annotations

import bisect
import json
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cache_aug.record_schema import RECORD_SCHEMA

RUNS, MANIFESTS, SNAPSHOTS = "runs", "manifests", "snapshots"
POINTER = "CURRENT.json"  # under <root>/snapshots
NO_BUCKET = "-"
POINTER_FORMAT = 1
# a snapshot's rows: the record columns (nullable: records of any format version fold) + the run each came from
SNAPSHOT_SCHEMA = pa.schema([f.with_nullable(True) for f in RECORD_SCHEMA] + [pa.field("run_id", pa.string())])


def bucket_of(doc_id: str, n_buckets: int) -> str:
    """Stable bucket of a document id (crc32, zero-padded so names sort)."""
    return f"{zlib.crc32(doc_id.encode('utf-8', 'surrogatepass')) % n_buckets:04d}"


def bucket_names(n_buckets: int) -> list[str]:
    """Every name `bucket_of` gives for `n_buckets`, in order."""
    return [f"{b:04d}" for b in range(n_buckets)]


def new_run_id() -> str:
    """Sortable by start time, unique across machines."""
    import uuid

    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def _list(fs: pafs.FileSystem, path: str, *, recursive: bool = False) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except FileNotFoundError:
        return []


def run_ids(fs: pafs.FileSystem, root: str) -> list[str]:
    """Run ids under <root>/runs, oldest first (folded ones included, until they are deleted)."""
    return sorted(i.base_name for i in _list(fs, f"{root}/{RUNS}") if i.type == pafs.FileType.Directory)


def _readable_rows(fs: pafs.FileSystem, paths: Iterable[str]) -> list[tuple[str, int]]:
    """(path, rows) of the files whose Parquet footer reads (a truncated file has none): rows from the footer."""
    good = []
    for p in paths:
        try:
            with fs.open_input_file(p) as f:
                good.append((p, pq.read_metadata(f).num_rows))
        except (OSError, pa.ArrowInvalid):
            continue
    return good


def readable_parquet_rows(fs: pafs.FileSystem, paths: Iterable[str]) -> list[tuple[str, int]]:
    """(path, rows) of the files whose Parquet footer reads, rows from the footer."""
    return _readable_rows(fs, paths)


def readable_parquet_files(fs: pafs.FileSystem, paths: Iterable[str]) -> list[str]:
    """The files whose Parquet footer reads (a truncated file has none)."""
    return [p for p, _ in _readable_rows(fs, paths)]


def _kind_file_rows(fs: pafs.FileSystem, root: str, kind: str, run_id: str | None = None,
                    bucket: str | None = None) -> list[tuple[str, int]]:
    runs = [run_id] if run_id else run_ids(fs, root)
    files = []
    for run in runs:
        base = f"{root}/{RUNS}/{run}/kind={kind}" + (f"/bucket={bucket}" if bucket else "")
        files += [i.path for i in _list(fs, base, recursive=True)
                  if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    return _readable_rows(fs, sorted(files))


def kind_files(fs: pafs.FileSystem, root: str, kind: str, run_id: str | None = None,
               bucket: str | None = None) -> list[str]:
    """Readable Parquet files of one kind in the runs' directories, optionally of one run and one bucket.

    Without `run_id` this is every run still on storage, folded ones included: a run's own accounting reads
    this; what holds the current records is `current_files`."""
    return [p for p, _ in _kind_file_rows(fs, root, kind, run_id, bucket)]


def _non_null(fs: pafs.FileSystem, path: str, column: str) -> int:
    """Values of `column` that are not null in one file, from its footer's statistics (the column itself is read
    only where a row group has none); 0 where the file has no such column."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        names = pf.schema_arrow.names
        if column not in names:
            return 0
        at = pf.schema_arrow.get_field_index(column)
        n = 0
        for rg in range(meta.num_row_groups):
            col = meta.row_group(rg).column(at)
            stats = col.statistics
            if stats is not None and stats.has_null_count:
                n += meta.row_group(rg).num_rows - stats.null_count
            else:
                n += pf.read_row_group(rg, columns=[column]).column(0).null_count * -1 + meta.row_group(rg).num_rows
        return n


def kind_non_null(fs: pafs.FileSystem, root: str, kind: str, run_id: str, column: str) -> int:
    """How many rows of one run's readable files of one kind have a value in `column` (a ledger mark), from
    the footers' statistics: a run's accounting of its marked rows, without reading them."""
    return sum(_non_null(fs, p, column) for p, _ in _kind_file_rows(fs, root, kind, run_id))


def kind_rows(fs: pafs.FileSystem, root: str, kind: str, run_id: str | None = None) -> int:
    """How many rows the readable files of one kind hold (of one run, or of every run on storage), from their
    Parquet footers alone: a run's accounting, without reading a single id."""
    return sum(n for _, n in _kind_file_rows(fs, root, kind, run_id))


# ---------------------------------------------------------------- the snapshot pointer


def pointer_path(root: str) -> str:
    return f"{root}/{SNAPSHOTS}/{POINTER}"


def snapshot_dir(root: str, snapshot_id: str) -> str:
    return f"{root}/{SNAPSHOTS}/{snapshot_id}"


def snapshot_bucket_file(root: str, snapshot_id: str, bucket: str, part: int) -> str:
    return f"{snapshot_dir(root, snapshot_id)}/bucket={bucket}/part-{part:05d}.parquet"


def snapshot_error_file(root: str, snapshot_id: str, part: int = 0) -> str:
    return f"{snapshot_dir(root, snapshot_id)}/errors/part-{part:05d}.parquet"


def read_pointer(fs: pafs.FileSystem, root: str) -> dict | None:
    """The current snapshot's pointer (`cache_aug.compaction` documents its fields), or None before any compaction.

    The pointer is written whole in one step (a rename on a local disk, one PUT on S3), so what is read is
    either the old pointer or the new one."""
    try:
        with fs.open_input_stream(pointer_path(root)) as f:
            pointer = json.loads(f.read().decode())
    except FileNotFoundError:
        return None
    except OSError as e:  # S3 reports a missing key as an OSError naming it
        if "NoSuchKey" in str(e) or "Path does not exist" in str(e):
            return None
        raise
    if pointer.get("format") != POINTER_FORMAT:
        raise ValueError(f"{pointer_path(root)}: pointer format {pointer.get('format')!r}, this reader knows "
                         f"{POINTER_FORMAT}")
    return pointer


def snapshot_files(root: str, pointer: dict | None, kind: str = "record", bucket: str | None = None) -> list[str]:
    """The files of the pointer's snapshot holding `kind` ("record": one bucket's, or all; "error"); [] without one.

    Named by the pointer, never listed: a snapshot directory holds nothing else a reader takes."""
    if pointer is None:
        return []
    sid = pointer["snapshot_id"]
    if kind == "error":
        return [snapshot_error_file(root, sid, k) for k in range(pointer.get("error_files", 0))]
    if kind != "record":
        return []
    buckets = pointer["bucket_files"]
    chosen = [bucket] if bucket is not None else sorted(buckets)
    return [snapshot_bucket_file(root, sid, b, k) for b in chosen for k in range(buckets.get(b, 0))]


def unfolded_runs(fs: pafs.FileSystem, root: str, pointer: dict | None) -> list[str]:
    """Run ids on storage that the pointer's snapshot has not folded, oldest first (all runs without a pointer).

    The pointer names the folded runs still on storage and those garbage collection deleted: an object store may
    go on listing a deleted run's prefix for a while (SeaweedFS lists its emptied directories)."""
    folded = set(pointer["runs"]) | set(pointer.get("deleted_runs", ())) if pointer else set()
    return [r for r in run_ids(fs, root) if r not in folded]


def current_files(fs: pafs.FileSystem, root: str, kind: str = "record") -> list[str]:
    """The files that hold every current row of `kind`: the current snapshot's, then each unfolded run's.

    "record": the snapshot's bucket files (one newest record per document, or per document and fingerprint) and
    the unfolded runs' record files; a document may have a record in several of them, and the newest run's is
    its current one (each row's `run_id` says which run made it). "error": the snapshot's carried errors (if it
    kept them) and the unfolded runs'; "skipped": the unfolded runs' only. Folded runs are never among them,
    whether or not garbage collection has deleted them yet."""
    return current_files_and_rows(fs, root, kind)[0]


def current_files_and_rows(fs: pafs.FileSystem, root: str, kind: str = "record") -> tuple[list[str], int | None]:
    """`current_files`, and how many rows they hold: the unfolded runs' from their footers (read anyway, to leave
    out unreadable files), the snapshot's records from its pointer's counts (None for the snapshot's carried
    errors, which it does not count)."""
    pointer = read_pointer(fs, root)
    files = snapshot_files(root, pointer, kind)
    rows: int | None = 0
    if files:
        rows = pointer.get("counts", {}).get("records") if kind == "record" else None
    for run in unfolded_runs(fs, root, pointer):
        found = _kind_file_rows(fs, root, kind, run)
        files += [p for p, _ in found]
        rows = None if rows is None else rows + sum(n for _, n in found)
    return files, rows


def read_kind(fs: pafs.FileSystem, root: str, kind: str, columns: list[str], run_id: str | None = None) -> pa.Table:
    """Columns of every readable file of one kind: of one run (its accounting), or the current ones
    (`current_files`: the snapshot and the unfolded runs) without `run_id`."""
    files = kind_files(fs, root, kind, run_id) if run_id else current_files(fs, root, kind)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    # a run's files and a snapshot's may differ in nullability (and format-1 files in columns): unify them
    return pa.concat_tables((pq.read_table(f, columns=columns, filesystem=fs) for f in files),
                            promote_options="permissive")


def done_documents(fs: pafs.FileSystem, root: str, fingerprint: str) -> set[tuple[str, str]]:
    """(doc_id, content_sha256) pairs that already have a current record made with `fingerprint` (in the current
    snapshot or an unfolded run), as one in-memory set: for inspecting a small store. The corpus job never builds
    it (its driver would hold every id of the corpus): it matches the same pairs per hash partition, as Ray Data
    tasks (`cache_aug.incremental`)."""
    table = read_kind(fs, root, "record", ["doc_id", "content_sha256", "fingerprint"])
    rows = zip(table.column("doc_id").to_pylist(), table.column("content_sha256").to_pylist(),
               table.column("fingerprint").to_pylist(), strict=True)
    return {(d, h) for d, h, f in rows if f == fingerprint}


# ---------------------------------------------------------------- reading one document


class _LRU(OrderedDict):
    """At most `limit` entries; the least recently used goes first."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def lookup(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class _RunBucket(dict):
    """One (run, bucket)'s index: doc_id -> (path, row group, row), and each file's footer."""

    def __init__(self):
        super().__init__()
        self.footers: dict[str, pq.FileMetaData] = {}


class _SnapshotBucket:
    """One snapshot bucket's row groups in doc_id order: their [min, max] doc_id, file and footer."""

    def __init__(self, fs: pafs.FileSystem, paths: list[str]):
        self.lows: list[str] = []
        self.highs: list[str] = []
        self.places: list[tuple[str, int]] = []
        self.footers: dict[str, pq.FileMetaData] = {}
        for path in paths:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                meta = self.footers[path] = pf.metadata
                col = pf.schema_arrow.get_field_index("doc_id")
                for rg in range(meta.num_row_groups):
                    if meta.row_group(rg).num_rows == 0:
                        continue
                    stats = meta.row_group(rg).column(col).statistics
                    if stats is not None and stats.has_min_max:
                        lo, hi = stats.min, stats.max
                    else:  # no statistics (an id longer than the writer keeps them for): read the ids once
                        ids = pf.read_row_group(rg, columns=["doc_id"]).column(0).to_pylist()
                        lo, hi = min(ids), max(ids)
                    self.lows.append(lo)
                    self.highs.append(hi)
                    self.places.append((path, rg))

    def find(self, doc_id: str) -> tuple[str, int] | None:
        """The row group whose doc_id range holds `doc_id` (the first, where a document spans two), or None."""
        i = bisect.bisect_left(self.highs, doc_id)
        if i < len(self.places) and self.lows[i] <= doc_id:
            return self.places[i]
        return None


class AugmentedCacheReader:
    """Loads the current record of one document from an output prefix: the current snapshot, plus the runs it has
    not folded.

    Unfolded runs (those since the last compaction), newest first: the first lookup in a (run, bucket) reads only
    the doc_id column of that bucket's files and keeps where each document sits (file, row group, row), and each
    file's footer; a lookup then reads the single row group that holds the record.
    The snapshot: its bucket files are sorted by doc_id in row groups of a few rows, so the first lookup in a
    bucket reads its files' footers and keeps each row group's doc_id range (the footer's statistics: no index
    file); a lookup then reads one row group of one file. A document found in no newer run is read there: one
    bucket, one row group, however many runs were folded.
    At most `max_buckets` bucket indexes are held for the snapshot, and as many for the unfolded runs (least
    recently used evicted), so a replica's memory for indexes and footers does not grow with the corpus's runs.
    The pointer and the run listing are read again every `list_ttl_s` seconds (a new run may have landed, or a
    compaction made another snapshot current); a reader holding the previous pointer keeps reading the previous
    snapshot and runs, which stay on storage for the compaction's grace period.
    """

    def __init__(self, fs: pafs.FileSystem, root: str, n_buckets: int, list_ttl_s: float = 30.0,
                 max_buckets: int = 256):
        self.fs, self.root, self.n_buckets, self.list_ttl_s = fs, root.rstrip("/"), n_buckets, list_ttl_s
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
        self.max_buckets = max_buckets
        self._pointer: dict | None = None
        self._runs: list[str] = []  # unfolded runs, oldest first
        self._index: _LRU = _LRU(max_buckets)  # (run, bucket) -> _RunBucket
        self._snapshot: _LRU = _LRU(max_buckets)  # (snapshot id, bucket) -> _SnapshotBucket
        self._listed_at = float("-inf")

    def _refresh(self) -> None:
        if time.monotonic() - self._listed_at > self.list_ttl_s:
            pointer = read_pointer(self.fs, self.root)  # the pointer first: the runs it folded stay through the grace
            self._runs = unfolded_runs(self.fs, self.root, pointer)
            if (pointer or {}).get("snapshot_id") != (self._pointer or {}).get("snapshot_id"):
                self._snapshot.clear()
            self._pointer, self._listed_at = pointer, time.monotonic()
            self._index.clear()  # an unfolded run may have written more since

    def _bucket_index(self, run: str, bucket: str) -> _RunBucket:
        key = (run, bucket)
        where = self._index.lookup(key)
        if where is None:
            where = _RunBucket()
            for path in kind_files(self.fs, self.root, "record", run, bucket):
                with self.fs.open_input_file(path) as f:
                    pf = pq.ParquetFile(f)
                    where.footers[path] = pf.metadata
                    for rg in range(pf.num_row_groups):
                        for row, doc in enumerate(pf.read_row_group(rg, columns=["doc_id"]).column(0).to_pylist()):
                            where[doc] = (path, rg, row)
            self._index.put(key, where)
        return where

    def _read_row(self, path: str, rg: int, footer, doc_id: str, row: int | None = None) -> dict | None:
        with self.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, metadata=footer)
            have = set(pf.schema_arrow.names)  # a format-1 file lacks the newer columns
            table = pf.read_row_group(rg, columns=[n for n in (*RECORD_SCHEMA.names, "run_id") if n in have])
        if row is None:  # the first row of the document: the newest (a snapshot sorts them so)
            ids = table.column("doc_id").to_pylist()
            if doc_id not in ids:
                return None
            row = ids.index(doc_id)
        return table.slice(row, 1).to_pylist()[0]

    def _from_run(self, run: str, bucket: str, doc_id: str) -> dict | None:
        index = self._bucket_index(run, bucket)
        place = index.get(doc_id)
        if place is None:
            return None
        path, rg, row = place
        return self._read_row(path, rg, index.footers.get(path), doc_id, row)

    def _from_snapshot(self, bucket: str, doc_id: str) -> dict | None:
        pointer = self._pointer
        if pointer is None or not pointer["bucket_files"].get(bucket):
            return None
        key = (pointer["snapshot_id"], bucket)
        entry = self._snapshot.lookup(key)
        if entry is None:
            entry = _SnapshotBucket(self.fs, snapshot_files(self.root, pointer, "record", bucket))
            self._snapshot.put(key, entry)
        place = entry.find(doc_id)
        if place is None:
            return None
        path, rg = place
        return self._read_row(path, rg, entry.footers[path], doc_id)

    def get(self, doc_id: str):
        """The newest run's record of `doc_id` (a `CacheRecord`), or None if no current record holds it."""
        from cache_aug.records import CacheRecord

        self._refresh()
        bucket = bucket_of(doc_id, self.n_buckets)
        through = (self._pointer or {}).get("folded_through") or ""
        newer = [r for r in self._runs if r > through]
        for run in reversed(newer):  # runs since the snapshot: each newer than anything it folded
            row = self._from_run(run, bucket, doc_id)
            if row is not None:
                return CacheRecord.from_row(row)
        best = self._from_snapshot(bucket, doc_id)
        # a run that sorts before the newest folded one but was not folded (its first file landed after the
        # compaction listed the runs): its record is current only where it is newer than the snapshot's
        for run in reversed([r for r in self._runs if r <= through]):
            if best is not None and run <= (best.get("run_id") or ""):
                break
            row = self._from_run(run, bucket, doc_id)
            if row is not None:
                best = row
                break
        return None if best is None else CacheRecord.from_row(best)
