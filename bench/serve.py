"""Serve endpoint latency: stored cache vs plain decoding vs online augmentation, side by side in one run.

    python -m bench.serve [--docs 24] [--doc-tokens 1000] [--max-tokens 16] [--clients 8] [--load-s 30]
                          [--ingress both|haproxy|proxy] [--config JOB.yaml --name NAME]

    # a real model (bench/results/real_model.json): SmolLM2-135M, its LoRA kv coprocessor's settings
    python -m bench.serve --config jobs/configs/smollm2_cpu.yaml --name real_model --ingress haproxy \
                          --docs 6 --max-tokens 8 --load-s 0

Local Ray (2 CPUs), the embedded tiny-kjv decoder and a coprocessor, KJV chapters cut to ~1,000 tokens,
caches written by the corpus job (latent_kv and full modes). Requests go over loopback HTTP with
streaming, so time to first token (TTFT) is the first text chunk. Every request names a different
document than the last of its kind and the replica's LRU is off (cache_ttl_s=0): stored means
read + check + restore each time, the cold path. Conditions rotate request by request:

    stored   document_id with a record (latent_kv: prefill the document + append the latents' KV;
             ttft_s is this default mode, full_1k_ttft_s the `full` mode)
    plain    the document's text + prompt as a plain prompt: what a server without augmentation does
    online   document_id with no record + the text in `document`: augmented on the request path
    full     document_id with a `full`-mode record (nothing recomputed), against `plain` for the same text

Then 8 concurrent clients send stored requests for --load-s seconds: p50/p99 latency, requests/s,
errors. Writes bench/results/serve.json.

Everything above runs once per HTTP ingress, each on its own fresh local Ray (the ingress is chosen when
Serve starts):
    haproxy  Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1, the binary comes with ray[serve]):
             requests go straight to the replica's own HTTP port. The shipped RayService uses it.
    proxy    Serve's default Python proxy actor, one more hop (and process) on every request and chunk.
The top-level numbers are the haproxy run's; `by_ingress` holds both. Ratios are only taken within a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests


def stream_once(url: str, body: dict) -> tuple[float, float, str, str]:
    """(ttft_s, total_s, text, source) of one streamed completion."""
    t0 = time.perf_counter()
    ttft, text, source = None, [], None
    with requests.post(f"{url}/v1/completions", json=body | {"stream": True}, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            source = source or chunk.get("cache_aug", {}).get("source")
            piece = chunk["choices"][0]["text"] if chunk.get("choices") else ""
            if ttft is None and (piece or chunk["choices"] and chunk["choices"][0]["finish_reason"]):
                ttft = time.perf_counter() - t0
            text.append(piece)
    return ttft, time.perf_counter() - t0, "".join(text), source


def _payload_bytes(root: Path) -> dict:
    """Mean and max payload bytes of the records the corpus job wrote under `root` (the Parquet file sizes too)."""
    import pyarrow.parquet as pq

    sizes, files = [], 0
    for path in root.rglob("*.parquet"):
        table = pq.read_table(path)
        if "payload" in table.column_names:
            files += path.stat().st_size
            sizes += [len(b) for b in table.column("payload").to_pylist() if b]
    return {"records": len(sizes), "payload_mean": statistics.mean(sizes) if sizes else 0,
            "payload_max": max(sizes, default=0), "parquet_bytes_per_record": files / len(sizes) if sizes else 0}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=24, help="documents per condition")
    ap.add_argument("--doc-tokens", type=int, default=1000, help="documents are cut to this many tokens")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--load-s", type=float, default=30.0)
    ap.add_argument("--n-latents", type=int, default=8)
    ap.add_argument("--ingress", choices=["both", "haproxy", "proxy"], default="both")
    ap.add_argument("--config", help="a job config whose model, augmentation and coprocessor sections are used "
                    "(default: the embedded tiny-kjv with the default coprocessor)")
    ap.add_argument("--name", default="serve", help="the result's name: bench/results/NAME.json")
    ap.add_argument("--json-out", help=argparse.SUPPRESS)  # one ingress's result, for the `both` parent
    args = ap.parse_args()
    if args.ingress == "both":
        return run_both(args)
    result = measure(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result))
        return
    from bench.results_io import write_result

    write_result(args.name, result)


def run_both(args) -> None:
    """Each ingress in its own process and Ray cluster, one after the other; merged into one result."""
    import os
    import subprocess
    import sys

    runs = {}
    for ingress in ("haproxy", "proxy"):
        out = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "result.json"
        argv = [sys.executable, "-m", "bench.serve", "--ingress", ingress, "--json-out", str(out)]
        for name in ("docs", "doc_tokens", "max_tokens", "clients", "load_s", "n_latents", "config"):
            if getattr(args, name) is not None:
                argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        subprocess.run(argv, check=True, cwd=Path(__file__).resolve().parents[1],
                       env=os.environ | {"RAY_SERVE_ENABLE_HA_PROXY": "1" if ingress == "haproxy" else "0"})
        runs[ingress] = json.loads(out.read_text())
    keys = ("ttft_s", "total_s", "stored_vs_plain_ttft", "online_vs_stored_ttft", "full_1k_ttft_s",
            "full_1k_ttft_speedup", "full_online_vs_stored_ttft", "load", "p50_s", "p99_s", "rps", "errors")
    result = runs["haproxy"] | {"ingress": "haproxy",
                                "by_ingress": {k: {n: v[n] for n in keys} for k, v in runs.items()}}
    from bench.results_io import write_result

    write_result(args.name, result)


def measure(args) -> dict:
    """One ingress, on a Ray started here (Serve reads the switch when it starts)."""
    import os

    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if args.ingress == "haproxy" else "0"

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray import serve

    from cache_aug.config import to_dict
    from cache_aug.coprocessor import build_latent_module, save_latent_module
    from cache_aug.corpus import ensure_embedded_corpus
    from cache_aug.decoder import load_decoder
    from cache_aug.tiny import build_if_embedded
    from pipelines.config import load_job_config
    from pipelines.corpus import run_corpus_job
    from pipelines.serve import CompletionServer

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    base = [f"augmentation.n_latents={args.n_latents}", f"corpus.max_tokens={args.doc_tokens}", "corpus.truncate=true",
            f"corpus.input_paths=[{work / 'in'}]", f"corpus.coprocessor={work / 'cop'}", "storage.dtype=bfloat16"]
    cfg = load_job_config(args.config, overrides=base)
    build_if_embedded(cfg.model.path)  # the explicit build of an embedded decoder: loading never builds
    decoder = load_decoder(cfg.model)
    tok = decoder.tokenizer
    save_latent_module(build_latent_module(decoder, cfg.coprocessor, args.n_latents).eval(), decoder, work / "cop")
    params = sum(p.numel() for p in decoder.model.parameters())

    # the longest chapters, cut to doc_tokens: stored docs, online docs (never stored), load docs
    rows = pq.read_table(ensure_embedded_corpus("kjv") / "train.parquet").to_pylist()
    rows = sorted(rows, key=lambda r: -len(r["text"]))[: 2 * args.docs]
    texts = {r["doc_id"]: tok.decode(tok.encode(r["text"], add_special_tokens=False)[: args.doc_tokens]) for r in rows}
    ids = list(texts)
    stored_ids, online_ids = ids[: args.docs], ids[args.docs :]
    (work / "in").mkdir()
    pq.write_table(pa.table({"doc_id": stored_ids, "text": [texts[i] for i in stored_ids]}),
                   work / "in" / "docs.parquet")
    doc_tokens = statistics.mean(len(tok.encode(texts[i], add_special_tokens=False)) for i in ids)

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    for mode in ("latent_kv", "full"):
        job = load_job_config(args.config, overrides=base + [f"storage.mode={mode}", f"corpus.output={work / mode}"])
        assert run_corpus_job(job)["counts"]["written"] == len(stored_ids)

    port = 8123
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"

    def deploy(mode: str) -> None:
        c = load_job_config(args.config, overrides=base + [f"serve.cache_prefix={work / mode}", "serve.cache_ttl_s=0",
                                                "serve.documents=[]", f"serve.max_prompt_tokens={args.doc_tokens + 64}",
                                                f"serve.max_document_tokens={args.doc_tokens}"])
        serve.run(CompletionServer.options(ray_actor_options={"num_cpus": 1}).bind(to_dict(c)), name="cache-aug",
                  route_prefix="/")

    prompt = " And the LORD said"
    common = {"model": cfg.serve.model_name, "max_tokens": args.max_tokens, "temperature": 0}
    bodies = {
        "stored": lambda i: common | {"prompt": prompt, "document_id": stored_ids[i]},
        "plain": lambda i: common | {"prompt": texts[stored_ids[i]] + prompt},
        "online": lambda i: common | {"prompt": prompt, "document_id": online_ids[i], "document": texts[online_ids[i]]},
    }

    def rounds(mode: str, conditions: list[str]) -> dict[str, list[tuple[float, float]]]:
        deploy(mode)
        for name in conditions:  # warm-up: one request of each kind
            stream_once(url, bodies[name](0))
        out: dict[str, list[tuple[float, float]]] = {n: [] for n in conditions}
        for i in range(1, args.docs):
            for k in range(len(conditions)):  # rotate the order so no condition always goes first
                name = conditions[(i + k) % len(conditions)]
                ttft, total, _, source = stream_once(url, bodies[name](i))
                assert source == ("stored" if name == "stored" else "online" if name == "online" else "none"), (
                    name, source)
                out[name].append((ttft, total))
        return out

    lat = rounds("latent_kv", ["stored", "plain", "online"])
    full = rounds("full", ["stored", "plain", "online"])
    stored_bytes = {mode: _payload_bytes(work / mode) for mode in ("latent_kv", "full")}

    # load: concurrent clients over the stored path (--load-s 0: none)
    if args.load_s > 0:
        deploy("latent_kv")
    lats: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + args.load_s
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal errors
        i = c
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                r = requests.post(f"{url}/v1/completions", json=bodies["stored"](i % args.docs), timeout=300)
                ok = r.status_code == 200 and r.json()["cache_aug"]["source"] == "stored"
            except requests.RequestException:
                ok = False
            with lock:
                if ok:
                    lats.append(time.perf_counter() - t)
                else:
                    errors += 1
            i += args.clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    serve.shutdown()
    ray.shutdown()

    med = lambda xs, j: statistics.median(x[j] for x in xs)  # noqa: E731
    ttft = {name: med(v, 0) for name, v in lat.items()}
    total = {name: med(v, 1) for name, v in lat.items()}
    return {
        "bench": "serve",
        "ingress": args.ingress,
        "decoder": cfg.model.path,
        "decoder_parameters": params,
        "coprocessor": {"mode": cfg.coprocessor.mode, "latent_channel": cfg.coprocessor.latent_channel,
                        "position_rule": cfg.coprocessor.position_rule,
                        "first_ahead_from": cfg.coprocessor.first_ahead_from},
        "storage_dtype": cfg.storage.dtype,
        "bytes_per_document": stored_bytes,
        "doc_tokens_mean": doc_tokens,
        "max_tokens": args.max_tokens,
        "n_latents": args.n_latents,
        "requests_per_condition": args.docs - 1,
        "ttft_s": ttft,
        "total_s": total,
        "stored_vs_plain_ttft": ttft["stored"] / ttft["plain"],
        "online_vs_stored_ttft": ttft["online"] / ttft["stored"],
        "full_1k_ttft_s": {"stored_full": med(full["stored"], 0), "plain": med(full["plain"], 0),
                           "online": med(full["online"], 0)},
        "full_1k_ttft_speedup": med(full["plain"], 0) / med(full["stored"], 0),
        "full_online_vs_stored_ttft": med(full["online"], 0) / med(full["stored"], 0),
        "load": {"clients": args.clients, "seconds": wall, "requests": len(lats)},
        "p50_s": pct(lats, 0.5) if lats else None,
        "p99_s": pct(lats, 0.99) if lats else None,
        "rps": len(lats) / wall,
        "errors": errors,
        "setup": ("local Ray, 2 CPUs; one replica (1 CPU, 1 torch thread); streaming over loopback HTTP; LRU off "
                  "(every stored request reads, checks and restores its record); medians over the requests"),
    }


if __name__ == "__main__":
    main()
