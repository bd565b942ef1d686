"""The library's settings of each stage: training data, optimiser, training run, corpus job, endpoint, evaluation,
sweep.

Sections of the library's configuration tree (:class:`cache_aug.config.CacheAugConfig`); import them
from ``cache_aug.config``. They hold what the library itself reads; how a stage is spread over a Ray
cluster (workers, actors, CPUs and GPUs per actor, replicas' request limits, DeepSpeed) is added to
these sections by the jobs' configuration, outside this library. No torch, no ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from cache_aug.typed_config import at_least, require

__all__ = ["CompactionConfig", "CorpusConfig", "DataConfig", "EvalConfig", "OptimConfig", "SelectionConfig",
           "ServeConfig", "SweepConfig", "TrainConfig", "WantedQueueConfig"]


@dataclass(kw_only=True)
class DataConfig:
    """Pretraining text for the coprocessor: where it is and how it is cut into sequences."""

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

    def __post_init__(self) -> None:
        require(bool(self.paths), "paths", "must name at least one shard", self.paths)
        require(0 <= self.heldout_fraction < 1, "heldout_fraction", "must be in [0, 1)", self.heldout_fraction)
        at_least("seq_len", self.seq_len, 2)


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warmup, then cosine decay to ``min_lr_ratio`` of the peak)."""

    lr: float = 1e-3
    """Peak learning rate."""

    warmup_steps: int = 50
    """Optimizer steps of linear warmup: step s (from 0) runs at lr * (s + 1) / warmup_steps."""

    max_steps: int = 1000
    """Optimizer steps in the whole run (a resumed run continues up to it); the cosine decay ends here."""

    decay: Literal["cosine", "constant"] = "cosine"
    """After warmup: "cosine" decays to min_lr_ratio * lr at max_steps; "constant" stays at lr."""

    min_lr_ratio: float = 0.1
    """Where the cosine decay ends, as a fraction of the peak rate."""

    grad_clip: float = 1.0
    """Gradient-norm clipping (all trainable parameters together)."""

    weight_decay: float = 0.0
    """AdamW weight decay of the matrices (parameters with two or more dimensions); vectors get none."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2)."""

    eps: float = 1e-8
    """AdamW's epsilon."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", "must be > 0", self.lr)
        at_least("warmup_steps", self.warmup_steps, 0)
        at_least("max_steps", self.max_steps, 1)
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        require(self.grad_clip > 0, "grad_clip", "must be > 0", self.grad_clip)
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                "must be two numbers in [0, 1)", self.betas)
        require(self.eps > 0, "eps", "must be > 0", self.eps)


@dataclass(kw_only=True)
class TrainConfig:
    """The training run: its name and storage, batch sizes, checkpoints and evaluations (the optimiser and its
    schedule are the root ``optim`` section)."""

    moved_keys: ClassVar[dict[str, str]] = {k: f"optim.{k}" for k in ("lr", "warmup_steps", "max_steps", "grad_clip")}

    run_name: str = "coprocessor"
    """Run name under ``storage_path``; re-running with the same name resumes from its latest checkpoint."""

    storage_path: str = "runs"
    """Where checkpoints and the exported coprocessor go: a local directory or ``s3://bucket/prefix``."""

    micro_batch_size: int = 8
    """Sequences per worker per micro-step."""

    grad_accum_steps: int = 1
    """Micro-steps accumulated per optimizer step."""

    checkpoint_every: int = 100
    """Optimizer steps between checkpoints (one is always written at the end)."""

    eval_every: int = 100
    """Optimizer steps between held-out evaluations (one is always run at the end)."""

    eval_batches: int = 4
    """Held-out batches per evaluation, per worker."""

    export_path: str | None = None
    """Where the trained coprocessor is exported in cache_aug format; None: <storage_path>/<run_name>/export."""

    seed: int = 0
    """Seed for augmentation points and data order."""

    def __post_init__(self) -> None:
        require(bool(self.run_name) and "/" not in self.run_name, "run_name", "must be a non-empty name without '/'",
                self.run_name)
        for name in ("micro_batch_size", "grad_accum_steps", "checkpoint_every", "eval_every", "eval_batches"):
            at_least(name, getattr(self, name), 1)


