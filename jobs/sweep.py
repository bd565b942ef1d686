# The N_L sweep on the embedded default: pause tokens and a coprocessor trained with the Ray Train +
# DeepSpeed job at each N_L (same steps), then none / pause / coprocessor evaluated at the same points.
#
#   ray job submit --working-dir . -- python -m jobs.sweep --config jobs/configs/tiny_cpu.yaml --set sweep.steps=600
#
# Resumable: re-running skips trained conditions; an interrupted one resumes its Ray Train run.
# `cache-aug sweep` is the same sweep with the library's own training loop in one process (one GPU).
"""Entrypoint of the N_L sweep with the Ray Train trainer (sweep.trainer=ray)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def ray_train_condition(cfg, condition: str, run_dir: Path) -> Path:
    """One condition through pipelines.train (Ray Train + DeepSpeed), exported into run_dir/module."""
    from pipelines.train import run_training

    module_dir = run_dir / "module"
    train = dataclasses.replace(
        cfg.train, run_name=f"sweep-{run_dir.name}", max_steps=cfg.sweep.steps, lr=cfg.sweep.lr,
        warmup_steps=cfg.sweep.warmup_steps, export_path=str(module_dir.resolve()),
        storage_path=str((run_dir / "ray").resolve()) if "://" not in cfg.train.storage_path else cfg.train.storage_path,
    )
    result = run_training(dataclasses.replace(cfg, train=train))
    (run_dir / "training.json").write_text(json.dumps({
        "trainer": "ray", "steps": train.max_steps, "micro_batch_size": train.micro_batch_size, "workers": train.num_workers,
        "lr": train.lr, "metrics": result.metrics}, indent=1, default=str) + "\n")
    return module_dir


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description="N_L sweep: Ray Train for each condition, then evaluation.")
    ap.add_argument("--config", help="YAML config (the cache_aug config tree)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. sweep.steps=600")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local cluster started here")
    args = ap.parse_args(argv)

    from cache_aug.config import dump_config, load_config
    from cache_aug.sweep import run_sweep, sweep_table
    from cache_aug.tiny import build_if_embedded
    from pipelines.ray_session import init_ray

    cfg = load_config(args.config, overrides=[*args.set, "sweep.trainer=ray"])
    print(dump_config(cfg), flush=True)
    build_if_embedded(cfg.model.path)  # here, before any worker loads it: loading never builds
    init_ray(args.num_cpus)
    reports = run_sweep(cfg, train_fn=ray_train_condition)
    print(sweep_table(reports), flush=True)
    return reports


if __name__ == "__main__":
    main()
