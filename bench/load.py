"""Load and soak: concurrent clients against the Serve endpoint on loopback, every answer checked.

    python -m bench.load [--clients 16] [--seconds 60] [--docs 12] [--missing 6] [--cache-entries 6]

Local Ray (2 CPUs), the embedded tiny-kjv decoder and a coprocessor; the corpus job writes latent_kv caches
for --docs KJV chapters (cut to --doc-tokens) to a local directory, and --missing more chapters are added to
the corpus afterwards (no record: augmented online, their text found by id). One replica (1 CPU) whose LRU
holds --cache-entries caches, fewer than the distinct documents, so it evicts all the time.

Each client loops for --seconds over a rotation of request kinds: stored, stored streamed, online, online
streamed. Every 200 is checked against offline greedy decoding of its document (temperature 0): the
token ids of a plain response, the text of a streamed one. A refused or failed request is an error; a
200 with another answer is a wrong answer. A sampler reads /healthz (LRU entries and bytes) and the
replica process's RSS once a second. --replica-env sets the replica's environment (e.g. glibc malloc
settings, to tell allocator growth from a leak). Writes bench/results/<--out>.json (load.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import requests

KINDS = ("stored", "stored_stream", "online", "online_stream")
REPLICA_TITLE = "ServeReplica:cache-aug:CompletionServer"


def replica_pid() -> int:
    """The Serve replica of the local cluster this process started (its descendant)."""
    import psutil

    pids = [p.pid for p in psutil.Process().children(recursive=True) if REPLICA_TITLE in " ".join(_cmdline(p))]
    assert len(pids) == 1, pids
    return pids[0]


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except psutil.Error:
        return []


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def complete(session: requests.Session, url: str, body: dict) -> tuple[int | str, str | None, list[int] | None, str]:
    """(status, source, token_ids or None, text) of one completion, streamed or not."""
    stream = body.get("stream", False)
    with session.post(f"{url}/v1/completions", json=body, stream=stream, timeout=120) as r:
        if r.status_code != 200:
            return r.status_code, None, None, ""
        if not stream:
            out = r.json()
            return 200, out["cache_aug"]["source"], out["cache_aug"]["token_ids"], out["choices"][0]["text"]
        source, text, done = None, [], False
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return "stream_error", source, None, ""
            source = source or chunk.get("cache_aug", {}).get("source")
            text.append(chunk["choices"][0]["text"] if chunk.get("choices") else "")
        return (200 if done else "truncated_stream"), source, None, "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--docs", type=int, default=12, help="documents with a stored cache")
    ap.add_argument("--missing", type=int, default=6, help="documents without one (augmented online)")
    ap.add_argument("--doc-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--cache-entries", type=int, default=6,
                    help="the replica's LRU limit (below the distinct documents)")
    ap.add_argument("--n-latents", type=int, default=8)
    ap.add_argument("--replica-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable of the replica's process (repeatable), e.g. malloc settings")
    ap.add_argument("--out", default="load", help="result name under bench/results/")
    args = ap.parse_args()
    assert args.cache_entries < args.docs + args.missing, "the LRU must be smaller than the working set"

    import ray
    from ray import serve

    from bench.stored_corpus import stored_corpus
    from cache_aug.config import to_dict
    from pipelines.config import load_job_config
    from pipelines.serve import CompletionServer

    corpus = stored_corpus("bench-load-", n_latents=args.n_latents, doc_tokens=args.doc_tokens, stored=args.docs,
                       extra=args.missing)
    base, tok = corpus.base, corpus.decoder.tokenizer
    stored_ids, online_ids = corpus.stored, corpus.extra
    ids = stored_ids + online_ids
    prompt = " And the LORD said"
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    want, want_text = corpus.answers(prompt_ids, args.max_tokens)

    port = 8124
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    c = load_job_config(None, overrides=base + [f"serve.cache_entries={args.cache_entries}",
                                                f"serve.max_tokens={args.max_tokens}",
                                            f"serve.max_prompt_tokens={len(prompt_ids) + 8}"])
    env = dict(kv.split("=", 1) for kv in args.replica_env)
    actor = {"num_cpus": 1} | ({"runtime_env": {"env_vars": env}} if env else {})
    serve.run(CompletionServer.options(ray_actor_options=actor).bind(to_dict(c)), name="cache-aug",
              route_prefix="/")
    pid = replica_pid()

    def body(kind: str, doc: str) -> dict:
        return {"model": "cache-aug", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                "document_id": doc, "stream": kind.endswith("_stream")}

    with requests.Session() as s:  # warm-up: every document once, so the start RSS includes a full LRU
        for d in ids:
            status, source, got, text = complete(s, url, body("stored" if d in want else "online", d))
            assert status == 200 and got == want[d], (d, status, source)
    rss_start = rss(pid)

    lats: dict[str, list[float]] = {k: [] for k in KINDS}
    errors: dict[str, int] = {}
    wrong: list[tuple[str, str]] = []
    samples: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        i = k
        with requests.Session() as s:
            while not stop.is_set():
                kind = KINDS[i % len(KINDS)]
                pool = stored_ids if kind.startswith("stored") else online_ids
                doc = pool[(i // len(KINDS)) % len(pool)]
                t = time.perf_counter()
                try:
                    status, source, got, text = complete(s, url, body(kind, doc))
                except requests.RequestException as e:
                    status, source, got, text = type(e).__name__, None, None, ""
                dt = time.perf_counter() - t
                with lock:
                    if status != 200:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                    elif source != kind.split("_")[0] or (got if got is not None else text) != (
                        want[doc] if got is not None else want_text[doc]):
                        wrong.append((kind, doc))
                    else:
                        lats[kind].append(dt)
                i += args.clients

    def sampler() -> None:
        t0 = time.perf_counter()
        while not stop.wait(1.0):
            try:
                lru = requests.get(f"{url}/healthz", timeout=10).json()["lru"]
                samples.append({"t": time.perf_counter() - t0, "rss": rss(pid)} | lru)
            except requests.RequestException:
                pass

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    mon = threading.Thread(target=sampler, daemon=True)
    t0 = time.perf_counter()
    for th in [*threads, mon]:
        th.start()
    time.sleep(args.seconds)
    stop.set()
    for th in [*threads, mon]:
        th.join(150)
    wall = time.perf_counter() - t0
    assert not any(th.is_alive() for th in threads), "clients still hanging 150 s after the end"
    health = requests.get(f"{url}/healthz", timeout=30).json()
    rss_end = rss(pid)
    assert replica_pid() == pid, "the replica was restarted during the run"
    serve.shutdown()
    ray.shutdown()

    every = [x for v in lats.values() for x in v]
    n_err = sum(errors.values())
    quarter = len(samples) // 4
    result = {
        "bench": "load",
        "decoder": "tiny-kjv",
        "clients": args.clients,
        "seconds": wall,
        "requests": len(every) + n_err + len(wrong),
        "ok": len(every),
        "errors": n_err,
        "errors_by_kind": errors,
        "wrong_answers": len(wrong),
        "p50_s": pct(every, 0.5) if every else None,
        "p99_s": pct(every, 0.99) if every else None,
        "rps": len(every) / wall,
        "p50_s_by_kind": {k: statistics.median(v) if v else None for k, v in lats.items()},
        "requests_by_kind": {k: len(v) for k, v in lats.items()},
        "rss_start": rss_start,
        "rss_end": rss_end,
        "rss_growth_mb": (rss_end - rss_start) / 2**20,
        # growth across the run: mean RSS of the first and last quarter of the once-a-second samples
        "rss_first_quarter_mean": statistics.mean(s["rss"] for s in samples[:quarter]) if quarter else None,
        "rss_last_quarter_mean": statistics.mean(s["rss"] for s in samples[-quarter:]) if quarter else None,
        "rss_max": max((s["rss"] for s in samples), default=None),
        # the trend: mean RSS (MB) of each tenth of the run
        "rss_mb_by_tenth": [statistics.mean(s["rss"] for s in part) / 2**20
                            for part in (samples[i * len(samples) // 10 : (i + 1) * len(samples) // 10]
                                         for i in range(10)) if part],
        "replica_env": env,
        "lru_limit_entries": args.cache_entries,
        "lru_max_entries": max((s["entries"] for s in samples), default=None),
        "lru_max_bytes": max((s["bytes"] for s in samples), default=None),
        "lru_end": health["lru"],
        "lru_holds_limit": (all(s["entries"] <= args.cache_entries for s in samples)
                            and health["lru"]["entries"] <= args.cache_entries),
        "served": health["served"],
        "distinct_documents": len(ids),
        "doc_tokens": args.doc_tokens,
        "max_tokens": args.max_tokens,
        "n_latents": args.n_latents,
        "setup": ("local Ray, 2 CPUs shared with other work; one replica (1 CPU, 1 torch thread, the deployment's "
                  "defaults: max_ongoing_requests 32, max_queued_requests 128, continuous batching); loopback HTTP; "
                  "kinds rotate stored / stored streamed / online / online streamed; LRU smaller than the working set; "
                  "every answer checked against offline greedy decoding"),
    }
    from bench.results_io import write_result

    write_result(args.out, result)
    assert result["wrong_answers"] == 0 and result["lru_holds_limit"], "wrong answers or the LRU over its limit"


if __name__ == "__main__":
    main()