@dataclass(kw_only=True)
class SelectionConfig:
    """Selective augmentation (`cache_aug.selection`): the corpus job measures what the latents buy each document on
    its own text, stores the gain with the record, and stores a document whose gain is at most ``min_gain`` as a
    ``plain`` record (its token ids, no latents), which serving decodes plainly (source "skipped").

    The probe augments the document at ``n_points`` points of its own text and compares the decoder's ahead-token
    cross-entropy over the ``n_ahead`` tokens after each point with and without the latents (the training loss);
    it reads nothing past the document. A document shorter than ``min_prefix + n_ahead`` tokens is not measured
    (gain null) and is augmented. The policy is applied when a document is augmented: records already current
    keep their kind (a changed ``min_gain`` applies to new and changed documents, or to a fresh output)."""

    probe: bool = False
    """Measure each augmented document's gain (the record's ``gain`` column, the manifest's histogram). Costs
    1.5-2x an augmentation per document, on top of the one stored (bench/results/selection*.json)."""

    min_gain: float | None = None
    """Documents whose measured gain (nats per token) is at most this are stored plain, without latents. None
    (the default) stores every document augmented. Needs ``probe``."""

    n_points: int = 4
    """Probe points per document, spread evenly over [min_prefix, length - n_ahead]."""

    n_ahead: int = 8
    """Tokens after each probe point whose cross-entropy is compared (the coprocessor's training ``n_ahead``
    fits best)."""

    min_prefix: int = 8
    """Fewest document tokens before the first probe point."""

    histogram_edges: list[float] = field(
        default_factory=lambda: [-0.1, -0.05, -0.02, -0.01, -0.005, 0.0, 0.005, 0.01, 0.02, 0.05, 0.1])
    """Bin edges (nats per token, increasing) of the manifest's gain histogram; gains below the first or above the
    last are counted in two open bins at the ends."""

    def __post_init__(self) -> None:
        for name in ("n_points", "n_ahead", "min_prefix"):
            at_least(name, getattr(self, name), 1)
        require(self.min_gain is None or self.probe, "min_gain", "needs probe: true (the gain must be measured)",
                self.min_gain)
        edges = self.histogram_edges
        require(bool(edges) and all(a < b for a, b in zip(edges, edges[1:], strict=False)), "histogram_edges",
                "must be a non-empty increasing list", edges)


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

    augment_batch_size: int = 8
    """Documents augmented together in one forward pass (similar lengths, right-padded)."""

    max_rows_per_file: int = 256
    """Upper bound on records per output Parquet file (bounded file sizes)."""

    index_buckets: int = 64
    """Records are partitioned by a hash of doc_id into this many buckets, so one lookup reads one bucket."""

    rows_per_group: int = 4
    """Records per Parquet row group. A lookup reads one row group, so this bounds the bytes read per served
    document (a `full`-mode record holds the document's whole KV cache)."""

    wanted: Literal["off", "alongside", "only"] = "alongside"
    """The serving replicas' wanted queue (``<output>/wanted/``, `cache_aug.wanted`): "alongside" takes its
    documents with the input, "only" takes just them (their text from the input, else the queue's), "off" leaves
    the queue alone. Taken entries are deleted once the run's manifest, which counts them, is written."""

    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Selective augmentation: measure each document's gain, and store those it does not help without latents."""

    def __post_init__(self) -> None:
        require(bool(self.input_paths), "input_paths", "must name at least one input", self.input_paths)
        for name in ("max_tokens", "augment_batch_size", "max_rows_per_file", "index_buckets", "rows_per_group"):
            at_least(name, getattr(self, name), 1)


