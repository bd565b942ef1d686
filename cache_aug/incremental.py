"""The corpus job's incremental decisions as table operations on hash partitions, never as one process's id set.

Which input rows are duplicated ids, and which are already done (a current record with the same doc_id and
content hash, made with the current models' fingerprint), is decided per partition of a hash of the id:

    key_input_rows(batch, ...)       input rows -> PARTITION_SCHEMA (side 0), with their id key and text hash
    key_record_rows(batch, ...)      current records -> PARTITION_SCHEMA (side 1), only those of `fingerprint`
    key_wanted_rows(batch, ...)      entries of the serving replicas' wanted queue (`cache_aug.wanted`) -> side 2
    mark_partition(table)            one partition's rows of every side -> the rows to take, each with
                                     DUPLICATES (its id's count in the whole input, when > 1), DONE, WANTED
                                     (why serving wants it, for one row per wanted id) and QUEUED (a document
                                     only the queue names: not in the input, its text, if any, the queue's)

Every row with a given id lands in the same partition (`partition_of`), so a partition sees all the input's
copies of an id and all its current records: the counts and matches are those over the whole input and store.
The corpus job (`pipelines.corpus`) groups both sides by PARTITION and runs `mark_partition` on each group as
Ray Data tasks; nothing here imports Ray. The decision itself (error, skipped, process) stays per row in the job's
`prepare_rows`, from these two columns.
"""

from __future__ import annotations

import hashlib
import zlib

import pyarrow as pa
import pyarrow.compute as pc

PARTITION, SIDE, KEY, SHA, TEXT = "_ca_partition", "_ca_side", "_ca_key", "_ca_sha", "_ca_text"
REASON, AT = "_ca_reason", "_ca_at"
DUPLICATES, DONE, WANTED, QUEUED = "_ca_duplicates", "_ca_done", "_ca_wanted", "_ca_queued"
INPUT_SIDE, RECORD_SIDE, WANTED_SIDE = 0, 1, 2

# every side of a partition, one schema: an input row has KEY (its id as text, null when missing), SHA (of its
# raw text bytes, null for a null text) and TEXT; a record row has KEY (its doc_id) and SHA (its content_sha256);
# a wanted row KEY, SHA (of the text serving saw), TEXT (when the queue holds it), REASON and AT (when it was missed)
PARTITION_SCHEMA = pa.schema([
    pa.field(PARTITION, pa.int32()), pa.field(SIDE, pa.int8()), pa.field(KEY, pa.string()),
    pa.field(SHA, pa.string()), pa.field(TEXT, pa.large_binary()), pa.field(REASON, pa.string()),
    pa.field(AT, pa.float64()),
])
# what `mark_partition` returns: the rows to take (the input's, and the documents only the queue names), marked
MARKED_SCHEMA = pa.schema([
    pa.field(KEY, pa.string()), pa.field(TEXT, pa.large_binary()), pa.field(DUPLICATES, pa.int64()),
    pa.field(DONE, pa.bool_()), pa.field(WANTED, pa.string()), pa.field(QUEUED, pa.bool_()),
])


def partition_of(key: str | None, n_partitions: int) -> int:
    """The partition of an id key (crc32, as `cache_aug.store.bucket_of`); a missing id goes to partition 0."""
    return 0 if key is None else zlib.crc32(key.encode("utf-8", "surrogatepass")) % n_partitions


def id_keys(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Each id as the text the ledger stores (`str(id)`, null for a missing one), whatever the column's type."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.cast(column, pa.string()) if isinstance(column, pa.Array) else column.combine_chunks().cast(
            pa.string())
    return pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())


def key_input_rows(batch: pa.Table, *, id_column: str, text_column: str, n_partitions: int) -> pa.Table:
    """Input rows as PARTITION_SCHEMA rows of the input side: id key, partition, sha256 of the raw text bytes.

    The hash is of the bytes as stored: for valid UTF-8 it is the content hash a record of that text holds
    (`cache_aug.documents.content_hash` of the decoded text's UTF-8); an invalid text is an error whatever it is."""
    keys = id_keys(batch.column(id_column))
    texts = batch.column(text_column).cast(pa.large_binary()).combine_chunks()
    shas = pa.array([None if t is None else hashlib.sha256(t).hexdigest() for t in texts.to_pylist()], pa.string())
    parts = pa.array([partition_of(k, n_partitions) for k in keys.to_pylist()], pa.int32())
    n = len(keys)
    return pa.Table.from_arrays(
        [parts, pa.array([INPUT_SIDE] * n, pa.int8()), keys, shas, texts, pa.nulls(n, pa.string()),
         pa.nulls(n, pa.float64())], schema=PARTITION_SCHEMA)


def key_record_rows(batch: pa.Table, *, fingerprint: str, n_partitions: int) -> pa.Table:
    """Current record rows (doc_id, content_sha256, fingerprint) as PARTITION_SCHEMA rows of the record side,
    only those made with `fingerprint` (a record of other models is no reason to skip)."""
    batch = batch.filter(pc.equal(batch.column("fingerprint"), fingerprint))
    keys = batch.column("doc_id").cast(pa.string()).combine_chunks()
    shas = batch.column("content_sha256").cast(pa.string()).combine_chunks()
    parts = pa.array([partition_of(k, n_partitions) for k in keys.to_pylist()], pa.int32())
    n = len(keys)
    return pa.Table.from_arrays(
        [parts, pa.array([RECORD_SIDE] * n, pa.int8()), keys, shas, pa.nulls(n, pa.large_binary()),
         pa.nulls(n, pa.string()), pa.nulls(n, pa.float64())], schema=PARTITION_SCHEMA)


