"""The HTTP side of /v1/completions: request bodies in, checked requests out; refusals as status codes and OpenAI-style
errors.

    body = await read_body(headers.get("content-length"), request.stream(), cfg.max_request_bytes)   # 413 if too large
    req = parse_request(json_body(body), tokenizer, cfg)    # a cache_aug.engine.CompletionRequest, or RequestError
    ...engine.plan(req)...                                   # cache_aug.engine.RequestRefused -> http_error(e)
    JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)

Every refusal is a `RequestError`: the HTTP status, the message, the offending request field (`param`)
and an optional machine-readable `code`. The engine's own refusals (`DocumentNotFound`, `DocumentTooLong`)
carry no status; `http_error` gives them theirs. No Ray here: the Serve app (pipelines/serve.py) uses it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from cache_aug.engine import (
    CompletionRequest,
    DocumentNotFound,
    DocumentTooLong,
    Plan,
    RequestRefused,
)
from pipelines.config import RayServeConfig

DOC_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9 _.,:;@+=#()\[\]-]{0,255}")


class RequestError(ValueError):
    """A request the server refuses: HTTP status, message, and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# the engine's refusals: (status, code)
_REFUSALS: dict[type[RequestRefused], tuple[int, str | None]] = {
    DocumentNotFound: (404, "document_not_found"),
    DocumentTooLong: (400, None),
}


def http_error(e: RequestError | RequestRefused) -> RequestError:
    """A refusal as HTTP: a RequestError as it is; an engine's refusal with the status (and code) of its kind, else
    400."""
    if isinstance(e, RequestError):
        return e
    status, code = next((v for k, v in _REFUSALS.items() if isinstance(e, k)), (400, None))
    return RequestError(status, e.message, e.param, code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI-style error body: {"error": {"message", "type", "param", "code"}}, its type following the status."""
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def read_body(declared: str | None, chunks: AsyncIterator[bytes], limit: int) -> bytearray:
    """The request body, read no further than `limit` bytes: RequestError 413 if its declared length
    (the Content-Length header; not a number counts as too large) or what arrives is over the limit."""
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body over {limit} bytes")
    return body


_UNSUPPORTED = {"best_of": 1, "suffix": None}  # OpenAI fields accepted only at their neutral value
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "stream", "stream_options", "seed", "user",
           "logit_bias", "document_id", "document", "n", "presence_penalty", "frequency_penalty", "logprobs"}
_KNOWN = {*_COMMON, "prompt", "echo", *_UNSUPPORTED}
_CHAT_KNOWN = {*_COMMON, "messages", "top_logprobs", "max_completion_tokens"}
_ROLES = ("system", "user", "assistant", "developer", "tool")


def _bad(message: str, param: str | None = None, status: int = 400, code: str | None = None) -> RequestError:
    return RequestError(status, message, param, code)


def _number(data: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number, got {type(value).__name__}", name)
    if not (low < value <= high if low_open else low <= value <= high):
        raise _bad(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def _integer(data: dict, name: str) -> int | None:
    value = data.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad(f"{name} must be an integer, got {type(value).__name__}", name)
    return value


def _unicode(text: str, name: str) -> str:
    """`text` if it is valid Unicode: JSON may carry lone surrogates ("\\ud800"), which neither tokenizer nor UTF-8
    takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"{name} is not valid Unicode: lone surrogate at character {e.start}", name) from None
    return text


