"""Compaction: fold the corpus job's finished runs into one current snapshot, so a lookup costs the same after one run
or a thousand.

    summary = compact(fs, root, fingerprint=fp, n_buckets=64, options=cfg.compaction)   # fold, switch, collect
    collect_garbage(fs, root, cfg.compaction)                                            # only delete what expired

What a snapshot holds (layout: `cache_aug.store`):
- per bucket (`bucket_of`, the corpus job's `index_buckets`), exactly the newest record of each document made with
  `fingerprint` (the served models'), in files sorted by doc_id with row groups of `rows_per_group` rows. With
  `keep_other_fingerprints` the newest record of each (document, fingerprint) stays instead, a document's rows
  newest first, so a lookup still finds the newest record first. "Newest" is by run id (each row keeps the
  `run_id` that made it), whatever order runs were folded in;
- with `keep_errors`, the errors table of the newest finished run it folded (every run ledgers every input row,
  so that run's errors are the input's errors as of it); skipped rows are never kept.

Which runs are folded: the new snapshot is the previous snapshot plus a prefix (oldest first) of the runs it has not
folded, made of finished runs (a manifest exists, whatever its status: the next run takes a failed run's records
as done too). The prefix stops at the first run without a manifest, unless that run's start and newest file are
both older than `stale_run_s` (a crashed run): its readable files are folded too. So every unfolded run is newer
than every folded one, and the newest run wins; the runs each fold took are named in the pointer.

The switch: buckets are written under a new snapshot id beside the current one, then one small JSON pointer,
`<root>/snapshots/CURRENT.json`, is replaced whole (a temporary file renamed over it on a local disk, one PUT on
S3), naming the snapshot, the runs it folded, the fingerprint and the counts. Until that write the previous
snapshot is current and the runs just folded are read as before; after it, the new snapshot is, and those runs
are skipped. A compaction killed at any point (SIGKILL included) leaves the previous pointer current and a
half-written snapshot directory that no pointer names; `collect_garbage` deletes it once it is older than
`stale_run_s`.

Garbage: a run folded into a snapshot, and a snapshot replaced by another, stay on storage for `grace_s` seconds
after the snapshot that folded or replaced them became current (a reader that read the previous pointer within
its listing refresh still finds their files), and are deleted by a later compaction or `collect_garbage` after
that. Run manifests are kept (the history of runs).

One compaction at a time per output prefix: a compaction refuses to switch when the pointer changed under it.
The per-bucket work is `compact_bucket`, a plain function of plain arguments: `compact` runs it in a local loop,
or through `map_buckets` (the jobs' Ray tasks).
"""

from __future__ import annotations

import calendar
import json
import os
import signal
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cache_aug.stage_config import CompactionConfig
from cache_aug.store import (
    MANIFESTS,
    POINTER,
    POINTER_FORMAT,
    RUNS,
    SNAPSHOT_SCHEMA,
    SNAPSHOTS,
    _list,
    bucket_names,
    kind_files,
    new_run_id,
    pointer_path,
    read_pointer,
    snapshot_bucket_file,
    snapshot_dir,
    snapshot_error_file,
    snapshot_files,
    unfolded_runs,
)

__all__ = ["KILL_AT_ENV", "collect_garbage", "compact", "compact_bucket", "plan_fold", "write_pointer"]

KILL_AT_ENV = "CACHE_AUG_COMPACTION_KILL_AT"  # "STEP" or "STEP:N": SIGKILL this process at a named step (tests)
_READ_CACHE_BYTES = 256 << 20  # source row groups kept while a bucket is written in doc_id order
_steps: dict[str, int] = {}


