"""Serving: OpenAI-style completions decoded against a document's augmented cache, with fallback.

    req = parse_request(body, tokenizer, cfg)     # RequestError(status, message, param) for bad input
    plan = engine.plan(req)                       # a stored cache (LRU, then storage), or what to compute
    cache = engine.prepare([plan])[0]             # batched: online augmentation or plain prefill
    for delta, token in engine.stream(plan, cache, req): ...   # text deltas; engine.finish_reason after

Where the cache comes from is always reported (`Plan.source`):
    stored   the corpus job's record for the document, checked against the served models' fingerprint
    online   no usable record: the document is augmented now by the loaded coprocessor
    none     plain decoding (no coprocessor, fallback "none", or no document text known)

A stored record is used only when it passes every check of `cache_aug.records.restore` (fingerprint,
checksum, shapes) and, when the request sends the document's text, its content hash matches that
text. Anything else falls back; a request never fails because a cache is missing or damaged.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from cache_aug.augment import AugmentedCache, augment, decode_steps
from cache_aug.config import ServeConfig
from cache_aug.decoder import Decoder
from cache_aug.fingerprint import FingerprintMismatch
from cache_aug.records import CacheRecordError, restore

SOURCES = ("stored", "online", "none")
DOC_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9 _.,:;@+=#()\[\]-]{0,255}")


class RequestError(ValueError):
    """A request the server refuses: HTTP status, message, and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# --------------------------------------------------------------------------- #
# Requests
# --------------------------------------------------------------------------- #


@dataclass
class CompletionRequest:
    """A validated /v1/completions request."""

    model: str
    prompt_ids: list[int]  # the prompt, tokenized without special tokens (it follows the document)
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None
    document_id: str | None = None
    document: str | None = None  # the document's text, optional: used when no stored cache fits


