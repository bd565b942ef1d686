# Train a coprocessor for a frozen decoder with Ray Train + DeepSpeed.
#
#   ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/tiny_cpu.yaml
#   ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/tiny_cpu.yaml --debug-steps 4
#
# Without a running cluster (no RAY_ADDRESS) it starts a local one. Re-running with the same
# train.run_name and train.storage_path resumes from the latest checkpoint.
"""Entrypoint of the training job (same as `cache-aug train`)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Train a coprocessor with Ray Train + DeepSpeed.")
    ap.add_argument("--config", help="YAML config (the cache_aug config tree)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. train.max_steps=100")
    ap.add_argument("--debug-steps", type=int, default=0, help="smoke run: only this many optimizer steps")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local cluster started here")
    args = ap.parse_args(argv)

    from pipelines.train import train_job

    return train_job(args.config, args.set, args.debug_steps, args.num_cpus)


if __name__ == "__main__":
    main()