def json_body(raw: bytes) -> object:
    """The decoded JSON of a request body; RequestError 400 if it is not JSON (bad syntax, bad UTF-8, nested too
    deep)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: e.g. 200k nested arrays
        raise _bad(f"body is not valid JSON: {e}") from None


def valid_document_id(doc_id: object) -> str:
    """A plain identifier: no path separators, no '..', no control characters, at most 256 characters."""
    if not isinstance(doc_id, str):
        raise _bad(f"document_id must be a string, got {type(doc_id).__name__}", "document_id")
    if not DOC_ID_RE.fullmatch(doc_id) or ".." in doc_id or doc_id != doc_id.strip():
        raise _bad("document_id must be a plain identifier (letters, digits, spaces and ._,:;@+=#()[]-; "
                   "no '/', '\\', '..' or control characters; at most 256 characters)", "document_id")
    return doc_id


def _fields(data: object, known: set[str]) -> dict:
    if not isinstance(data, dict):
        raise _bad(f"the request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - known)
    if unknown:
        # a name is echoed back: one that is not valid Unicode (a lone surrogate) is shown escaped
        shown = [u.encode("utf-8", "backslashreplace").decode() for u in unknown]
        raise _bad(f"unrecognized request argument(s): {', '.join(shown)}", shown[0])
    for name, neutral in _UNSUPPORTED.items():
        if name in data and data[name] is not None and data[name] != neutral:
            raise _bad(f"{name}={data[name]!r} is not supported (only {neutral!r})", name)
    if data.get("logit_bias"):
        raise _bad("logit_bias is not supported", "logit_bias")
    if "user" in data and not isinstance(data["user"], (str, type(None))):
        raise _bad("user must be a string", "user")
    return data


def _prompt_ids(prompt: object, tokenizer, name: str = "prompt") -> list[int]:
    vocab = len(tokenizer)
    if isinstance(prompt, str):
        return tokenizer.encode(_unicode(prompt, name), add_special_tokens=False) if prompt else []
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < vocab for t in prompt):
            raise _bad(f"{name} token ids must be in [0, {vocab})", name)
        return list(prompt)
    raise _bad(f"{name} must be a string, a list of token ids, or a list of either", name)


def _prompts(prompt: object, tokenizer) -> list[list[int]]:
    """The prompts of a completions body: a string, a list of token ids, or a non-empty list of either."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) == 1:  # the openai client may send one prompt as a list
            return [_prompt_ids(prompt[0], tokenizer)]
        return [_prompt_ids(p, tokenizer, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [_prompt_ids(prompt, tokenizer)]


def _common(data: dict, prompts: list[list[int]], cfg: RayServeConfig, *, max_tokens_field: str = "max_tokens",
            logprobs: int | None = None) -> CompletionRequest:
    """What completions and chat requests share, checked against the configured limits."""
    model = data.get("model", cfg.model_name)
    if not isinstance(model, str):
        raise _bad("model must be a string", "model")
    if model != cfg.model_name:
        raise _bad(f"model {model!r} does not exist (this endpoint serves {cfg.model_name!r})", "model", 404,
                   "model_not_found")

    max_tokens = _integer(data, max_tokens_field)
    max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= cfg.max_tokens:
        raise _bad(f"{max_tokens_field} must be in [1, {cfg.max_tokens}], got {max_tokens}", max_tokens_field)
    seed = _integer(data, "seed")
    if seed is not None and not 0 <= seed < 2**63:  # torch.Generator.manual_seed takes no more
        raise _bad(f"seed must be in [0, 2^63), got {seed}", "seed")
    n = _integer(data, "n")
    n = 1 if n is None else n
    if not 1 <= n <= cfg.max_choices:
        raise _bad(f"n must be in [1, {cfg.max_choices}], got {n}", "n")
    if len(prompts) * n > cfg.max_choices:
        raise _bad(f"{len(prompts)} prompts x n={n} make {len(prompts) * n} choices, more than the limit of "
                   f"{cfg.max_choices}", "n" if n > 1 else "prompt")

    stop = data.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop must be a non-empty string or a list of at most 4 of them", "stop")
    for s in stop:
        _unicode(s, "stop")

    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    opts = data.get("stream_options") or {}
    if (not isinstance(opts, dict) or set(opts) - {"include_usage"}
            or not isinstance(opts.get("include_usage", False), bool)):
        raise _bad("stream_options must be an object with an optional boolean include_usage", "stream_options")

    doc_id = data.get("document_id")
    doc_id = None if doc_id is None else valid_document_id(doc_id)
    document = data.get("document")
    if document is not None and (not isinstance(document, str) or not document.strip()):
        raise _bad("document must be a non-empty string", "document")
    if document is not None and doc_id is None:
        raise _bad("document needs a document_id to go with it", "document")
    if document is not None and len(_unicode(document, "document").encode("utf-8")) > cfg.max_request_bytes:
        raise _bad("document is too large", "document", 413)

    for i, ids in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if len(ids) > cfg.max_prompt_tokens:
            raise _bad(f"{name} has {len(ids)} tokens, more than the limit of {cfg.max_prompt_tokens}", name,
                       code="context_length_exceeded")
        if not ids and doc_id is None:
            raise _bad(f"{name} is empty and no document_id is given: nothing to continue", name)

    return CompletionRequest(
        model=model, prompts=prompts, max_tokens=max_tokens, temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0, low_open=True), stop=stop, stream=stream,
        include_usage=bool(opts.get("include_usage", False)), seed=seed, document_id=doc_id, document=document,
        n=n, logprobs=logprobs, presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
    )


def parse_request(data: object, tokenizer, cfg: RayServeConfig) -> CompletionRequest:
    """Check a decoded /v1/completions body against the OpenAI completions API and the configured limits."""
    data = _fields(data, _KNOWN)
    prompts = _prompts(data.get("prompt", ""), tokenizer)
    logprobs = _integer(data, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= 5:  # OpenAI's completions limit
        raise _bad(f"logprobs must be in [0, 5], got {logprobs}", "logprobs")
    echo = data.get("echo", False)
    if not isinstance(echo, bool):
        raise _bad("echo must be a boolean", "echo")
    if echo and logprobs is not None:
        raise _bad("echo with logprobs is not supported (the prompt's own log-probabilities are not computed)",
                   "echo")
    req = _common(data, prompts, cfg, logprobs=logprobs)
    req.echo = echo
    return req


def parse_chat(data: object, tokenizer, cfg: RayServeConfig) -> CompletionRequest:
    """Check a decoded /v1/chat/completions body; the messages become the prompt through the model's chat template
    (or `cfg.chat_template`), with the assistant's turn opened. The document's cache, if any, comes first."""
    data = _fields(data, _CHAT_KNOWN)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or set(m) - {"role", "content", "name"}:
            raise _bad(f"messages[{i}] must be an object with a role ({', '.join(_ROLES)}) and a content",
                       f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            m = {**m, "content": "".join(p["text"] for p in content)}
            messages[i] = m
        elif not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        _unicode(m["content"], f"messages[{i}].content")
    template = cfg.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise _bad("this model has no chat template (set serve.chat_template); use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template that refuses these messages (e.g. roles out of order)
        raise _bad(f"the chat template refused the messages: {e}"[:500], "messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    logprobs = data.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad("logprobs must be a boolean", "logprobs")
    top = _integer(data, "top_logprobs")
    if top is not None and not 0 <= top <= 20:
        raise _bad(f"top_logprobs must be in [0, 20], got {top}", "top_logprobs")
    if top is not None and not logprobs:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    field = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    return _common(data, [ids], cfg, max_tokens_field=field, logprobs=(top or 0) if logprobs else None)


def response_meta(plan: Plan, req: CompletionRequest) -> dict:
    """The `cache_aug` block of a response: how the answer was produced."""
    return {"source": plan.source, "reason": plan.reason, "document_id": req.document_id,
            "document_tokens": plan.document_tokens, "gain": plan.gain}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(tokens: list, tokenizer, offset: int = 0) -> dict:
    """The completions API's `logprobs` of a choice's tokens (cache_aug.batching.TokenEvent): each token's text,
    log-probability, its top alternatives and where its text starts in the choice's text."""
    texts = [_token_text(tokenizer, t.token) for t in tokens]
    starts = [offset + sum(len(x) for x in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_token_text(tokenizer, i): lp for i, lp in t.top} for t in tokens],
            "text_offset": starts}


def chat_logprobs(tokens: list, tokenizer) -> dict:
    """The chat API's `logprobs` of a choice's tokens: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""

    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens]}
