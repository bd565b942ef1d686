"""The serving engine without Ray: where caches come from, the refusals, stop strings and streaming.

Requests are built here as the Serve app's protocol makes them from a body; the parsing itself, and how
the engine's refusals become HTTP statuses, are tested in tests/pipelines/test_protocol.py.
"""

from __future__ import annotations

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cache_aug.augment import augment, decode_steps, generate
from cache_aug.batching import run_alone
from cache_aug.config import ServeConfig
from cache_aug.document_texts import DocumentTexts
from cache_aug.engine import (
    CompletionEngine,
    CompletionRequest,
    DocumentNotFound,
    DocumentTooLong,
    _held_back,
    collect,
)
from cache_aug.records import encode_record


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


def req(**fields) -> CompletionRequest:
    """A checked request with the protocol's defaults for the fields a body leaves out (temperature 1, max_tokens
    16)."""
    cfg = ServeConfig()  # the model name is the endpoint's default (serve.model_name); the engine never reads it
    fields = {"prompts": [fields.pop("prompt_ids", [])]} | fields
    return CompletionRequest(**({"model": "cache-aug", "max_tokens": cfg.default_max_tokens,
                                 "temperature": 1.0} | fields))


def run(eng, plan, cache, r) -> dict:
    """Decode a planned request alone: its first choice (text, token_ids, finish_reason) and every event."""
    events = []
    run_alone(eng.decoder, eng.sequences(plan, cache, r, events.append))
    return collect(events, len(r.prompts) * r.n)[0] | {"events": events}


def test_seed_range_ends_decode(setup):
    eng = engine(setup)
    for seed in (0, 2**63 - 1):  # the ends of the seeds the protocol accepts
        r = req(prompt_ids=[5, 6], max_tokens=3, temperature=1.0, seed=seed)
        assert eng.complete(r)["token_ids"] == eng.complete(r)["token_ids"]  # the seed reaches the sampler


def test_document_lookup_failures_fall_back(setup, tmp_path):
    dec, module, fp = setup
    pq.write_table(pa.table({"doc_id": [7], "text": ["seven days"]}), tmp_path / "int.parquet")
    eng = CompletionEngine(dec, module, fp, ServeConfig(max_tokens=64),
                           documents=DocumentTexts([str(tmp_path / "int.parquet")]))
    plan = eng.plan(req(prompt_ids=[5, 6], document_id="7"))  # integer-id corpus: the text is found
    assert plan.source == "online" and plan.compute_ids == dec.tokenizer.encode("seven days", add_special_tokens=False)

    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    eng = CompletionEngine(dec, module, fp, ServeConfig(max_tokens=64),
                           documents=DocumentTexts([str(tmp_path / "broken.parquet")]))
    plan = eng.plan(req(prompt_ids=[5, 6], document_id="7"))  # unreadable store: a reason, not a failure
    assert plan.source == "none" and plan.compute_ids is None and plan.prompt_ids == [5, 6]  # the prompt alone
    assert "document store unreadable" in plan.reason
    with pytest.raises(DocumentNotFound) as e:  # and nothing to continue without the text: the usual refusal
        eng.plan(req(prompt_ids=[], document_id="7"))
    assert e.value.param == "document_id" and "document store unreadable" in e.value.message


def test_documents_over_the_token_limit_are_refused_or_truncated(setup):
    dec, module, fp = setup
    text = "a document of forty-one characters, long."
    assert len(dec.tokenizer.encode(text, add_special_tokens=False)) == 41
    docs = type("Docs", (), {"get": staticmethod(lambda i: text)})()
    eng = CompletionEngine(dec, module, fp, ServeConfig(max_tokens=64), documents=docs, max_document_tokens=40)
    with pytest.raises(DocumentTooLong) as e:
        eng.plan(req(prompt_ids=[5, 6], document_id="d"))
    assert (e.value.param, e.value.message) == ("document", "document has 41 tokens, more than the limit of 40")
    eng = CompletionEngine(dec, module, fp, ServeConfig(max_tokens=64), documents=docs, max_document_tokens=40,
                           truncate=True)
    plan = eng.plan(req(prompt_ids=[5, 6], document_id="d"))
    assert plan.source == "online" and plan.compute_ids == dec.tokenizer.encode(text, add_special_tokens=False)[:40]


