"""The serving engine: OpenAI-style completions decoded against a document's augmented cache, with fallback.

    plan = engine.plan(req)                       # a stored cache (LRU, then storage), or what to compute
    cache = engine.prepare([plan])[0]             # batched: online augmentation or plain prefill (None: no document)
    seqs = engine.sequences(plan, cache, req, sink)   # one per choice (prompts x n); sink(ChoiceEvent) hears each
    loop.submit(seqs)                             # the replica's cache_aug.batching.DecodeLoop decodes them
    out = engine.complete(req)                    # or all of it in this thread, alone (offline use, tests)

`req` is a checked `CompletionRequest` (the Serve app's protocol, pipelines/protocol.py, makes it from
a request body). A request the engine cannot answer raises a `RequestRefused` naming the request
field it is about: `DocumentNotFound` (no cache, no text, no prompt) or `DocumentTooLong`.

Where the cache comes from is always reported (`Plan.source`):
    stored   the corpus job's record for the document, checked against the served models' fingerprint
    online   no usable record: the document is augmented now by the loaded coprocessor
    none     plain decoding (no coprocessor, fallback "none", or no document text known)
    skipped  plain decoding of the document, because the corpus job measured that the latents do not help it
             (its `plain` record, `cache_aug.records.encode_plain`): the record's checked token ids are
             prefilled, nothing is restored, and the document is not a miss

A stored record is used only when it passes every check of `cache_aug.records.restore` (fingerprint,
checksum, shapes) and, when the request sends the document's text, its content hash matches that
text. Anything else falls back; a request never fails because a cache is missing or damaged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from cache_aug.augment import AugmentedCache, augment, model_stop_ids
from cache_aug.batching import Sequence, TokenEvent, run_alone
from cache_aug.config import ServeConfig
from cache_aug.decoder import Decoder
from cache_aug.document_texts import DocumentTexts
from cache_aug.fingerprint import FingerprintMismatch
from cache_aug.lru import CacheLRU
from cache_aug.records import PLAIN_MODE, CacheRecordError, decode_payload, restore
from cache_aug.sampling import SamplingParams
from cache_aug.wanted import text_sha256

SOURCES = ("stored", "online", "none", "skipped")


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
    """A checked completions (or chat) request: pipelines/protocol.py makes one from a request body."""

    model: str
    prompts: list[list[int]]  # one or more prompts, tokenized without special tokens (each follows the document)
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None  # choice j of a prompt samples with seed + j
    document_id: str | None = None
    document: str | None = None  # the document's text, optional: used when no stored cache fits
    n: int = 1  # choices per prompt, all decoded after the same cache
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    echo: bool = False  # the answer text starts with the prompt's (the HTTP layer adds it)

    @property
    def prompt_ids(self) -> list[int]:
        """The first prompt."""
        return self.prompts[0]

    def sampling(self, choice: int, stop_token_ids: list[int]) -> SamplingParams:
        """The sampling settings of choice `choice` (0..n-1) of a prompt."""
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=seed,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logprobs=self.logprobs, stop_token_ids=tuple(stop_token_ids))


@dataclass
class ChoiceEvent:
    """What one choice of a request produced: a token and the text it released, or (finish_reason set) its end."""

    index: int  # prompt * n + choice
    text: str = ""  # text released by this event (held back while it may still be part of a stop string)
    token: TokenEvent | None = None  # the generated token; None on the last event
    finish_reason: str | None = None  # on the last event: stop | length | cancelled | error
    error: BaseException | None = None


@dataclass
class Plan:
    """How one request will be answered."""

    source: str  # stored | online | none | skipped
    reason: str | None  # why it is not "stored", when it is not
    prompt_ids: list[int]  # fed after the cache (the request's first prompt; `sequences` feeds each)
    cache: AugmentedCache | None = None  # ready (stored), or None: `compute_ids` must be prefilled/augmented
    compute_ids: list[int] | None = None  # the document to augment or prefill; None with no cache: no document
    document_tokens: int = 0
    gain: float | None = None  # the record's measured gain (cache_aug.selection), when it has one


@dataclass
class _Skipped:
    """A `plain` record's checked token ids and measured gain: the document is decoded plainly."""

    input_ids: list[int]
    gain: float | None


