"""Ray Data job: precompute augmented caches for a document corpus, incrementally.

    read_parquet(input) -> PrepareRows (tasks: validate, hash, tokenize, decide)
                        -> Augmenter (actor pool: decoder + coprocessor, batches sorted by length)
                        -> write_parquet(<output>/runs/<run_id>, partitioned by kind and bucket)

Each input row becomes exactly one ledger row: a `record`, `skipped` (a record with this content
hash and model fingerprint exists), or an `error` with its reason (missing id, duplicate id,
null/empty/invalid UTF-8 text, too long). A re-run processes only new or changed documents, or
all of them when the models' fingerprint changed; a run that crashed part-way is finished by the
next one without redoing what it wrote. Layout and reader: `cache_aug.store`.

Which ids are duplicated and which documents are already done is decided by Ray Data, not by the
driver: the input rows (id, text hash, text) and the current records (doc_id, content hash) of the
current fingerprint are grouped by a hash partition of the id, and each partition is marked as
table operations (`cache_aug.incremental`) before PrepareRows:

    read_parquet(input) -> key ----------------------------\
    read_parquet(current record files) -> key (this fp) ---+-> groupby(partition).map_groups(mark)
                                                                 -> PrepareRows -> Augmenter -> write

The driver reads only file listings and Parquet footers (input rows to read; each kind's rows the run
wrote, for the accounting): its memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from cache_aug.config import to_dict
from cache_aug.documents import DocumentError, prepare_document
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
)
from cache_aug.records import RECORD_SCHEMA
from cache_aug.store import (
    MANIFESTS,
    NO_BUCKET,
    RUNS,
    bucket_of,
    current_files_and_rows,
    kind_files,
    kind_non_null,
    kind_rows,
    new_run_id,
    readable_parquet_rows,
)
from cache_aug.tiny import build_if_embedded
from cache_aug.wanted import consumed_names, delete_files, queue_files
from pipelines.config import JobConfig
from pipelines.ray_session import check_driver_models, init_ray
from pipelines.storage import portable, resolve, resolve_inputs

FAIL_AFTER_ENV = "CACHE_AUG_CORPUS_FAIL_AFTER"  # "N:MARKER": an actor dies after N documents, once (tests)
EXIT_AT_ENV = "CACHE_AUG_CORPUS_EXIT_AT"  # "after_write" | "after_manifest": the driver dies there (tests)
# Sizing the hash partitions that decide duplicates and done documents: a shuffle partition (one task's memory, and
# then one PrepareRows task) holds at most about this many rows of input and records, and there are at least as many
# as the cluster has CPUs (PrepareRows runs in parallel); each is split into a few groups (one `mark_partition` call
# each), so that the hash of the group numbers spreads rows evenly over the partitions.
ROWS_PER_SHUFFLE_PARTITION = 100_000
GROUPS_PER_SHUFFLE_PARTITION = 4

LEDGER_SCHEMA = pa.schema(
    [pa.field("doc_id", pa.string()), pa.field("kind", pa.string()), pa.field("reason", pa.string()),
     pa.field("bucket", pa.string()), pa.field("run_id", pa.string()),
     # why serving wants the document (`cache_aug.wanted.REASONS`), on one row per wanted id; null otherwise
     pa.field("wanted", pa.string()),
     # true on a row only the wanted queue named (not in the input); null otherwise
     pa.field("queued", pa.bool_())]
    + [f.with_nullable(True) for f in RECORD_SCHEMA if f.name != "doc_id"]
)


def _empty_ledger(n: int) -> dict[str, list]:
    return {name: [None] * n for name in LEDGER_SCHEMA.names}


def prepare_rows(batch: pa.Table, *, id_column: str, text_column: str, tokenizer, max_tokens: int, truncate: bool,
                 n_buckets: int, run_id: str, duplicates_column: str = DUPLICATES,
                 done_column: str = DONE) -> pa.Table:
    """Decide each row's fate; rows to augment carry their token ids.

    `duplicates_column`: how many input rows carry this row's id, where more than one (else null); `done_column`:
    a current record has this row's id and content hash (`cache_aug.incremental.mark_partition` marks both, and
    the wanted queue's WANTED and QUEUED, carried into the ledger's `wanted` and `queued`)."""
    ids = batch.column(id_column).to_pylist()
    texts = batch.column(text_column).cast(pa.large_binary()).to_pylist()  # raw bytes: invalid UTF-8 stays detectable
    duplicates = batch.column(duplicates_column).to_pylist()
    done = batch.column(done_column).to_pylist()
    n = len(ids)
    wanted = batch.column(WANTED).to_pylist() if WANTED in batch.column_names else [None] * n
    queued = batch.column(QUEUED).to_pylist() if QUEUED in batch.column_names else [None] * n
    out = _empty_ledger(n) | {"input_ids": [None] * n}
    for i, (doc_id, raw) in enumerate(zip(ids, texts, strict=True)):
        out["doc_id"][i] = None if doc_id is None else str(doc_id)
        out["run_id"][i] = run_id
        out["bucket"][i] = NO_BUCKET
        out["wanted"][i], out["queued"][i] = wanted[i], queued[i]
        try:
            if doc_id is not None and duplicates[i]:
                raise DocumentError(f"duplicate doc_id: appears {duplicates[i]} times in the input")
            if queued[i] and raw is None and done[i]:  # a record of the text serving saw exists already
                out["kind"][i], out["reason"][i] = "skipped", "up to date"
                continue
            if queued[i] and raw is None:
                raise DocumentError(f"wanted by serving ({wanted[i]}), but its text is unknown: the input does not "
                                    "hold the document and the request did not send its text")
            doc = prepare_document(doc_id, raw, tokenizer, max_tokens=max_tokens, truncate=truncate)
        except DocumentError as e:
            out["kind"][i], out["reason"][i] = "error", str(e)
            continue
        out["content_sha256"][i], out["truncated"][i] = doc.content_sha256, doc.truncated
        if done[i]:
            out["kind"][i], out["reason"][i] = "skipped", "up to date"
        else:
            out["kind"][i], out["bucket"][i] = "process", bucket_of(doc.doc_id, n_buckets)
            out["input_ids"][i] = np.asarray(doc.input_ids, dtype=np.int32)
    schema = LEDGER_SCHEMA.append(pa.field("input_ids", pa.list_(pa.int32())))
    return pa.Table.from_pydict(out, schema=schema)


class Augmenter:
    """Actor: holds decoder + coprocessor; turns `process` rows into `record` rows."""

    def __init__(self, config: dict, coprocessor: str, fingerprint: str):
        from cache_aug.config import from_dict
        from cache_aug.coprocessor import load_latent_module
        from cache_aug.decoder import load_decoder
        from cache_aug.devices import choose_device

        self.cfg = from_dict(JobConfig, config)
        c = self.cfg.corpus
        self.device = choose_device("auto", gpus=c.gpus_per_actor, cpus=c.cpus_per_actor)  # a GPU when given one
        self.decoder = load_decoder(self.cfg.model, device=self.device, s3=self.cfg.s3)
        self.module = load_latent_module(coprocessor, self.decoder, self.cfg.s3)
        # every record of a run must come from the models the driver checked
        self.fingerprint = check_driver_models(self.decoder, self.module, fingerprint, "corpus.coprocessor",
                                               coprocessor)
        self.done_docs = 0

    def _maybe_fail(self, n: int) -> None:
        spec = os.environ.get(FAIL_AFTER_ENV)
        if spec:
            after, _, marker = spec.partition(":")
            if self.done_docs + n > int(after) and not os.path.exists(marker):
                Path(marker).write_text(f"actor killed after {self.done_docs} documents\n")
                os._exit(1)  # a real process death, not a Python exception

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cache_aug.augment import augment
        from cache_aug.records import encode_plain, encode_record
        from cache_aug.selection import probe_gains

        rows = batch.to_pylist()
        todo = sorted((i for i, r in enumerate(rows) if r["kind"] == "process"),
                      key=lambda i: len(rows[i]["input_ids"]))
        self._maybe_fail(len(todo))
        c, storage = self.cfg.corpus, self.cfg.storage
        sel = c.selection
        gains = dict.fromkeys(todo)
        if sel.probe and todo:  # what the latents buy each document, on its own text (cache_aug.selection)
            measured = probe_gains(self.decoder, self.module, [rows[i]["input_ids"] for i in todo],
                                   n_points=sel.n_points, n_ahead=sel.n_ahead, min_prefix=sel.min_prefix,
                                   batch_size=c.augment_batch_size)
            gains = dict(zip(todo, measured, strict=True))
        common = {"fingerprint": self.fingerprint, "dtype": storage.dtype}
        keep = [i for i in todo if sel.min_gain is None or gains[i] is None or gains[i] > sel.min_gain]
        for i in sorted(set(todo) - set(keep)):  # measured not to help: its token ids, no latents
            rec = encode_plain(rows[i]["input_ids"], doc_id=rows[i]["doc_id"], **common, gain=gains[i],
                               content_sha256=rows[i]["content_sha256"], truncated=bool(rows[i]["truncated"]))
            rows[i] |= rec.to_row() | {"kind": "record"}
        step = c.augment_batch_size
        for start in range(0, len(keep), step):  # neighbours in length order: little padding
            chunk = keep[start : start + step]
            augs = augment(self.decoder, self.module, [rows[i]["input_ids"] for i in chunk])
            for i, aug in zip(chunk, augs, strict=True):
                rec = encode_record(
                    aug, doc_id=rows[i]["doc_id"], mode=storage.mode, spec=self.decoder.cache_spec, **common,
                    content_sha256=rows[i]["content_sha256"], truncated=bool(rows[i]["truncated"]), gain=gains[i],
                )
                rows[i] |= rec.to_row() | {"kind": "record"}
        self.done_docs += len(todo)
        for r in rows:
            r.pop("input_ids", None)
        return pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)


def _input_dataset(cfg: JobConfig) -> tuple[ray.data.Dataset, list[str]]:
    c = cfg.corpus
    fs, targets, paths = resolve_inputs(c.input_paths, cfg.s3, "corpus.input_paths")
    try:
        ds = ray.data.read_parquet(targets, filesystem=fs)
        names = ds.schema().names
    except Exception as e:
        raise RuntimeError(f"corpus.input_paths: cannot read {paths}: {e}") from e
    missing = [col for col in (c.id_column, c.text_column) if col not in names]
    if missing:
        raise ValueError(f"corpus: column(s) {missing} not found in {paths} (columns: {names})")
    return ds.select_columns([c.id_column, c.text_column]), paths


def _count_input_rows(paths: list[str], cfg: JobConfig) -> int:
    """The input's rows, from the Parquet footers alone (no column is read)."""
    import pyarrow.dataset as pads

    n = 0
    for p in paths:
        fs, target = resolve(p, cfg.s3)
        n += pads.dataset(target, filesystem=fs, format="parquet").count_rows()
    return n