def _step(name: str) -> None:
    """A named point of a compaction; a no-op unless KILL_AT_ENV names it (then the process dies there, at once)."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want == name:
        _steps[name] = _steps.get(name, 0) + 1
        if _steps[name] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _id_time(name: str) -> float:
    """The start time a run or snapshot id begins with (0 when it has none)."""
    try:
        return float(calendar.timegm(time.strptime(name[:16], "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return 0.0


def _newest_mtime(fs: pafs.FileSystem, path: str) -> float:
    times = [i.mtime.timestamp() for i in _list(fs, path, recursive=True) if i.mtime is not None]
    return max(times, default=0.0)


def _manifests(fs: pafs.FileSystem, root: str) -> set[str]:
    return {i.base_name[: -len(".json")] for i in _list(fs, f"{root}/{MANIFESTS}")
            if i.type == pafs.FileType.File and i.base_name.endswith(".json")}


def plan_fold(fs: pafs.FileSystem, root: str, pointer: dict | None, stale_run_s: float,
              now: float | None = None) -> tuple[list[str], list[str], str | None]:
    """(runs to fold now, oldest first; those of them folded as crashed; the first run left waiting, or None)."""
    now = time.time() if now is None else now
    done = _manifests(fs, root)
    fold, stale = [], []
    for run in unfolded_runs(fs, root, pointer):
        if run in done:
            fold.append(run)
        elif now - max(_id_time(run), _newest_mtime(fs, f"{root}/{RUNS}/{run}")) > stale_run_s:
            fold.append(run)
            stale.append(run)
        else:
            return fold, stale, run
    return fold, stale, None


def _check_buckets(fs: pafs.FileSystem, root: str, runs: Sequence[str], n_buckets: int) -> None:
    """A run's records are bucketed by the `index_buckets` it ran with: refuse to fold one made with another."""
    for run in runs:
        try:
            with fs.open_input_stream(f"{root}/{MANIFESTS}/{run}.json") as f:
                manifest = json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            continue  # a crashed run has none: its files are taken as they are bucketed
        got = ((manifest.get("config") or {}).get("corpus") or {}).get("index_buckets")
        if got is not None and got != n_buckets:
            raise ValueError(f"run {run} bucketed its records by index_buckets={got}, this compaction by {n_buckets}: "
                             "compact with the corpus job's corpus.index_buckets")


def _normalise(table: pa.Table, run: str | None) -> pa.Table:
    """A source row group as SNAPSHOT_SCHEMA: missing columns null, `run_id` the run that made each row."""
    arrays = []
    for f in SNAPSHOT_SCHEMA:
        if f.name == "run_id" and run is not None:
            arrays.append(pa.array([run] * table.num_rows, pa.string()))
        elif f.name in table.column_names:
            arrays.append(table.column(f.name).cast(f.type))
        else:
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=SNAPSHOT_SCHEMA)


def compact_bucket(fs: pafs.FileSystem, root: str, snapshot_id: str, bucket: str, previous: dict | None,
                   runs: list[str], fingerprint: str, keep_other_fingerprints: bool = False, rows_per_group: int = 4,
                   max_rows_per_file: int = 256) -> dict:
    """Write one bucket of snapshot `snapshot_id`: the previous snapshot's bucket (pointer `previous`) plus the records
    of `runs` in it, newest per document (or per document and fingerprint), sorted by doc_id. Returns its counts."""
    sources: list[tuple[str, str | None]] = [(p, None) for p in snapshot_files(root, previous, "record", bucket)]
    for run in runs:
        sources += [(p, run) for p in kind_files(fs, root, "record", run, bucket)]
    best: dict = {}  # doc_id (or (doc_id, fingerprint)) -> ((run, source, row group, row), source, row group, row)
    footers: list[pq.FileMetaData] = []
    seen = dropped = 0
    for si, (path, run) in enumerate(sources):
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            footers.append(pf.metadata)
            cols = ["doc_id", "fingerprint"] + (["run_id"] if run is None else [])
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=cols).to_pydict()
                made_by = t["run_id"] if run is None else [run] * len(t["doc_id"])
                for row, (doc, fp, src) in enumerate(zip(t["doc_id"], t["fingerprint"], made_by, strict=True)):
                    if doc is None:
                        continue
                    seen += 1
                    if fp != fingerprint and not keep_other_fingerprints:
                        dropped += 1
                        continue
                    key = (doc, fp) if keep_other_fingerprints else doc
                    order = (src or "", si, rg, row)
                    if key not in best or order > best[key][0]:
                        best[key] = (order, si, rg, row)
    winners = sorted(best.items(), key=lambda kv: kv[1][0], reverse=True)  # newest first ...
    winners.sort(key=lambda kv: kv[0][0] if keep_other_fingerprints else kv[0])  # ... within each doc_id, stably
    cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
    cached = 0

    def row_group(si: int, rg: int) -> pa.Table:
        nonlocal cached
        if (si, rg) in cache:
            cache.move_to_end((si, rg))
            return cache[(si, rg)]
        path, run = sources[si]
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, metadata=footers[si])
            have = set(pf.schema_arrow.names)
            t = _normalise(pf.read_row_group(rg, columns=[n for n in SNAPSHOT_SCHEMA.names if n in have]), run)
        cache[(si, rg)] = t
        cached += t.nbytes
        while cached > _READ_CACHE_BYTES and len(cache) > 1:
            cached -= cache.popitem(last=False)[1].nbytes
        return t

    parts = 0
    for start in range(0, len(winners), max_rows_per_file):
        path = snapshot_bucket_file(root, snapshot_id, bucket, parts)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        chunk = winners[start : start + max_rows_per_file]
        with pq.ParquetWriter(path, SNAPSHOT_SCHEMA, filesystem=fs, write_statistics=True) as writer:
            for g in range(0, len(chunk), rows_per_group):
                rows = [row_group(si, rg).slice(row, 1) for _, (_, si, rg, row) in chunk[g : g + rows_per_group]]
                writer.write_table(pa.concat_tables(rows), row_group_size=rows_per_group)
                _step("bucket_row_group")
        parts += 1
        _step("bucket_file")
    return {"bucket": bucket, "files": parts, "records": len(winners), "documents": len({k if isinstance(k, str)
            else k[0] for k in best}), "dropped_fingerprint": dropped, "superseded": seen - dropped - len(winners)}