class CompletionEngine:
    """The models of one replica, its stored-cache reader and LRU, and the decoding loop. Thread-safe."""

    def __init__(self, decoder: Decoder, module, fingerprint: str, cfg: ServeConfig, *, records=None,
                 documents: DocumentTexts | None = None, max_document_tokens: int | None = None,
                 truncate: bool = False, wanted=None):
        self.decoder, self.module, self.fingerprint, self.cfg = decoder, module, fingerprint, cfg
        self.records, self.documents = records, documents  # records: anything with .get(doc_id) -> CacheRecord | None
        # wanted: anything with .add(doc_id, content_sha256, reason, text) that never blocks nor raises
        # (`cache_aug.wanted.WantedQueue`); it hears every miss whose text is known, for the corpus job
        self.wanted = wanted
        self.max_document_tokens = max_document_tokens or cfg.max_document_tokens
        self.truncate = truncate
        self.lru = CacheLRU(cfg.cache_entries, cfg.cache_bytes, cfg.cache_ttl_s)
        self.counts = {s: 0 for s in SOURCES}

    # -- planning: which cache answers the request ----------------------------------------------------- #

    def plan(self, req: CompletionRequest) -> Plan:
        """Find the request's cache (LRU, then storage), or decide what to compute instead."""
        if req.document_id is None:  # no document: plain decoding of the prompt
            return Plan("none", "no document_id", req.prompt_ids)
        want = None if req.document is None else hashlib.sha256(req.document.encode("utf-8")).hexdigest()
        reason, miss = self._stored(req.document_id, want)
        if isinstance(reason, AugmentedCache):
            return Plan("stored", None, req.prompt_ids, cache=reason, document_tokens=reason.doc_len,
                        gain=reason.gain)
        if isinstance(reason, _Skipped):
            why = "the corpus job measured that augmentation does not help this document"
            if reason.gain is not None:
                why += f" (gain {reason.gain:+.4g} nats/token)"
            return Plan("skipped", why, req.prompt_ids, compute_ids=reason.input_ids,
                        document_tokens=len(reason.input_ids), gain=reason.gain)
        text = req.document
        if text is None and self.documents is not None:
            try:
                text = self.documents.get(req.document_id)
            except Exception as e:  # storage trouble is a fallback, not a failure  # noqa: BLE001
                reason = f"{reason}; document store unreadable ({type(e).__name__}: {e})"[:500]
        if miss is not None and text is not None and self.wanted is not None:
            # for the corpus job: the text goes along only when the request sent it (the queue leaves it out where
            # the document store holds the document)
            self.wanted.add(req.document_id, want or text_sha256(text), miss,
                            req.document if req.document is not None else None)
        if text is None:
            if not req.prompt_ids:
                raise DocumentNotFound(f"document {req.document_id!r}: {reason} and its text is unknown, and the "
                                       "prompt is empty: nothing to continue")
            return Plan("none", f"{reason}; document text unknown, decoded the prompt alone", req.prompt_ids)
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

    def _stored(self, doc_id: str, want_sha256: str | None) -> tuple[AugmentedCache | _Skipped | str, str | None]:
        """The stored cache (or, for a `plain` record, its checked token ids), or the reason there is none usable
        and, where the store answered, the kind of miss it is for the wanted queue (`cache_aug.wanted.REASONS`:
        missing, stale, refused; None: not a miss)."""
        hit = self.lru.get(doc_id)
        if hit is not None:
            cache, sha = hit
            if want_sha256 is None or sha == want_sha256:
                return cache, None
            return "the stored cache is for another text of this document", "stale"
        if self.records is None:
            return "no cache store configured", None
        try:
            record = self.records.get(doc_id)
        except Exception as e:  # storage trouble is a fallback, not a failure  # noqa: BLE001
            return f"cache store unreadable ({type(e).__name__}: {e})"[:500], None
        if record is None:
            return "no stored cache", "missing"
        if want_sha256 is not None and record.content_sha256 != want_sha256:
            return "the stored cache is for another text of this document", "stale"
        try:
            if record.mode == PLAIN_MODE:  # nothing to restore: the ids, checked, are prefilled with the others
                ids = decode_payload(record, self.decoder.cache_spec, self.fingerprint)["input_ids"]
                return _Skipped(ids.tolist(), record.gain), None
            cache = restore(record, self.decoder, self.fingerprint,
                            layout=None if self.module is None else self.module.layout)
        except FingerprintMismatch:
            return "stored cache refused: made by other models (fingerprint mismatch)", "refused"
        except CacheRecordError as e:
            return f"stored cache refused: {e}"[:500], "refused"
        self.lru.put(doc_id, cache, record.content_sha256)
        return cache, None

    # -- computing what the plans need, several documents per forward pass ------------------------------ #

    def prepare(self, plans: list[Plan]) -> list[AugmentedCache | None]:
        """Caches for the plans: stored ones as they are, the documents of the others augmented or prefilled in
        batches; None for a plan without a document (its prompt alone is decoded)."""
        out: list[AugmentedCache | None] = [p.cache for p in plans]
        for online in (True, False):
            todo = [i for i, p in enumerate(plans)
                    if p.cache is None and p.compute_ids is not None and (p.source == "online") == online]
            todo.sort(key=lambda i: len(plans[i].compute_ids))  # neighbours in length: little padding
            for start in range(0, len(todo), self.cfg.batch_size):
                chunk = todo[start : start + self.cfg.batch_size]
                caches = augment(self.decoder, self.module if online else None, [plans[i].compute_ids for i in chunk])
                for i, cache in zip(chunk, caches, strict=True):
                    out[i] = cache
        return out

    # -- decoding --------------------------------------------------------------------------------------- #

    def sequences(self, plan: Plan, cache: AugmentedCache | None, req: CompletionRequest,
                  sink: Callable[[ChoiceEvent], None]) -> list[Sequence]:
        """The request's sequences, one per choice (its prompts times n, sharing `cache`), for a
        `cache_aug.batching.DecodeLoop` or `run_alone`. `sink` hears every choice's events, on the decoding thread."""
        self.counts[plan.source] += 1
        stops = self.stop_token_ids()
        out = []
        for p, prompt in enumerate(req.prompts):
            for j in range(req.n):
                text = TextStream(self.decoder.tokenizer, prompt or ([] if cache is None else cache.input_ids.tolist()),
                                  req.stop)
                out.append(Sequence(cache, prompt, req.sampling(j, stops), *_callbacks(p * req.n + j, text,
                                                                                     set(stops), sink)))
        return out

    def stop_token_ids(self) -> list[int]:
        return model_stop_ids(self.decoder.model)

    def complete(self, req: CompletionRequest) -> dict:
        """Plan, prepare and decode one request in this thread, alone: {"plan", "choices": [{"text", "token_ids",
        "finish_reason", "tokens": [TokenEvent]}]}, and the first choice's text, token_ids and finish_reason."""
        plan = self.plan(req)
        cache = self.prepare([plan])[0]
        events: list[ChoiceEvent] = []
        run_alone(self.decoder, self.sequences(plan, cache, req, events.append))
        choices = collect(events, len(req.prompts) * req.n)
        return {"plan": plan, "choices": choices} | {k: choices[0][k] for k in ("text", "token_ids", "finish_reason")}


