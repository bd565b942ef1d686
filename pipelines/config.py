"""The jobs' configuration: the library's tree plus how each stage runs on a Ray cluster.

:class:`JobConfig` is the root every job, the CLI and the Serve application load. It is
:class:`cache_aug.config.CacheAugConfig` with six sections replaced by subclasses that add the
Ray settings of their stage (workers and actors, CPUs and GPUs per actor or task, Ray Data batching,
Serve's request limits, DeepSpeed). The YAML keys stay where they were: ``train.num_workers``,
``corpus.num_actors``, ``serve.max_ongoing_requests``, ... are fields of ``train``, ``corpus``,
``serve``, ..., defined here rather than in the library, which never reads them.

    cfg = load_job_config("jobs/configs/tiny_cpu.yaml", overrides=["train.num_workers=4"])

No torch and no ray are imported here, so reading and validating a job config stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cache_aug.config import (
    CacheAugConfig,
    CompactionConfig,
    CorpusConfig,
    DataConfig,
    EvalConfig,
    ServeConfig,
    TrainConfig,
    load_config,
)
from cache_aug.typed_config import at_least, require

__all__ = [
    "JobConfig",
    "RayCompactionConfig",
    "RayCorpusConfig",
    "RayDataConfig",
    "RayEvalConfig",
    "RayServeConfig",
    "RayTrainConfig",
    "load_job_config",
]


@dataclass(kw_only=True)
class RayDataConfig(DataConfig):
    """Pretraining text for the coprocessor, read with Ray Data."""

    docs_per_batch: int = 256
    """Documents tokenized and packed together in one Ray Data batch (the tail of each batch is dropped)."""

    preserve_order: bool = True
    """Feed blocks in a deterministic order (reproducible runs); False lets Ray Data reorder for throughput."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("docs_per_batch", self.docs_per_batch, 1)


@dataclass(kw_only=True)
class RayTrainConfig(TrainConfig):
    """The distributed training job (Ray Train + DeepSpeed)."""

    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""

    use_gpu: bool = False
    """One GPU per worker (bf16 + NCCL with the GPU DeepSpeed config)."""

    cpus_per_worker: float = 0.5
    """CPUs reserved per worker. Keep it below a whole CPU on small machines so Ray Data's tasks
    always find a CPU while the workers hold theirs (otherwise the pipeline can deadlock)."""

    torch_threads: int = 1
    """torch intra-op threads per worker (CPU training); 0 keeps torch's default."""

    deepspeed_config: str = "cluster/deepspeed/cpu.json"
    """DeepSpeed JSON (ZeRO stage, precision, optimizer implementation); batch sizes come from here, AdamW's
    settings and clipping from the optim section, and the schedule is the library's (cache_aug.optim)."""

    zero_stage: int | None = None
    """Override of the JSON's ZeRO stage (0-3)."""

    max_failures: int = 2
    """Worker-group restarts Ray Train allows; each resumes from the latest checkpoint."""

    checkpoints_to_keep: int = 2
    """Latest checkpoints kept in storage."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("num_workers", self.num_workers, 1)
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0", self.cpus_per_worker)
        at_least("torch_threads", self.torch_threads, 0)
        if self.zero_stage is not None:
            require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be None or 0-3", self.zero_stage)
        at_least("checkpoints_to_keep", self.checkpoints_to_keep, 1)
        at_least("max_failures", self.max_failures, 0)


@dataclass(kw_only=True)
class ActorPool:
    """The Ray Data actor pool of a stage (each actor holds the decoder and the coprocessor or modules)."""

    num_actors: int = 1
    """Actors in the pool."""

    cpus_per_actor: float = 1.0
    """CPUs reserved per actor."""

    gpus_per_actor: float = 0.0
    """GPUs per actor (0 on CPU clusters)."""

    def _check_pool(self) -> None:
        at_least("num_actors", self.num_actors, 1)
        require(self.cpus_per_actor > 0, "cpus_per_actor", "must be > 0", self.cpus_per_actor)
        require(self.gpus_per_actor >= 0, "gpus_per_actor", "must be >= 0", self.gpus_per_actor)


@dataclass(kw_only=True)
class RayCorpusConfig(ActorPool, CorpusConfig):
    """The corpus augmentation job on Ray Data: documents in, stored augmented caches out (incremental)."""

    batch_size: int = 64
    """Documents per Ray Data batch handed to an augmentation actor (sorted by length inside)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("batch_size", self.batch_size, 1)
        self._check_pool()


