"""The whole system once, on the embedded default: train -> augment a corpus -> serve -> ask.

    cache-aug demo                                  # local storage under runs/demo
    cache-aug demo --storage s3://bucket/demo       # the same with every artefact on S3

Steps (each prints its progress): build or reuse the tiny decoder, here on the driver (the Ray workers only
load it); start a local Ray cluster; train a coprocessor with Ray Train + DeepSpeed (loss lines, held-out
evaluation); precompute augmented caches for a few held-out chapters with the Ray Data job; start the Serve
endpoint on loopback; send real HTTP requests for one chapter with and without its augmented cache; print both
answers and the held-out perplexity with and without augmentation; stop Serve and Ray.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray

from pipelines.ray_session import init_ray

REPO = Path(__file__).resolve().parents[1]


def _say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def run_demo(storage: str = "runs/demo", steps: int = 120, docs: int = 24, port: int = 8000, num_cpus: int | None = 2,
             overrides: list[str] | None = None) -> dict:
    """Run every stage once; returns what it measured (also printed)."""
    import requests
    from ray import serve

    from cache_aug.config import dump_config, to_dict
    from cache_aug.corpus import ensure_embedded_corpus
    from cache_aug.tiny import build_if_embedded
    from pipelines.config import load_job_config
    from pipelines.corpus import run_corpus_job
    from pipelines.serve import CompletionServer
    from pipelines.storage import resolve
    from pipelines.train import run_training

    t_start = time.time()
    storage = storage.rstrip("/")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    run = time.strftime("demo-%Y%m%dT%H%M%S")  # a fresh run each time (the same name would resume the finished one)
    cfg = load_job_config(REPO / "jobs/configs/tiny_cpu.yaml", overrides=[
        f"train.storage_path={storage}/train", f"train.run_name={run}", f"optim.max_steps={steps}",
        f"optim.warmup_steps={min(50, steps // 10)}", f"train.checkpoint_every={steps}",
        f"train.eval_every={max(1, steps // 2)}",
        f"corpus.input_paths=[{storage}/corpus/]", f"corpus.output={storage}/caches",
        f"corpus.coprocessor={storage}/train/{run}/export",
        "corpus.max_tokens=2048", "corpus.truncate=true", "serve.max_prompt_tokens=2304", *(overrides or [])])
    print(dump_config(cfg), flush=True)
    _say(f"1/6 the decoder ({cfg.model.path}): an embedded one is built here once (tiny-kjv: about 11 min on 2 cores, "
         "20 on one), then reused; the Ray workers below only load it")
    print(build_if_embedded(cfg.model.path) or cfg.model.path, flush=True)

    _say(f"2/6 local Ray cluster ({num_cpus or 'all'} CPUs)")
    init_ray(num_cpus, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        _say(f"3/6 train a coprocessor: Ray Train + DeepSpeed, {cfg.train.num_workers} workers, {steps} steps")
        result = run_training(cfg)
        m = result.metrics
        print(f"[demo] held-out ahead-token perplexity: none {m['eval_ppl_none']:.2f}, augmented {m['eval_ppl']:.2f}",
              flush=True)

        _say(f"4/6 precompute augmented caches for {docs} held-out chapters: Ray Data job")
        chapters = pq.read_table(ensure_embedded_corpus("kjv") / "heldout.parquet").slice(0, docs)
        fs, target = resolve(f"{storage}/corpus/docs.parquet", cfg.s3)
        if fs is None:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            pq.write_table(chapters, target)
        else:
            with fs.open_output_stream(target) as f:
                pq.write_table(chapters, f)
        manifest = run_corpus_job(cfg)

        _say(f"5/6 Serve endpoint on http://127.0.0.1:{port}")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(CompletionServer.options(ray_actor_options={"num_cpus": 0.5}).bind(to_dict(cfg)), name="cache-aug",
                  route_prefix="/")

        _say("6/6 ask: the next words of a chapter, with its stored augmented cache and without")
        row = chapters.slice(0, 1).to_pylist()[0]
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": cfg.serve.model_name, "max_tokens": 24, "temperature": 0}
        with_cache = requests.post(url, json=body | {"prompt": "", "document_id": row["doc_id"]}, timeout=300).json()
        plain = requests.post(url, json=body | {"prompt": row["text"]}, timeout=300).json()
        gain = 1 - m["eval_ppl"] / m["eval_ppl_none"]
        summary = {
            "ppl": {"none": m["eval_ppl_none"], "augmented": m["eval_ppl"]},
            "relative_ppl_reduction": gain,
            "corpus_counts": manifest["counts"],
            "answer": {"stored": with_cache["choices"][0]["text"], "plain": plain["choices"][0]["text"]},
            "sources": {"stored": with_cache["cache_aug"]["source"], "plain": plain["cache_aug"]["source"]},
            "storage": storage,
            "seconds": time.time() - t_start,
        }
        print(json.dumps(summary, indent=2), flush=True)
    finally:
        _say("stopping Serve and Ray")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    # the results last, after every log line of the cluster, where a reader of a log file looks first
    rule = "=" * 100
    print(f"\n{rule}\n[demo] RESULTS ({summary['seconds']:.0f} s in all; artefacts under {storage})\n{rule}")
    print(f"[demo] document {row['doc_id']!r} ends: ...{row['text'][-120:]!r}")
    print(f"[demo] with its augmented cache ({summary['sources']['stored']}): {summary['answer']['stored']!r}")
    print(f"[demo] plain decoding            ({summary['sources']['plain']}): {summary['answer']['plain']!r}")
    print(f"[demo] corpus job: {summary['corpus_counts']}")
    print(f"[demo] held-out ahead-token perplexity: none {m['eval_ppl_none']:.2f}, augmented {m['eval_ppl']:.2f} "
          f"({100 * -gain:+.1f}%; lower is better)\n{rule}", flush=True)
    return summary


if __name__ == "__main__":
    run_demo()
