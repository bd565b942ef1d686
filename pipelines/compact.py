"""Compaction of the corpus job's runs into one current snapshot, each bucket a Ray task (a local loop off Ray).

    cache-aug compact --config jobs/configs/augment_tiny.yaml            # this process, one bucket at a time
    cache-aug compact --ray --config jobs/configs/augment_tiny.yaml      # each bucket a Ray task
    cache-aug compact --gc-only --config jobs/configs/augment_tiny.yaml  # only delete what the grace period freed

What is folded, how the switch is made and what is deleted when: `cache_aug.compaction`. The fingerprint the
snapshot keeps is that of `model.path` + `corpus.coprocessor`, computed as the corpus job computes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pyarrow.fs as pafs

from pipelines.config import JobConfig
from pipelines.storage import portable, resolve


def models_fingerprint(cfg: JobConfig) -> str:
    """The fingerprint the corpus job writes records with: decoder `model.path` + coprocessor `corpus.coprocessor`."""
    from cache_aug.coprocessor import latent_fingerprint, load_latent_module
    from cache_aug.decoder import load_decoder
    from cache_aug.tiny import build_if_embedded

    if not cfg.corpus.coprocessor:
        raise ValueError("corpus.coprocessor: the trained coprocessor the corpus job augments with is required (or "
                         "pass the fingerprint)")
    build_if_embedded(cfg.model.path)
    decoder = load_decoder(cfg.model, s3=cfg.s3)
    return latent_fingerprint(decoder, load_latent_module(portable(cfg.corpus.coprocessor), decoder, cfg.s3))


def ray_map(cpus_per_task: float) -> Callable[[Callable[..., dict], list[dict]], list[dict]]:
    """A `map_buckets` for `cache_aug.compaction.compact`: each bucket one Ray task, results in order."""
    import ray

    def run(fn: Callable[..., dict], jobs: list[dict]) -> list[dict]:
        task = ray.remote(num_cpus=cpus_per_task, max_retries=3)(fn)
        return ray.get([task.remote(**job) for job in jobs])

    return run


def run_compaction(cfg: JobConfig, *, fingerprint: str | None = None, gc_only: bool = False) -> dict:
    """Compact `corpus.output` (or only collect its garbage); Ray tasks when Ray is initialised, else a local loop."""
    from cache_aug.compaction import collect_garbage, compact

    fs, root = resolve(cfg.corpus.output.rstrip("/"), cfg.s3)
    fs = fs or pafs.LocalFileSystem()
    if gc_only:
        return collect_garbage(fs, root, cfg.compaction)
    import ray

    mapper = ray_map(cfg.compaction.cpus_per_task) if ray.is_initialized() else None
    return compact(fs, root, fingerprint=fingerprint or models_fingerprint(cfg), n_buckets=cfg.corpus.index_buckets,
                   options=cfg.compaction, rows_per_group=cfg.corpus.rows_per_group,
                   max_rows_per_file=cfg.corpus.max_rows_per_file, map_buckets=mapper)


def compact_job(config: str | None, overrides: list[str], *, gc_only: bool = False, use_ray: bool = False,
                num_cpus: int | None = None, fingerprint: str | None = None) -> dict:
    """The compaction as `cache-aug compact` runs it; returns its summary (also printed as JSON)."""
    from pipelines.config import load_job_config

    cfg = load_job_config(config, overrides=overrides)
    if use_ray and not gc_only:
        from pipelines.ray_session import init_ray

        init_ray(num_cpus)
    summary = run_compaction(cfg, fingerprint=fingerprint, gc_only=gc_only)
    print(json.dumps(summary, indent=2, default=str), flush=True)
    return summary
