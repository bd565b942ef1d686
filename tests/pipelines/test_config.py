"""Tests for pipelines.config: the job root, the Ray settings of each stage, and the keys users write."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cache_aug.config import (
    CacheAugConfig,
    ConfigError,
    dump_config,
    field_docs,
    load_config,
    to_dict,
)
from pipelines.config import (
    JobConfig,
    RayCorpusConfig,
    RayDataConfig,
    RayEvalConfig,
    RayServeConfig,
    RayTrainConfig,
    load_job_config,
)

ROOT = Path(__file__).resolve().parents[2]

# The jobs' settings (Ray, and the HTTP side of serve), by section, with their defaults: what the library's
# sections no longer carry.
RAY_FIELDS = {
    "data": {"docs_per_batch": 256, "preserve_order": True},
    "train": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.5, "torch_threads": 1,
              "deepspeed_config": "cluster/deepspeed/cpu.json", "zero_stage": None, "max_failures": 2,
              "checkpoints_to_keep": 2},
    "corpus": {"batch_size": 64, "num_actors": 1, "cpus_per_actor": 1.0, "gpus_per_actor": 0.0},
    "serve": {"model_name": "cache-aug", "max_request_bytes": 1 << 20, "auth_token_env": "CACHE_AUG_API_TOKEN",
              "batch_wait_s": 0.005, "max_ongoing_requests": 32, "max_queued_requests": 128, "max_choices": 16,
              "chat_template": None},
    "eval": {"num_actors": 1, "cpus_per_actor": 1.0, "gpus_per_actor": 0.0, "docs_per_batch": 8},
}
RAY_SECTIONS = {"data": RayDataConfig, "train": RayTrainConfig, "corpus": RayCorpusConfig, "serve": RayServeConfig,
                "eval": RayEvalConfig}


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_job_root_extends_the_library_root_with_the_ray_sections():
    cfg = load_job_config()
    assert cfg == JobConfig() and isinstance(cfg, CacheAugConfig)
    assert [f.name for f in dataclasses.fields(JobConfig)] == [f.name for f in dataclasses.fields(CacheAugConfig)]
    for name, cls in RAY_SECTIONS.items():
        section = getattr(cfg, name)
        assert type(section) is cls
        assert {k: getattr(section, k) for k in RAY_FIELDS[name]} == RAY_FIELDS[name]


def test_library_sections_carry_no_ray_setting():
    lib = CacheAugConfig()
    for name, ray_fields in RAY_FIELDS.items():
        library_cls = type(getattr(lib, name))
        assert not _names(library_cls) & set(ray_fields), library_cls.__name__
        assert _names(RAY_SECTIONS[name]) == _names(library_cls) | set(ray_fields)
        for key in ray_fields:  # the library's own tree refuses them, as overrides and in a file's mapping
            with pytest.raises(ConfigError, match=rf"^{name}\.{key}: unknown key"):
                load_config(overrides=[f"{name}.{key}=1"])
            with pytest.raises(ConfigError, match=rf"^{name}\.{key}: unknown key"):
                load_config({name: {key: 1}})


def test_ray_keys_keep_their_paths():
    cfg = load_job_config(overrides=["train.num_workers=4", "train.zero_stage=2", "corpus.num_actors=3",
                                     "serve.max_queued_requests=7", "eval.gpus_per_actor=1",
                                     "data.preserve_order=false"])
    assert (cfg.train.num_workers, cfg.train.zero_stage, cfg.corpus.num_actors) == (4, 2, 3)
    assert (cfg.serve.max_queued_requests, cfg.eval.gpus_per_actor, cfg.data.preserve_order) == (7, 1.0, False)
    assert load_job_config(yaml.safe_load(dump_config(cfg))) == cfg
    assert to_dict(cfg)["train"]["num_workers"] == 4


@pytest.mark.parametrize("override,message", [
    ("train.num_workers=0", "train.num_workers: must be >= 1, got 0"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker: must be > 0, got 0.0"),
    ("train.torch_threads=-1", "train.torch_threads: must be >= 0, got -1"),
    ("train.zero_stage=4", "train.zero_stage: must be None or 0-3, got 4"),
    ("train.checkpoints_to_keep=0", "train.checkpoints_to_keep: must be >= 1, got 0"),
    ("train.max_failures=-1", "train.max_failures: must be >= 0, got -1"),
    ("optim.max_steps=0", "optim.max_steps: must be >= 1, got 0"),  # the library's checks still run
    ("data.docs_per_batch=0", "data.docs_per_batch: must be >= 1, got 0"),
    ("corpus.batch_size=0", "corpus.batch_size: must be >= 1, got 0"),
    ("corpus.num_actors=0", "corpus.num_actors: must be >= 1, got 0"),
    ("corpus.cpus_per_actor=0", "corpus.cpus_per_actor: must be > 0, got 0.0"),
    ("corpus.gpus_per_actor=-1", "corpus.gpus_per_actor: must be >= 0, got -1.0"),
    ("serve.model_name=''", "serve.model_name: must be non-empty, got ''"),
    ("serve.max_request_bytes=0", "serve.max_request_bytes: must be >= 1, got 0"),
    ("serve.batch_wait_s=-1", "serve.batch_wait_s: must be >= 0, got -1.0"),
    ("serve.max_ongoing_requests=0", "serve.max_ongoing_requests: must be >= 1, got 0"),
    ("serve.max_queued_requests=0", "serve.max_queued_requests: must be >= 1, got 0"),
    ("eval.num_actors=0", "eval.num_actors: must be >= 1, got 0"),
    ("eval.docs_per_batch=0", "eval.docs_per_batch: must be >= 1, got 0"),
    ("eval.cpus_per_actor=0", "eval.cpus_per_actor: must be > 0, got 0.0"),
    ("eval.gpus_per_actor=-1", "eval.gpus_per_actor: must be >= 0, got -1.0"),
])
def test_ray_settings_are_validated_with_their_path(override, message):
    with pytest.raises(ConfigError) as info:
        load_job_config(overrides=[override])
    assert str(info.value) == message


def test_every_job_field_is_documented():
    for f in dataclasses.fields(JobConfig):
        cls = type(getattr(JobConfig(), f.name))
        for name, doc in field_docs(cls).items():
            assert doc.strip(), f"{f.name}.{name} has no docstring"
    assert field_docs(JobConfig).keys() == _names(JobConfig)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_serve_configs_write_their_sources_out(path):
    raw = yaml.safe_load(path.read_text()) or {}
    if "serve" not in raw:
        return
    assert {"coprocessor", "cache_prefix", "documents"} <= set(raw["serve"]), (
        "serve.* sources written out, not inherited")


def test_import_does_not_pull_heavy_deps():
    code = ("import sys, pipelines.config\nheavy = [m for m in ('ray', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
