"""Typed configuration for cache augmentation: the library's configuration tree and its public names.

The whole configuration is one tree of ``@dataclass(kw_only=True)`` sections rooted at
:class:`CacheAugConfig`. The sections live beside this module, by concern:

- :mod:`cache_aug.model_config`: what is augmented and how (model, augmentation, coprocessor, storage, s3);
- :mod:`cache_aug.stage_config`: what the library reads of each stage (data, optim, train, corpus, serve, eval,
  sweep); the optimiser section is shared by every training loop (:mod:`cache_aug.optim`);
- :mod:`cache_aug.typed_config`: the generic machinery (:func:`from_dict`, :func:`to_dict`,
  :func:`load_config`, :func:`dump_config`, :func:`field_docs`, :class:`ConfigError`).

Import all of them from here. The jobs extend this tree with the Ray settings of each stage (a root
that subclasses :class:`CacheAugConfig`, outside this library); every function here takes either.

This module deliberately imports neither torch nor ray, so reading and validating a config stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cache_aug import typed_config
from cache_aug.model_config import (
    AugmentationConfig,
    CoprocessorConfig,
    ModelConfig,
    S3Config,
    StorageConfig,
)
from cache_aug.stage_config import (
    CompactionConfig,
    CorpusConfig,
    DataConfig,
    EvalConfig,
    OptimConfig,
    SelectionConfig,
    ServeConfig,
    SweepConfig,
    TrainConfig,
    WantedQueueConfig,
)
from cache_aug.typed_config import (
    ConfigError,
    dump_config,
    field_docs,
    from_dict,
    require,
    to_dict,
)

__all__ = [
    "AugmentationConfig",
    "CacheAugConfig",
    "CompactionConfig",
    "ConfigError",
    "CoprocessorConfig",
    "CorpusConfig",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "S3Config",
    "SelectionConfig",
    "ServeConfig",
    "ServeSources",
    "StorageConfig",
    "SweepConfig",
    "TrainConfig",
    "WantedQueueConfig",
    "dump_config",
    "field_docs",
    "from_dict",
    "load_config",
    "resolve_serve_sources",
    "to_dict",
]

T = TypeVar("T")


@dataclass(kw_only=True)
class CacheAugConfig:
    """Root of the configuration tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen decoder model."""

    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    """Number and placement of latent embeddings."""

    coprocessor: CoprocessorConfig = field(default_factory=CoprocessorConfig)
    """The trainable coprocessor (or pause-token baseline)."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    """Format of precomputed augmentations."""

    s3: S3Config = field(default_factory=S3Config)
    """How s3:// paths are reached."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimiser and its learning-rate schedule, for every way the library trains a module."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """The training run."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus augmentation job."""

    compaction: CompactionConfig = field(default_factory=CompactionConfig)
    """Compaction of the corpus job's runs into one current snapshot."""

    serve: ServeConfig = field(default_factory=ServeConfig)
    """The completions endpoint."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation of the three conditions."""

    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The N_L sweep."""

    def __post_init__(self) -> None:
        kv_module = self.coprocessor.latent_channel == "kv" and self.coprocessor.mode != "pause"
        require(not (kv_module and self.storage.mode == "latents"), "storage.mode",
                'a coprocessor with latent_channel="kv" writes keys and values, not input embeddings: '
                'store "latent_kv" or "full"', self.storage.mode)


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    cls: type[T] = CacheAugConfig,  # type: ignore[assignment]
    overrides: Sequence[str] = (),
) -> T:
    """`typed_config.load_config`, by default for the library's tree (:class:`CacheAugConfig`)."""
    return typed_config.load_config(source, cls=cls, overrides=overrides)


@dataclass(frozen=True, kw_only=True)
class ServeSources:
    """Where the endpoint reads from, with the serve section's documented defaults applied."""

    coprocessor: str | None
    """Trained coprocessor directory; None: none (stored caches are never used, no online augmentation)."""

    cache_prefix: str | None
    """Corpus job output prefix holding the cache records; None: none."""

    documents: list[str]
    """Parquet inputs holding document texts by id; []: no lookup."""


def resolve_serve_sources(cfg: CacheAugConfig) -> ServeSources:
    """The one place the serve section's sources take their defaults from the corpus section.

    ``serve.coprocessor`` None (or empty) -> ``corpus.coprocessor``; ``serve.cache_prefix`` None (or empty)
    -> ``corpus.output``; ``serve.documents`` None -> ``corpus.input_paths`` ([] stays: no lookup). An
    endpoint thus serves, by default, exactly what the corpus job of the same config wrote.
    """
    s, c = cfg.serve, cfg.corpus
    return ServeSources(
        coprocessor=s.coprocessor or c.coprocessor,
        cache_prefix=s.cache_prefix or c.output,
        documents=list(c.input_paths if s.documents is None else s.documents),
    )
