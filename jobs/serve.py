# Run the completions endpoint (Ray Serve) in the foreground on a cluster, e.g. as a long-running job.
#
#   ray job submit --working-dir . -- python -m jobs.serve --config jobs/configs/serve_tiny.yaml
#
# For managed deployments use the Serve config instead: `serve deploy cluster/serve/serve_tiny.yaml`,
# or cluster/kuberay/rayservice.yaml on Kubernetes.
"""Entrypoint of the completions endpoint: `cache-aug serve` (jobs/cli.py defines its flags and function)."""

from jobs.cli import command

main = command("serve")

if __name__ == "__main__":
    main()