@dataclass(kw_only=True)
class CompactionConfig:
    """Compaction of the corpus job's runs into one current snapshot (`cache-aug compact`, cache_aug.compaction).

    Reads and writes under ``corpus.output``, with ``corpus.index_buckets`` buckets, ``corpus.rows_per_group`` rows
    per row group and at most ``corpus.max_rows_per_file`` records per file."""

    grace_s: float = 3600.0
    """Seconds a folded run, or a snapshot another replaced, stays on storage after the snapshot that folded or
    replaced it became current, so a reader that read the previous pointer still finds its files; keep it well
    above the readers' listing refresh (30 s). Deleted by a later compaction once this has passed."""

    stale_run_s: float = 86400.0
    """A run without a manifest whose start and newest file are both older than this is taken as crashed: its
    readable files are folded and the runs after it no longer wait. A snapshot directory no pointer names (a
    compaction killed before its switch) is deleted once older than this. Keep it above the longest a running
    corpus job goes without writing a file."""

    keep_other_fingerprints: bool = False
    """Keep records made with other models too (the newest of each document and fingerprint, a document's newest
    first); False keeps only those of the fingerprint compacted for, and drops the rest from the snapshot (a
    later corpus run with those models augments such documents again)."""

    keep_errors: bool = True
    """Carry the errors table of the newest finished run folded into the snapshot (every run ledgers every input
    row, so it holds the input's errors as of that run); False drops errors with the runs."""

    def __post_init__(self) -> None:
        require(self.grace_s >= 0, "grace_s", "must be >= 0", self.grace_s)
        require(self.stale_run_s >= 0, "stale_run_s", "must be >= 0", self.stale_run_s)


@dataclass(kw_only=True)
class WantedQueueConfig:
    """How a replica records the documents it answered without a stored cache (`cache_aug.wanted`), for the
    corpus job to augment: under ``<serve.cache_prefix>/wanted/``."""

    enabled: bool = True
    """Queue misses (a missing, stale or refused record) whose text is known; False: never write the queue."""

    flush_s: float = 5.0
    """Seconds between writes of the pending entries (one file per write, off the request path)."""

    flush_rows: int = 256
    """Pending entries that trigger a write before flush_s has passed."""

    max_pending: int = 10_000
    """Entries held in memory while storage is unreachable; beyond this new misses are dropped (and counted)."""

    max_files: int = 1000
    """The queue's size bound on storage: while it holds this many files, a replica writes no more (it drops the
    entries, counted); the corpus job empties it."""

    requeue_s: float = 3600.0
    """A document a replica has written to the queue is not queued by it again for this long (the corpus job
    needs time to take it)."""

    max_text_bytes: int = 1 << 20
    """Largest document text (UTF-8 bytes) an entry carries; a longer one is queued without it."""

    def __post_init__(self) -> None:
        require(self.flush_s > 0, "flush_s", "must be > 0", self.flush_s)
        for name in ("flush_rows", "max_pending", "max_text_bytes"):
            at_least(name, getattr(self, name), 1)
        at_least("max_files", self.max_files, 0)
        require(self.requeue_s >= 0, "requeue_s", "must be >= 0", self.requeue_s)


