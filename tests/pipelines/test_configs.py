"""Every shipped job config loads into the typed tree, and every DeepSpeed JSON is accepted by DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cache_aug.config import load_config
from pipelines.train import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "cluster" / "deepspeed").glob("*.json"))


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_loads_and_names_existing_files(path, monkeypatch):
    assert path.read_text().startswith("#"), "each config opens with the command that launches it"
    assert "python -m jobs." in path.read_text().splitlines()[2] or "python -m jobs." in path.read_text()
    cfg = load_config(path)
    assert (ROOT / cfg.train.deepspeed_config).exists()
    monkeypatch.chdir(ROOT)
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.train.num_workers


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_json_accepted_by_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    raw.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, train_batch_size=2)
    ds = DeepSpeedConfig(raw)  # world size 1 without a process group; raises on anything DeepSpeed rejects
    assert ds.zero_optimization_stage == raw["zero_optimization"]["stage"]
    assert ds.bfloat16_config.enabled == raw.get("bf16", {}).get("enabled", False)
