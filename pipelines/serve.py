"""Ray Serve application: OpenAI-compatible completions decoded against stored augmented caches.

    serve run cluster/serve/serve_tiny.yaml         # or `serve deploy`, or the RayService manifest
    cache-aug serve --config jobs/configs/serve_tiny.yaml

    POST /v1/completions   {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "seed",
                            "document_id", "document"}   (the openai client sends the last two via extra_body)
    GET  /v1/models, GET /healthz

Each response carries a `cache_aug` block saying how it was produced: `stored` (the corpus job's
record for the document), `online` (augmented now: the record was missing or refused) or `none`
(plain decoding). Requests that need a document augmented or prefilled are batched together
(`@serve.batch`); decoding runs off the event loop so streams and health checks stay responsive.
"""


# No `from __future__ import annotations` here: FastAPI must see the real `Request` type of the routes.
import asyncio
import hmac
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cache_aug.config import from_dict, resolve_serve_sources, to_dict
from cache_aug.engine import CompletionEngine, CompletionRequest, Plan, RequestRefused
from pipelines.config import JobConfig, load_job_config
from pipelines.protocol import (
    RequestError,
    error_body,
    http_error,
    json_body,
    parse_request,
    read_body,
    response_meta,
)

api = FastAPI(title="cache-aug", description="Completions decoded against augmented KV caches")


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _next(gen):
    """next() that can cross a thread boundary (StopIteration cannot)."""
    try:
        return False, next(gen)
    except StopIteration as stop:
        return True, stop.value


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
    records = None
    prefix = sources.cache_prefix
    if fingerprint and prefix:
        fs, root = resolve(prefix.rstrip("/"), cfg.s3)
        records = AugmentedCacheReader(fs or pafs.LocalFileSystem(), root, cfg.corpus.index_buckets)
    doc_paths = sources.documents
    documents = None
    if doc_paths:
        fs, targets, _ = resolve_inputs(doc_paths, cfg.s3, "serve.documents")
        documents = DocumentTexts(targets, filesystem=fs,
                                  id_column=cfg.corpus.id_column, text_column=cfg.corpus.text_column)
    return CompletionEngine(decoder, module, fingerprint or "", s, records=records, documents=documents,
                            max_document_tokens=min(s.max_document_tokens, cfg.corpus.max_tokens),
                            truncate=cfg.corpus.truncate)


@serve.deployment(name="CompletionServer")
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
        self.started = int(time.time())

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
                "lru": {"entries": len(e.lru), "bytes": e.lru.bytes, "hits": e.lru.hits, "misses": e.lru.misses}}

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
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = await read_body(request.headers.get("content-length"), request.stream(),
                                   self.cfg.serve.max_request_bytes)
            req = parse_request(json_body(body), self.engine.decoder.tokenizer, self.cfg.serve)
            plan = await asyncio.to_thread(self.engine.plan, req)
        except (RequestError, RequestRefused) as refused:  # the engine's refusals get their status from the protocol
            e = http_error(refused)
            return _error(e.status, e.message, e.param, e.code)
        cache = plan.cache if plan.cache is not None else await self._prepare(plan)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(self._events(plan, cache, req, cid, created), media_type="text/event-stream")
        out = await asyncio.to_thread(self.engine.run, plan, cache, req)
        return {
            "id": cid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"text": out["text"], "index": 0, "logprobs": None, "finish_reason": out["finish_reason"]}],
            "usage": self._usage(req, len(out["token_ids"])),
            "cache_aug": response_meta(plan, req) | {"token_ids": out["token_ids"]},
        }

    @staticmethod
    def _usage(req: CompletionRequest, n: int) -> dict:
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n, "total_tokens": len(req.prompt_ids) + n}

    async def _events(self, plan: Plan, cache, req: CompletionRequest, cid: str, created: int):
        """Server-sent events in the format the openai client reads, ending with `data: [DONE]`."""

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def chunk(text: str, finish: str | None, **extra) -> str:
            return event({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                          "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]} | extra)

        gen = self.engine.stream(plan, cache, req)
        n = 0
        yield chunk("", None, cache_aug=response_meta(plan, req))
        try:
            while True:
                done, value = await asyncio.to_thread(_next, gen)
                if done:
                    yield chunk("", value)
                    break
                delta, token = value
                n += token >= 0
                if delta:
                    yield chunk(delta, None)
        except Exception as e:  # the status line is already sent: report in-band  # noqa: BLE001
            yield event(error_body(500, f"{type(e).__name__}: {e}"))
            return
        if req.include_usage:
            yield event({"id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": [],
                         "usage": self._usage(req, n)})
        yield "data: [DONE]\n\n"


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
                                    max_queued_requests=s.max_queued_requests).bind(to_dict(cfg))


def serve_job(config: str | None, overrides: list[str], host: str = "127.0.0.1", port: int = 8000,
              num_cpus: int | None = None) -> None:
    """Run the endpoint on the cluster named by RAY_ADDRESS (or a local one) until interrupted."""
    from cache_aug.tiny import build_if_embedded
    from pipelines.ray_session import init_ray

    # here, before any replica loads it: loading never builds
    build_if_embedded(load_job_config(_config_source(config), overrides=list(overrides)).model.path)
    init_ray(num_cpus)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({"config": config, "overrides": overrides}), name="cache-aug", route_prefix="/", blocking=True)
