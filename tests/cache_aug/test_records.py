"""Cache records are untrusted input: every kind of damage is a clear error, never a wrong cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_aug.augment import augment
from cache_aug.checksum import checksum_matches, payload_checksum
from cache_aug.config import CoprocessorConfig
from cache_aug.coprocessor import build_latent_module, latent_fingerprint
from cache_aug.fingerprint import FingerprintMismatch
from cache_aug.records import (
    MODES,
    PLAIN_MODE,
    RECORD_SCHEMA,
    CacheRecord,
    CacheRecordError,
    decode_payload,
    encode_plain,
    encode_record,
    read_records,
    restore,
    write_records,
)
from cache_aug.store import AugmentedCacheReader, bucket_of
from cache_aug.testing import tiny_decoder


@pytest.fixture(scope="module")
def made():
    decoder = tiny_decoder("llama")
    module = build_latent_module(decoder, CoprocessorConfig(mode="full"), n_latents=2).eval()
    fp = latent_fingerprint(decoder, module)
    aug = augment(decoder, module, [list(range(3, 23))])[0]
    records = {m: encode_record(aug, doc_id="doc-7", fingerprint=fp, mode=m, dtype="float32", spec=decoder.cache_spec)
               for m in ("latents", "latent_kv", "full")}
    return decoder, fp, records


def _with_payload(record: CacheRecord, payload: bytes, fix_checksum: bool = True) -> CacheRecord:
    digest = payload_checksum(payload) if fix_checksum else record.payload_checksum
    return dataclasses.replace(record, payload=payload, payload_checksum=digest)


def _as_format_1(record: CacheRecord) -> CacheRecord:
    """The same record as the previous format wrote it: one sha256 of the payload, no chunked checksum."""
    return dataclasses.replace(record, format_version=1, payload_checksum=None,
                               payload_sha256=hashlib.sha256(record.payload).hexdigest())


def _rewrite_header(payload: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload[8 + n :]


def test_valid_records_load(made):
    decoder, fp, records = made
    for record in records.values():
        assert restore(record, decoder, fp).seq_len == 22


def test_fingerprint_mismatch(made):
    _, fp, records = made
    other = tiny_decoder("llama", seed=1)  # same shapes, other weights
    other_fp = latent_fingerprint(other, build_latent_module(other, CoprocessorConfig(), 2))
    assert other_fp != fp
    with pytest.raises(FingerprintMismatch, match="doc-7"):
        restore(records["full"], other, other_fp)


@pytest.mark.parametrize("mode", ["latents", "latent_kv", "full"])
def test_truncated_payload(made, mode):
    decoder, fp, records = made
    record = records[mode]
    for cut in (0, 5, 8, 40, len(record.payload) // 2, len(record.payload) - 1):
        bad = _with_payload(record, record.payload[:cut])
        with pytest.raises(CacheRecordError, match="doc-7"):
            restore(bad, decoder, fp)


def test_bit_flip_is_caught_by_checksum(made):
    decoder, fp, records = made
    record = records["latent_kv"]
    flipped = bytearray(record.payload)
    flipped[-3] ^= 0x10
    with pytest.raises(CacheRecordError, match="checksum"):
        restore(_with_payload(record, bytes(flipped), fix_checksum=False), decoder, fp)


def test_chunked_checksum_catches_damage_in_any_chunk():
    data = bytes(range(256)) * 1000  # 256,000 bytes: 4 chunks of 64 KiB
    chunk = 1 << 16
    stored = payload_checksum(data, chunk)
    assert stored.startswith(f"crc32/{chunk}:") and stored.count(",") == 3
    assert checksum_matches(data, stored)
    for i in (0, chunk - 1, chunk, 2 * chunk + 7, len(data) - 1):
        bad = bytearray(data)
        bad[i] ^= 0x01
        assert not checksum_matches(bytes(bad), stored), i
    assert not checksum_matches(data + b"x", stored) and not checksum_matches(data[:-1] + b"", stored[:-9])
    for malformed in ("", "sha256:abc", stored.replace("crc32/65536", "crc32/1"), stored.upper(), stored + ",",
                      "crc32/65536:zz"):
        assert not checksum_matches(data, malformed), malformed


def test_format_1_records_still_load_and_are_still_checked(made, tmp_path):
    decoder, fp, records = made
    for mode, record in records.items():
        old = _as_format_1(record)
        want, got = restore(record, decoder, fp), restore(old, decoder, fp)
        assert all(torch.equal(a, b) for x, y in zip(want.layers, got.layers, strict=True)
                   for a, b in zip(x, y, strict=True)), mode
        flipped = bytearray(old.payload)
        flipped[-3] ^= 0x10
        with pytest.raises(CacheRecordError, match="checksum"):
            restore(dataclasses.replace(old, payload=bytes(flipped)), decoder, fp)
    # a Parquet file written before the chunked checksum and the position rule existed (neither column)
    newer = ("payload_checksum", "position_rule")
    old_schema = pa.schema([f.with_nullable(f.name != "payload_sha256" and f.nullable) for f in RECORD_SCHEMA
                            if f.name not in newer])
    rows = [{k: v for k, v in _as_format_1(r).to_row().items() if k not in newer} for r in records.values()]
    pq.write_table(pa.Table.from_pylist(rows, schema=old_schema), tmp_path / "old.parquet")
    loaded = read_records(str(tmp_path / "old.parquet"))
    assert [r.format_version for r in loaded] == [1, 1, 1] and all(r.payload_checksum is None for r in loaded)
    for r in loaded:
        assert r.position_rule is None
        back = restore(r, decoder, fp, "shift")
        assert back.position_rule == "shift" and back.next_position == back.seq_len
    # and through the serving reader, from an output prefix laid out as a format-1 corpus job wrote it
    bucket = tmp_path / "out" / "runs" / "r1" / "kind=record" / f"bucket={bucket_of('doc-7', 4)}"
    bucket.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[2:], schema=old_schema), bucket / "part-0.parquet")
    got = AugmentedCacheReader(pafs.LocalFileSystem(), str(tmp_path / "out"), 4).get("doc-7")
    assert got.format_version == 1 and got.mode == "full"
    restore(got, decoder, fp)


def test_position_rule_is_checked(made):
    """A record says where the next token goes on; an unknown rule, or one the loaded module does not follow, is
    refused."""
    decoder, fp, records = made
    for record in records.values():
        assert record.position_rule == "shift"
        assert restore(record, decoder, fp, "shift").next_position == 20 + 2
        with pytest.raises(CacheRecordError, match="position_rule 'sideways'"):
            restore(dataclasses.replace(record, position_rule="sideways"), decoder, fp)
        with pytest.raises(CacheRecordError, match="the loaded module follows 'keep'"):
            restore(record, decoder, fp, "keep")


def test_unknown_format_is_refused(made):
    decoder, fp, records = made
    with pytest.raises(CacheRecordError, match="format_version 3"):
        restore(dataclasses.replace(records["full"], format_version=3), decoder, fp)


def test_wrong_shapes_and_dtypes(made):
    decoder, fp, records = made
    record = records["full"]

    def grow(h):
        h["k.0"]["shape"][1] = 10**9  # a huge declared shape: refused before any allocation

    def dtype(h):
        h["k.0"]["dtype"] = "F64"

    def offsets(h):
        h["k.0"]["data_offsets"] = [0, 10**12]

    for edit, msg in ((grow, "shape"), (dtype, "dtype"), (offsets, "byte range")):
        bad = _with_payload(record, _rewrite_header(record.payload, edit))
        with pytest.raises(CacheRecordError, match=msg):
            restore(bad, decoder, fp)
    # the header length itself altered
    bad = _with_payload(record, struct.pack("<Q", 2**60) + record.payload[8:])
    with pytest.raises(CacheRecordError, match="header length"):
        restore(bad, decoder, fp)
    # a record whose stated lengths disagree with its tensors
    with pytest.raises(CacheRecordError, match="shape"):
        restore(dataclasses.replace(record, doc_tokens=19, seq_len=21), decoder, fp)
    with pytest.raises(CacheRecordError, match="inconsistent lengths"):
        restore(dataclasses.replace(record, seq_len=99), decoder, fp)
    # another model's cache: right fingerprint claimed, wrong layer shapes
    wide = tiny_decoder("llama", num_key_value_heads=4)
    with pytest.raises(CacheRecordError, match="shape"):
        decode_payload(record, wide.cache_spec, fp)


def test_wrong_mode_dtype_and_missing_fields(made):
    decoder, fp, records = made
    with pytest.raises(CacheRecordError, match="mode"):
        restore(dataclasses.replace(records["full"], mode="everything"), decoder, fp)
    with pytest.raises(CacheRecordError, match="dtype"):
        restore(dataclasses.replace(records["full"], dtype="int8"), decoder, fp)
    with pytest.raises(CacheRecordError, match="latents"):  # a latents payload claimed as full
        restore(dataclasses.replace(records["latents"], mode="full"), decoder, fp)
    row = records["full"].to_row()
    del row["payload"]
    with pytest.raises(CacheRecordError, match="payload"):
        CacheRecord.from_row(row)


def _header(payload: bytes) -> tuple[int, dict]:
    """(bytes before the tensor data, the safetensors header without metadata) of a payload."""
    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + n])
    header.pop("__metadata__", None)
    return 8 + n, header


def _damage(data, payload: bytes, lo: int, hi: int) -> tuple[bytes, list[int]]:
    """1-4 distinct bytes in payload[lo:hi] changed (each XOR a non-zero mask): (damaged payload, their offsets)."""
    where = data.draw(st.lists(st.integers(lo, hi - 1), min_size=1, max_size=4, unique=True))
    damaged = bytearray(payload)
    for i in where:
        damaged[i] ^= data.draw(st.integers(1, 255))
    return bytes(damaged), where


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_damage_never_passes_silently(made, data):
    """Any change to a stored payload (bytes of its header or its tensors changed, the payload cut or extended) with
    the checksum left as written, as damage in storage or transit leaves it, is refused by `decode_payload` and by
    `restore` as a checksum mismatch naming the document, in either record format."""
    decoder, fp, records = made
    record = records[data.draw(st.sampled_from(MODES))]
    if data.draw(st.booleans()):
        record = _as_format_1(record)
    payload = record.payload
    how = data.draw(st.sampled_from(["change", "cut", "extend"]))
    if how == "change":
        payload, _ = _damage(data, payload, 0, len(payload))
    elif how == "cut":
        payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
    else:
        payload += data.draw(st.binary(min_size=1, max_size=16))
    assert payload != record.payload
    bad = dataclasses.replace(record, payload=payload)  # payload_checksum / payload_sha256 as they were written
    with pytest.raises(CacheRecordError, match=r"record 'doc-7': payload checksum mismatch"):
        decode_payload(bad, decoder.cache_spec, fp)
    with pytest.raises(CacheRecordError, match=r"record 'doc-7': payload checksum mismatch"):
        restore(bad, decoder, fp)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_under_a_rewritten_checksum_the_header_and_token_ids_are_still_checked(made, data):
    """A writer that recomputes the checksum over the bytes it changed (not damage: the checksum cannot tell) still
    cannot get a misread cache past `decode_payload`:
    - a changed header (length prefix or JSON) is refused, unless the change leaves it meaning the same (JSON
      whitespace), in which case exactly the written tensors load;
    - changed tensor bytes load as exactly those bytes, under the declared names, dtypes and shapes (no tensor read
      from another's range), except token ids outside the vocabulary, which are refused; `restore` then builds a
      cache. The cache values themselves are not checked (what the fingerprint and checksum are for): a changed
      value under a rewritten checksum is accepted, and this test says so rather than pretending otherwise."""
    decoder, fp, records = made
    record = records[data.draw(st.sampled_from(MODES))]
    head, header = _header(record.payload)
    good = decode_payload(record, decoder.cache_spec, fp)
    in_header = data.draw(st.booleans())
    payload, where = _damage(data, record.payload, *((0, head) if in_header else (head, len(record.payload))))
    bad = _with_payload(record, payload)  # the checksum recomputed over the changed bytes
    try:
        tensors = decode_payload(bad, decoder.cache_spec, fp)
    except CacheRecordError as e:
        assert "checksum" not in str(e) and "doc-7" in str(e)
        ids_at = header["input_ids"]["data_offsets"]
        assert in_header or ("input_ids" in str(e) and any(head + ids_at[0] <= i < head + ids_at[1] for i in where))
        return
    if in_header:  # accepted: the same header, the same tensors
        assert _header(payload)[1] == header
        assert tensors.keys() == good.keys() and all(torch.equal(tensors[k], good[k]) for k in good)
        return
    assert tensors.keys() == header.keys()
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "I32": torch.int32}
    for name, info in header.items():
        t = tensors[name]
        assert list(t.shape) == info["shape"] and t.dtype == dtypes[info["dtype"]], name
        start, end = info["data_offsets"]
        assert t.contiguous().view(torch.uint8).numpy().tobytes() == payload[head + start : head + end], name
    ids = tensors["input_ids"]
    assert 0 <= int(ids.min()) and int(ids.max()) < decoder.cache_spec.vocab_size
    assert restore(bad, decoder, fp).seq_len == record.seq_len


def test_token_ids_outside_the_vocabulary_are_refused(made):
    """A record whose document holds a token id the decoder has no embedding for is refused before `restore` uses it
    (on CUDA an out-of-range index would take the whole device down), even under a recomputed checksum."""
    decoder, fp, records = made
    vocab = decoder.cache_spec.vocab_size
    for mode, record in records.items():
        head, header = _header(record.payload)
        start, _ = header["input_ids"]["data_offsets"]
        for token in (vocab, -1, 2**31 - 1):
            payload = bytearray(record.payload)
            payload[head + start : head + start + 4] = struct.pack("<i", token)
            bad = _with_payload(record, bytes(payload))
            refused = rf"record 'doc-7': input_ids .*outside the decoder's vocabulary \(0..{vocab - 1}\)"
            with pytest.raises(CacheRecordError, match=refused):
                restore(bad, decoder, fp)
        payload = bytearray(record.payload)
        payload[head + start : head + start + 4] = struct.pack("<i", vocab - 1)  # the last id is a real one
        assert restore(_with_payload(record, bytes(payload)), decoder, fp).input_ids[0] == vocab - 1, mode


def test_plain_record_round_trip_and_checks(made, tmp_path):
    """A `plain` record (selective augmentation left the document out) holds its token ids and measured gain; it
    restores to exactly the plain prefill, through Parquet too, and every check still applies."""
    decoder, fp, records = made
    ids = list(range(3, 23))
    rec = encode_plain(ids, doc_id="doc-7", fingerprint=fp, dtype="bfloat16", content_sha256="ab", gain=-0.0125)
    assert (rec.mode, rec.n_latents, rec.doc_tokens, rec.seq_len) == (PLAIN_MODE, 0, 20, 20)
    write_records(str(tmp_path / "r.parquet"), [rec, records["latent_kv"]])
    back = read_records(str(tmp_path / "r.parquet"))
    assert back[0] == rec and back[1].gain is None  # the gain column round-trips; unmeasured stays null
    cache = restore(back[0], decoder, fp)
    plain = augment(decoder, None, [ids])[0]
    assert cache.n_latents == 0 and cache.gain == -0.0125 and cache.input_ids.tolist() == ids
    assert torch.equal(cache.next_logits, plain.next_logits)
    assert all(torch.equal(a, b) for kv, pv in zip(cache.layers, plain.layers, strict=True)
               for a, b in zip(kv, pv, strict=True))
    assert decode_payload(rec, decoder.cache_spec, fp)["input_ids"].tolist() == ids
    assert restore(rec, decoder, fp, "keep").n_latents == 0  # fits the module whatever its layout
    with pytest.raises(FingerprintMismatch):
        restore(rec, decoder, "0" * 32)
    for bad, field in ((dataclasses.replace(rec, n_latents=2), "inconsistent lengths"),
                       (dataclasses.replace(rec, seq_len=21), "inconsistent lengths"),
                       (_with_payload(rec, records["latent_kv"].payload), "latent layout")):
        with pytest.raises(CacheRecordError, match=field):
            restore(bad, decoder, fp)
    out_of_vocab = encode_plain([3, decoder.cache_spec.vocab_size], doc_id="v", fingerprint=fp, dtype="float32")
    with pytest.raises(CacheRecordError, match="vocabulary"):
        restore(out_of_vocab, decoder, fp)
