# Train a coprocessor for a frozen decoder with Ray Train + DeepSpeed.
#
#   ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/tiny_cpu.yaml
#   ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/tiny_cpu.yaml --debug-steps 4
#
# Without a running cluster (no RAY_ADDRESS) it starts a local one. Re-running with the same
# train.run_name and train.storage_path resumes from the latest checkpoint.
"""Entrypoint of the training job: `cache-aug train` (jobs/cli.py defines its flags and function)."""

from jobs.cli import command

main = command("train")

if __name__ == "__main__":
    main()