def collect(events: list[ChoiceEvent], n: int) -> list[dict]:
    """The choices that `events` make up: text, token ids, finish reason, and the TokenEvents (logprobs)."""
    out = [{"text": "", "token_ids": [], "tokens": [], "finish_reason": None, "error": None} for _ in range(n)]
    for e in events:
        c = out[e.index]
        c["text"] += e.text
        if e.token is not None:
            c["token_ids"].append(e.token.token)
            c["tokens"].append(e.token)
        if e.finish_reason is not None:
            c["finish_reason"], c["error"] = e.finish_reason, e.error
    return out


def _callbacks(index: int, text: TextStream, stops: set[int], sink: Callable[[ChoiceEvent], None]):
    """A choice's on_token and on_finish: tokens through its TextStream, events to the sink."""

    def on_token(event: TokenEvent) -> bool:
        # the answer keeps the token and its logprobs, not the scores: a view of them holds the whole step's
        # (N, V) logits alive for as long as the answer lives
        event = TokenEvent(event.token, event.logprob, event.top)
        if event.token in stops:  # end of text: not part of the answer
            sink(ChoiceEvent(index, "", event))
            return False
        delta, cut = text.feed(event.token)
        sink(ChoiceEvent(index, delta, event))
        return cut

    def on_finish(reason: str, error: BaseException | None) -> None:
        sink(ChoiceEvent(index, text.flush(), None, reason, error))

    return on_token, on_finish


class TextStream:
    """A choice's text as its tokens arrive: released only once it cannot turn out to be part of a stop string,
    or an incomplete character. `feed` gives the text a token releases and whether a stop string ended the answer
    (the answer ends before it); `flush` what was held back, at the end."""

    def __init__(self, tokenizer, context: list[int], stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.context = context[-4:]  # so leading spaces detokenize as in context
        self.head = tokenizer.decode(self.context, skip_special_tokens=True)
        self.tokens: list[int] = []
        self.text, self.sent, self.cut = "", 0, False

    def feed(self, token: int) -> tuple[str, bool]:
        if self.cut:
            return "", True
        self.tokens.append(token)
        self.text = _detok(self.tok, self.context, self.head, self.tokens)
        at = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        if at >= 0:
            self.cut = True
            delta, self.sent = self.text[self.sent : at], at
            return delta, True
        ready = len(self.text) - _held_back(self.text, self.stops)
        if self.text.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
            ready = min(ready, len(self.text.rstrip("\ufffd")))
        delta = self.text[self.sent : ready] if ready > self.sent else ""
        self.sent = max(self.sent, ready)
        return delta, False

    def flush(self) -> str:
        if self.cut or len(self.text) <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


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
