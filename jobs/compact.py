# Fold the corpus job's finished runs into one current snapshot (lookups then read one bucket of it).
#
#   ray job submit --working-dir . -- python -m jobs.compact --config jobs/configs/augment_tiny.yaml
#
# Scheduled after each corpus run: cluster/kuberay/augment-cronjob.yaml and augment-raycronjob.yaml run it right
# after jobs.augment, with the same config.
"""Entrypoint of compaction: `cache-aug compact --ray` (jobs/cli.py defines its flags and function)."""

from jobs.cli import command

main = command("compact", ray=True)  # under `ray job submit`: each bucket a Ray task

if __name__ == "__main__":
    main()
