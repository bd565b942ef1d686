"""Corpus job throughput vs a bare in-process loop, and bytes per document per storage mode.

    python -m bench.augment [--docs 300] [--max-tokens 512]

Same decoder (tiny-kjv), same coprocessor, same documents, same run: the Ray Data job (one
actor, 1 CPU, on a 2-CPU local cluster) against a plain loop that prepares, augments (same
length-sorted batches) and encodes records in this process with one thread. Writes
bench/results/augment.json with {"ray_vs_bare", "docs_per_s", "bytes_per_doc", ...}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bench.results_io import write_result



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--augment-batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import ray

    from cache_aug.augment import augment
    from cache_aug.config import load_config
    from cache_aug.coprocessor import build_latent_module, latent_fingerprint, save_latent_module
    from cache_aug.corpus import ensure_embedded_corpus
    from cache_aug.decoder import load_decoder
    from cache_aug.documents import prepare_document
    from cache_aug.records import encode_record
    from pipelines.corpus import run_corpus_job

    work = Path(tempfile.mkdtemp(prefix="bench-augment-"))
    table = pq.read_table(ensure_embedded_corpus("kjv") / "train.parquet").slice(0, args.docs)
    (work / "in").mkdir()
    pq.write_table(table, work / "in" / "docs.parquet")
    base = [f"corpus.input_paths=[{work / 'in'}]", f"corpus.max_tokens={args.max_tokens}", "corpus.truncate=true",
            f"corpus.batch_size={args.batch_size}", f"corpus.augment_batch_size={args.augment_batch_size}", "augmentation.n_latents=8"]
    cfg = load_config(None, overrides=base)
    decoder = load_decoder(cfg.model)
    module = build_latent_module(decoder, cfg.coprocessor, cfg.augmentation.n_latents).eval()
    save_latent_module(module, decoder, work / "cop")
    fp = latent_fingerprint(decoder, module)

    # bare loop: the same work as the job's actor, in this process
    t = time.perf_counter()
    docs = [prepare_document(r["doc_id"], r["text"], decoder.tokenizer, max_tokens=args.max_tokens, truncate=True) for r in table.to_pylist()]
    tokens = sum(len(d.input_ids) for d in docs)
    for start in range(0, len(docs), args.batch_size):
        batch = sorted(docs[start : start + args.batch_size], key=lambda d: len(d.input_ids))
        for i in range(0, len(batch), args.augment_batch_size):
            chunk = batch[i : i + args.augment_batch_size]
            for d, aug in zip(chunk, augment(decoder, module, [d.input_ids for d in chunk])):
                encode_record(aug, doc_id=d.doc_id, fingerprint=fp, mode=cfg.storage.mode, dtype=cfg.storage.dtype,
                              spec=decoder.cache_spec, content_sha256=d.content_sha256, truncated=d.truncated)
    bare_s = time.perf_counter() - t

    # bytes per document for each mode, on the same documents
    sample = docs[:32]
    augs = augment(decoder, module, [d.input_ids for d in sample])
    bytes_per_doc = {
        mode: sum(len(encode_record(a, doc_id=d.doc_id, fingerprint=fp, mode=mode, dtype="bfloat16", spec=decoder.cache_spec).payload)
                  for d, a in zip(sample, augs)) / len(sample)
        for mode in ("latents", "latent_kv", "full")
    }

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    job_cfg = load_config(None, overrides=base + [f"corpus.output={work / 'out'}", f"corpus.coprocessor={work / 'cop'}"])
    t = time.perf_counter()
    manifest = run_corpus_job(job_cfg)
    ray_s = time.perf_counter() - t
    ray.shutdown()
    assert manifest["counts"]["written"] == args.docs

    result = {
        "bench": "augment",
        "decoder": "tiny-kjv",
        "docs": args.docs,
        "tokens": tokens,
        "max_tokens": args.max_tokens,
        "storage": {"mode": cfg.storage.mode, "dtype": cfg.storage.dtype},
        "bare_s": bare_s,
        "ray_job_s": ray_s,
        "docs_per_s": args.docs / ray_s,
        "tokens_per_s": tokens / ray_s,
        "bare_docs_per_s": args.docs / bare_s,
        "bare_tokens_per_s": tokens / bare_s,
        "ray_vs_bare": bare_s / ray_s,
        "ray_phases_s": manifest["phases"],
        "bytes_per_doc": bytes_per_doc,
        "setup": "Ray: local cluster with 2 CPUs, 1 augmentation actor (1 CPU, 1 torch thread); bare: 1 thread, same batches",
    }
    write_result("augment", result)


if __name__ == "__main__":
    main()
