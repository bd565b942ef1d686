"""The "wanted" queue: documents a replica answered without a stored cache, waiting for the corpus job.

    <output>/wanted/<time>-<uuid>.parquet      one batch of entries (WANTED_SCHEMA), written whole by one replica

A replica that answers a request without a usable stored cache (`missing`: no record; `stale`: the record is
for another text; `refused`: made by other models, or damaged) records the document here, so that the next
corpus run augments it and later requests find it stored: the coprocessor works offline, behind a cache miss.

Writing (`WantedQueue`, one per replica): `add` is called on the request path and only appends to a bounded
in-memory buffer, de-duplicated by (doc_id, content_sha256); a background thread writes the buffer as one file
every `flush_s` seconds or `flush_rows` entries. Nothing here ever raises into a request: a write that fails
(the store is down) is logged and counted, and its entries are kept for the next try, up to `max_pending`
(beyond that new entries are dropped, and counted). A document written once is not queued again by the same
replica for `requeue_s` seconds. The queue on storage is bounded too: a replica writes no new file while the
queue holds `max_files` files.

An entry carries the text only when the request sent it and the replica's document store does not hold the
document (the corpus job reads the text of those from its input, which wins over a queued text).

Consuming (the corpus job, `pipelines.corpus`): a run lists the queue's files once (`queue_files`), takes their
entries alongside (or instead of) its input, and deletes the files only after its manifest, which names them,
is written. A run killed before its manifest leaves the files for the next run (whatever it had written counts
as done: the next run skips it). A run killed after its manifest but before the deletions is caught by the next
one, which deletes the files that a succeeded manifest already names (`consumed_names`) without taking them
again: each entry counts in exactly one succeeded run. One corpus run at a time per output, as for the runs
themselves. Several replicas that miss the same document each queue it; consumption merges them by doc_id
(`cache_aug.incremental`), so it becomes one ledger row.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

WANTED = "wanted"  # under the corpus job's output
REASONS = ("missing", "stale", "refused")
WANTED_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("content_sha256", pa.string(), nullable=False),  # of the text the request saw (UTF-8)
    pa.field("reason", pa.string(), nullable=False),  # one of REASONS
    pa.field("text", pa.large_string()),  # the request's text, when no document store holds the document; else null
    pa.field("wanted_at", pa.float64(), nullable=False),  # seconds since the epoch, when the miss happened
    pa.field("replica", pa.string()),  # which writer (a random id per queue object)
])
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"  # as run ids (`cache_aug.store.new_run_id`): file names and run ids compare

log = logging.getLogger(__name__)


def text_sha256(text: str) -> str:
    """The content hash a record of this text holds (`cache_aug.documents`)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def wanted_dir(root: str) -> str:
    return f"{root}/{WANTED}"


def _list(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []


def queue_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """The queue's files, oldest first (a temporary file of a local write in progress is not one)."""
    return sorted(i.path for i in _list(fs, wanted_dir(root))
                  if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))


def file_time(path: str) -> float | None:
    """When a queue file was written, from its name (None: not a queue file's name)."""
    try:
        return float(calendar.timegm(time.strptime(path.rsplit("/", 1)[-1][:16], _TIME_FORMAT)))
    except ValueError:
        return None


def consumed_names(fs: pafs.FileSystem, root: str, files: list[str], manifests: str, *,
                   margin_s: float = 86400.0) -> set[str]:
    """The base names among `files` that a succeeded run's manifest (under `<root>/<manifests>`) already names as
    consumed: a run killed between its manifest and deleting its queue files left them behind.

    Only the manifests of runs started at most `margin_s` before the oldest of `files` are read: a run lists the
    queue at its start, so an older one cannot have taken them."""
    times = [t for t in map(file_time, files) if t is not None]
    if not files:
        return set()
    since = time.strftime(_TIME_FORMAT, time.gmtime(min(times) - margin_s)) if times else ""
    names = {f.rsplit("/", 1)[-1] for f in files}
    done: set[str] = set()
    for info in _list(fs, f"{root}/{manifests}"):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json") or info.base_name < since:
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                manifest = json.loads(f.read().decode())
        except (OSError, ValueError):
            continue
        if manifest.get("status") == "succeeded":
            done |= names & set((manifest.get("wanted") or {}).get("files", ()))
    return done


def delete_files(fs: pafs.FileSystem, paths: list[str]) -> int:
    """Delete queue files; one already gone is fine. Returns how many were deleted."""
    n = 0
    for p in paths:
        try:
            fs.delete_file(p)
            n += 1
        except FileNotFoundError:
            continue
        except OSError as e:
            if "NoSuchKey" not in str(e) and "not found" not in str(e).lower():
                raise
    return n


