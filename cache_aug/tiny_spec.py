"""The identity of an embedded tiny decoder's build: its recipe (:class:`TinySpec`) and :func:`spec_hash`.

A build is cached under ``<name>-<spec_hash(spec)>`` (:mod:`cache_aug.tiny`); the hash covers every field of
the recipe that changes what is built, the resolved thread count and :data:`_BUILD_VERSION`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from .stage_config import OptimConfig

__all__ = ["TinySpec", "build_threads", "spec_hash"]

_BUILD_VERSION = 1
"""Bump when the build recipe changes, so cached models are rebuilt."""


@dataclass(kw_only=True, frozen=True)
class TinySpec:
    """Architecture and pretraining recipe of an embedded tiny decoder."""

    vocab_size: int
    """Target byte-level BPE vocabulary size (incl. 256 byte symbols and special tokens)."""
    hidden_size: int
    """Model width."""
    intermediate_size: int
    """SwiGLU MLP inner width."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Attention (query) heads; ``hidden_size`` must be divisible by it."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention); divides ``num_heads``."""
    seq_len: int
    """Training block length in tokens."""
    batch_size: int = 16
    """Blocks per optimizer step."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=2e-3, warmup_steps=100, max_steps=100_000, weight_decay=0.1, betas=[0.9, 0.95]))
    """The project's one optimiser and schedule (:mod:`cache_aug.optim`): ``max_steps`` steps, the cosine decay
    running over them from step 0."""
    max_minutes: float = 20.0
    """Wall-clock safety cap on the training loop (minutes): a build that reaches it stops there (its
    pretrain.json says ``stop_reason: max_minutes``). The schedule never follows the clock, so a build slowed
    by other work on the machine builds the same bytes."""
    threads: int = 1
    """torch intra-op threads used while building; 0: every core (at most 8). Part of the build's identity
    (`spec_hash`, as the resolved count): BLAS libraries may split a weight gradient's reduction over threads, so
    another thread count can build other bytes (seen on a 2-core x86 machine: gradients ~1e-9 apart)."""
    seed: int = 0
    """Seed for init and data order."""
    heldout_every: int = 20
    """Every N-th document (KJV chapter) is held out for evaluation."""
    eval_batches: int = 32
    """At most this many batches of held-out blocks are evaluated."""
    log_every: int = 50
    """Print a progress line every this many steps."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        if self.vocab_size < 258:
            raise ValueError("vocab_size must hold the 256 byte symbols + 2 specials (258: no merges, character level)")
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("seq_len >= 2 and batch_size >= 1 required")


_NOT_IDENTITY = ("log_every",)  # how a build reports, not what it builds


def build_threads(spec: TinySpec) -> int:
    """The intra-op thread count a build of `spec` runs with (`TinySpec.threads`, 0 resolved on this machine)."""
    return spec.threads if spec.threads > 0 else max(1, min(8, os.cpu_count() or 1))


def spec_hash(spec: TinySpec) -> str:
    """Short stable hash of a spec's recipe (plus the build-recipe version), with its resolved thread count."""
    recipe = {k: v for k, v in dataclasses.asdict(spec).items()
              if k not in _NOT_IDENTITY} | {"threads": build_threads(spec)}
    payload = json.dumps({"build_version": _BUILD_VERSION, "spec": recipe}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]
