"""The N_L sweep with the Ray Train trainer (`cache-aug sweep --ray`): each condition through pipelines.train.

`cache_aug.sweep.run_sweep` knows no Ray; this module passes it a trainer that runs Ray Train + DeepSpeed
per condition and exports the module where the sweep expects it. Evaluation stays in the driver.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cache_aug.config import dump_config, to_dict
from cache_aug.sweep import run_sweep, sweep_table
from cache_aug.tiny import build_if_embedded
from pipelines.config import JobConfig, load_job_config
from pipelines.ray_session import init_ray
from pipelines.train import run_training


def ray_train_condition(cfg: JobConfig, condition: str, run_dir: Path) -> Path:
    """One condition through pipelines.train (Ray Train + DeepSpeed), exported into run_dir/module."""
    module_dir = run_dir / "module"
    train = dataclasses.replace(
        cfg.train, run_name=f"sweep-{run_dir.name}", export_path=str(module_dir.resolve()),
        storage_path=(str((run_dir / "ray").resolve()) if "://" not in cfg.train.storage_path
                      else cfg.train.storage_path),
    )
    result = run_training(dataclasses.replace(cfg, train=train))
    (run_dir / "training.json").write_text(json.dumps({
        "trainer": "ray", "optim": to_dict(cfg.optim), "micro_batch_size": train.micro_batch_size,
        "workers": train.num_workers, "metrics": result.metrics}, indent=1, default=str) + "\n")
    return module_dir


def sweep_job(config: str | None, overrides: list[str], num_cpus: int | None = None) -> list[dict]:
    """The sweep as `ray job submit` and `cache-aug sweep --ray` run it; returns the per-N_L reports."""
    cfg = load_job_config(config, overrides=overrides)
    print(dump_config(cfg), flush=True)
    build_if_embedded(cfg.model.path)  # here, before any worker loads it: loading never builds
    init_ray(num_cpus)
    reports = run_sweep(cfg, train_fn=ray_train_condition)
    print(sweep_table(reports), flush=True)
    return reports