def _marked_input(ds: ray.data.Dataset, cfg: JobConfig, out_fs: pafs.FileSystem, record_files: list[str],
                  fingerprint: str, rows: int, cpus: float, wanted_files: list[str] = ()) -> ray.data.Dataset:
    """The rows to take as (id key, text, duplicates, done, wanted, queued): the input, the current records and
    the wanted queue's entries grouped by a hash partition of the id, each partition marked as table operations
    in Ray tasks (`cache_aug.incremental`). `rows`: input rows + current records + queue entries; `cpus`: the
    cluster's."""
    c = cfg.corpus
    shuffle_partitions = max(math.ceil(rows / ROWS_PER_SHUFFLE_PARTITION), int(cpus), 1)
    n_groups = shuffle_partitions * GROUPS_PER_SHUFFLE_PARTITION
    keyed = ds.map_batches(key_input_rows, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
                           fn_kwargs={"id_column": c.id_column, "text_column": c.text_column,
                                      "n_partitions": n_groups})
    if record_files:
        records = ray.data.read_parquet(record_files, filesystem=out_fs, partitioning=None, num_cpus=0.25) \
            .select_columns(["doc_id", "content_sha256", "fingerprint"])
        keyed = keyed.union(records.map_batches(
            key_record_rows, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
            fn_kwargs={"fingerprint": fingerprint, "n_partitions": n_groups}))
    if wanted_files:
        entries = ray.data.read_parquet(list(wanted_files), filesystem=out_fs, partitioning=None, num_cpus=0.25)
        keyed = keyed.union(entries.map_batches(key_wanted_rows, batch_format="pyarrow", batch_size=None,
                                                num_cpus=0.25, fn_kwargs={"n_partitions": n_groups}))
    return keyed.groupby(PARTITION, num_partitions=shuffle_partitions).map_groups(
        mark_partition, batch_format="pyarrow", num_cpus=0.25, fn_kwargs={"wanted_only": c.wanted == "only"})


