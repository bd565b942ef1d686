"""The on-storage layout of precomputed caches, and reading one document's record back.

    <output>/runs/<run_id>/kind=record/bucket=<b>/*.parquet   cache records (RECORD_SCHEMA + ledger columns)
    <output>/runs/<run_id>/kind=error/bucket=-/*.parquet      the errors table: doc_id, reason
    <output>/runs/<run_id>/kind=skipped/bucket=-/*.parquet    documents already up to date
    <output>/manifests/<run_id>.json                          what a run read, wrote, skipped, failed

Every input row of a run lands in exactly one of the three kinds. Records are partitioned by a
hash of doc_id, so looking one document up reads one bucket per run, never the whole dataset.
Run ids sort by start time; the newest run's record of a document is its current one.
Files that cannot be read (a write cut short by a crash) are ignored, so a half-written file is
never taken for data: its documents are simply not done yet.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cache_aug.records import RECORD_SCHEMA, CacheRecord

RUNS, MANIFESTS = "runs", "manifests"
NO_BUCKET = "-"


def bucket_of(doc_id: str, n_buckets: int) -> str:
    """Stable bucket of a document id (crc32, zero-padded so names sort)."""
    return f"{zlib.crc32(doc_id.encode('utf-8', 'surrogatepass')) % n_buckets:04d}"


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
    """Run ids under <root>/runs, oldest first."""
    return sorted(i.base_name for i in _list(fs, f"{root}/{RUNS}") if i.type == pafs.FileType.Directory)


def readable_parquet_files(fs: pafs.FileSystem, paths: Iterable[str]) -> list[str]:
    """The files whose Parquet footer reads (a truncated file has none)."""
    good = []
    for p in paths:
        try:
            with fs.open_input_file(p) as f:
                pq.read_metadata(f)
            good.append(p)
        except (OSError, pa.ArrowInvalid):
            continue
    return good


def kind_files(fs: pafs.FileSystem, root: str, kind: str, run_id: str | None = None,
               bucket: str | None = None) -> list[str]:
    """Readable Parquet files of one kind, optionally of one run and one bucket."""
    runs = [run_id] if run_id else run_ids(fs, root)
    files = []
    for run in runs:
        base = f"{root}/{RUNS}/{run}/kind={kind}" + (f"/bucket={bucket}" if bucket else "")
        files += [i.path for i in _list(fs, base, recursive=True)
                  if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    return readable_parquet_files(fs, sorted(files))


def read_kind(fs: pafs.FileSystem, root: str, kind: str, columns: list[str], run_id: str | None = None) -> pa.Table:
    """Columns of every readable file of one kind (for accounting and incremental state)."""
    files = kind_files(fs, root, kind, run_id)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(pq.read_table(f, columns=columns, filesystem=fs) for f in files)


def done_documents(fs: pafs.FileSystem, root: str, fingerprint: str) -> set[tuple[str, str]]:
    """(doc_id, content_sha256) pairs that already have a record made with `fingerprint`."""
    table = read_kind(fs, root, "record", ["doc_id", "content_sha256", "fingerprint"])
    rows = zip(table.column("doc_id").to_pylist(), table.column("content_sha256").to_pylist(),
               table.column("fingerprint").to_pylist(), strict=True)
    return {(d, h) for d, h, f in rows if f == fingerprint}


class AugmentedCacheReader:
    """Loads the current record of one document from an output prefix: one bucket per run, one row group.

    The first lookup in a (run, bucket) reads only the doc_id column of that bucket's files and keeps
    where each document sits (file, row group, row), and each file's footer; a lookup then reads the single
    row group that holds the record (no footer read), so the bytes read per document are bounded by the job's
    row-group size, not the file's.
    Listings and indexes are refreshed every `list_ttl_s` seconds (a new run may have landed).
    """

    def __init__(self, fs: pafs.FileSystem, root: str, n_buckets: int, list_ttl_s: float = 30.0):
        self.fs, self.root, self.n_buckets, self.list_ttl_s = fs, root.rstrip("/"), n_buckets, list_ttl_s
        self._runs: list[str] = []
        self._index: dict[tuple[str, str], dict[str, tuple[str, int, int]]] = {}  # (run, bucket) -> doc_id -> place
        self._footers: dict[str, pq.FileMetaData] = {}  # path -> its Parquet footer, so a lookup is one ranged read
        self._listed_at = float("-inf")

    def _run_ids(self) -> list[str]:
        if time.monotonic() - self._listed_at > self.list_ttl_s:
            self._runs, self._listed_at = run_ids(self.fs, self.root), time.monotonic()
            self._index, self._footers = {}, {}
        return self._runs

    def _bucket_index(self, run: str, bucket: str) -> dict[str, tuple[str, int, int]]:
        key = (run, bucket)
        if key not in self._index:
            where: dict[str, tuple[str, int, int]] = {}
            for path in kind_files(self.fs, self.root, "record", run, bucket):
                with self.fs.open_input_file(path) as f:
                    pf = pq.ParquetFile(f)
                    self._footers[path] = pf.metadata
                    for rg in range(pf.num_row_groups):
                        for row, doc in enumerate(pf.read_row_group(rg, columns=["doc_id"]).column(0).to_pylist()):
                            where[doc] = (path, rg, row)
            self._index[key] = where
        return self._index[key]

    def get(self, doc_id: str) -> CacheRecord | None:
        """The newest run's record of `doc_id`, or None if no run stored one."""
        bucket = bucket_of(doc_id, self.n_buckets)
        for run in reversed(self._run_ids()):
            place = self._bucket_index(run, bucket).get(doc_id)
            if place is None:
                continue
            path, rg, row = place
            with self.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f, metadata=self._footers.get(path))
                have = set(pf.schema_arrow.names)  # a format-1 file lacks the newer columns
                table = pf.read_row_group(rg, columns=[n for n in RECORD_SCHEMA.names if n in have])
            return CacheRecord.from_row(table.slice(row, 1).to_pylist()[0])
        return None
