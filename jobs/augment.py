# Precompute augmented KV caches for a document corpus (incremental: only new/changed documents).
#
#   ray job submit --working-dir . -- python -m jobs.augment --config jobs/configs/augment_tiny.yaml
#
# Scheduled runs (cron, Airflow, KubeRay): the same command; a re-run costs only the changes.
# cluster/kuberay/augment-cronjob.yaml and augment-raycronjob.yaml run it on Kubernetes.
"""Entrypoint of the corpus augmentation job: `cache-aug augment` (jobs/cli.py defines its flags and function)."""

from jobs.cli import command

main = command("augment")

if __name__ == "__main__":
    main()
