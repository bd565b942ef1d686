"""The Serve app's request protocol without Ray: request checks, body limits, and refusals as HTTP statuses
and OpenAI-style error bodies (the routes themselves run on a real cluster in test_serve.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from cache_aug.config import ServeConfig
from cache_aug.engine import (
    CompletionEngine,
    CompletionRequest,
    DocumentNotFound,
    DocumentTooLong,
    RequestRefused,
)
from cache_aug.testing import byte_tokenizer, tiny_decoder
from pipelines.config import RayServeConfig
from pipelines.protocol import (
    RequestError,
    error_body,
    http_error,
    json_body,
    parse_chat,
    parse_request,
    read_body,
)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()  # the tokenizer of every tiny test decoder


def req(tok, body, **cfg):
    return parse_request(body, tok, RayServeConfig(**({"max_tokens": 64} | cfg)))


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
    ({"prompt": "x", "n": 17}, 400, "n"),  # past max_choices (16)
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": ["x"] * 9, "n": 2}, 400, "n"),  # 18 choices
    ({"prompt": ["x"] * 17}, 400, "prompt"),
    ({"prompt": ["x", ""]}, 400, "prompt[1]"),
    ({"prompt": ["x", 5]}, 400, "prompt"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": 1, "echo": True}, 400, "echo"),
    ({"prompt": "x", "echo": 1}, 400, "echo"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": "1"}, 400, "frequency_penalty"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of"),
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
    # seeds are in [0, 2^63): past 2^64 torch.Generator.manual_seed overflows
    ({"prompt": "x", "seed": 2**63}, 400, "seed"),
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
def test_bad_requests_are_refused_naming_the_field(tok, body, status, param):
    with pytest.raises(RequestError) as e:
        req(tok, body, max_prompt_tokens=100)
    assert (e.value.status, e.value.param) == (status, param), e.value.message
    json.dumps({"message": e.value.message, "param": e.value.param}, ensure_ascii=False).encode("utf-8")


def test_lone_surrogates_are_named_in_the_refusal(tok):
    for body, param in [({"prompt": "ab\ud800cd"}, "prompt"),
                        ({"prompt": "x", "document_id": "d", "document": "t\ud800"}, "document"),
                        ({"prompt": "x", "stop": ["\ud800"]}, "stop")]:
        with pytest.raises(RequestError, match=f"{param} is not valid Unicode: lone surrogate"):
            req(tok, body)


def test_seed_range_ends_are_accepted(tok):
    for seed in (0, 2**63 - 1):  # that they decode is tested in tests/cache_aug/test_engine.py
        r = req(tok, {"prompt": [5, 6], "max_tokens": 3, "temperature": 1.0, "seed": seed})
        assert r.seed == seed


@pytest.mark.parametrize("raw", [b'{"prompt": "x",', b'{"prompt": "\xff\xfe"}', b"[" * 200_000 + b"]" * 200_000],
                         ids=["truncated", "bad utf-8", "nested 200k deep"])
def test_bodies_that_are_not_json_are_refused_with_400(raw):
    with pytest.raises(RequestError) as e:
        json_body(bytearray(raw))
    assert (e.value.status, e.value.param) == (400, None) and e.value.message.startswith("body is not valid JSON")
    assert json_body(b'{"prompt": [[1]]}') == {"prompt": [[1]]}


def test_good_request_fields(tok):
    r = req(tok, {"model": "cache-aug", "prompt": ["hello"], "max_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3,
                  "document_id": "Ge 20", "stream": True, "stream_options": {"include_usage": True}, "user": "u",
                  "n": 1})
    assert r.prompt_ids == tok.encode("hello", add_special_tokens=False)
    assert (r.max_tokens, r.stop, r.seed, r.document_id, r.stream,
            r.include_usage) == (5, ["\n"], 3, "Ge 20", True, True)
    assert req(tok, {"prompt": "x"}).max_tokens == ServeConfig().default_max_tokens


def test_a_body_becomes_the_request_the_engine_takes(tok):
    # the engine's tests build their requests directly, with these defaults for what a body leaves out
    assert req(tok, {"prompt": [5, 6], "document_id": "7"}) == CompletionRequest(
        model="cache-aug", prompts=[[5, 6]], max_tokens=16, temperature=1.0, top_p=1.0, stop=[], stream=False,
        include_usage=False, seed=None, document_id="7", document=None)
    assert req(tok, {"prompt": "ab", "max_tokens": 6, "temperature": 0, "stop": ["x", "y"], "document_id": "d",
                     "document": "text"}) == CompletionRequest(
        model="cache-aug", prompts=[tok.encode("ab", add_special_tokens=False)], max_tokens=6, temperature=0.0,
        stop=["x", "y"], document_id="d", document="text")


def test_documents_over_the_byte_limit_are_refused_with_413(tok):
    cfg = {"max_request_bytes": 100}
    assert req(tok, {"prompt": "x", "document_id": "d", "document": "é" * 50}, **cfg).document == "é" * 50  # 100 bytes
    with pytest.raises(RequestError) as e:
        req(tok, {"prompt": "x", "document_id": "d", "document": "é" * 50 + "e"}, **cfg)
    assert (e.value.status, e.value.param, e.value.message) == (413, "document", "document is too large")


def test_request_bodies_are_read_up_to_the_limit():
    async def chunks(*parts):
        for p in parts:
            yield p

    def read(declared, *parts):
        return asyncio.run(read_body(declared, chunks(*parts), 10))

    assert read(None, b"01234", b"56789") == b"0123456789"
    assert read("10", b"0123456789") == b"0123456789"
    for declared, parts in [("11", [b"x"]), ("ten", [b"x"]), ("-1", [b"x"]), (None, [b"012345", b"67890"]),
                            ("5", [b"0123456789", b"0"])]:  # a declared length is not trusted: what arrives counts
        with pytest.raises(RequestError) as e:
            read(declared, *parts)
        assert (e.value.status, e.value.param, e.value.message) == (413, None, "request body over 10 bytes"), declared


def test_engine_refusals_get_their_http_status():
    dec = tiny_decoder("llama")
    docs = type("Docs", (), {"get": staticmethod(lambda i: {"long": "x" * 41}.get(i))})()
    eng = CompletionEngine(dec, None, "", ServeConfig(), documents=docs, max_document_tokens=40)
    refusals = {}
    for doc_id, prompt in [("zz", []), ("long", [5])]:
        with pytest.raises(RequestRefused) as e:
            eng.plan(CompletionRequest(model="cache-aug", prompts=[prompt], max_tokens=4, document_id=doc_id))
        refusals[doc_id] = e.value
    assert isinstance(refusals["zz"], DocumentNotFound) and isinstance(refusals["long"], DocumentTooLong)
    e = http_error(refusals["zz"])
    assert (e.status, e.param, e.code) == (404, "document_id", "document_not_found")
    assert e.message == ("document 'zz': no cache store configured and its text is unknown, and the prompt is empty: "
                         "nothing to continue")
    e = http_error(refusals["long"])
    assert (e.status, e.param, e.code, e.message) == (400, "document", None,
                                                      "document has 41 tokens, more than the limit of 40")
    e = http_error(RequestRefused("no", "prompt"))  # a refusal of no kind of its own: a plain 400
    assert (e.status, e.param, e.code, e.message) == (400, "prompt", None, "no")
    mine = RequestError(413, "too big")
    assert http_error(mine) is mine


def test_error_bodies_are_openai_style():
    assert error_body(404, "gone", "model", "model_not_found") == {
        "error": {"message": "gone", "type": "not_found_error", "param": "model", "code": "model_not_found"}}
    kinds = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}
    for status, kind in kinds.items():
        assert error_body(status, "m") == {"error": {"message": "m", "type": kind, "param": None, "code": None}}


CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


def test_chat_messages_become_the_templated_prompt(tok):
    cfg = RayServeConfig(max_tokens=64, chat_template=CHAT)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}]
    r = parse_chat({"messages": msgs, "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 3, "n": 2,
                    "document_id": "d"}, tok, cfg)
    assert r.prompt_ids == tok.encode("<system>Be brief.\n<user>Hi!\n<assistant>", add_special_tokens=False)
    assert (r.max_tokens, r.logprobs, r.n, r.document_id) == (5, 3, 2, "d")
    assert parse_chat({"messages": msgs[:1]}, tok, cfg).logprobs is None
    for body, param in [({"messages": []}, "messages"),
                        ({"messages": [{"role": "king", "content": "x"}]}, "messages[0]"),
                        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
                        ({"messages": msgs, "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": msgs, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"messages": msgs, "prompt": "x"}, "prompt"),
                        ({"messages": msgs, "max_completion_tokens": 65}, "max_completion_tokens")]:
        with pytest.raises(RequestError) as e:
            parse_chat(body, tok, cfg)
        assert (e.value.status, e.value.param) == (400, param), e.value.message
    with pytest.raises(RequestError, match="no chat template") as e:  # the byte tokenizer has none of its own
        parse_chat({"messages": msgs}, tok, RayServeConfig())
    assert e.value.param == "messages"


def test_lists_of_prompts_n_and_sampling_fields(tok):
    r = req(tok, {"prompt": ["ab", [5, 6]], "n": 3, "logprobs": 0, "presence_penalty": -1.5, "frequency_penalty": 2,
                  "echo": False})
    assert r.prompts == [tok.encode("ab", add_special_tokens=False), [5, 6]]
    assert (r.n, r.logprobs, r.presence_penalty, r.frequency_penalty) == (3, 0, -1.5, 2.0)
    assert req(tok, {"prompt": "x", "echo": True}).echo
