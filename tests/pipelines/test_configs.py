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
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert path.read_text().startswith("#") and "python -m jobs." in header, "each config opens with the command that launches it"
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


def _entrypoints(doc) -> list[str]:
    """Every `entrypoint` string anywhere in a manifest (nested RayJob templates included)."""
    import yaml

    found = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "entrypoint" and isinstance(v, str):
                found.append(v)
            elif isinstance(v, str) and k.endswith(".yaml"):
                found += _entrypoints(yaml.safe_load(v))
            else:
                found += _entrypoints(v)
    elif isinstance(doc, list):
        for v in doc:
            found += _entrypoints(v)
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "cluster" / "kuberay").glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifests_name_real_entrypoints(path):
    import shlex

    import yaml

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert kinds & {"RayCronJob", "CronJob", "RayJob", "RayService", "RayCluster"}
    entrypoints = _entrypoints(docs)
    assert entrypoints, "no entrypoint found"
    for entry in entrypoints:
        argv = shlex.split(entry)
        assert argv[:2] == ["python", "-m"] and (ROOT / (argv[2].replace(".", "/") + ".py")).exists(), entry
        config = argv[argv.index("--config") + 1]
        overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        load_config(ROOT / config, overrides=overrides)  # the job config and its overrides are valid
    if "RayCronJob" in kinds:
        cron = next(d for d in docs if d["kind"] == "RayCronJob")
        assert cron["apiVersion"] == "ray.io/v1" and cron["spec"]["schedule"] and cron["spec"]["jobTemplate"]["rayClusterSpec"]