_UNSUPPORTED = {  # OpenAI fields accepted only at their neutral value
    "n": 1, "best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0, "suffix": None,
}
_KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "stream_options", "seed", "user",
          "logit_bias", "document_id", "document", *_UNSUPPORTED}


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
    """`text` if it is valid Unicode: JSON may carry lone surrogates ("\\ud800"), which neither tokenizer nor UTF-8 takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"{name} is not valid Unicode: lone surrogate at character {e.start}", name) from None
    return text


def json_body(raw: bytes) -> object:
    """The decoded JSON of a request body; RequestError 400 if it is not JSON (bad syntax, bad UTF-8, nested too deep)."""
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


def parse_request(data: object, tokenizer, cfg: ServeConfig) -> CompletionRequest:
    """Check a decoded JSON body against the OpenAI completions API and the configured limits."""
    if not isinstance(data, dict):
        raise _bad(f"the request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _KNOWN)
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

    model = data.get("model", cfg.model_name)
    if not isinstance(model, str):
        raise _bad("model must be a string", "model")
    if model != cfg.model_name:
        raise _bad(f"model {model!r} does not exist (this endpoint serves {cfg.model_name!r})", "model", 404, "model_not_found")

    max_tokens = _integer(data, "max_tokens")
    max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= cfg.max_tokens:
        raise _bad(f"max_tokens must be in [1, {cfg.max_tokens}], got {max_tokens}", "max_tokens")
    seed = _integer(data, "seed")
    if seed is not None and not 0 <= seed < 2**63:  # torch.Generator.manual_seed takes no more
        raise _bad(f"seed must be in [0, 2^63), got {seed}", "seed")

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
    if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(opts.get("include_usage", False), bool):
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

    prompt = data.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the openai client may send one prompt as a list
    vocab = len(tokenizer)
    if isinstance(prompt, str):
        ids = tokenizer.encode(_unicode(prompt, "prompt"), add_special_tokens=False) if prompt else []
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < vocab for t in prompt):
            raise _bad(f"prompt token ids must be in [0, {vocab})", "prompt")
        ids = list(prompt)
    else:
        raise _bad("prompt must be a string, a list of one string, or a list of token ids", "prompt")
    if len(ids) > cfg.max_prompt_tokens:
        raise _bad(f"prompt has {len(ids)} tokens, more than the limit of {cfg.max_prompt_tokens}", "prompt", code="context_length_exceeded")
    if not ids and doc_id is None:
        raise _bad("prompt is empty and no document_id is given: nothing to continue", "prompt")

    return CompletionRequest(
        model=model, prompt_ids=ids, max_tokens=max_tokens, temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0, low_open=True), stop=stop, stream=stream,
        include_usage=bool(opts.get("include_usage", False)), seed=seed, document_id=doc_id, document=document,
    )


# --------------------------------------------------------------------------- #
# Where caches come from
# --------------------------------------------------------------------------- #


class DocumentTexts:
    """Document texts by id from a Parquet corpus (the corpus job's input), for online augmentation."""

    def __init__(self, paths: list[str], *, filesystem=None, id_column: str = "doc_id", text_column: str = "text",
                 refresh_s: float = 60.0):
        self.paths, self.fs, self.id_column, self.text_column, self.refresh_s = paths, filesystem, id_column, text_column, refresh_s
        self._dataset, self._made = None, float("-inf")

    def get(self, doc_id: str) -> str | None:
        """The text of `doc_id`, or None if it is absent, duplicated or not valid UTF-8."""
        import pyarrow as pa
        import pyarrow.dataset as pads

        if time.monotonic() - self._made > self.refresh_s:  # new files appear as the corpus grows
            parts = [pads.dataset(p, filesystem=self.fs, format="parquet") for p in self.paths]  # files or directories
            self._dataset = parts[0] if len(parts) == 1 else pads.dataset(parts)
            self._made = time.monotonic()
        # compared as strings: the corpus job accepts integer ids too, and stores them as str(id)
        match = pads.field(self.id_column).cast(pa.string()) == doc_id
        table = self._dataset.to_table(columns=[self.text_column], filter=match)
        if table.num_rows != 1:
            return None
        text = table.column(0)[0].as_py()
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                return None
        return text if text and text.strip() else None


class CacheLRU:
    """Restored caches by document id, bounded in entries and tensor bytes, with a time to live."""

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float):
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._items: OrderedDict[str, tuple[AugmentedCache, str | None, int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def nbytes(cache: AugmentedCache) -> int:
        tensors = [cache.input_ids, cache.next_logits, *(t for kv in cache.layers for t in kv)]
        if cache.latents is not None:
            tensors.append(cache.latents)
        return sum(t.numel() * t.element_size() for t in tensors)

    def get(self, doc_id: str) -> tuple[AugmentedCache, str | None] | None:
        with self._lock:
            item = self._items.get(doc_id)
            if item is None or time.monotonic() - item[3] > self.ttl_s:
                if item is not None:
                    self._drop(doc_id)
                self.misses += 1
                return None
            self._items.move_to_end(doc_id)
            self.hits += 1
            return item[0], item[1]

    def put(self, doc_id: str, cache: AugmentedCache, content_sha256: str | None) -> None:
        size = self.nbytes(cache)
        if size > self.max_bytes:
            return
        with self._lock:
            if doc_id in self._items:
                self._drop(doc_id)
            self._items[doc_id] = (cache, content_sha256, size, time.monotonic())
            self.bytes += size
            while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _drop(self, doc_id: str) -> None:
        self.bytes -= self._items.pop(doc_id)[2]

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Plan:
    """How one request will be answered."""

    source: str  # stored | online | none
    reason: str | None  # why it is not "stored", when it is not
    prompt_ids: list[int]  # fed after the cache
    cache: AugmentedCache | None = None  # ready (stored), or None: `compute_ids` must be prefilled/augmented
    compute_ids: list[int] | None = None
    document_tokens: int = 0


class CompletionEngine:
    """The models of one replica, its stored-cache reader and LRU, and the decoding loop. Thread-safe."""

    def __init__(self, decoder: Decoder, module, fingerprint: str, cfg: ServeConfig, *, records=None,
                 documents: DocumentTexts | None = None, max_document_tokens: int | None = None, truncate: bool = False):
        self.decoder, self.module, self.fingerprint, self.cfg = decoder, module, fingerprint, cfg
        self.records, self.documents = records, documents  # records: anything with .get(doc_id) -> CacheRecord | None
        self.max_document_tokens = max_document_tokens or cfg.max_document_tokens
        self.truncate = truncate
        self.lru = CacheLRU(cfg.cache_entries, cfg.cache_bytes, cfg.cache_ttl_s)
        self.counts = {s: 0 for s in SOURCES}

    # -- planning: which cache answers the request ----------------------------------------------------- #

    def plan(self, req: CompletionRequest) -> Plan:
        """Find the request's cache (LRU, then storage), or decide what to compute instead."""
        if req.document_id is None:  # no document: plain decoding of the prompt
            return Plan("none", "no document_id", [], compute_ids=req.prompt_ids)
        want = None if req.document is None else hashlib.sha256(req.document.encode("utf-8")).hexdigest()
        reason = self._stored(req.document_id, want)
        if isinstance(reason, AugmentedCache):
            return Plan("stored", None, req.prompt_ids, cache=reason, document_tokens=reason.doc_len)
        text = req.document
        if text is None and self.documents is not None:
            try:
                text = self.documents.get(req.document_id)
            except Exception as e:  # storage trouble is a fallback, not a failure
                reason = f"{reason}; document store unreadable ({type(e).__name__}: {e})"[:500]
        if text is None:
            if not req.prompt_ids:
                raise _bad(f"document {req.document_id!r}: {reason} and its text is unknown, and the prompt is empty: "
                           "nothing to continue", "document_id", 404, "document_not_found")
            return Plan("none", f"{reason}; document text unknown, decoded the prompt alone", [], compute_ids=req.prompt_ids)
        ids = self.decoder.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > self.max_document_tokens:
            if not self.truncate:
                raise _bad(f"document has {len(ids)} tokens, more than the limit of {self.max_document_tokens}", "document")
            ids = ids[: self.max_document_tokens]
        if self.cfg.fallback == "online" and self.module is not None:
            return Plan("online", reason, req.prompt_ids, compute_ids=ids, document_tokens=len(ids))
        why = "fallback is 'none'" if self.cfg.fallback == "none" else "no coprocessor loaded"
        return Plan("none", f"{reason}; {why}", req.prompt_ids, compute_ids=ids, document_tokens=len(ids))

    def _stored(self, doc_id: str, want_sha256: str | None) -> AugmentedCache | str:
        """The stored cache, or the reason there is none usable."""
        hit = self.lru.get(doc_id)
        if hit is not None:
            cache, sha = hit
            if want_sha256 is None or sha == want_sha256:
                return cache
            return "the stored cache is for another text of this document"
        if self.records is None:
            return "no cache store configured"
        try:
            record = self.records.get(doc_id)
        except Exception as e:  # storage trouble is a fallback, not a failure
            return f"cache store unreadable ({type(e).__name__}: {e})"[:500]
        if record is None:
            return "no stored cache"
        if want_sha256 is not None and record.content_sha256 != want_sha256:
            return "the stored cache is for another text of this document"
        try:
            cache = restore(record, self.decoder, self.fingerprint, getattr(self.module, "position_rule", None))
        except FingerprintMismatch:
            return "stored cache refused: made by other models (fingerprint mismatch)"
        except CacheRecordError as e:
            return f"stored cache refused: {e}"[:500]
        self.lru.put(doc_id, cache, record.content_sha256)
        return cache

    # -- computing what the plans need, several documents per forward pass ------------------------------ #

    def prepare(self, plans: list[Plan]) -> list[AugmentedCache]:
        """Caches for the plans: stored ones as they are, the others augmented or prefilled in batches."""
        out: list[AugmentedCache | None] = [p.cache for p in plans]
        for online in (True, False):
            todo = [i for i, p in enumerate(plans) if p.cache is None and (p.source == "online") == online]
            todo.sort(key=lambda i: len(plans[i].compute_ids))  # neighbours in length: little padding
            for start in range(0, len(todo), self.cfg.batch_size):
                chunk = todo[start : start + self.cfg.batch_size]
                caches = augment(self.decoder, self.module if online else None, [plans[i].compute_ids for i in chunk])
                for i, cache in zip(chunk, caches):
                    out[i] = cache
        return out

    # -- decoding --------------------------------------------------------------------------------------- #

    def stream(self, plan: Plan, cache: AugmentedCache, req: CompletionRequest) -> Iterator[tuple[str, int]]:
        """Decode after `cache` and the prompt: yields (text delta, token id); the result is in `.finish`.

        Text is released only once it cannot turn out to be part of a stop string, or an incomplete
        character. The generator's return value is the finish reason ("stop" or "length").
        """
        self.counts[plan.source] += 1
        tok = self.decoder.tokenizer
        context = (plan.prompt_ids or cache.input_ids.tolist())[-4:]  # so leading spaces detokenize as in context
        head = tok.decode(context, skip_special_tokens=True)
        stops = set(self.stop_token_ids())
        tokens: list[int] = []
        text, sent, finish, cut = "", 0, "length", -1
        for token, _ in decode_steps(self.decoder, cache, plan.prompt_ids, max_new_tokens=req.max_tokens, temperature=req.temperature,
                                     top_p=req.top_p, seed=req.seed, stop_token_ids=sorted(stops)):
            if token in stops:  # end of text: not part of the answer
                finish = "stop"
                yield "", token
                break
            tokens.append(token)
            text = _detok(tok, context, head, tokens)
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            if cut >= 0:  # a stop string: the answer ends before it
                finish = "stop"
                yield text[sent:cut], token
                break
            ready = len(text) - _held_back(text, req.stop)
            if text.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
                ready = min(ready, len(text.rstrip("\ufffd")))
            yield (text[sent:ready] if ready > sent else ""), token
            sent = max(sent, ready)
        if cut < 0 and len(text) > sent:
            yield text[sent:], -1  # what was held back, at the end
        return finish

    def stop_token_ids(self) -> list[int]:
        eos = self.decoder.model.generation_config.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def complete(self, req: CompletionRequest) -> dict:
        """Plan, prepare and decode one request in this thread (no batching): the response's parts."""
        plan = self.plan(req)
        cache = self.prepare([plan])[0]
        return self.run(plan, cache, req)

    def run(self, plan: Plan, cache: AugmentedCache, req: CompletionRequest) -> dict:
        pieces, ids = [], []
        gen = self.stream(plan, cache, req)
        while True:
            try:
                delta, token = next(gen)
            except StopIteration as stop:
                finish = stop.value
                break
            pieces.append(delta)
            if token >= 0:
                ids.append(token)
        return {"text": "".join(pieces), "token_ids": ids, "finish_reason": finish}


def _detok(tok, context: list[int], head: str, tokens: list[int]) -> str:
    full = tok.decode(context + tokens, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tok.decode(tokens, skip_special_tokens=True)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[len(text) - n :]):
                best = n
                break
    return best


def response_meta(plan: Plan, req: CompletionRequest) -> dict:
    """The `cache_aug` block of a response: how the answer was produced."""
    return {"source": plan.source, "reason": plan.reason, "document_id": req.document_id, "document_tokens": plan.document_tokens}
