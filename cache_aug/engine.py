"""The serving engine: OpenAI-style completions decoded against a document's augmented cache, with fallback.

    plan = engine.plan(req)                       # a stored cache (LRU, then storage), or what to compute
    cache = engine.prepare([plan])[0]             # batched: online augmentation or plain prefill
    for delta, token in engine.stream(plan, cache, req): ...   # text deltas; the finish reason is its return value

`req` is a checked `CompletionRequest` (the Serve app's protocol, pipelines/protocol.py, makes it from
a request body). A request the engine cannot answer raises a `RequestRefused` naming the request
field it is about: `DocumentNotFound` (no cache, no text, no prompt) or `DocumentTooLong`.

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
from collections.abc import Iterator
from dataclasses import dataclass, field

from cache_aug.augment import AugmentedCache, augment, decode_steps
from cache_aug.config import ServeConfig
from cache_aug.decoder import Decoder
from cache_aug.document_texts import DocumentTexts
from cache_aug.fingerprint import FingerprintMismatch
from cache_aug.lru import CacheLRU
from cache_aug.records import CacheRecordError, restore

SOURCES = ("stored", "online", "none")


class RequestRefused(ValueError):
    """A request the engine cannot answer: the reason, and the request field it is about (None: the request as a
    whole)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class DocumentNotFound(RequestRefused):
    """Neither a cache nor the text of the requested document is known, and the prompt is empty: nothing to continue."""

    def __init__(self, message: str):
        super().__init__(message, "document_id")


class DocumentTooLong(RequestRefused):
    """The document has more tokens than the configured limit, and truncation is off."""

    def __init__(self, message: str):
        super().__init__(message, "document")


@dataclass
class CompletionRequest:
    """A checked completions request (pipelines/protocol.py makes one from a /v1/completions body)."""

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
                 documents: DocumentTexts | None = None, max_document_tokens: int | None = None,
                 truncate: bool = False):
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
            except Exception as e:  # storage trouble is a fallback, not a failure  # noqa: BLE001
                reason = f"{reason}; document store unreadable ({type(e).__name__}: {e})"[:500]
        if text is None:
            if not req.prompt_ids:
                raise DocumentNotFound(f"document {req.document_id!r}: {reason} and its text is unknown, and the "
                                       "prompt is empty: nothing to continue")
            return Plan("none", f"{reason}; document text unknown, decoded the prompt alone", [],
                        compute_ids=req.prompt_ids)
        ids = self.decoder.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > self.max_document_tokens:
            if not self.truncate:
                raise DocumentTooLong(f"document has {len(ids)} tokens, more than the limit of "
                                      f"{self.max_document_tokens}")
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
        except Exception as e:  # storage trouble is a fallback, not a failure  # noqa: BLE001
            return f"cache store unreadable ({type(e).__name__}: {e})"[:500]
        if record is None:
            return "no stored cache"
        if want_sha256 is not None and record.content_sha256 != want_sha256:
            return "the stored cache is for another text of this document"
        try:
            cache = restore(record, self.decoder, self.fingerprint,
                            layout=None if self.module is None else self.module.layout)
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
                for i, cache in zip(chunk, caches, strict=True):
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
        for token, _ in decode_steps(self.decoder, cache, plan.prompt_ids, max_new_tokens=req.max_tokens,
                                     temperature=req.temperature,
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