def run_corpus_job(cfg: JobConfig, *, actor_env: dict | None = None) -> dict:
    """Run one incremental pass over the corpus; returns (and writes) the run manifest."""
    from cache_aug.coprocessor import latent_fingerprint, load_latent_module
    from cache_aug.decoder import load_decoder

    c = cfg.corpus
    if not c.coprocessor:
        raise ValueError("corpus.coprocessor: a trained coprocessor directory is required (the training job's export)")
    t0 = time.time()
    run_id = new_run_id()
    out_fs, out_root = resolve(c.output.rstrip("/"), cfg.s3)
    out_fs = out_fs or pafs.LocalFileSystem()

    coprocessor = portable(c.coprocessor)  # each actor loads it from there: the driver's disk may not be theirs
    decoder = load_decoder(cfg.model, s3=cfg.s3)  # the driver checks the fingerprint once
    module = load_latent_module(coprocessor, decoder, cfg.s3)
    if not module.layout.allows_storage(cfg.storage.mode):
        raise ValueError(f"storage.mode: the coprocessor at {c.coprocessor} writes keys and values "
                         "(latent_channel=\"kv\"), not input embeddings: store \"latent_kv\" or \"full\"")
    fingerprint = latent_fingerprint(decoder, module)
    del module
    tokenizer = decoder.tokenizer
    del decoder
    phases = {"setup_s": time.time() - t0}

    # S3 servers answer 500/502/504 during restarts and brief outages; Ray Data retries only some by default.
    ctx = ray.data.DataContext.get_current()
    extra = [e for e in ("HTTP status 500", "HTTP status 502", "HTTP status 504") if e not in ctx.retried_io_errors]
    if extra:
        with warnings.catch_warnings():  # Ray warns on any non-default list; these are valid regexes, as it asks
            warnings.filterwarnings("ignore", message=".*retried_io_errors.*substring matching",
                                    category=DeprecationWarning)
            ctx.retried_io_errors = [*ctx.retried_io_errors, *extra]
    total_cpus = ray.cluster_resources().get("CPU", 0)
    if total_cpus and c.num_actors * c.cpus_per_actor > total_cpus - 1:
        print(f"[corpus] WARNING: corpus.num_actors x corpus.cpus_per_actor = {c.num_actors * c.cpus_per_actor:g} "
              "leaves less than "
              f"one of the cluster's {total_cpus:g} CPUs to Ray Data's listing, read and write tasks; unless the "
              "cluster grows, the job stalls. Lower corpus.cpus_per_actor or corpus.num_actors.", flush=True)
    t1 = time.time()
    ds, paths = _input_dataset(cfg)
    n_input = _count_input_rows(paths, cfg)
    record_files, n_records = current_files_and_rows(out_fs, out_root, "record")
    wanted_files, wanted_entries, superseded = _claim_wanted(out_fs, out_root, c.wanted)
    phases["scan_s"] = time.time() - t1
    print(f"[corpus] run {run_id}: {n_input} input rows; {n_records} current records in {len(record_files)} files "
          f"(those of fingerprint {fingerprint} count as done); {wanted_entries} wanted queue entries in "
          f"{len(wanted_files)} files (corpus.wanted={c.wanted})", flush=True)

    manifest = {"run_id": run_id, "fingerprint": fingerprint, "status": "running", "input_paths": paths,
                "output": c.output,
                "config": {k: to_dict(getattr(cfg, k)) for k in ("model", "augmentation", "storage", "corpus")}}
    marked = _marked_input(ds, cfg, out_fs, record_files, fingerprint, n_input + (n_records or 0) + wanted_entries,
                           total_cpus, wanted_files)
    prepared = marked.map_batches(
        prepare_rows, batch_format="pyarrow", batch_size=c.batch_size, num_cpus=0.25,
        fn_kwargs={"id_column": KEY, "text_column": TEXT, "tokenizer": tokenizer, "max_tokens": c.max_tokens,
                   "truncate": c.truncate, "n_buckets": c.index_buckets, "run_id": run_id},
    )
    augmented = prepared.map_batches(
        Augmenter, batch_format="pyarrow", batch_size=c.batch_size,
        fn_constructor_kwargs={"config": to_dict(cfg), "coprocessor": coprocessor, "fingerprint": fingerprint},
        compute=ray.data.ActorPoolStrategy(size=c.num_actors),
        num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor or None,
        **({"runtime_env": {"env_vars": dict(actor_env)}} if actor_env else {}),
    )
    t1 = time.time()
    try:
        augmented.write_parquet(f"{out_root}/{RUNS}/{run_id}", filesystem=out_fs, partition_cols=["kind", "bucket"],
                                max_rows_per_file=c.max_rows_per_file, row_group_size=c.rows_per_group)
        phases["process_s"] = time.time() - t1
    except Exception as e:
        manifest |= {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
        try:
            _write_manifest(out_fs, out_root, manifest, t0)
        except Exception as m:  # storage down: the write error is the one to report, not the manifest's  # noqa: BLE001
            e.add_note(f"the failed run's manifest could not be written either: {type(m).__name__}: {m}")
        raise

    _exit_at("after_write")
    t1 = time.time()
    kinds = ("record", "skipped", "error")
    counts = {kind: kind_rows(out_fs, out_root, kind, run_id) for kind in kinds}
    # the ledger's marks, from the footers' null counts: rows serving wanted, and those only the queue named
    wanted = {kind: kind_non_null(out_fs, out_root, kind, run_id, "wanted") for kind in kinds}
    queued = sum(kind_non_null(out_fs, out_root, kind, run_id, "queued") for kind in kinds)
    phases["account_s"] = time.time() - t1
    manifest["phases"] = phases
    # read: the input's rows and the documents only the queue named; with corpus.wanted="only", the wanted ones
    read = sum(wanted.values()) if c.wanted == "only" else n_input + queued
    manifest |= {"status": "succeeded", "counts": {"read": read, "written": counts["record"],
                                                   "skipped": counts["skipped"], "failed": counts["error"]}}
    manifest["wanted"] = {"mode": c.wanted, "files": [f.rsplit("/", 1)[-1] for f in wanted_files],
                          "entries": wanted_entries, "documents": sum(wanted.values()), "queue_only": queued,
                          "written": wanted["record"], "skipped": wanted["skipped"], "failed": wanted["error"],
                          "already_taken_files": superseded}
    if c.wanted == "only":
        manifest["wanted"]["input_rows_scanned"] = n_input
    if c.selection.probe:
        manifest["selection"] = {"min_gain": c.selection.min_gain, "n_points": c.selection.n_points,
                                 "n_ahead": c.selection.n_ahead} | _gain_histogram(out_fs, out_root, run_id, cfg)
    if sum(counts.values()) != read:
        manifest["status"] = "accounting_mismatch"
    _write_manifest(out_fs, out_root, manifest, t0)
    if manifest["status"] != "succeeded":
        raise RuntimeError(f"run {run_id}: {read} rows read but {counts} accounted for")
    _exit_at("after_manifest")
    # taken: the manifest names them, so a run killed before these deletions does not take them again
    delete_files(out_fs, wanted_files)
    print(f"[corpus] run {run_id}: {json.dumps(manifest['counts'])} in {manifest['timings']['seconds']:.1f}s",
          flush=True)
    return manifest


def _gain_histogram(fs: pafs.FileSystem, root: str, run_id: str, cfg: JobConfig) -> dict:
    """The histogram of the gains this run's records measured, summed by Ray Data over their `gain` and `mode`
    columns (`cache_aug.selection.gain_counts`): the driver receives one row."""
    from cache_aug.selection import gain_count_columns, gain_counts, gain_histogram

    edges = cfg.corpus.selection.histogram_edges
    files = kind_files(fs, root, "record", run_id)
    totals = {}
    if files:
        per_batch = ray.data.read_parquet(files, filesystem=fs, partitioning=None, num_cpus=0.25) \
            .select_columns(["gain", "mode"]) \
            .map_batches(gain_counts, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
                         fn_kwargs={"edges": edges})
        totals = per_batch.sum(gain_count_columns(edges)) or {}
        totals = {k.removeprefix("sum(").removesuffix(")"): v for k, v in totals.items()}
    return gain_histogram(totals, edges)


def _claim_wanted(fs: pafs.FileSystem, root: str, mode: str) -> tuple[list[str], int, int]:
    """The wanted queue's files this run takes, their entries (from the footers), and how many files a succeeded
    run had already taken (deleted now, not taken again: a run killed after its manifest left them)."""
    if mode == "off":
        return [], 0, 0
    files = queue_files(fs, root)
    taken = consumed_names(fs, root, files, MANIFESTS)
    if taken:
        delete_files(fs, [f for f in files if f.rsplit("/", 1)[-1] in taken])
    files = [f for f in files if f.rsplit("/", 1)[-1] not in taken]
    found = readable_parquet_rows(fs, files)
    return [p for p, _ in found], sum(n for _, n in found), len(taken)


def _exit_at(point: str) -> None:
    if os.environ.get(EXIT_AT_ENV) == point:
        print(f"[corpus] {EXIT_AT_ENV}={point}: the driver dies here", flush=True)
        os._exit(1)


def _write_manifest(fs, root: str, manifest: dict, t0: float) -> None:
    manifest["timings"] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "seconds": time.time() - t0}
    fs.create_dir(f"{root}/{MANIFESTS}", recursive=True)
    with fs.open_output_stream(f"{root}/{MANIFESTS}/{manifest['run_id']}.json") as f:
        f.write((json.dumps(manifest, indent=2, default=str) + "\n").encode())


def augment_job(config: str | None, overrides: list[str], num_cpus: int | None = None) -> dict:
    """The corpus job as `ray job submit` and `cache-aug augment` run it; returns the run manifest."""
    from cache_aug.config import dump_config
    from pipelines.config import load_job_config

    cfg = load_job_config(config, overrides=overrides)
    print(dump_config(cfg), flush=True)
    build_if_embedded(cfg.model.path)  # here, before any actor loads it: loading never builds
    init_ray(num_cpus)
    manifest = run_corpus_job(cfg)
    print(json.dumps({k: manifest[k] for k in ("run_id", "fingerprint", "status", "counts", "timings")}, indent=2),
          flush=True)
    return manifest
