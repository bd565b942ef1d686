"""Corpus job throughput vs a bare in-process loop, and bytes per document per storage mode.

    python -m bench.augment [--docs 1000] [--actors 1 --bare-threads 1] [--name augment]

Same decoder (tiny-kjv), same coprocessor, same documents, same run, both end to end (load the
models, read the corpus, prepare, augment in the same length-sorted batches, encode, write
Parquet): the Ray Data job on a running local cluster against one plain process. Writes
bench/results/<name>.json with {"ray_vs_bare", "docs_per_s", "bytes_per_doc", ...}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bench.results_io import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--augment-batch-size", type=int, default=8)
    ap.add_argument("--actors", type=int, default=1, help="augmentation actors in the Ray job")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--bare-threads", type=int, default=1, help="torch threads of the bare loop")
    ap.add_argument("--name", default="augment", help="results file name under bench/results/")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import ray

    from cache_aug.augment import augment
    from cache_aug.coprocessor import (
        build_latent_module,
        latent_fingerprint,
        load_latent_module,
        save_latent_module,
    )
    from cache_aug.corpus import ensure_embedded_corpus
    from cache_aug.decoder import load_decoder
    from cache_aug.documents import prepare_document
    from cache_aug.records import encode_record, write_records
    from cache_aug.tiny import build_if_embedded
    from pipelines.config import load_job_config
    from pipelines.corpus import run_corpus_job

    work = Path(tempfile.mkdtemp(prefix="bench-augment-"))
    table = pq.read_table(ensure_embedded_corpus("kjv") / "train.parquet").slice(0, args.docs)
    (work / "in").mkdir()
    pq.write_table(table, work / "in" / "docs.parquet")
    base = [f"corpus.input_paths=[{work / 'in'}]", f"corpus.max_tokens={args.max_tokens}", "corpus.truncate=true",
            f"corpus.batch_size={args.batch_size}", f"corpus.augment_batch_size={args.augment_batch_size}",
            "augmentation.n_latents=8",
            f"corpus.num_actors={args.actors}", f"corpus.cpus_per_actor={args.cpus_per_actor}"]
    cfg = load_job_config(None, overrides=base)
    build_if_embedded(cfg.model.path)  # the explicit build of an embedded decoder: loading never builds
    decoder = load_decoder(cfg.model)
    module = build_latent_module(decoder, cfg.coprocessor, cfg.augmentation.n_latents).eval()
    save_latent_module(module, decoder, work / "cop")
    fp = latent_fingerprint(decoder, module)

    def bare_loop() -> tuple[list, int]:
        """The whole job as one plain process: load the models, read, prepare, augment, encode, write."""
        dec = load_decoder(cfg.model)
        mod = load_latent_module(work / "cop", dec)
        fp_ = latent_fingerprint(dec, mod)
        rows = pq.read_table(work / "in" / "docs.parquet").to_pylist()
        docs = [prepare_document(r["doc_id"], r["text"], dec.tokenizer, max_tokens=args.max_tokens, truncate=True)
                for r in rows]
        records = []
        for start in range(0, len(docs), args.batch_size):
            batch = sorted(docs[start : start + args.batch_size], key=lambda d: len(d.input_ids))
            for i in range(0, len(batch), args.augment_batch_size):
                chunk = batch[i : i + args.augment_batch_size]
                for d, aug in zip(chunk, augment(dec, mod, [d.input_ids for d in chunk]), strict=True):
                    records.append(encode_record(aug, doc_id=d.doc_id, fingerprint=fp_, mode=cfg.storage.mode,
                                                 dtype=cfg.storage.dtype,
                                                 spec=dec.cache_spec, content_sha256=d.content_sha256,
                                                 truncated=d.truncated))
        (work / "bare").mkdir(exist_ok=True)
        for i in range(0, len(records), 256):
            write_records(str(work / "bare" / f"part-{i // 256:05d}.parquet"), records[i : i + 256])
        return docs, len(records)

    torch.set_num_threads(args.bare_threads)
    t = time.perf_counter()
    docs, n_written = bare_loop()
    bare_s = time.perf_counter() - t
    assert n_written == args.docs
    tokens = sum(len(d.input_ids) for d in docs)
    torch.set_num_threads(1)

    # bytes per document for each mode, on the same documents
    sample = docs[:32]
    augs = augment(decoder, module, [d.input_ids for d in sample])
    bytes_per_doc = {
        mode: sum(len(encode_record(a, doc_id=d.doc_id, fingerprint=fp, mode=mode, dtype="bfloat16",
                                    spec=decoder.cache_spec).payload)
                  for d, a in zip(sample, augs, strict=True)) / len(sample)
        for mode in ("latents", "latent_kv", "full")
    }

    # Ray starts workers at niceness 15 so that its own daemons stay responsive; the bare loop runs at 0. On a
    # machine shared with other work that alone skews the comparison, so both sides get the same priority here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    job_cfg = load_job_config(None,
                              overrides=base + [f"corpus.output={work / 'out'}", f"corpus.coprocessor={work / 'cop'}"])
    # the cluster is up before the clock starts (a user's cluster already is)
    ray.get(ray.remote(lambda: None).remote())
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
        "setup": ("end to end, both loading the models and writing Parquet: Ray job on a running local cluster of 2 "
                  f"CPUs, {args.actors} augmentation actor(s) x {args.cpus_per_actor} CPU (torch threads = CPUs); "
                  f"bare: one process, {args.bare_threads} torch thread(s), same length-sorted batches; "
                  f"Ray workers at niceness {os.environ['RAY_worker_niceness']} like the bare loop"),
    }
    write_result(args.name, result)


if __name__ == "__main__":
    main()