def test_sources_and_equivalence(setup):
    dec, module, fp = setup
    g = torch.Generator().manual_seed(1)
    docs = {f"d{i}": torch.randint(3, 90, (n,), generator=g).tolist() for i, n in enumerate([9, 14, 6])}
    augs = dict(zip(docs, augment(dec, module, list(docs.values())), strict=True))
    good = encode_record(augs["d0"], doc_id="d0", fingerprint=fp, mode="latent_kv", dtype="float32",
                         spec=dec.cache_spec)
    for mode in ("latents", "full"):  # every storage mode restores to the same answers
        rec = encode_record(augs["d0"], doc_id="d0", fingerprint=fp, mode=mode, dtype="float32", spec=dec.cache_spec)
        out = engine(setup, Records({"d0": rec})).complete(req(prompt_ids=[5, 6], max_tokens=6, temperature=0.0,
                                                               document_id="d0"))
        assert out["token_ids"] == generate(dec, augs["d0"], [5, 6], max_new_tokens=6), mode
    forged = encode_record(augs["d1"], doc_id="d1", fingerprint="0" * 32, mode="latent_kv", dtype="float32",
                           spec=dec.cache_spec)
    texts = {"d1": "some text", "d2": "more text"}
    store = Records({"d0": good, "d1": forged})
    eng = engine(setup, store, texts)
    prompt = [5, 6, 7]
    body = {"prompt_ids": prompt, "max_tokens": 6, "temperature": 0.0}

    plan = eng.plan(req(**body, document_id="d0"))
    assert plan.source == "stored" and plan.reason is None
    out = run(eng, plan, eng.prepare([plan])[0], req(**body, document_id="d0"))
    assert out["token_ids"] == generate(dec, augs["d0"], prompt, max_new_tokens=6)
    eng.plan(req(**body, document_id="d0"))
    assert store.reads == 1 and eng.lru.hits == 1  # the second request is served from the LRU

    plan = eng.plan(req(**body, document_id="d1"))  # forged record: refused, text known -> online
    assert plan.source == "online" and "fingerprint" in plan.reason
    ids = dec.tokenizer.encode("some text", add_special_tokens=False)
    out = run(eng, plan, eng.prepare([plan])[0], req(**body, document_id="d1"))
    assert out["token_ids"] == generate(dec, augment(dec, module, [ids])[0], prompt, max_new_tokens=6)

    plans = [eng.plan(req(**body, document_id=d)) for d in ("d2", "zz")]
    assert [p.source for p in plans] == ["online", "none"] and "unknown" in plans[1].reason
    batched = eng.prepare(plans)  # online and plain in one call: each equals its own one-document result
    plain = augment(dec, None, [prompt])[0]
    assert run(eng, plans[1], batched[1], req(**body))["token_ids"] == generate(dec, plain, [], max_new_tokens=6)

    with pytest.raises(DocumentNotFound) as e:  # unknown document and nothing else to continue
        eng.plan(req(prompt_ids=[], document_id="zz"))
    assert e.value.param == "document_id" and "'zz'" in e.value.message

    eng_none = engine(setup, store, texts, fallback="none")
    plan = eng_none.plan(req(**body, document_id="d2"))
    assert plan.source == "none" and "fallback" in plan.reason
    # the request's own text that differs from what was stored: the stored cache is not used for it
    plan = eng.plan(req(**body, document_id="d0", document="different text"))
    assert plan.source == "online" and "another text" in plan.reason


# A prompt whose greedy answer on the fixture's decoder varies. That of [5, 6, 7, 8] is " ," over and over: any two
# of its characters are found at its very start, so a stop string taken from it cut the answer to at most one
# character and was never held back across tokens (the test passed with the hold-back removed from the engine).
STOP_PROMPT = [9, 10, 11, 12]


def test_stop_strings_and_streaming_equal_the_whole_answer(setup):
    dec = setup[0]
    eng = engine(setup)
    base = {"prompt_ids": STOP_PROMPT, "max_tokens": 40, "temperature": 0.0}
    whole = eng.complete(req(**base))
    assert whole["finish_reason"] in ("length", "stop") and whole["text"]
    text = whole["text"]
    plan = eng.plan(req(**base))
    deltas = [e.text for e in run(eng, plan, eng.prepare([plan])[0], req(**base))["events"]]
    assert "".join(deltas) == text
    # the stop string: two characters from the second half of the answer, not blank, on either side of the end
    # of a token's text (so the stream must hold the first back until the next token), first found there (so the
    # answer is cut there, after a non-empty part)
    ends = sorted(set(itertools.accumulate(len(d) for d in deltas)))
    at = next((b - 1 for b in ends if len(text) // 2 <= b < len(text) and text[b - 1 : b + 1].strip()
               and text.find(text[b - 1 : b + 1]) == b - 1), None)
    assert at is not None, f"no stop string to take from the answer {text!r}: pick another STOP_PROMPT"
    stop = text[at : at + 2]
    cut = eng.complete(req(**base, stop=[stop]))
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.find(stop)] and cut["text"]
    # streamed deltas join to the same text, and none of them leaks part of the stop string
    plan = eng.plan(req(**base, stop=[stop]))
    deltas = [e.text for e in run(eng, plan, eng.prepare([plan])[0], req(**base, stop=[stop]))["events"]]
    assert "".join(deltas) == cut["text"]
    assert dec is eng.decoder


