"""Serve batching: the replica's two decoding engines side by side, in one run, at rising client counts.

    python -m bench.serve_batching [--docs 8] [--doc-tokens 200] [--max-tokens 16] [--seconds 15] [--levels 1,4,16,64]

Local Ray (2 CPUs), the embedded tiny-kjv decoder and a fresh coprocessor; the corpus job writes latent_kv
caches for --docs KJV chapters (cut to --doc-tokens) to a local directory, and each document's answer is
decoded offline first (greedy, temperature 0). Then, for each engine - `serve.batching: false` (the
sequential engine: each request decoded alone in asyncio's thread pool) and `serve.batching: true` (continuous
batching: one decode loop per replica, every running sequence advances in one forward per step) - one
replica (1 CPU, 1 torch thread) is deployed with the same settings (max_ongoing_requests and
max_running_sequences 64, an LRU that holds every document, a TTL longer than the run: the comparison is
decoding, not storage reads), warmed up (each document once, plain and streamed, checked), and loaded at
each --levels client count for --seconds: every client loops over streamed requests for stored documents
(rotating over them), each on its own requests.Session.

Per engine and level: requests/s and completion tokens/s (of correct answers; tokens counted from the
offline answer), p50/p99 latency, p50 time to first token (the first chunk whose text is non-empty),
wrong answers (streamed text != offline text), errors by kind (non-200 status, broken or truncated
streams, client exceptions), and for the batched engine the mean sequences per decode step (from
/healthz). A "goals" block is computed from the same run: batched/sequential requests/s at 16 clients
(goal >= 5), batched/sequential p50 time to first token at 1 client (goal <= 1.2), and no wrong answer.
Before Serve starts, "engine_only" times the two engines without HTTP, in this process, on the same
sequences (what the decode loop itself gains, apart from the HTTP path both engines share).
Writes bench/results/serve_batching.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import requests

ENGINES = (("sequential", False), ("batched", True))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def complete(session: requests.Session, url: str, body: dict) -> tuple[int | str, str | None, list[int] | None, str]:
    """(status, source, token_ids, text) of one plain (not streamed) completion."""
    with session.post(f"{url}/v1/completions", json=body | {"stream": False}, timeout=120) as r:
        if r.status_code != 200:
            return r.status_code, None, None, ""
        out = r.json()
        return 200, out["cache_aug"]["source"], out["cache_aug"]["token_ids"], out["choices"][0]["text"]


def stream(session: requests.Session, url: str, body: dict) -> tuple[int | str, str | None, str, float | None,
                                                                        str | None]:
    """(status, source, text, seconds to the first chunk with non-empty text, transfer-encoding) of one
    streamed completion."""
    t0 = time.perf_counter()
    with session.post(f"{url}/v1/completions", json=body | {"stream": True}, stream=True, timeout=120) as r:
        if r.status_code != 200:
            return r.status_code, None, "", None, None
        encoding = r.headers.get("transfer-encoding")
        source, text, ttft, done = None, [], None, False
        # chunk_size=None: each HTTP chunk as it arrives (the response is chunked; the warm-up checks that)
        for line in r.iter_lines(chunk_size=None):
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return "stream_error", source, "", ttft, encoding
            source = source or chunk.get("cache_aug", {}).get("source")
            piece = chunk["choices"][0]["text"] if chunk.get("choices") else ""
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text.append(piece or "")
        return (200 if done else "truncated_stream"), source, "".join(text), ttft, encoding


def explain(goals: dict, engine_only: dict) -> None:
    """Put the decode loop's own ratio at 16 sequences (no HTTP) beside the end-to-end one: what the HTTP path
    both engines share takes away."""
    rps = goals["rps_batched_over_sequential_16_clients"]
    alone = engine_only.get("16", {}).get("batched_over_sequential")
    rps["engine_only_ratio"] = alone
    if not rps["met"] and alone is not None:
        rps["why"] = (f"the decode loop alone is {alone:.2f}x the sequential engine at 16 sequences; end to end the "
                      "HTTP path that both engines share (Serve's proxy, the replica's ASGI app, a streamed chunk per "
                      "step, the clients) runs on the same 2 cores and caps the batched engine's requests/s")


def engine_alone(corpus, prompt_ids: list[int], max_tokens: int, levels: list[int], want: dict) -> dict:
    """The two engines without HTTP, in this process (1 torch thread, as a replica): for each level, that many
    sequences (stored caches, greedy) decoded one after another alone (`run_alone`), then all in one batch
    (`DecodeBatch`, every sequence admitted at once, stepped to the end). Best of 3 each; answers checked."""
    import torch

    from cache_aug.batching import DecodeBatch, Sequence, run_alone
    from cache_aug.engine import CompletionEngine, CompletionRequest

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = CompletionEngine(corpus.decoder, None, "", corpus.cfg.serve)
    stops = engine.stop_token_ids()
    caches = corpus.caches()
    req = CompletionRequest("cache-aug", [prompt_ids], max_tokens)
    out = {}
    try:
        for n in levels:
            docs = [corpus.stored[i % len(corpus.stored)] for i in range(n)]

            def sequences(got, docs=docs):
                return [Sequence(caches[d], prompt_ids, req.sampling(0, stops),
                                 lambda e, i=i: got[i].append(e.token) and False, lambda *_: None)
                        for i, d in enumerate(docs)]

            timings = {"sequential": [], "batched": []}
            for _ in range(3):
                for name in timings:
                    got = [[] for _ in docs]
                    t0 = time.perf_counter()
                    if name == "sequential":
                        for seq in sequences(got):
                            run_alone(corpus.decoder, [seq])
                    else:
                        batch = DecodeBatch(corpus.decoder)
                        batch.admit(sequences(got))
                        while batch.rows:
                            batch.step()
                    timings[name].append(time.perf_counter() - t0)
                    assert all(g == want[d] for g, d in zip(got, docs, strict=True)), (name, n)
            tokens = sum(len(want[d]) for d in docs)
            best = {k: min(v) for k, v in timings.items()}
            out[str(n)] = {f"{k}_tokens_per_s": tokens / t for k, t in best.items()} | {
                "batched_over_sequential": best["sequential"] / best["batched"], "tokens": tokens}
            print(json.dumps({"engine_only": {n: out[str(n)]}}), flush=True)
    finally:
        torch.set_num_threads(threads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=8, help="documents with a stored cache")
    ap.add_argument("--doc-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0, help="load per engine and client count")
    ap.add_argument("--levels", default="1,4,16,64", help="client counts, comma-separated")
    ap.add_argument("--max-ongoing", type=int, default=64,
                    help="serve.max_ongoing_requests and serve.max_running_sequences, both engines")
    ap.add_argument("--n-latents", type=int, default=8)
    ap.add_argument("--port", type=int, default=8131)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    run_t0 = time.perf_counter()

    import ray
    from ray import serve

    from bench.stored_corpus import stored_corpus
    from cache_aug.config import to_dict
    from pipelines.config import load_job_config
    from pipelines.serve import CompletionServer

    corpus = stored_corpus("bench-serve-batching-", n_latents=args.n_latents, doc_tokens=args.doc_tokens,
                       stored=args.docs)
    base, tok, ids = corpus.base, corpus.decoder.tokenizer, corpus.stored
    prompt = " And the LORD said"
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    want, want_text = corpus.answers(prompt_ids, args.max_tokens)
    setup_s = time.perf_counter() - run_t0
    engine_only = engine_alone(corpus, prompt_ids, args.max_tokens, levels, want)

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    serve_settings = [f"serve.max_tokens={args.max_tokens}", f"serve.max_prompt_tokens={len(prompt_ids) + 8}",
                      f"serve.cache_entries={max(64, len(ids))}", "serve.cache_ttl_s=86400",
                      f"serve.max_ongoing_requests={args.max_ongoing}",
                      f"serve.max_running_sequences={args.max_ongoing}"]

    def body(doc: str) -> dict:
        return {"model": "cache-aug", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                "document_id": doc}

    def health() -> dict:
        return requests.get(f"{url}/healthz", timeout=60).json()

    def run_level(clients: int) -> dict:
        lats: list[float] = []
        ttfts: list[float] = []
        tokens = [0]
        errors: dict[str, int] = {}
        wrong: list[str] = []
        not_stored = [0]
        lock = threading.Lock()
        stop = threading.Event()

        def client(k: int) -> None:
            i = k
            with requests.Session() as s:
                while not stop.is_set():
                    doc = ids[i % len(ids)]
                    i += clients
                    t = time.perf_counter()
                    try:
                        status, source, text, ttft, _ = stream(s, url, body(doc))
                    except requests.RequestException as e:
                        status, source, text, ttft = type(e).__name__, None, "", None
                    except Exception as e:  # noqa: BLE001 - a malformed stream is an error of the run, not a crash
                        status, source, text, ttft = f"client_{type(e).__name__}", None, "", None
                    dt = time.perf_counter() - t
                    with lock:
                        if status != 200:
                            errors[str(status)] = errors.get(str(status), 0) + 1
                        elif text != want_text[doc]:
                            wrong.append(doc)
                        else:
                            if source != "stored":
                                not_stored[0] += 1
                            lats.append(dt)
                            tokens[0] += len(want[doc])
                            if ttft is not None:
                                ttfts.append(ttft)

        before = health()
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        time.sleep(args.seconds)
        stop.set()
        for th in threads:
            th.join(max(1.0, 180 - (time.perf_counter() - t0 - args.seconds)))
        wall = time.perf_counter() - t0
        hung = sum(th.is_alive() for th in threads)
        after = health()
        with lock:
            n_err = sum(errors.values())
            out = {
                "clients": clients,
                "seconds": wall,
                "requests": len(lats) + n_err + len(wrong),
                "ok": len(lats),
                "rps": len(lats) / wall,
                "tokens_per_s": tokens[0] / wall,
                "p50_s": pct(lats, 0.5),
                "p99_s": pct(lats, 0.99),
                "p50_ttft_s": pct(ttfts, 0.5),
                "ttft_measured": len(ttfts),
                "wrong_answers": len(wrong),
                "errors": n_err,
                "errors_by_kind": dict(errors),
                "source_not_stored": not_stored[0],
                "clients_hung": hung,
            }
        dec0, dec1 = before["decoding"], after["decoding"]
        if "steps" in dec1:
            steps = dec1["steps"] - dec0["steps"]
            out["decode_steps"] = steps
            out["sequences_per_step"] = (dec1["tokens"] - dec0["tokens"]) / steps if steps else None
            out["decoding_after"] = {k: dec1[k] for k in ("running", "waiting")}
        out["served"] = {k: v - before["served"].get(k, 0) for k, v in after["served"].items()}
        out["lru_misses"] = after["lru"]["misses"] - before["lru"]["misses"]
        print(json.dumps({"level": out}), flush=True)
        return out

    engines: dict[str, dict] = {}
    try:
        for name, batching in ENGINES:
            c = load_job_config(None, overrides=base + serve_settings + [f"serve.batching={str(batching).lower()}"])
            sc = c.serve
            t_deploy = time.perf_counter()
            serve.run(CompletionServer.options(ray_actor_options={"num_cpus": 1},
                                               max_ongoing_requests=sc.max_ongoing_requests,
                                               max_queued_requests=sc.max_queued_requests,
                                               graceful_shutdown_timeout_s=5).bind(to_dict(c)),
                      name="cache-aug", route_prefix="/")
            deploy_s = time.perf_counter() - t_deploy
            dec = health()["decoding"]
            assert ("steps" in dec) == batching, (name, dec)
            with requests.Session() as sess:  # warm-up: every document once, plain and streamed, checked
                for d in ids:
                    status, source, got, _ = complete(sess, url, body(d))
                    assert status == 200 and source == "stored" and got == want[d], (name, d, status, source)
                    status, source, text, _, encoding = stream(sess, url, body(d))
                    assert status == 200 and source == "stored" and text == want_text[d], (name, d, status, source)
                    assert encoding == "chunked", encoding  # else iter_lines(chunk_size=None) waits for the end
            engines[name] = {"batching": batching, "deploy_s": deploy_s,
                             "levels": {str(n): run_level(n) for n in levels}}
            serve.delete("cache-aug")
    finally:
        serve.shutdown()
        ray.shutdown()

    def level(engine: str, n: int) -> dict:
        return engines[engine]["levels"].get(str(n), {})

    def ratio(key: str, n: int) -> dict:
        b, s = level("batched", n).get(key), level("sequential", n).get(key)
        return {"batched": b, "sequential": s, "ratio": b / s if b is not None and s else None}

    rps16 = ratio("rps", 16)
    ttft1 = ratio("p50_ttft_s", 1)
    total_wrong = sum(lv["wrong_answers"] for e in engines.values() for lv in e["levels"].values())
    goals = {
        "rps_batched_over_sequential_16_clients": rps16 | {
            "goal": ">= 5", "met": rps16["ratio"] is not None and rps16["ratio"] >= 5},
        "p50_ttft_batched_over_sequential_1_client": ttft1 | {
            "goal": "<= 1.2", "met": ttft1["ratio"] is not None and ttft1["ratio"] <= 1.2},
        "wrong_answers": {"total": total_wrong, "goal": "== 0", "met": total_wrong == 0},
    }
    explain(goals, engine_only)
    result = {
        "bench": "serve_batching",
        "decoder": "tiny-kjv",
        "settings": {
            "docs": len(ids), "doc_tokens": args.doc_tokens, "max_tokens": args.max_tokens,
            "seconds_per_level": args.seconds, "levels": levels, "n_latents": args.n_latents,
            "max_ongoing_requests": args.max_ongoing, "max_running_sequences": args.max_ongoing,
            "max_queued_requests": sc.max_queued_requests, "max_batched_tokens": sc.max_batched_tokens,
            "cache_entries": sc.cache_entries, "cache_ttl_s": sc.cache_ttl_s, "prompt": prompt,
            "completion_tokens_mean": statistics.mean(len(v) for v in want.values()),
        },
        "engines": engines,
        "engine_only": engine_only,
        "goals": goals,
        "setup_s": setup_s,
        "wall_s": time.perf_counter() - run_t0,
        "setup": ("local Ray, 2 CPUs shared with other work; one replica per engine (1 CPU, 1 torch thread, same "
                  "settings), deployed in turn (sequential first); loopback HTTP; every request streamed, for a "
                  "stored document (LRU holds all, warmed up); clients in this process, one requests.Session "
                  "each; every answer checked against offline greedy decoding"),
    }
    from bench.results_io import write_result

    write_result("serve_batching", result)


if __name__ == "__main__":
    main()
