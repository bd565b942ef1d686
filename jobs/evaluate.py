# Evaluate none / pause / coprocessor on held-out documents at the same sampled points (Ray Data).
#
#   ray job submit --working-dir . -- python -m jobs.evaluate --config jobs/configs/eval_tiny.yaml
#   ray job submit --working-dir . -- python -m jobs.evaluate --config jobs/configs/eval_tiny.yaml \
#       --set eval.paths=[s3://bucket/heldout/] --set eval.output=s3://bucket/eval/run-1
#
# Without a running cluster (no RAY_ADDRESS) it starts a local one. `cache-aug eval` runs the same
# evaluation in one process, without Ray.
"""Entrypoint of the evaluation job: `cache-aug eval --ray` (jobs/cli.py defines its flags and function)."""

from jobs.cli import command

main = command("eval", ray=True)

if __name__ == "__main__":
    main()