def test_held_back_tail():
    assert _held_back("abc\n", ["\n\n"]) == 1
    assert _held_back("abc", ["\n\n"]) == 0
    assert _held_back("xEN", ["END", "ENOUGH"]) == 2


def test_choices_prompts_penalties_and_logprobs_equal_offline(setup):
    """n choices of two prompts share one cache; each equals offline decoding with seed + j and the penalties,
    and its logprobs are the model's own distribution at each step."""
    dec, module, _ = setup
    eng = engine(setup, texts={"d": "some text"})
    prompts = [[5, 6], [7]]
    r = req(prompts=prompts, n=3, temperature=1.0, seed=11, max_tokens=5, presence_penalty=0.4,
            frequency_penalty=0.2, document_id="d", logprobs=2)
    out = eng.complete(r)
    assert out["plan"].source == "online" and len(out["choices"]) == 6
    aug = augment(dec, module, [dec.tokenizer.encode("some text", add_special_tokens=False)])[0]
    answers = []
    for i, prompt in enumerate(prompts):
        for j in range(3):
            steps = list(decode_steps(dec, aug, prompt, max_new_tokens=5, temperature=1.0, seed=11 + j,
                                      presence_penalty=0.4, frequency_penalty=0.2))
            choice = out["choices"][i * 3 + j]
            assert choice["token_ids"] == [t for t, _ in steps], (i, j)
            for event, (token, logits) in zip(choice["tokens"], steps, strict=True):
                logp = torch.log_softmax(logits.float(), -1)
                assert event.logprob == pytest.approx(float(logp[token]), abs=1e-5)
                assert [t for t, _ in event.top] == torch.topk(logp, 2).indices.tolist()
            answers.append(tuple(choice["token_ids"]))
    assert len(set(answers)) > 2  # the seeds differ per choice
    # the penalties reach the sampler: greedy with a repetition cost is another answer than without
    greedy = dict(prompt_ids=[5, 6], max_tokens=12, temperature=0.0, document_id="d")
    assert eng.complete(req(**greedy, frequency_penalty=2.0))["token_ids"] != eng.complete(req(**greedy))["token_ids"]


def test_plain_records_are_decoded_plainly_as_skipped(setup):
    """A document the corpus job stored plain (augmentation measured not to help) is answered by plain decoding
    of the record's own token ids, source "skipped" with the gain; it is not a miss (nothing is queued), a stale
    text still falls back, and a plain record of other models is refused like any other."""
    from cache_aug.records import encode_plain

    dec, module, fp = setup
    ids = [7, 8, 9, 10, 11, 12]
    heard = []
    wanted = type("Q", (), {"add": staticmethod(lambda *a: heard.append(a))})()
    store = Records({"p": encode_plain(ids, doc_id="p", fingerprint=fp, dtype="float32", gain=-0.02,
                                       content_sha256="0" * 64),
                     "q": encode_plain(ids, doc_id="q", fingerprint="f" * 32, dtype="float32")})
    eng = engine(setup, store, {"q": "some text"})
    eng.wanted = wanted
    body = {"prompt_ids": [5, 6], "max_tokens": 6, "temperature": 0.0}
    plan = eng.plan(req(**body, document_id="p"))
    assert (plan.source, plan.gain, plan.compute_ids, plan.cache) == ("skipped", -0.02, ids, None)
    assert "-0.02" in plan.reason and heard == []
    out = run(eng, plan, eng.prepare([plan])[0], req(**body, document_id="p"))
    assert out["token_ids"] == generate(dec, augment(dec, None, [ids])[0], [5, 6], max_new_tokens=6)
    eng.plan(req(**body, document_id="p"))
    assert store.reads == 2 and len(eng.lru) == 0  # never restored, never held
    stale = eng.plan(req(**body, document_id="p", document="another text"))
    assert stale.source == "online" and "another text" in stale.reason and heard[-1][2] == "stale"
    refused = eng.plan(req(**body, document_id="q"))
    assert refused.source == "online" and "fingerprint" in refused.reason and heard[-1][2] == "refused"
