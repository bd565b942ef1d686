"""LatentLayout: one value for N_L, the re-read count, the position rule and the latent channel, carried by the
latent module, the augmented cache and the stored record."""

from __future__ import annotations

import dataclasses
import itertools
import json
import struct

import pytest
import torch

from cache_aug.augment import augment
from cache_aug.config import CoprocessorConfig
from cache_aug.coprocessor import (
    Coprocessor,
    PauseTokens,
    build_latent_module,
    latent_fingerprint,
)
from cache_aug.layout import PLAIN, LatentLayout
from cache_aug.records import (
    LAYOUT_KEY,
    CacheRecordError,
    encode_record,
    payload_checksum,
    restore,
)
from cache_aug.testing import tiny_decoder

LAYOUTS = [LatentLayout(n, r, rule, channel)
           for n, r, rule, channel in itertools.product((1, 3), (0, 1), ("shift", "keep"), ("embeds", "kv"))
           if not (channel == "kv" and r == 0)]


def test_names_and_config():
    assert LatentLayout.from_names(3) == LatentLayout(3, 0, "shift", "embeds")
    assert LatentLayout.from_names(2, "last_token", "keep", "kv") == LatentLayout(2, 1, "keep", "kv")
    cfg = CoprocessorConfig(mode="full", first_ahead_from="last_token", position_rule="keep", latent_channel="kv")
    assert LatentLayout.from_config(cfg, 4) == LatentLayout(4, 1, "keep", "kv")
    pause = dataclasses.replace(cfg, mode="pause")  # pause tokens have no coprocessor: always fed as embeddings
    assert LatentLayout.from_config(pause, 4) == LatentLayout(4, 1, "keep", "embeds")
    for layout in LAYOUTS:
        assert LatentLayout.from_names(layout.n_latents, layout.first_ahead_from, layout.position_rule,
                                       layout.channel) == layout


@pytest.mark.parametrize("bad, match", [
    ({"n_latents": -1}, "n_latents"), ({"n_latents": 2.0}, "n_latents"), ({"n_latents": 2, "reread": 2}, "reread"),
    ({"n_latents": 2, "position_rule": "sideways"}, "position_rule"),
    ({"n_latents": 2, "channel": "logits"}, "latent_channel"),
    ({"n_latents": 2, "channel": "kv"}, "last_token"), ({"n_latents": 0, "reread": 1}, "plain cache"),
])
def test_invalid_layouts_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        LatentLayout(**bad)
    with pytest.raises(ValueError, match="first_ahead_from"):
        LatentLayout.from_names(2, "first_latent")


def test_questions_the_code_asks():
    paper = LatentLayout(4)
    assert (not paper.writes_kv and paper.storage_modes == ("latents", "latent_kv", "full")
            and paper.first_ahead_from == "last_latent")
    assert paper.n_added == 4 and paper.cache_len(10) == 14 and paper.next_position(10) == 14
    assert paper.latent_positions(10) == [10, 11, 12, 13] and paper.text_positions(10, 2) == [14, 15]
    kv = LatentLayout(4, 1, "keep", "kv")
    assert kv.writes_kv and kv.storage_modes == ("latent_kv", "full") and not kv.allows_storage("latents")
    assert (kv.first_ahead_from == "last_token" and kv.n_added == 5 and kv.cache_len(10) == 15
            and kv.next_position(10) == 10)
    assert kv.latent_positions(10) == [6, 7, 8, 9] and kv.text_positions(10, 3) == [9, 10, 11]
    assert kv.latent_positions(2) == [0, 0, 0, 1]  # a prefix shorter than N_L: clamped at 0
    assert LatentLayout(2, 1).next_position(10) == 13 and LatentLayout(2, 1).text_positions(10, 2) == [12, 13]
    assert PLAIN.n_latents == 0 and PLAIN.cache_len(7) == PLAIN.next_position(7) == 7


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_position_ids_follow_the_per_position_rule(layout):
    """The batched positions (masks.block_position_ids) are the per-position ones the reference loss uses."""
    n_ahead = 3
    block = layout.n_added + n_ahead - 1
    points = torch.tensor([[1, 4, 9], [2, 3, 12]])
    got = layout.position_ids(points, block).view(2, 3, block)
    for i, j in itertools.product(range(2), range(3)):
        p = int(points[i, j])
        want = layout.latent_positions(p) + layout.text_positions(p, layout.reread + n_ahead - 1)
        assert got[i, j].tolist() == want, (p, layout)
        assert want[layout.n_latents + layout.reread] == layout.next_position(p) == p + layout.text_shift


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_json_round_trip(layout):
    text = layout.to_json()
    assert LatentLayout.from_json(text) == layout and json.loads(text)["reread"] == layout.reread
    for bad in ("", "[]", '{"n_latents": 2}', text[:-1], text.replace('"reread"', '"re_read"'),
                json.dumps(dataclasses.asdict(layout) | {"extra": 1})):
        with pytest.raises(ValueError):
            LatentLayout.from_json(bad)


@pytest.fixture(scope="module")
def made():
    """A paper-rule module and a re-reading, position-keeping, KV-writing one, each with its records in every mode it
    allows."""
    decoder = tiny_decoder("llama")
    out = {}
    for name, cfg in {"paper": CoprocessorConfig(mode="full"),
                      "kv": CoprocessorConfig(mode="full", first_ahead_from="last_token", position_rule="keep",
                                              latent_channel="kv")}.items():
        module = build_latent_module(decoder, cfg, n_latents=2).eval()
        fp = latent_fingerprint(decoder, module)
        aug = augment(decoder, module, [list(range(3, 15))])[0]
        records = {m: encode_record(aug, doc_id=f"doc-{name}", fingerprint=fp, mode=m, dtype="float32",
                                    spec=decoder.cache_spec)
                   for m in module.layout.storage_modes}
        out[name] = module, fp, aug, records
    return decoder, out


