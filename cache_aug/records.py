"""Cache records: one augmented cache <-> one Arrow row, tensors as safetensors bytes (never pickle).

Row layout (`RECORD_SCHEMA`):
    doc_id, fingerprint, mode, dtype, n_latents, doc_tokens, seq_len, shapes (JSON),
    payload (safetensors bytes), payload_checksum, format_version, content_sha256, truncated,
    payload_sha256 (format 1 only), position_rule (null in records written before it: "shift"),
    gain (the selection probe's measured gain, `cache_aug.selection`; null: not measured)

Integrity (format 2): `payload_checksum` is "crc32/<chunk bytes>:<crc>,<crc>,..." over fixed-size
chunks of the payload, checked on several threads at once (zlib releases the GIL), so a large `full`
record costs a fraction of a whole-payload sha256 (33 MB: 21 ms sha256 vs 9 ms CRC32 on one core here,
and it divides across cores). It detects damage in storage or transit; which models made a record
is the fingerprint's job, and a hostile writer could recompute any checksum, which is why the header
and every byte range are validated too. Format 1 records (one sha256 of the payload) still load.

Payload tensors by storage mode (H_i, D_i: layer i's KV heads and head dim):
    all modes   input_ids (T,) int32            the document, so serving can prefill it
    latents     latents (N_L, d)                z; serving prefills document + latents
    latent_kv   k.i, v.i (H_i, N_L, D_i)        the latents' KV; serving prefills the document
                next_logits (V,)                and appends them (exact: they depend only on it)
    full        k.i, v.i (H_i, S_i, D_i)        the whole augmented KV; S_i = T+N_L, or the
                next_logits (V,)                window-1 last columns of a sliding layer
    plain       nothing more                    a document whose augmentation was measured not to help it
                                                (n_latents 0, seq_len = doc_tokens): served by plain decoding

A `plain` record (`encode_plain`) is what selective augmentation stores for a document it leaves out: the
corpus job still marks it done for these models, and serving reads its checked token ids and prefills them
without the latents (source "skipped"), skipping any restore.

The payload's safetensors header holds the module's `LatentLayout` (cache_aug/layout.py) as JSON, in
its `__metadata__` under LAYOUT_KEY: N_L, the re-read count, the position rule and the latent channel.
A module with first_ahead_from="last_token" adds one more position after the latents (the re-read
last token): seq_len = T+N_L+1, and latent_kv holds N_L+1 columns. A module with position_rule="keep"
stores the same tensors (their keys carry its positions), and the next token takes position doc_tokens
rather than seq_len. `restore` reads all of it off the stored layout, after checking it against the
record's n_latents, seq_len and position_rule columns; it can be given the loaded module's layout (or
only its position rule), and refuses a record made with another. A record written before payloads held
the layout is read as before: the re-read count is seq_len - doc_tokens - n_latents (0 or 1), the position
rule its column's (null: "shift"), and the channel the loaded module's when `restore` is given its layout
(the fingerprint, which names the channel, has been checked), else "embeds".

Stored data is untrusted input: `decode_payload` checks fingerprint, checksum, and every
tensor's name, dtype, shape and byte range against what the loaded decoder implies before
anything is allocated, then that the document's token ids lie in the decoder's vocabulary, and
raises `CacheRecordError` (or `FingerprintMismatch`) naming the document and the field. The
values of the cache tensors themselves are not checked: under a recomputed checksum, changed
tensor bytes load as they are stored.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, fields

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cache_aug.augment import AugmentedCache, added_embeds, augment
from cache_aug.checksum import checksum_matches, payload_checksum
from cache_aug.decoder import Decoder, torch_dtype
from cache_aug.fingerprint import FingerprintMismatch
from cache_aug.kv import CacheSpec
from cache_aug.layout import PLAIN, STORAGE_MODES, LatentLayout
from cache_aug.masks import POSITION_RULES
from cache_aug.passes import decoder_pass, prefill
from cache_aug.record_schema import RECORD_SCHEMA

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: payload_sha256; 2: chunked payload_checksum
MODES = STORAGE_MODES
PLAIN_MODE = "plain"  # a record without latents: the document was measured not to gain from them
RECORD_MODES = (*STORAGE_MODES, PLAIN_MODE)
LAYOUT_KEY = "cache_aug.layout"  # payload header __metadata__ entry: the LatentLayout's JSON (absent in older records)
STORE_DTYPES = ("float32", "bfloat16")
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "int32": "I32"}
_ITEMSIZE = {"F32": 4, "BF16": 2, "I32": 4}
MAX_HEADER_BYTES = 1 << 20  # a safetensors header larger than this is damage, not data


class CacheRecordError(ValueError):
    """A stored cache record is damaged or does not fit the loaded models."""


@dataclass(frozen=True)
class CacheRecord:
    """One stored augmented cache (see module docstring)."""

    doc_id: str
    fingerprint: str
    mode: str
    dtype: str
    n_latents: int
    doc_tokens: int
    seq_len: int
    shapes: str
    payload: bytes
    payload_checksum: str | None = None  # format 2: chunked CRC32 (module docstring)
    format_version: int = FORMAT_VERSION
    content_sha256: str | None = None  # sha256 of the document's UTF-8 text (incremental runs compare it)
    truncated: bool = False  # the document was cut to the configured maximum before augmentation
    payload_sha256: str | None = None  # format 1: sha256 of the payload
    position_rule: str | None = None  # where the next token goes on (AugmentedCache.next_position); None: "shift"
    gain: float | None = None  # nats/token the latents save on the document's own text (cache_aug.selection)

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> CacheRecord:
        names = [f.name for f in fields(cls)]
        optional = {"content_sha256", "truncated", "payload_checksum", "payload_sha256", "position_rule", "gain"}
        missing = [n for n in names if n not in optional and (n not in row or row[n] is None)]
        if missing:
            raise CacheRecordError(f"record {row.get('doc_id')!r}: missing field(s) {', '.join(missing)}")
        return cls(**{n: row[n] for n in names if n in row and row[n] is not None})


def encode_record(aug: AugmentedCache, *, doc_id: str, fingerprint: str, mode: str, dtype: str, spec: CacheSpec,
                  content_sha256: str | None = None, truncated: bool = False, gain: float | None = None) -> CacheRecord:
    """Serialise one augmented cache in the given storage mode and dtype."""
    if mode not in MODES:
        raise ValueError(f"storage mode {mode!r} not in {MODES}")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} not in {STORE_DTYPES}")
    if aug.n_latents == 0:
        raise ValueError(f"document {doc_id!r}: a plain (non-augmented) cache is not stored")
    tdtype = torch_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {"input_ids": aug.input_ids.to(torch.int32)}
    if mode == "latents":
        if not aug.layout.allows_storage(mode) or aug.latents is None:
            raise ValueError(f"document {doc_id!r}: storage mode 'latents' needs input-embedding latents, and this "
                             "cache's module writes keys and values (latent_channel=\"kv\"): store \"latent_kv\" or "
                             '"full"')
        tensors["latents"] = aug.latents.to(tdtype)
    else:
        layers = aug.latent_kv() if mode == "latent_kv" else aug.layers
        for i, (k, v) in enumerate(layers):
            keep = aug.n_added if mode == "latent_kv" else spec.stored_len(i, aug.seq_len)
            tensors[f"k.{i}"] = k[0, :, k.shape[2] - keep :].to(tdtype)
            tensors[f"v.{i}"] = v[0, :, v.shape[2] - keep :].to(tdtype)
        tensors["next_logits"] = aug.next_logits.to(tdtype)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    payload = st_save(tensors, metadata={LAYOUT_KEY: aug.layout.to_json()})
    return CacheRecord(
        doc_id=doc_id,
        fingerprint=fingerprint,
        mode=mode,
        dtype=dtype,
        n_latents=aug.n_latents,
        doc_tokens=aug.doc_len,
        seq_len=aug.seq_len,
        shapes=json.dumps({k: list(t.shape) for k, t in tensors.items()}, sort_keys=True),
        payload=payload,
        payload_checksum=payload_checksum(payload),
        content_sha256=content_sha256,
        truncated=truncated,
        position_rule=aug.layout.position_rule,
        gain=gain,
    )


def encode_plain(input_ids, *, doc_id: str, fingerprint: str, dtype: str, content_sha256: str | None = None,
                 truncated: bool = False, gain: float | None = None) -> CacheRecord:
    """The `plain` record of a document left without latents (module docstring): its token ids only, under the
    fingerprint of the models that measured it (`dtype`: the run's storage dtype, recorded for uniformity)."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} not in {STORE_DTYPES}")
    ids = torch.as_tensor(input_ids, dtype=torch.int32).reshape(-1).contiguous()  # (T,)
    if ids.numel() == 0:
        raise ValueError(f"document {doc_id!r}: no tokens")
    payload = st_save({"input_ids": ids})
    return CacheRecord(doc_id=doc_id, fingerprint=fingerprint, mode=PLAIN_MODE, dtype=dtype, n_latents=0,
                       doc_tokens=ids.numel(), seq_len=ids.numel(), shapes=json.dumps({"input_ids": [ids.numel()]}),
                       payload=payload, payload_checksum=payload_checksum(payload), content_sha256=content_sha256,
                       truncated=truncated, gain=gain)


def legacy_layout(record: CacheRecord, channel: str = "embeds") -> LatentLayout:
    """The layout of a record written before payloads held it, from its lengths and position rule column
    (the channel is not recorded there: `channel` is taken). ValueError when they fit no layout."""
    reread = record.seq_len - record.doc_tokens - record.n_latents  # 1: the last token was re-read after the latents
    return LatentLayout(record.n_latents, reread, record.position_rule or "shift", channel)


def expected_tensors(record: CacheRecord, spec: CacheSpec,
                     layout: LatentLayout | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) that a valid record of this decoder and layout (default: `legacy_layout`) must
    hold."""
    out = {"input_ids": ("I32", (record.doc_tokens,))}
    if record.mode == PLAIN_MODE:
        return out
    layout = legacy_layout(record) if layout is None else layout
    st = _ST_DTYPES[record.dtype]
    if record.mode == "latents":
        out["latents"] = (st, (layout.n_latents, spec.hidden_size))
        return out
    for i in range(len(spec.layers)):
        s = layout.n_added if record.mode == "latent_kv" else spec.stored_len(i, layout.cache_len(record.doc_tokens))
        out[f"k.{i}"] = out[f"v.{i}"] = (st, spec.kv_shape(i, s))
    out["next_logits"] = (st, (spec.vocab_size,))
    return out


def _record_layout(record: CacheRecord, metadata, channel: str) -> LatentLayout:
    """The layout the payload header's metadata holds (checked against the record's columns), or `legacy_layout`."""
    where = f"record {record.doc_id!r}"
    lengths = f"doc_tokens={record.doc_tokens}, n_latents={record.n_latents}, seq_len={record.seq_len}"
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CacheRecordError(f"{where}: payload header metadata is not a mapping of strings")
    stored = (metadata or {}).get(LAYOUT_KEY)
    if record.mode == PLAIN_MODE:
        if stored is not None:
            raise CacheRecordError(f"{where}: a plain record's payload holds a latent layout")
        return PLAIN
    if stored is None:  # written before payloads held the layout
        try:
            return legacy_layout(record, channel)
        except ValueError:
            raise CacheRecordError(f"{where}: inconsistent lengths ({lengths})") from None
    try:
        layout = LatentLayout.from_json(stored)
    except ValueError as e:
        raise CacheRecordError(f"{where}: payload header's latent layout is invalid ({e})") from None
    if layout.n_latents != record.n_latents or layout.cache_len(record.doc_tokens) != record.seq_len:
        raise CacheRecordError(f"{where}: inconsistent lengths ({lengths}) for the latent layout in its header "
                               f"({layout.describe()})")
    if layout.position_rule != (record.position_rule or "shift"):
        raise CacheRecordError(f"{where}: position_rule {record.position_rule!r}, the latent layout in its header has "
                               f"{layout.position_rule!r}")
    if not layout.allows_storage(record.mode):
        raise CacheRecordError(f"{where}: mode {record.mode!r} cannot hold a cache of the layout in its header "
                               f"({layout.describe()})")
    return layout


def _check_header(record: CacheRecord, spec: CacheSpec, channel: str = "embeds") -> LatentLayout:
    """Validate the safetensors header against the expected tensors before loading anything; returns the record's
    layout."""
    where = f"record {record.doc_id!r}"
    data = record.payload
    if len(data) < 8:
        raise CacheRecordError(f"{where}: payload truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise CacheRecordError(f"{where}: payload header length {n} does not fit a {len(data)}-byte payload")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheRecordError(f"{where}: payload header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CacheRecordError(f"{where}: payload header is not a mapping")
    layout = _record_layout(record, header.pop("__metadata__", None), channel)
    expected = expected_tensors(record, spec, layout)
    if set(header) != set(expected):
        raise CacheRecordError(f"{where}: payload holds tensors {sorted(header)}, expected {sorted(expected)}")
    body = len(data) - 8 - n
    for name, (st_dtype, shape) in expected.items():
        info = header[name]
        if not isinstance(info, dict):
            raise CacheRecordError(f"{where}: tensor {name}: malformed header entry")
        if info.get("dtype") != st_dtype:
            raise CacheRecordError(f"{where}: tensor {name}: dtype {info.get('dtype')!r}, expected {st_dtype!r}")
        if list(info.get("shape", [])) != list(shape):
            raise CacheRecordError(f"{where}: tensor {name}: shape {info.get('shape')}, expected {list(shape)}")
        offsets = info.get("data_offsets")
        size = _ITEMSIZE[st_dtype]
        for dim in shape:
            size *= dim
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or offsets[1] - offsets[0] != size
            or not 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise CacheRecordError(f"{where}: tensor {name}: byte range {offsets} does not fit the payload")
    return layout


def decode_payload(record: CacheRecord, spec: CacheSpec, fingerprint: str) -> dict[str, torch.Tensor]:
    """Checked tensors of a record made by the models with `fingerprint` for a decoder of `spec`."""
    return _decode(record, spec, fingerprint)[0]


def _decode(record: CacheRecord, spec: CacheSpec, fingerprint: str,
            channel: str = "embeds") -> tuple[dict[str, torch.Tensor], LatentLayout]:
    """`decode_payload`, and the record's checked layout (`channel`: assumed for a record without a stored layout)."""
    where = f"record {record.doc_id!r}"
    if record.format_version not in READABLE_VERSIONS:
        raise CacheRecordError(
            f"{where}: format_version {record.format_version}, this reader knows {READABLE_VERSIONS}")
    if record.fingerprint != fingerprint:
        raise FingerprintMismatch(f"{where}: made by models {record.fingerprint}, the loaded models are {fingerprint}")
    if record.mode not in RECORD_MODES:
        raise CacheRecordError(f"{where}: mode {record.mode!r} not in {RECORD_MODES}")
    if record.dtype not in STORE_DTYPES:
        raise CacheRecordError(f"{where}: dtype {record.dtype!r} not in {STORE_DTYPES}")
    plain = record.mode == PLAIN_MODE
    if record.doc_tokens < 1 or (record.n_latents != 0 if plain else record.n_latents < 1) \
            or (plain and record.seq_len != record.doc_tokens):
        raise CacheRecordError(
            f"{where}: inconsistent lengths (doc_tokens={record.doc_tokens}, n_latents={record.n_latents}, "
            f"seq_len={record.seq_len})"
        )
    if (record.position_rule or "shift") not in POSITION_RULES:
        raise CacheRecordError(f"{where}: position_rule {record.position_rule!r} not in {POSITION_RULES}")
    if record.format_version == 1:
        intact = (record.payload_sha256 is not None
                  and hashlib.sha256(record.payload).hexdigest() == record.payload_sha256)
    else:
        intact = record.payload_checksum is not None and checksum_matches(record.payload, record.payload_checksum)
    if not intact:
        raise CacheRecordError(f"{where}: payload checksum mismatch (damaged in storage or transit)")
    layout = _check_header(record, spec, channel)
    try:
        tensors = st_load(bytes(record.payload))
    except Exception as e:  # noqa: BLE001 - the header was checked; anything the reader still refuses is damage
        raise CacheRecordError(f"{where}: payload unreadable ({e})") from None
    ids = tensors["input_ids"]  # indexes the embedding table on restore: out of range crashes it (on CUDA, the device)
    if int(ids.min()) < 0 or int(ids.max()) >= spec.vocab_size:
        raise CacheRecordError(
            f"{where}: input_ids hold token ids outside the decoder's vocabulary (0..{spec.vocab_size - 1})")
    return tensors, layout