def _carry_errors(fs: pafs.FileSystem, root: str, snapshot_id: str, previous: dict | None, fold: list[str],
                  stale: list[str], keep: bool) -> tuple[int, str | None]:
    """Write the errors table the snapshot keeps; (its file count, the run it is of)."""
    if not keep:
        return 0, None
    finished = [r for r in fold if r not in stale]
    if finished:
        of, files = finished[-1], kind_files(fs, root, "error", finished[-1])
    elif previous is not None and previous.get("errors_of"):
        of, files = previous["errors_of"], snapshot_files(root, previous, "error")
    else:
        return 0, None
    tables = [pq.read_table(p, filesystem=fs) for p in files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return 0, of
    path = snapshot_error_file(root, snapshot_id)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.concat_tables(tables, promote_options="permissive"), path, filesystem=fs)
    return 1, of


def write_pointer(fs: pafs.FileSystem, root: str, pointer: dict) -> None:
    """Make `pointer` current in one step: one PUT of the whole object on S3, a temporary file renamed over the
    old pointer elsewhere (a rename within a directory replaces it atomically)."""
    data = (json.dumps(pointer, indent=1) + "\n").encode()
    path = pointer_path(root)
    fs.create_dir(f"{root}/{SNAPSHOTS}", recursive=True)
    if fs.type_name == "s3":
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    _step("pointer_temp_written")
    fs.move(tmp, path)


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def collect_garbage(fs: pafs.FileSystem, root: str, options: CompactionConfig, *, now: float | None = None) -> dict:
    """Delete what no reader can need any more: runs folded, and snapshots replaced, more than `grace_s` ago; half-
    written snapshots (no pointer names them) and pointer temporaries older than `stale_run_s`. The pointer is
    then rewritten without the deleted (same snapshot: readers see no change)."""
    root = root.rstrip("/")
    now = time.time() if now is None else now
    pointer = read_pointer(fs, root)
    deleted_runs, deleted_snapshots = [], []
    if pointer is not None:
        for run, at in pointer["runs"].items():
            if now - at > options.grace_s:
                _delete_dir(fs, f"{root}/{RUNS}/{run}")
                deleted_runs.append(run)
                _step("gc_deleted")
        for old in pointer["retired"]:
            if now - old["since"] > options.grace_s:
                _delete_dir(fs, snapshot_dir(root, old["snapshot_id"]))
                deleted_snapshots.append(old["snapshot_id"])
                _step("gc_deleted")
    named = {pointer["snapshot_id"], *(o["snapshot_id"] for o in pointer["retired"])} if pointer else set()
    for info in _list(fs, f"{root}/{SNAPSHOTS}"):
        name = info.base_name
        if (info.type == pafs.FileType.Directory and name not in named and now - _id_time(name) > options.stale_run_s
                and any(i.type == pafs.FileType.File for i in _list(fs, info.path, recursive=True))):
            _delete_dir(fs, info.path)  # a compaction killed before its switch
            deleted_snapshots.append(name)
        elif (info.type == pafs.FileType.File and name.startswith(POINTER + ".tmp-") and info.mtime is not None
              and now - info.mtime.timestamp() > options.stale_run_s):
            fs.delete_file(info.path)
    if pointer is not None and (deleted_runs or set(deleted_snapshots) & named):
        current = read_pointer(fs, root)
        if current is not None and current["snapshot_id"] == pointer["snapshot_id"]:
            gone = set(deleted_snapshots)
            write_pointer(fs, root, current | {
                "runs": {r: t for r, t in current["runs"].items() if r not in deleted_runs},
                "deleted_runs": current.get("deleted_runs", []) + [r for r in deleted_runs if r in current["runs"]],
                "retired": [o for o in current["retired"] if o["snapshot_id"] not in gone]})
    return {"deleted_runs": deleted_runs, "deleted_snapshots": deleted_snapshots}


def _local_map(fn: Callable[..., dict], jobs: list[dict]) -> list[dict]:
    return [fn(**job) for job in jobs]


