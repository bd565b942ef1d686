"""The serving benchmarks' common setup: KJV chapters augmented by the real corpus job, and their offline answers.

    sc = stored_corpus("bench-load-", n_latents=8, doc_tokens=256, stored=12, extra=6)
    sc.cfg, sc.base          # the job config (and its overrides) that wrote the caches: serve from them
    sc.stored, sc.extra      # ids with a stored latent_kv cache; ids of chapters left out of the run
    ids, text = sc.answers(prompt_ids, max_tokens)   # per doc_id: the offline greedy answer's token ids and text

The embedded tiny-kjv decoder and a fresh coprocessor; the longest chapters, each cut to `doc_tokens`.
Starts local Ray (2 CPUs, one torch thread per worker) for the corpus job; the caller starts Serve on it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class StoredCorpus:
    work: Path  # the run's scratch directory: in/ (the corpus), cop/ (the coprocessor), caches/ (the store)
    base: list[str]  # config overrides of the corpus run; serving configs extend them
    cfg: object  # pipelines.config.JobConfig of those overrides
    decoder: object
    module: object
    texts: dict[str, str]  # doc_id -> its text (cut to doc_tokens)
    stored: list[str]  # ids the corpus job augmented and stored
    extra: list[str]  # ids in the corpus after the run (part-1.parquet), not stored

    def caches(self) -> dict:
        """The stored documents' caches, restored from the store (doc_id -> AugmentedCache)."""
        import pyarrow.fs as pafs

        from cache_aug.coprocessor import latent_fingerprint
        from cache_aug.records import restore
        from cache_aug.store import AugmentedCacheReader

        fp = latent_fingerprint(self.decoder, self.module)
        reader = AugmentedCacheReader(pafs.LocalFileSystem(), str(self.work / "caches"), self.cfg.corpus.index_buckets)
        return {d: restore(reader.get(d), self.decoder, fp) for d in self.stored}

    def answers(self, prompt_ids: list[int], max_tokens: int) -> tuple[dict[str, list[int]], dict[str, str]]:
        """The greedy offline answer of every document, its token ids and its text: stored ones decoded from
        their restored record, the others augmented now, as the endpoint's online fallback does."""
        from cache_aug.augment import augment, generate

        tok = self.decoder.tokenizer
        ids = {d: generate(self.decoder, cache, prompt_ids, max_new_tokens=max_tokens)
               for d, cache in self.caches().items()}
        for d in self.extra:
            aug = augment(self.decoder, self.module, [tok.encode(self.texts[d], add_special_tokens=False)])[0]
            ids[d] = generate(self.decoder, aug, prompt_ids, max_new_tokens=max_tokens)
        text = {d: tok.decode([t for t in v if t != tok.eos_token_id], skip_special_tokens=True)
                for d, v in ids.items()}
        return ids, text


def stored_corpus(prefix: str, *, n_latents: int, doc_tokens: int, stored: int, extra: int = 0) -> StoredCorpus:
    """Run the corpus job over the `stored` longest KJV chapters (latent_kv, bfloat16), then add `extra` more
    chapters to the corpus that no run has augmented."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from cache_aug.coprocessor import build_latent_module, save_latent_module
    from cache_aug.corpus import ensure_embedded_corpus
    from cache_aug.decoder import load_decoder
    from cache_aug.tiny import build_if_embedded
    from pipelines.config import load_job_config
    from pipelines.corpus import run_corpus_job

    work = Path(tempfile.mkdtemp(prefix=prefix))
    base = [f"augmentation.n_latents={n_latents}", f"corpus.max_tokens={doc_tokens}", "corpus.truncate=true",
            f"corpus.input_paths=[{work / 'in'}]", f"corpus.coprocessor={work / 'cop'}", "storage.dtype=bfloat16",
            "storage.mode=latent_kv", f"corpus.output={work / 'caches'}"]
    cfg = load_job_config(None, overrides=base)
    build_if_embedded(cfg.model.path)  # the explicit build of an embedded decoder: loading never builds
    decoder = load_decoder(cfg.model)
    tok = decoder.tokenizer
    module = build_latent_module(decoder, cfg.coprocessor, n_latents).eval()
    save_latent_module(module, decoder, work / "cop")

    rows = pq.read_table(ensure_embedded_corpus("kjv") / "train.parquet").to_pylist()
    rows = sorted(rows, key=lambda r: -len(r["text"]))[: stored + extra]
    texts = {r["doc_id"]: tok.decode(tok.encode(r["text"], add_special_tokens=False)[:doc_tokens]) for r in rows}
    ids = list(texts)
    stored_ids, extra_ids = ids[:stored], ids[stored:]
    (work / "in").mkdir()
    pq.write_table(pa.table({"doc_id": stored_ids, "text": [texts[i] for i in stored_ids]}),
                   work / "in" / "part-0.parquet")

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    assert run_corpus_job(cfg)["counts"]["written"] == len(stored_ids)
    if extra_ids:  # documents added after the corpus run: found by id in the corpus, augmented online
        pq.write_table(pa.table({"doc_id": extra_ids, "text": [texts[i] for i in extra_ids]}),
                       work / "in" / "part-1.parquet")
    return StoredCorpus(work, base, cfg, decoder, module, texts, stored_ids, extra_ids)