@dataclass(kw_only=True)
class ServeConfig:
    """The completions endpoint: completions decoded against stored augmented caches, with fallback.

    Where it reads from (``coprocessor``, ``cache_prefix``, ``documents``) defaults to what the corpus job
    wrote and read; :func:`cache_aug.config.resolve_serve_sources` is the one place that applies those
    defaults, and the shipped serve configs write all three out. What only the HTTP endpoint reads (the
    model name, the body size limit, the bearer token, how long a request waits for a batch) is added by
    the jobs' configuration."""

    cache_prefix: str | None = None
    """Output prefix of the corpus job to read cache records from (local or ``s3://``). None (the default)
    means ``corpus.output``: the prefix this config's corpus job writes (see ``resolve_serve_sources``)."""

    coprocessor: str | None = None
    """Trained coprocessor directory (local or ``s3://``) the stored caches were made with. None (the
    default) means ``corpus.coprocessor``: the module this config's corpus job augments with (see
    ``resolve_serve_sources``). Without one, stored caches cannot be checked and are never used."""

    online: bool = True
    """Hold the coprocessor in memory for online augmentation (the fallback for a missing or refused cache);
    False loads only its fingerprint, so the replica needs memory for the decoder alone."""

    fallback: Literal["online", "none"] = "online"
    """What a request whose document has no usable stored cache gets: "online" augments the document now
    (needs ``online``), "none" decodes after the plain document. Either way the response says which."""

    documents: list[str] | None = None
    """Where document texts are looked up by id when a cache is missing (Parquet, local or ``s3://``, with
    ``corpus.id_column``/``corpus.text_column``). None (the default) means ``corpus.input_paths``: the
    documents this config's corpus job reads (see ``resolve_serve_sources``); [] disables the lookup
    (then only a request's own "document" text can be augmented online)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the replica runs the models; "auto" takes a GPU when the replica was given one (Ray Serve's
    ``num_gpus``), else the CPU (``cache_aug.devices.choose_device``)."""

    max_tokens: int = 256
    """Largest ``max_tokens`` a request may ask for (larger requests get 400)."""

    default_max_tokens: int = 16
    """``max_tokens`` of a request that names none (OpenAI's default)."""

    max_prompt_tokens: int = 2048
    """Longest prompt in tokens (longer requests get 400)."""

    max_document_tokens: int = 4096
    """Longest document text a request may send for online augmentation (longer ones get 400)."""

    cache_entries: int = 64
    """Restored caches held in the replica's LRU (by document id)."""

    cache_bytes: int = 1 << 30
    """Upper bound on the bytes of tensors held in that LRU; the least recently used are evicted first."""

    cache_ttl_s: float = 300.0
    """Seconds an LRU entry is trusted before the cache prefix is read again (a newer corpus run may replace it)."""

    store_list_s: float = 30.0
    """Seconds between reads of the cache prefix's snapshot pointer and run listing: a corpus run that lands is
    seen by lookups at most this long after (``cache_aug.store.AugmentedCacheReader``'s ``list_ttl_s``)."""

    batch_size: int = 8
    """Most documents augmented (or prefilled) together in one forward pass when requests arrive together."""

    batching: bool = True
    """Continuous batching (``cache_aug.batching.DecodeLoop``): one decode loop per replica runs every running
    sequence in one forward per step. False decodes each request in its own thread, alone (the sequential engine,
    kept for comparison)."""

    max_running_sequences: int = 32
    """Sequences decoded together in one step (a request's choices each count); more wait for a free slot."""

    max_batched_tokens: int = 4096
    """Tokens fed to the decoder in one step: one per running sequence, plus the prompts of those joining."""

    wanted: WantedQueueConfig = field(default_factory=WantedQueueConfig)
    """The queue of documents answered without a stored cache, which the corpus job takes first."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "default_max_tokens", "max_prompt_tokens", "max_document_tokens", "cache_entries",
                     "cache_bytes", "batch_size", "max_running_sequences", "max_batched_tokens"):
            at_least(name, getattr(self, name), 1)
        require(self.default_max_tokens <= self.max_tokens, "default_max_tokens", "must be <= max_tokens",
                self.default_max_tokens)
        require(self.cache_ttl_s >= 0, "cache_ttl_s", "must be >= 0", self.cache_ttl_s)
        require(self.store_list_s >= 0, "store_list_s", "must be >= 0", self.store_list_s)


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

    device: str = "auto"
    """Where the models run, in a local evaluation and in the Ray job's actors alike: "auto" takes a GPU when the
    process was given one (an actor with eval.gpus_per_actor > 0; a local run is given none, so it runs on the
    CPU), else the CPU; or a torch device name such as "cpu" or "cuda" (``cache_aug.devices.choose_device``)."""

    output: str = "runs/eval"
    """Output directory (local or ``s3://``): eval.json, eval.md, positions.json and the PNG plot."""

    def __post_init__(self) -> None:
        require(bool(self.paths), "paths", "must name at least one input", self.paths)
        for name in ("window", "points_per_window", "max_ahead", "batch_size", "bootstrap_samples"):
            at_least(name, getattr(self, name), 1)
        at_least("max_documents", self.max_documents, 0)
        require(0 < self.confidence < 1, "confidence", "must be in (0, 1)", self.confidence)


@dataclass(kw_only=True)
class SweepConfig:
    """The N_L sweep (`cache-aug sweep`): train pause and coprocessor at each N_L with one budget (the root
    ``optim`` section, the same for both), evaluate each."""

    moved_keys: ClassVar[dict[str, str]] = {"steps": "optim.max_steps", "lr": "optim.lr",
                                            "warmup_steps": "optim.warmup_steps"}

    n_latents: list[int] = field(default_factory=lambda: [4, 8, 16])
    """The N_L values swept."""

    batch_size: int = 32
    """Sequences per optimizer step (local trainer; the Ray trainer uses train.micro_batch_size)."""

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
        require(bool(self.n_latents) and all(n >= 1 for n in self.n_latents), "n_latents",
                "must list N_L values >= 1", self.n_latents)
        for name in ("batch_size", "checkpoint_every"):
            at_least(name, getattr(self, name), 1)
        at_least("curve_every", self.curve_every, 0)
