# Precompute augmented KV caches for a document corpus (incremental: only new/changed documents).
#
#   ray job submit --working-dir . -- python -m jobs.augment --config jobs/configs/augment_tiny.yaml
#
# Scheduled runs (cron, Airflow, KubeRay): the same command; a re-run costs only the changes.
# cluster/kuberay/augment-cronjob.yaml and augment-raycronjob.yaml run it on Kubernetes.
"""Entrypoint of the corpus augmentation job (same as `cache-aug augment`)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Precompute augmented caches for a corpus with Ray Data.")
    ap.add_argument("--config", help="YAML config (the cache_aug config tree)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. corpus.output=s3://b/caches")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local cluster started here")
    args = ap.parse_args(argv)

    from pipelines.corpus import augment_job

    return augment_job(args.config, args.set, args.num_cpus)


if __name__ == "__main__":
    main()
