"""Ray Serve application: OpenAI-compatible completions decoded against stored augmented caches.

    serve run cluster/serve/serve_tiny.yaml         # or `serve deploy`, or the RayService manifest
    cache-aug serve --config jobs/configs/serve_tiny.yaml

    POST /v1/completions        {"model", "prompt" (a string, token ids, or a list of either), "max_tokens",
                                 "temperature", "top_p", "stop", "stream", "stream_options", "seed", "n", "logprobs",
                                 "echo", "presence_penalty", "frequency_penalty", "document_id", "document"}
    POST /v1/chat/completions   {"messages", ... the same, "logprobs": bool, "top_logprobs", "max_completion_tokens"}
    GET  /v1/models, GET /healthz

`document_id` and `document` are this endpoint's own fields: the openai client sends them via
`extra_body`, for chat as for completions. The document's augmented cache comes first; the prompt (for chat,
the messages formatted by the model's chat template, the assistant's turn opened) follows it. Each response
carries a `cache_aug` block saying how it was produced: `stored` (the corpus job's record for the
document), `online` (augmented now: the record was missing or refused) or `none` (plain decoding).

Requests that need a document augmented or prefilled are batched together (`@serve.batch`), off the event
loop. Decoding is continuous batching (`cache_aug.batching.DecodeLoop`, one thread per replica): every
running sequence of the replica advances in one forward per step, requests join between steps and leave when
they finish, and a client that disconnects frees its slot at the next step. `serve.batching: false` decodes
each request alone in asyncio's thread pool instead (the sequential engine, kept for comparison).
"""


# No `from __future__ import annotations` here: FastAPI must see the real `Request` type of the routes.
import asyncio
import hmac
import json
import os
import threading
import time
import uuid
import weakref
from collections import deque

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cache_aug.batching import BatchLimits, DecodeLoop, run_alone
from cache_aug.config import from_dict, resolve_serve_sources, to_dict
from cache_aug.engine import ChoiceEvent, CompletionEngine, CompletionRequest, Plan, RequestRefused
from pipelines.config import JobConfig, RayServeConfig, load_job_config
from pipelines.protocol import (
    RequestError,
    chat_logprobs,
    completion_logprobs,
    error_body,
    http_error,
    json_body,
    parse_chat,
    parse_request,
    read_body,
    response_meta,
)

api = FastAPI(title="cache-aug", description="Completions decoded against augmented KV caches")


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _alone(decoder, seqs) -> None:
    """The sequential engine: one request's sequences decoded in this thread (their sinks hear any error)."""
    try:
        run_alone(decoder, seqs)
    except Exception:  # noqa: BLE001,S110 - already delivered to the sequences as an "error" finish
        pass


def _cancel(seqs) -> None:
    for seq in seqs:
        seq.cancel()


class _Stream(StreamingResponse):
    """A streamed answer whose sequences are cancelled however it ends: sent in full, the client gone mid-stream,
    or never sent at all (the client left before the response started: the object is dropped unsent)."""

    def __init__(self, content, seqs):
        super().__init__(content, media_type="text/event-stream")
        self._seqs = seqs
        weakref.finalize(self, _cancel, seqs)

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            _cancel(self._seqs)


