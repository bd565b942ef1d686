# The N_L sweep on the embedded default: pause tokens and a coprocessor trained with the Ray Train +
# DeepSpeed job at each N_L (same steps), then none / pause / coprocessor evaluated at the same points.
#
#   ray job submit --working-dir . -- python -m jobs.sweep --config jobs/configs/tiny_cpu.yaml --set optim.max_steps=600
#
# Resumable: re-running skips trained conditions; an interrupted one resumes its Ray Train run.
# `cache-aug sweep` is the same sweep with the library's own training loop in one process (one GPU).
"""Entrypoint of the N_L sweep with the Ray Train trainer (`cache-aug sweep --ray`)
(jobs/cli.py defines its flags and function; pipelines/sweep.py trains each condition with Ray Train)."""

from jobs.cli import command

main = command("sweep", ray=True)

if __name__ == "__main__":
    main()