class WantedQueue:
    """One replica's writer of the wanted queue (module docstring). Thread-safe; `add` never blocks on storage and
    never raises.

    fs, root: the corpus job's output (files go under `<root>/wanted/`). has_document: doc_id -> whether the
    replica's document store holds it (asked on the writer thread, before an entry keeps its text); None: no
    store. start: run the background writer (False: only explicit `flush` calls write; for tests)."""

    def __init__(self, fs: pafs.FileSystem, root: str, *, flush_s: float = 5.0, flush_rows: int = 256,
                 max_pending: int = 10_000, max_files: int = 1000, requeue_s: float = 3600.0,
                 max_text_bytes: int = 1 << 20, has_document: Callable[[str], bool] | None = None,
                 clock: Callable[[], float] = time.time, start: bool = True):
        self.fs, self.root = fs, root.rstrip("/")
        self.flush_s, self.flush_rows, self.max_pending = flush_s, flush_rows, max_pending
        self.max_files, self.requeue_s, self.max_text_bytes = max_files, requeue_s, max_text_bytes
        self.has_document, self.clock = has_document, clock
        self.replica = uuid.uuid4().hex[:12]
        self._pending: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._written: OrderedDict[tuple[str, str], float] = OrderedDict()  # key -> when written (bounded)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flushing = threading.Lock()
        self.counts = {"added": 0, "duplicates": 0, "dropped_full_buffer": 0, "dropped_full_queue": 0,
                       "written": 0, "files": 0, "write_errors": 0}
        self.last_error: str | None = None
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._run, name="wanted-queue", daemon=True)
            self._thread.start()

    def add(self, doc_id: str, content_sha256: str, reason: str, text: str | None = None) -> bool:
        """Queue one miss (on the request path: memory only). Returns whether it was taken (False: a duplicate of
        one pending or recently written, or the buffer is full)."""
        try:
            if reason not in REASONS:
                raise ValueError(f"reason {reason!r} not in {REASONS}")
            if text is not None and len(text) * 4 > self.max_text_bytes \
                    and len(text.encode("utf-8", "surrogatepass")) > self.max_text_bytes:
                text = None  # too large to queue: the corpus job finds it in its input, or not at all
            key = (doc_id, content_sha256)
            now = self.clock()
            with self._lock:
                when = self._written.get(key)
                if key in self._pending or (when is not None and now - when < self.requeue_s):
                    self.counts["duplicates"] += 1
                    return False
                if len(self._pending) >= self.max_pending:
                    self.counts["dropped_full_buffer"] += 1
                    return False
                self._pending[key] = {"doc_id": doc_id, "content_sha256": content_sha256, "reason": reason,
                                      "text": text, "wanted_at": now, "replica": self.replica}
                self.counts["added"] += 1
                full = len(self._pending) >= self.flush_rows
            if full:
                self._wake.set()
            return True
        except Exception as e:  # noqa: BLE001 - the queue must never fail a request
            log.warning("wanted queue: entry for %r not taken: %s: %s", doc_id, type(e).__name__, e)
            return False

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counts) | {"pending": len(self._pending), "last_error": self.last_error,
                                        "replica": self.replica}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.flush()

    def flush(self) -> int:
        """Write every pending entry as one file; returns how many were written (0 on failure: they stay
        pending, the error is counted and logged)."""
        with self._flushing:
            with self._lock:
                batch = list(self._pending.items())
            if not batch:
                return 0
            try:
                if self.max_files and len(queue_files(self.fs, self.root)) >= self.max_files:
                    with self._lock:
                        for key, _ in batch:
                            self._pending.pop(key, None)
                        self.counts["dropped_full_queue"] += len(batch)
                    log.warning("wanted queue: %s holds %d files or more; %d entries dropped", wanted_dir(self.root),
                                self.max_files, len(batch))
                    return 0
                rows = [dict(r) for _, r in batch]
                for r in rows:
                    if r["text"] is not None and self._in_document_store(r["doc_id"]):
                        r["text"] = None  # the corpus job reads it from its input
                self._write(pa.Table.from_pylist(rows, schema=WANTED_SCHEMA))
            except Exception as e:  # noqa: BLE001 - storage down: keep the entries, say so, go on serving
                with self._lock:
                    self.counts["write_errors"] += 1
                    self.last_error = f"{type(e).__name__}: {e}"[:500]
                log.warning("wanted queue: writing %d entries failed (kept for the next try): %s", len(batch),
                            self.last_error)
                return 0
            now = self.clock()
            with self._lock:
                for key, _ in batch:
                    self._pending.pop(key, None)
                    self._written[key] = now
                    self._written.move_to_end(key)
                while len(self._written) > 4 * self.max_pending:
                    self._written.popitem(last=False)
                self.counts["written"] += len(batch)
                self.counts["files"] += 1
                self.last_error = None
            return len(batch)

    def _in_document_store(self, doc_id: str) -> bool:
        if self.has_document is None:
            return False
        try:
            return bool(self.has_document(doc_id))
        except Exception:  # noqa: BLE001 - unreadable document store: keep the text, the safe side
            return False

    def _write(self, table: pa.Table) -> None:
        name = f"{time.strftime(_TIME_FORMAT, time.gmtime(self.clock()))}-{uuid.uuid4().hex[:8]}.parquet"
        path = f"{wanted_dir(self.root)}/{name}"
        self.fs.create_dir(wanted_dir(self.root), recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):  # whole or not at all: write aside, then one rename
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.move(tmp, path)
        else:  # one PUT: an object appears whole
            pq.write_table(table, path, filesystem=self.fs)

    def close(self, flush: bool = True) -> None:
        """Stop the writer thread, after one last flush (by default)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.flush_s, 1.0) + 30)
        if flush:
            self.flush()