def key_wanted_rows(batch: pa.Table, *, n_partitions: int) -> pa.Table:
    """Entries of the wanted queue (`cache_aug.wanted.WANTED_SCHEMA`) as PARTITION_SCHEMA rows of the wanted side."""
    keys = batch.column("doc_id").cast(pa.string()).combine_chunks()
    parts = pa.array([partition_of(k, n_partitions) for k in keys.to_pylist()], pa.int32())
    n = len(keys)
    return pa.Table.from_arrays(
        [parts, pa.array([WANTED_SIDE] * n, pa.int8()), keys,
         batch.column("content_sha256").cast(pa.string()).combine_chunks(),
         batch.column("text").cast(pa.large_binary()).combine_chunks(),
         batch.column("reason").cast(pa.string()).combine_chunks(),
         batch.column("wanted_at").cast(pa.float64()).combine_chunks()], schema=PARTITION_SCHEMA)


def mark_partition(table: pa.Table, *, wanted_only: bool = False) -> pa.Table:
    """One partition (every row of every side whose id hashes to it) -> the rows to take, marked:
    DUPLICATES = how many input rows carry the row's id, where that is more than one (else null; never for a
    missing id); DONE = a record row has the same id and content hash; WANTED = the reason of the newest wanted
    entry of the row's id, on one input row per id (the first); QUEUED = true on a row made from a wanted entry
    whose id no input row has (its text: the entry's, null when the queue holds none).

    wanted_only: take only the wanted documents (their input rows, and those only the queue names)."""
    side = table.column(SIDE)
    inputs = table.filter(pc.equal(side, INPUT_SIDE)).select([KEY, SHA, TEXT])
    records = table.filter(pc.equal(side, RECORD_SIDE)).select([KEY, SHA])
    wanted = _newest_per_id(table.filter(pc.equal(side, WANTED_SIDE)).select([KEY, SHA, TEXT, REASON, AT]))
    reasons = dict(zip(wanted.column(KEY).to_pylist(), wanted.column(REASON).to_pylist(), strict=True))
    marks, seen = [], set()
    for k in inputs.column(KEY).to_pylist():  # one input row per wanted id carries the mark
        marks.append(reasons.get(k) if k is not None and k not in seen else None)
        if k is not None:
            seen.add(k)
    inputs = inputs.append_column(WANTED, pa.array(marks, pa.string()))
    queued = wanted.filter(pa.array([k not in seen for k in wanted.column(KEY).to_pylist()], pa.bool_()))
    if wanted_only:
        inputs = inputs.filter(pc.is_valid(inputs.column(WANTED)))
    inputs = inputs.append_column(QUEUED, pa.nulls(inputs.num_rows, pa.bool_()))
    queued = pa.Table.from_arrays(
        [queued.column(KEY), queued.column(SHA), queued.column(TEXT), queued.column(REASON),
         pa.array([True] * queued.num_rows, pa.bool_())], names=[KEY, SHA, TEXT, WANTED, QUEUED])
    rows = pa.concat_tables([inputs, queued.cast(inputs.schema)])

    with_id = inputs.filter(pc.is_valid(inputs.column(KEY))).select([KEY])
    counts = with_id.group_by(KEY).aggregate([([], "count_all")]).rename_columns([KEY, DUPLICATES])
    counts = counts.filter(pc.greater(counts.column(DUPLICATES), 1))
    done = records.filter(pc.and_(pc.is_valid(records.column(KEY)), pc.is_valid(records.column(SHA))))
    done = done.group_by([KEY, SHA]).aggregate([])  # each (id, hash) once: several records must not copy a row
    done = done.append_column(DONE, pa.array([True] * done.num_rows, pa.bool_()))
    # null keys never match (an input row without an id or text is neither a duplicate nor done)
    out = rows.join(counts, keys=KEY, join_type="left outer", use_threads=False)
    out = out.join(done, keys=[KEY, SHA], join_type="left outer", use_threads=False)
    return pa.Table.from_arrays(
        [out.column(KEY), out.column(TEXT), out.column(DUPLICATES).cast(pa.int64()),
         pc.fill_null(out.column(DONE), False), out.column(WANTED), out.column(QUEUED)], schema=MARKED_SCHEMA)


def _newest_per_id(wanted: pa.Table) -> pa.Table:
    """One wanted entry per id: the newest (ties: the one with text, then the greatest hash; deterministic)."""
    if wanted.num_rows == 0:
        return wanted
    keys, at = wanted.column(KEY).to_pylist(), wanted.column(AT).to_pylist()
    has_text, shas = pc.is_valid(wanted.column(TEXT)).to_pylist(), wanted.column(SHA).to_pylist()
    best: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k is None:
            continue
        j = best.get(k)
        if j is None or (at[i] or 0.0, has_text[i], shas[i] or "") > (at[j] or 0.0, has_text[j], shas[j] or ""):
            best[k] = i
    return wanted.take(pa.array(sorted(best.values()), pa.int64()))
