# Evaluate none / pause / coprocessor on held-out documents at the same sampled points (Ray Data).
#
#   ray job submit --working-dir . -- python -m jobs.evaluate --config jobs/configs/eval_tiny.yaml
#   ray job submit --working-dir . -- python -m jobs.evaluate --config jobs/configs/eval_tiny.yaml \
#       --set eval.paths=[s3://bucket/heldout/] --set eval.output=s3://bucket/eval/run-1
#
# Without a running cluster (no RAY_ADDRESS) it starts a local one. `cache-aug eval` runs the same
# evaluation in one process, without Ray.
"""Entrypoint of the evaluation job (same as `cache-aug eval --ray`)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Evaluate none / pause / coprocessor on held-out text with Ray Data.")
    ap.add_argument("--config", help="YAML config (the cache_aug config tree)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. eval.output=s3://b/eval")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local cluster started here")
    args = ap.parse_args(argv)

    from pipelines.evaluate import eval_job

    return eval_job(args.config, args.set, args.num_cpus)


if __name__ == "__main__":
    main()