@torch.no_grad()
def restore(record: CacheRecord, decoder: Decoder, fingerprint: str, position_rule: str | None = None, *,
            layout: LatentLayout | None = None) -> AugmentedCache:
    """Rebuild the augmented cache a record stands for, ready for `decode_steps`.

    position_rule: the loaded module's rule, when known; a record that says otherwise is refused.
    layout: the loaded module's whole layout, when known; a record made with another is refused.
    """
    tensors, stored = _decode(record, decoder.cache_spec, fingerprint,
                              layout.channel if layout is not None else "embeds")
    if record.mode == PLAIN_MODE:  # fits any layout of these models: the document alone, prefilled
        cache = augment(decoder, None, [tensors["input_ids"].to(decoder.device, torch.long)])[0]
        cache.gain = record.gain
        return cache
    if position_rule is not None and stored.position_rule != position_rule:
        raise CacheRecordError(f"record {record.doc_id!r}: position_rule {stored.position_rule!r}, the loaded module "
                               f"follows {position_rule!r}")
    if layout is not None and stored != layout:
        raise CacheRecordError(f"record {record.doc_id!r}: made with latent layout ({stored.describe()}), the loaded "
                               f"module's is ({layout.describe()})")
    device, dtype = decoder.device, decoder.dtype
    ids = tensors["input_ids"].to(device, torch.long)  # (T,)
    L, r = stored.n_latents, stored.reread
    if record.mode == "full":
        layers = [(tensors[f"k.{i}"][None].to(device, dtype), tensors[f"v.{i}"][None].to(device, dtype))
                  for i in range(len(decoder.cache_spec.layers))]
        return AugmentedCache(ids, layers, tensors["next_logits"].to(device, dtype), stored, gain=record.gain)
    prefix, _ = prefill(decoder, ids[None])  # the document's KV, recomputed: (1, H, T, D) per layer
    if record.mode == "latent_kv":
        layers = [
            (torch.cat([k, tensors[f"k.{i}"][None].to(device, dtype)], 2),
             torch.cat([v, tensors[f"v.{i}"][None].to(device, dtype)], 2))
            for i, (k, v) in enumerate(prefix)
        ]
        return AugmentedCache(ids, layers, tensors["next_logits"].to(device, dtype), stored, gain=record.gain)
    z = tensors["latents"].to(device, dtype)  # (N_L, d)
    points = torch.tensor([[ids.shape[0]]], device=device)
    embeds = added_embeds(decoder, z[None], ids[None, -1:], r)  # (1, L+r, d)
    positions = stored.position_ids(points, L + r)  # (1, L+r)
    logits, layers = decoder_pass(decoder, prefix, points, embeds, L + r, torch.tensor([L + r - 1], device=device),
                                  positions)
    return AugmentedCache(ids, layers, logits[0, 0], stored, latents=z, gain=record.gain)


def records_to_table(records: list[CacheRecord]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records], schema=RECORD_SCHEMA)


def write_records(path: str, records: list[CacheRecord], filesystem=None) -> None:
    """Write records to one Parquet file (local path, or a path on `filesystem`)."""
    pq.write_table(records_to_table(records), path, filesystem=filesystem)


def read_records(path: str, filesystem=None) -> list[CacheRecord]:
    """Read every record of a Parquet file or dataset directory."""
    table = pq.read_table(path, filesystem=filesystem, schema=RECORD_SCHEMA)
    return [CacheRecord.from_row(row) for row in table.to_pylist()]
