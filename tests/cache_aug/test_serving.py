"""The serving engine without Ray: request checks, where caches come from, stop strings and streaming, the LRU."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cache_aug.augment import augment, generate
from cache_aug.config import CoprocessorConfig, ServeConfig
from cache_aug.coprocessor import build_latent_module, latent_fingerprint
from cache_aug.records import encode_record
from cache_aug.serving import CacheLRU, CompletionEngine, DocumentTexts, RequestError, _held_back, json_body, parse_request
from cache_aug.testing import tiny_decoder


@pytest.fixture(scope="module", params=[("last_latent", "shift"), ("last_token", "shift"), ("last_token", "keep")],
                ids=lambda p: "-".join(p))
def setup(request):
    torch.manual_seed(0)
    dec = tiny_decoder("llama")
    first, rule = request.param
    module = build_latent_module(dec, CoprocessorConfig(first_ahead_from=first, position_rule=rule), 3).eval()
    return dec, module, latent_fingerprint(dec, module)


class Records:
    """A stand-in store: records by id (the real reader is tested against S3 in tests/pipelines)."""

    def __init__(self, records):
        self.records, self.reads = records, 0

    def get(self, doc_id):
        self.reads += 1
        return self.records.get(doc_id)


def engine(setup, records=None, texts=None, **cfg):
    dec, module, fp = setup
    docs = type("Docs", (), {"get": staticmethod(lambda i: (texts or {}).get(i))})()
    return CompletionEngine(dec, module, fp, ServeConfig(**({"max_tokens": 64} | cfg)), records=records, documents=docs)


def req(setup, body, **cfg):
    return parse_request(body, setup[0].tokenizer, ServeConfig(**({"max_tokens": 64} | cfg)))


@pytest.mark.parametrize("body, status, param", [
    ([], 400, None),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"prompt": "x", "n": 3}, 400, "n"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": [1, 10**9]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x" * 300}, 400, "prompt"),
    ({"prompt": "x", "document_id": "../other"}, 400, "document_id"),
    ({"prompt": "x", "document_id": "a/b"}, 400, "document_id"),
    ({"prompt": "x", "document_id": "a\\b"}, 400, "document_id"),
    ({"prompt": "x", "document_id": " padded"}, 400, "document_id"),
    ({"prompt": "x", "document_id": "x" * 257}, 400, "document_id"),
    ({"prompt": "x", "document_id": 7}, 400, "document_id"),
    ({"prompt": "x", "document": "text"}, 400, "document"),
    ({"prompt": "x", "seed": 2**63}, 400, "seed"),  # seeds are in [0, 2^63): past 2^64 torch.Generator.manual_seed overflows
    ({"prompt": "x", "seed": 2**70}, 400, "seed"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "seed": 1.5}, 400, "seed"),
    ({"prompt": "ab\ud800cd"}, 400, "prompt"),  # lone surrogates: legal JSON ("\ud800"), not encodable text
    ({"prompt": ["\udfff"]}, 400, "prompt"),
    ({"prompt": "x", "document_id": "d", "document": "text \ud800"}, 400, "document"),
    ({"prompt": "x", "stop": "\ud800"}, 400, "stop"),
    ({"prompt": "x", "stop": ["ok", "a\udc00"]}, 400, "stop"),
    ({"prompt": "x", "b\ud800": 1}, 400, "b\\ud800"),  # an unknown name is echoed escaped: the answer must encode
])
def test_bad_requests_are_refused_naming_the_field(setup, body, status, param):
    with pytest.raises(RequestError) as e:
        req(setup, body, max_prompt_tokens=100)
    assert (e.value.status, e.value.param) == (status, param), e.value.message
    json.dumps({"message": e.value.message, "param": e.value.param}, ensure_ascii=False).encode("utf-8")


def test_lone_surrogates_are_named_in_the_refusal(setup):
    for body, param in [({"prompt": "ab\ud800cd"}, "prompt"), ({"prompt": "x", "document_id": "d", "document": "t\ud800"}, "document"),
                        ({"prompt": "x", "stop": ["\ud800"]}, "stop")]:
        with pytest.raises(RequestError, match=f"{param} is not valid Unicode: lone surrogate"):
            req(setup, body)


def test_seed_range_ends_are_accepted_and_decode(setup):
    eng = engine(setup)
    for seed in (0, 2**63 - 1):
        r = req(setup, {"prompt": [5, 6], "max_tokens": 3, "temperature": 1.0, "seed": seed})
        assert r.seed == seed
        assert eng.complete(r)["token_ids"] == eng.complete(r)["token_ids"]  # the seed reaches the sampler


@pytest.mark.parametrize("raw", [b'{"prompt": "x",', b'{"prompt": "\xff\xfe"}', b"[" * 200_000 + b"]" * 200_000],
                         ids=["truncated", "bad utf-8", "nested 200k deep"])
def test_bodies_that_are_not_json_are_refused_with_400(raw):
    with pytest.raises(RequestError) as e:
        json_body(bytearray(raw))
    assert (e.value.status, e.value.param) == (400, None) and e.value.message.startswith("body is not valid JSON")
    assert json_body(b'{"prompt": [[1]]}') == {"prompt": [[1]]}


def test_document_texts_with_integer_ids(tmp_path):
    # the corpus job accepts integer ids and stores them as str(id): the lookup must find them by that string
    pq.write_table(pa.table({"doc_id": pa.array([1, 2, 22], pa.int64()), "text": ["one", "two", "twenty-two"]}), tmp_path / "int.parquet")
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["alpha", "beta"]}), tmp_path / "str.parquet")
    ints, strs = DocumentTexts([str(tmp_path / "int.parquet")]), DocumentTexts([str(tmp_path / "str.parquet")])
    assert [ints.get(i) for i in ("1", "2", "22", "3", "01")] == ["one", "two", "twenty-two", None, None]
    assert [strs.get(i) for i in ("a", "b", "c")] == ["alpha", "beta", None]


def test_document_lookup_failures_fall_back(setup, tmp_path):
    dec, module, fp = setup
    pq.write_table(pa.table({"doc_id": [7], "text": ["seven days"]}), tmp_path / "int.parquet")
    eng = CompletionEngine(dec, module, fp, ServeConfig(max_tokens=64), documents=DocumentTexts([str(tmp_path / "int.parquet")]))
    plan = eng.plan(req(setup, {"prompt": [5, 6], "document_id": "7"}))  # integer-id corpus: the text is found
    assert plan.source == "online" and plan.compute_ids == dec.tokenizer.encode("seven days", add_special_tokens=False)

    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    eng = CompletionEngine(dec, module, fp, ServeConfig(max_tokens=64), documents=DocumentTexts([str(tmp_path / "broken.parquet")]))
    plan = eng.plan(req(setup, {"prompt": [5, 6], "document_id": "7"}))  # unreadable store: a reason, not a failure
    assert plan.source == "none" and plan.compute_ids == [5, 6] and "document store unreadable" in plan.reason
    with pytest.raises(RequestError) as e:  # and nothing to continue without the text: the usual 404
        eng.plan(req(setup, {"prompt": "", "document_id": "7"}))
    assert e.value.status == 404 and "document store unreadable" in e.value.message


def test_good_request_fields(setup):
    r = req(setup, {"model": "cache-aug", "prompt": ["hello"], "max_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3,
                    "document_id": "Ge 20", "stream": True, "stream_options": {"include_usage": True}, "user": "u", "n": 1})
    assert r.prompt_ids == setup[0].tokenizer.encode("hello", add_special_tokens=False)
    assert (r.max_tokens, r.stop, r.seed, r.document_id, r.stream, r.include_usage) == (5, ["\n"], 3, "Ge 20", True, True)
    assert req(setup, {"prompt": "x"}).max_tokens == ServeConfig().default_max_tokens


def test_sources_and_equivalence(setup):
    dec, module, fp = setup
    g = torch.Generator().manual_seed(1)
    docs = {f"d{i}": torch.randint(3, 90, (n,), generator=g).tolist() for i, n in enumerate([9, 14, 6])}
    augs = dict(zip(docs, augment(dec, module, list(docs.values()))))
    good = encode_record(augs["d0"], doc_id="d0", fingerprint=fp, mode="latent_kv", dtype="float32", spec=dec.cache_spec)
    for mode in ("latents", "full"):  # every storage mode restores to the same answers
        rec = encode_record(augs["d0"], doc_id="d0", fingerprint=fp, mode=mode, dtype="float32", spec=dec.cache_spec)
        out = engine(setup, Records({"d0": rec})).complete(req(setup, {"prompt": [5, 6], "max_tokens": 6, "temperature": 0,
                                                                         "document_id": "d0"}))
        assert out["token_ids"] == generate(dec, augs["d0"], [5, 6], max_new_tokens=6), mode
    forged = encode_record(augs["d1"], doc_id="d1", fingerprint="0" * 32, mode="latent_kv", dtype="float32", spec=dec.cache_spec)
    texts = {"d1": "some text", "d2": "more text"}
    store = Records({"d0": good, "d1": forged})
    eng = engine(setup, store, texts)
    prompt = [5, 6, 7]
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}

    plan = eng.plan(req(setup, body | {"document_id": "d0"}))
    assert plan.source == "stored" and plan.reason is None
    out = eng.run(plan, eng.prepare([plan])[0], req(setup, body | {"document_id": "d0"}))
    assert out["token_ids"] == generate(dec, augs["d0"], prompt, max_new_tokens=6)
    eng.plan(req(setup, body | {"document_id": "d0"}))
    assert store.reads == 1 and eng.lru.hits == 1  # the second request is served from the LRU

    plan = eng.plan(req(setup, body | {"document_id": "d1"}))  # forged record: refused, text known -> online
    assert plan.source == "online" and "fingerprint" in plan.reason
    ids = dec.tokenizer.encode("some text", add_special_tokens=False)
    out = eng.run(plan, eng.prepare([plan])[0], req(setup, body | {"document_id": "d1"}))
    assert out["token_ids"] == generate(dec, augment(dec, module, [ids])[0], prompt, max_new_tokens=6)

    plans = [eng.plan(req(setup, body | {"document_id": d})) for d in ("d2", "zz")]
    assert [p.source for p in plans] == ["online", "none"] and "unknown" in plans[1].reason
    batched = eng.prepare(plans)  # online and plain in one call: each equals its own one-document result
    plain = augment(dec, None, [prompt])[0]
    assert eng.run(plans[1], batched[1], req(setup, body))["token_ids"] == generate(dec, plain, [], max_new_tokens=6)

    with pytest.raises(RequestError) as e:  # unknown document and nothing else to continue
        eng.plan(req(setup, {"prompt": "", "document_id": "zz"}))
    assert e.value.status == 404

    eng_none = engine(setup, store, texts, fallback="none")
    plan = eng_none.plan(req(setup, body | {"document_id": "d2"}))
    assert plan.source == "none" and "fallback" in plan.reason
    # the request's own text that differs from what was stored: the stored cache is not used for it
    plan = eng.plan(req(setup, body | {"document_id": "d0", "document": "different text"}))
    assert plan.source == "online" and "another text" in plan.reason


def test_stop_strings_and_streaming_equal_the_whole_answer(setup):
    dec = setup[0]
    eng = engine(setup)
    base = {"prompt": [5, 6, 7, 8], "max_tokens": 40, "temperature": 0}
    whole = eng.complete(req(setup, base))
    assert whole["finish_reason"] in ("length", "stop") and whole["text"]
    text = whole["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("degenerate sample")
    cut = eng.complete(req(setup, base | {"stop": [stop]}))
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.find(stop)]
    # streamed deltas join to the same text, and none of them leaks part of the stop string
    plan = eng.plan(req(setup, base | {"stop": [stop]}))
    deltas = [d for d, _ in eng.stream(plan, eng.prepare([plan])[0], req(setup, base | {"stop": [stop]}))]
    assert "".join(deltas) == cut["text"]
    assert dec is eng.decoder


def test_held_back_tail():
    assert _held_back("abc\n", ["\n\n"]) == 1
    assert _held_back("abc", ["\n\n"]) == 0
    assert _held_back("xEN", ["END", "ENOUGH"]) == 2


def test_lru_holds_its_bounds(setup):
    dec, module, _ = setup
    caches = augment(dec, module, [[5, 6, 7, 8]] * 6)
    size = CacheLRU.nbytes(caches[0])
    lru = CacheLRU(max_entries=4, max_bytes=3 * size, ttl_s=60)
    for i, c in enumerate(caches):
        lru.put(f"d{i}", c, None)
        assert len(lru) <= 3 and lru.bytes <= 3 * size
    assert lru.get("d0") is None and lru.get("d5") is not None
    assert lru.bytes == sum(CacheLRU.nbytes(c) for c in caches[3:])
    expired = CacheLRU(max_entries=4, max_bytes=10 * size, ttl_s=0)
    expired.put("a", caches[0], None)
    assert expired.get("a") is None and expired.bytes == 0