def build_engine(cfg: JobConfig, device) -> CompletionEngine:
    """Load the models (on `device`), the stored-cache reader and the document lookup a replica serves with."""
    import pyarrow.fs as pafs

    from cache_aug.coprocessor import (
        latent_fingerprint,
        load_latent_module,
        saved_fingerprint,
    )
    from cache_aug.decoder import load_decoder
    from cache_aug.document_texts import DocumentTexts
    from cache_aug.store import AugmentedCacheReader
    from cache_aug.wanted import WantedQueue
    from pipelines.storage import resolve, resolve_inputs

    s = cfg.serve
    if device.type == "cpu":
        # grouped-query attention inside torch's SDPA instead of repeating K/V per head first: the same
        # numbers, one copy of the cache less per layer and step (CUDA would fall back to its math kernel)
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    decoder = load_decoder(cfg.model, device=device, s3=cfg.s3)
    module, fingerprint = None, None
    sources = resolve_serve_sources(cfg)  # serve.coprocessor / cache_prefix / documents, corpus.* where unset
    cop = sources.coprocessor
    if cop:
        if s.online:
            module = load_latent_module(cop, decoder, cfg.s3)
            fingerprint = latent_fingerprint(decoder, module)
        else:
            fingerprint = saved_fingerprint(cop, decoder, cfg.s3)
    records, store = None, None
    prefix = sources.cache_prefix
    if fingerprint and prefix:
        fs, root = resolve(prefix.rstrip("/"), cfg.s3)
        store = (fs or pafs.LocalFileSystem(), root)
        records = AugmentedCacheReader(*store, cfg.corpus.index_buckets, list_ttl_s=s.store_list_s)
    doc_paths = sources.documents
    documents = None
    if doc_paths:
        fs, targets, _ = resolve_inputs(doc_paths, cfg.s3, "serve.documents")
        documents = DocumentTexts(targets, filesystem=fs,
                                  id_column=cfg.corpus.id_column, text_column=cfg.corpus.text_column)
    wanted = None
    w = s.wanted
    if w.enabled and store is not None:  # misses go to the corpus job's queue, beside the records they lack
        wanted = WantedQueue(*store, flush_s=w.flush_s, flush_rows=w.flush_rows, max_pending=w.max_pending,
                             max_files=w.max_files, requeue_s=w.requeue_s, max_text_bytes=w.max_text_bytes,
                             has_document=None if documents is None else (lambda d: documents.get(d) is not None))
    return CompletionEngine(decoder, module, fingerprint or "", s, records=records, documents=documents,
                            max_document_tokens=min(s.max_document_tokens, cfg.corpus.max_tokens),
                            truncate=cfg.corpus.truncate, wanted=wanted)


