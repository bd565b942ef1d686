# Run the completions endpoint (Ray Serve) in the foreground on a cluster, e.g. as a long-running job.
#
#   ray job submit --working-dir . -- python -m jobs.serve --config jobs/configs/serve_tiny.yaml
#
# For managed deployments use the Serve config instead: `serve deploy cluster/serve/serve_tiny.yaml`,
# or cluster/kuberay/rayservice.yaml on Kubernetes.
"""Entrypoint of the completions endpoint (same as `cache-aug serve`)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve OpenAI-compatible completions over stored augmented caches.")
    ap.add_argument("--config", help="YAML config (the cache_aug config tree)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. serve.cache_prefix=s3://b/caches")
    ap.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (0.0.0.0 only on a private network)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local cluster started here")
    args = ap.parse_args(argv)

    from pipelines.serve import serve_job

    serve_job(args.config, args.set, args.host, args.port, args.num_cpus)


if __name__ == "__main__":
    main()