@dataclass(kw_only=True)
class RayCompactionConfig(CompactionConfig):
    """Compaction of the corpus job's runs, each bucket a Ray task (`cache-aug compact --ray`)."""

    cpus_per_task: float = 0.5
    """CPUs reserved per bucket task."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.cpus_per_task > 0, "cpus_per_task", "must be > 0", self.cpus_per_task)


@dataclass(kw_only=True)
class RayServeConfig(ServeConfig):
    """The HTTP endpoint on Ray Serve: completions decoded against stored augmented caches, with fallback.

    Adds what only the HTTP side reads (pipelines/protocol.py, pipelines/serve.py), never the engine."""

    model_name: str = "cache-aug"
    """Model name the endpoint lists at /v1/models and accepts in a request's "model" field."""

    max_request_bytes: int = 1 << 20
    """Largest request body in bytes (larger requests get 413)."""

    auth_token_env: str = "CACHE_AUG_API_TOKEN"
    """Environment variable holding the bearer token that requests must send; unset or empty: no auth."""

    batch_wait_s: float = 0.005
    """How long a request waits for others to share its augmentation batch (Ray Serve's batch wait)."""

    max_ongoing_requests: int = 32
    """Requests a replica works on at once (Ray Serve's ``max_ongoing_requests``): with batching, those decode
    together (up to ``max_running_sequences``), so keep it at least that."""

    max_queued_requests: int = 128
    """Requests waiting for a replica beyond those; more are refused with 503 instead of queueing without bound."""

    max_choices: int = 16
    """Most choices one request may ask for: its prompts times ``n``."""

    chat_template: str | None = None
    """Jinja chat template for /v1/chat/completions; None: the tokenizer's own (a model without one answers chat
    requests with 400)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.model_name), "model_name", "must be non-empty", self.model_name)
        for name in ("max_request_bytes", "max_ongoing_requests", "max_queued_requests", "max_choices"):
            at_least(name, getattr(self, name), 1)
        require(self.batch_wait_s >= 0, "batch_wait_s", "must be >= 0", self.batch_wait_s)


@dataclass(kw_only=True)
class RayEvalConfig(ActorPool, EvalConfig):
    """Held-out evaluation, in this process or over a pool of Ray Data actors."""

    docs_per_batch: int = 8
    """Documents handed to an evaluation actor at a time."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("docs_per_batch", self.docs_per_batch, 1)
        self._check_pool()


@dataclass(kw_only=True)
class JobConfig(CacheAugConfig):
    """Root of the configuration tree the jobs read: the library's sections, with the Ray settings of each stage."""

    data: RayDataConfig = field(default_factory=RayDataConfig)
    """Training data."""

    train: RayTrainConfig = field(default_factory=RayTrainConfig)
    """The distributed training job."""

    corpus: RayCorpusConfig = field(default_factory=RayCorpusConfig)
    """The corpus augmentation job."""

    compaction: RayCompactionConfig = field(default_factory=RayCompactionConfig)
    """Compaction of the corpus job's runs into one current snapshot."""

    serve: RayServeConfig = field(default_factory=RayServeConfig)
    """The HTTP endpoint."""

    eval: RayEvalConfig = field(default_factory=RayEvalConfig)
    """Held-out evaluation of the three conditions."""


def load_job_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
) -> JobConfig:
    """Load and validate a job config (:class:`JobConfig`): a YAML path, a parsed mapping, or None for defaults.

    ``overrides`` are ``dotted.key=value`` strings (``train.num_workers=4``), applied before validation.
    """
    return load_config(source, cls=JobConfig, overrides=overrides)