class _Inbox:
    """One request's events, from the decode thread to its coroutine: the loop is woken once per batch of
    events (a wake-up already pending takes the new ones along), not once per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock = loop, deque(), threading.Lock()
        self.pending, self.ready = False, asyncio.Event()

    def put(self, event: ChoiceEvent) -> None:  # the decode thread
        with self.lock:
            self.items.append(event)
            if self.pending:
                return
            self.pending = True
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self.lock:
            self.pending = False
        self.ready.set()

    async def take(self) -> list[ChoiceEvent]:
        """Every event that has arrived (at least one: waits for it)."""
        while True:
            with self.lock:
                if self.items:
                    out = list(self.items)
                    self.items.clear()
                    return out
            self.ready.clear()  # on the loop's thread, as _wake: no wake-up is lost in between
            await self.ready.wait()


class _Answer:
    """One request's choices as their events arrive, in the OpenAI completions or chat format."""

    def __init__(self, req: CompletionRequest, plan: Plan, chat: bool, tokenizer):
        self.req, self.plan, self.chat, self.tok = req, plan, chat, tokenizer
        self.n = len(req.prompts) * req.n
        self.text = ["" for _ in range(self.n)]
        self.tokens: list[list] = [[] for _ in range(self.n)]
        self.finish: list[str | None] = [None] * self.n
        self.error: BaseException | None = None
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.worker = None  # the sequential engine's task, held so it is not collected
        # echo: the answer starts with the prompt's text
        self.prefix = [tokenizer.decode(req.prompts[i // req.n], skip_special_tokens=True) if req.echo else ""
                       for i in range(self.n)]

    @property
    def open(self) -> bool:
        return any(f is None for f in self.finish)

    def add(self, e: ChoiceEvent) -> None:
        self.text[e.index] += e.text
        if e.token is not None:
            self.tokens[e.index].append(e.token)
        if e.finish_reason is not None:
            self.finish[e.index] = e.finish_reason
            if e.error is not None and self.error is None:
                self.error = e.error

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.req.prompts)
        done = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def _logprobs(self, tokens: list, offset: int = 0):
        if self.req.logprobs is None:
            return None
        return chat_logprobs(tokens, self.tok) if self.chat else completion_logprobs(tokens, self.tok, offset)

    def _meta(self) -> dict:
        return response_meta(self.plan, self.req)

    def body(self) -> dict:
        ids = [[t.token for t in ts] for ts in self.tokens]
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": self.text[i]},
                        "logprobs": self._logprobs(self.tokens[i]), "finish_reason": self.finish[i]}
                       for i in range(self.n)]
        else:
            choices = [{"index": i, "text": self.prefix[i] + self.text[i],
                        "logprobs": self._logprobs(self.tokens[i], len(self.prefix[i])),
                        "finish_reason": self.finish[i]} for i in range(self.n)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model, "choices": choices, "usage": self.usage(),
                "cache_aug": self._meta() | {"token_ids": ids[0], "choice_token_ids": ids}}

    def _chunk(self, index: int, text: str | None, finish: str | None, tokens: list | None = None,
               **extra) -> str:
        if self.chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if tokens:
                choice["logprobs"] = self._logprobs(tokens)
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            if tokens:
                choice["logprobs"] = self._logprobs(tokens)
        return self._event({"choices": [choice]} | extra)

    def _event(self, payload: dict) -> str:
        head = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model}
        return f"data: {json.dumps(head | payload)}\n\n"

    async def events(self, inbox: _Inbox, seqs):
        """Server-sent events in the format the openai client reads, ending with `data: [DONE]`."""
        try:
            opening = []
            for i in range(self.n):  # each choice opens with its role (chat) or echoed prompt; the first says how
                first = {"cache_aug": self._meta()} if i == 0 else {}
                if self.chat:
                    choice = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}
                    opening.append(self._event({"choices": [choice]} | first))
                else:
                    opening.append(self._chunk(i, self.prefix[i], None, **first))
            yield "".join(opening)
            while self.open:
                # every event that is ready goes out in one chunk: under load the replica sends one message per
                # request per wake-up, not one per token (each is a trip through Serve's proxy)
                out = []
                for e in await inbox.take():
                    self.add(e)
                    if e.error is not None:  # the status line is already sent: report in-band
                        yield "".join(out) + self._event(error_body(500, f"{type(e.error).__name__}: {e.error}"))
                        return
                    if e.text or e.token is not None and self.req.logprobs is not None:
                        out.append(self._chunk(e.index, e.text, None, [e.token] if e.token is not None else None))
                    if e.finish_reason is not None:
                        out.append(self._chunk(e.index, None if self.chat else "", e.finish_reason))
                if out:
                    yield "".join(out)
            if self.req.include_usage:
                yield self._event({"choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the answer is complete: either way its sequences are done
            _cancel(seqs)


# the endpoint's default limits also where the deployment is bound directly (build_app passes the configured ones)
@serve.deployment(name="CompletionServer", max_ongoing_requests=RayServeConfig.max_ongoing_requests,
                  max_queued_requests=RayServeConfig.max_queued_requests)
@serve.ingress(api)
class CompletionServer:
    """One replica: decoder (+ coprocessor), cache reader with its LRU, and the HTTP routes."""

    def __init__(self, config: dict):
        import ray

        from cache_aug.devices import choose_device

        self.cfg = from_dict(JobConfig, config)
        given = ray.get_runtime_context().get_assigned_resources()  # Ray Serve's num_cpus / num_gpus of the replica
        self.engine = build_engine(self.cfg, choose_device(self.cfg.serve.device, gpus=given.get("GPU", 0),
                                                           cpus=given.get("CPU", 1)))
        self.token = os.environ.get(self.cfg.serve.auth_token_env) or None
        self._prepare.set_max_batch_size(self.cfg.serve.batch_size)
        self._prepare.set_batch_wait_timeout_s(self.cfg.serve.batch_wait_s)
        s = self.cfg.serve
        self.loop = (DecodeLoop(self.engine.decoder, BatchLimits(s.max_running_sequences, s.max_batched_tokens))
                     if s.batching else None)
        self.started = int(time.time())

    def __del__(self):  # Ray Serve's replica shutdown: the decode loop's thread ends with it, the queue is written
        if getattr(self, "loop", None) is not None:
            self.loop.close()
        engine = getattr(self, "engine", None)
        if engine is not None and engine.wanted is not None:
            engine.wanted.close()

    def _denied(self, request: Request) -> JSONResponse | None:
        if self.token is None:
            return None
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
            return _error(401, "missing or wrong bearer token", code="invalid_api_key")
        return None

    @api.get("/healthz")
    async def healthz(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": self.cfg.serve.model_name, "fingerprint": e.fingerprint,
                "coprocessor": e.module is not None, "served": dict(e.counts),
                "lru": {"entries": len(e.lru), "bytes": e.lru.bytes, "hits": e.lru.hits, "misses": e.lru.misses},
                "decoding": self.loop.stats() if self.loop is not None else {"batching": False},
                "wanted": e.wanted.stats() if e.wanted is not None else {"enabled": False}}

    @api.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        return {"object": "list", "data": [{"id": self.cfg.serve.model_name, "object": "model", "created": self.started,
                                            "owned_by": "cache-aug"}]}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _prepare(self, plans: list[Plan]) -> list:
        """Augment (or prefill) the documents of requests that arrived together, in shared forward passes."""
        return await asyncio.to_thread(self.engine.prepare, plans)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, chat=True)

    async def _answer(self, request: Request, chat: bool):
        if (denied := self._denied(request)) is not None:
            return denied
        tok = self.engine.decoder.tokenizer
        try:
            body = await read_body(request.headers.get("content-length"), request.stream(),
                                   self.cfg.serve.max_request_bytes)
            req = (parse_chat if chat else parse_request)(json_body(body), tok, self.cfg.serve)
            if req.document_id is None or req.document_id in self.engine.lru:  # no storage read: on the loop
                plan = self.engine.plan(req)
            else:
                plan = await asyncio.to_thread(self.engine.plan, req)
        except (RequestError, RequestRefused) as refused:  # the engine's refusals get their status from the protocol
            e = http_error(refused)
            return _error(e.status, e.message, e.param, e.code)
        cache = plan.cache if plan.cache is not None or plan.compute_ids is None else await self._prepare(plan)
        answer = _Answer(req, plan, chat, tok)
        inbox = _Inbox(asyncio.get_running_loop())
        seqs = self.engine.sequences(plan, cache, req, inbox.put)
        if self.loop is not None:
            self.loop.submit(seqs)
        else:  # the sequential engine, as it was: each request decoded alone in asyncio's thread pool
            answer.worker = asyncio.create_task(asyncio.to_thread(_alone, self.engine.decoder, seqs))
        if req.stream:
            return _Stream(answer.events(inbox, seqs), seqs)
        try:
            while answer.open:
                for e in await inbox.take():
                    answer.add(e)
        finally:  # a client that went away (the handler is cancelled): its sequences leave at the next step
            _cancel(seqs)
        if answer.error is not None:
            return _error(500, f"{type(answer.error).__name__}: {answer.error}")
        return answer.body()


def _config_source(config):
    """A config path as given, else relative to the repository root (the builder may run in another directory)."""
    from pathlib import Path

    if isinstance(config, str) and not os.path.isabs(config) and not os.path.exists(config):
        candidate = Path(__file__).resolve().parents[1] / config
        if candidate.exists():
            return str(candidate)
    return config


def build_app(args: dict) -> serve.Application:
    """Serve application builder (`import_path: pipelines.serve:build_app`).

    args: {"config": the job config tree (pipelines.config.JobConfig): a YAML path (relative ones are also looked up in
    the repository that holds this package) or the tree itself, inline; optional. "overrides": ["serve.max_tokens=128",
    ...]}
    """
    cfg = load_job_config(_config_source(args.get("config")), overrides=list(args.get("overrides") or []))
    s = cfg.serve
    return CompletionServer.options(max_ongoing_requests=s.max_ongoing_requests,
                                    max_queued_requests=s.max_queued_requests,
                                    graceful_shutdown_timeout_s=5).bind(to_dict(cfg))


def serve_job(config: str | None, overrides: list[str], host: str = "127.0.0.1", port: int = 8000,
              num_cpus: int | None = None) -> None:
    """Run the endpoint on the cluster named by RAY_ADDRESS (or a local one) until interrupted."""
    from cache_aug.tiny import build_if_embedded
    from pipelines.ray_session import init_ray

    # here, before any replica loads it: loading never builds
    build_if_embedded(load_job_config(_config_source(config), overrides=list(overrides)).model.path)
    import signal
    import threading

    import ray

    init_ray(num_cpus)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({"config": config, "overrides": overrides}), name="cache-aug", route_prefix="/")
    print(f"serving on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C (or a SIGTERM) stops the app and this driver's Ray promptly
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    print("stopping", flush=True)
    serve.shutdown()
    ray.shutdown()