def compact(fs: pafs.FileSystem, root: str, *, fingerprint: str, n_buckets: int, options: CompactionConfig,
            rows_per_group: int = 4, max_rows_per_file: int = 256,
            map_buckets: Callable[[Callable[..., dict], list[dict]], list[dict]] | None = None,
            now: float | None = None) -> dict:
    """Collect garbage, fold what is ready into a new snapshot and make it current; returns a summary.

    fingerprint: the served (corpus job's) models' fingerprint: the records a snapshot keeps.
    n_buckets, rows_per_group, max_rows_per_file: the corpus job's index_buckets, rows_per_group, max_rows_per_file.
    map_buckets: runs `compact_bucket` over a list of keyword arguments and returns its results in order (default: a
        local loop).
    Nothing is written (status "unchanged") when there is nothing new to fold and the fingerprint and options are
    the current snapshot's."""
    root = root.rstrip("/")
    gc = collect_garbage(fs, root, options, now=now)
    now = time.time() if now is None else now
    pointer = read_pointer(fs, root)
    if pointer is not None and pointer["n_buckets"] != n_buckets:
        raise ValueError(f"the current snapshot has {pointer['n_buckets']} buckets, this compaction {n_buckets}: "
                         "compact with the corpus job's corpus.index_buckets")
    fold, stale, waiting = plan_fold(fs, root, pointer, options.stale_run_s, now)
    _check_buckets(fs, root, fold, n_buckets)
    kept = {"keep_other_fingerprints": options.keep_other_fingerprints, "keep_errors": options.keep_errors}
    summary = {"folded": fold, "folded_as_crashed": stale, "waiting_on": waiting, "gc": gc}
    if not fold and pointer is not None and pointer["fingerprint"] == fingerprint and pointer["options"] == kept:
        return summary | {"status": "unchanged", "snapshot_id": pointer["snapshot_id"]}
    if not fold and pointer is None:
        return summary | {"status": "unchanged", "snapshot_id": None}
    sid = new_run_id()
    _step("planned")
    jobs = [{"fs": fs, "root": root, "snapshot_id": sid, "bucket": b, "previous": pointer, "runs": fold,
             "fingerprint": fingerprint, "keep_other_fingerprints": options.keep_other_fingerprints,
             "rows_per_group": rows_per_group, "max_rows_per_file": max_rows_per_file} for b in bucket_names(n_buckets)]
    results = (map_buckets or _local_map)(compact_bucket, jobs)
    _step("buckets_written")
    error_files, errors_of = _carry_errors(fs, root, sid, pointer, fold, stale, options.keep_errors)
    _step("errors_written")
    counts = {k: sum(r[k] for r in results) for k in ("records", "documents", "dropped_fingerprint", "superseded")}
    switched = time.time()
    folded_runs = dict((pointer or {}).get("runs", {})) | dict.fromkeys(fold, switched)
    retired = list((pointer or {}).get("retired", []))
    if pointer is not None:
        retired.append({"snapshot_id": pointer["snapshot_id"], "since": switched})
    new = {
        "format": POINTER_FORMAT, "snapshot_id": sid, "previous": (pointer or {}).get("snapshot_id"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(switched)), "created_unix": switched,
        "fingerprint": fingerprint, "n_buckets": n_buckets, "options": kept,
        "runs": folded_runs, "deleted_runs": list((pointer or {}).get("deleted_runs", [])), "retired": retired,
        "folded_through": max(folded_runs, default=(pointer or {}).get("folded_through", "")),
        "bucket_files": {r["bucket"]: r["files"] for r in results if r["files"]},
        "error_files": error_files, "errors_of": errors_of, "counts": counts,
    }
    if pointer is not None:
        new["folded_through"] = max(new["folded_through"], pointer.get("folded_through", ""))
    fs.create_dir(snapshot_dir(root, sid), recursive=True)
    # the snapshot's own copy, for people: readers take the pointer
    with fs.open_output_stream(f"{snapshot_dir(root, sid)}/_snapshot.json") as f:
        f.write((json.dumps(new, indent=1) + "\n").encode())
    current = read_pointer(fs, root)
    if (current or {}).get("snapshot_id") != (pointer or {}).get("snapshot_id"):
        raise RuntimeError(f"{pointer_path(root)} changed during this compaction (another one switched to "
                           f"{(current or {}).get('snapshot_id')}): run one compaction at a time; {sid} is left "
                           "for garbage collection")
    _step("before_switch")
    write_pointer(fs, root, new)
    _step("switched")
    return summary | {"status": "compacted", "snapshot_id": sid, "counts": counts}