def _header(payload: bytes) -> dict:
    (n,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + n])


def _with_metadata(record, metadata):
    """The record with its payload header's __metadata__ replaced (None: removed, as records written before the
    layout)."""
    (n,) = struct.unpack("<Q", record.payload[:8])
    header = json.loads(record.payload[8 : 8 + n])
    header.pop("__metadata__", None)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    payload = struct.pack("<Q", len(raw)) + raw + record.payload[8 + n :]
    return dataclasses.replace(record, payload=payload, payload_checksum=payload_checksum(payload))


def _same_cache(a, b):
    assert a.layout == b.layout and a.seq_len == b.seq_len and a.next_position == b.next_position
    assert torch.equal(a.next_logits, b.next_logits)
    assert all(torch.equal(x, y) for (k, v), (k2, v2) in zip(a.layers, b.layers, strict=True)
               for x, y in ((k, k2), (v, v2)))


def test_module_and_cache_carry_the_layout(made):
    _, out = made
    module, _, aug, _ = out["kv"]
    assert module.layout == aug.layout == LatentLayout(2, 1, "keep", "kv")
    assert (module.n_latents, module.reread, module.first_ahead_from, module.position_rule, module.latent_channel) == (
        2, 1, "last_token", "keep", "kv")
    assert ((aug.n_latents, aug.n_reread, aug.position_rule) == (2, 1, "keep")
            and aug.seq_len == 12 + 3 and aug.next_position == 12)
    soft = module.soft_tokens.detach()
    with pytest.raises(ValueError, match="pause tokens"):
        PauseTokens(soft, module.layout)
    with pytest.raises(ValueError, match="2 soft tokens for a layout of N_L=3"):
        Coprocessor(module.trunk, soft, LatentLayout(3, 1), "full")


def test_layout_round_trips_through_the_record_header(made):
    decoder, out = made
    for name, (module, fp, aug, records) in out.items():
        for mode, record in records.items():
            assert LatentLayout.from_json(_header(record.payload)["__metadata__"][LAYOUT_KEY]) == module.layout, (
                name, mode)
            restored = restore(record, decoder, fp, layout=module.layout)
            assert restored.layout == module.layout and restored.seq_len == aug.seq_len, (name, mode)
            _same_cache(restored, restore(record, decoder, fp))


def test_records_without_a_stored_layout_still_load(made):
    """Records written before payload headers held the layout: derived as before (re-read count from the lengths)."""
    decoder, out = made
    for name, (module, fp, _, records) in out.items():
        for mode, record in records.items():
            old = _with_metadata(record, None)
            assert "__metadata__" not in _header(old.payload)
            # given the module's layout, the channel (not recorded in old records) is the module's
            _same_cache(restore(old, decoder, fp, layout=module.layout), restore(record, decoder, fp))
            back = restore(old, decoder, fp)  # no layout given: the channel is taken as "embeds", the rest derived
            assert (back.n_latents, back.n_reread, back.position_rule, back.seq_len) == (
                2, module.reread, module.position_rule, record.seq_len), (name, mode)
            with pytest.raises(CacheRecordError, match="inconsistent lengths"):
                restore(dataclasses.replace(old, seq_len=record.seq_len + 2), decoder, fp)


def test_a_record_made_with_another_layout_is_refused(made):
    decoder, out = made
    for (module, fp, _, records) in out.values():
        other = dataclasses.replace(module.layout, position_rule="keep" if module.position_rule == "shift" else "shift")
        for record in records.values():
            with pytest.raises(CacheRecordError,
                               match=r"made with latent layout \(N_L=2, .*\), the loaded module's is"):
                restore(record, decoder, fp, layout=other)
            with pytest.raises(CacheRecordError, match="made with latent layout"):
                restore(record, decoder, fp, layout=dataclasses.replace(module.layout, n_latents=3))


def test_a_header_that_disagrees_with_the_record_is_refused(made):
    decoder, out = made
    _, fp, _, records = out["kv"]
    for record in records.values():
        fewer = LatentLayout(2, 0, "keep", "embeds")  # the header says nothing was re-read: seq_len says otherwise
        with pytest.raises(CacheRecordError, match="inconsistent lengths"):
            restore(_with_metadata(record, {LAYOUT_KEY: fewer.to_json()}), decoder, fp)
        shifted = LatentLayout(2, 1, "shift", "kv")  # the header's rule is not the record's position_rule column
        with pytest.raises(CacheRecordError, match="position_rule 'keep', the latent layout in its header has 'shift'"):
            restore(_with_metadata(record, {LAYOUT_KEY: shifted.to_json()}), decoder, fp)
        for damaged in ({LAYOUT_KEY: "{"}, {LAYOUT_KEY: '{"n_latents": 2}'}, {LAYOUT_KEY: 7}, ["not", "a", "mapping"]):
            with pytest.raises(CacheRecordError, match="doc-kv"):
                restore(_with_metadata(record, damaged), decoder, fp)
    # a paper-rule record claiming in its header that its module wrote keys and values: "latents" cannot hold that
    _module, fp, _, records = out["paper"]
    kv = LatentLayout(2, 1, "shift", "kv")
    latents = dataclasses.replace(records["latents"], seq_len=records["latents"].seq_len + 1)
    with pytest.raises(CacheRecordError, match="mode 'latents' cannot hold"):
        restore(_with_metadata(latents, {LAYOUT_KEY: kv.to_json()}), decoder, fp)
