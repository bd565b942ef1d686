"""The embedded default decoder: a tiny Llama pretrained by the project itself.

Nothing is downloaded from a model hub. :func:`ensure_tiny_decoder` builds
(once, cached, under a file lock) a small Llama-architecture causal LM with a
byte-level BPE tokenizer, pretrained on the public-domain King James Bible
(Debian ``bible-kjv-text``), and returns the directory of an ordinary HF
checkpoint usable with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

Building is always an explicit step (``cache-aug pretrain-tiny --name <preset>``,
or :func:`build_if_embedded` at the start of a job, on its driver). Loading a
decoder by its preset name (:func:`built_tiny_decoder`, which
``decoder.load_decoder`` uses) only finds a finished build and never trains
one: a missing build is an :class:`EmbeddedDecoderNotBuilt` error naming the
command that builds it.

Presets live in :data:`TINY_SPECS`: ``"tiny-kjv"`` is the default frozen
decoder (~4M parameters, about 20 minutes on one CPU core, 11 on two); ``"test"`` is a
much smaller model that builds in seconds, for tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import Document, load_kjv, split_heldout
from .paths import cache_home

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TINY_SPECS",
    "EmbeddedDecoderNotBuilt",
    "TinySpec",
    "build_command",
    "build_if_embedded",
    "built_tiny_decoder",
    "ensure_tiny_decoder",
    "is_embedded_name",
    "pretrain_tiny",
    "spec_hash",
    "train_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
"""Document separator; used as both bos and eos."""
PAD_TOKEN = "<|pad|>"
"""Padding token (never trained on)."""
MIN_POSITIONS = 2048
"""Lower bound for ``max_position_embeddings`` so augmentation with extra latent positions fits."""
_BUILD_VERSION = 1
"""Bump when the build recipe changes, so cached models are rebuilt."""

Log = Callable[[str], None]


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
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    max_steps: int = 100_000
    """Step cap; cosine decay runs over ``min(max_steps, max_minutes)``, whichever ends first."""
    max_minutes: float = 20.0
    """Wall-clock cap on the training loop (minutes); the LR schedule follows it."""
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
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    log_every: int = 50
    """Print a progress line every this many steps."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        if self.vocab_size < 258:
            raise ValueError("vocab_size must hold the 256 byte symbols + 2 specials (258: no merges, character level)")
        if self.seq_len < 2 or self.batch_size < 1 or self.max_steps < 1:
            raise ValueError("seq_len >= 2, batch_size >= 1 and max_steps >= 1 required")


TINY_SPECS: dict[str, TinySpec] = {
    # ~3.95M params (1.05M of them the tied embedding). A fixed step count keeps the build
    # reproducible; 1,300 steps took ~20 min on one core here, ~10 on two (held-out perplexity ~29).
    # max_minutes is only a safety cap for much slower machines.
    "tiny-kjv": TinySpec(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        seq_len=256,
        batch_size=8,
        lr=2e-3,
        warmup_steps=100,
        max_steps=1300,
        max_minutes=60.0,
        threads=0,
        seed=0,
        heldout_every=20,
        eval_batches=32,
    ),
    # For tests: builds in a few seconds.
    "test": TinySpec(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        seq_len=128,
        batch_size=16,
        lr=5e-3,
        warmup_steps=20,
        max_steps=150,
        max_minutes=10.0,
        threads=1,
        seed=0,
        heldout_every=20,
        eval_batches=4,
        log_every=50,
    ),
}


def is_embedded_name(path: str) -> bool:
    """True if ``path`` names an embedded preset (a key of :data:`TINY_SPECS`)."""
    return isinstance(path, str) and path in TINY_SPECS


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


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    ``decode(encode(x)) == x`` for any text (no normalizer, no prefix space,
    byte-level fallback). ``<|endoftext|>`` is bos and eos, ``<|pad|>`` is pad;
    ``encode`` adds no special tokens. Save with ``save_pretrained``, load with
    ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        model_max_length=MIN_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def _encode_docs(tokenizer, docs: list[Document]) -> torch.Tensor:
    """Concatenate the token ids of ``docs``, each followed by eos."""
    eos = tokenizer.eos_token_id
    # The raw backend avoids transformers' "longer than model_max_length" warning.
    encs = tokenizer.backend_tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    flat: list[int] = []
    for enc in encs:
        flat.extend(enc.ids)
        flat.append(eos)
    return torch.tensor(flat, dtype=torch.long)


def _blocks(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = tokens.numel() // seq_len
    return tokens[: n * seq_len].view(n, seq_len)


# --------------------------------------------------------------------------- training


def _lr_at(spec: TinySpec, step: int, progress: float) -> float:
    """Linear warmup then cosine to 10% of peak; ``progress`` in [0, 1]."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    p = min(1.0, max(0.0, progress))
    return spec.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p)))


def _batches(blocks: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs of full batches."""
    n = blocks.shape[0]
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - bs + 1, bs):
            yield blocks[perm[i : i + bs]]


@torch.inference_mode()
def _heldout_nll(model, blocks: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Mean next-token NLL over ``blocks`` and the number of predicted tokens."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i : i + batch_size]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += x[:, 1:].numel()
    model.train()
    return total / max(count, 1), count


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished ``tmp`` build to ``out_dir`` (replacing any old one)."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pretrain_tiny(
    out_dir: str | Path,
    spec: TinySpec,
    *,
    docs: list[Document] | None = None,
    log: Log = print,
) -> dict:
    """Pretrain a tiny Llama per ``spec`` and save an HF checkpoint to ``out_dir``.

    ``docs`` defaults to the KJV chapters (:func:`cache_aug.corpus.load_kjv`).
    Documents are split with :func:`split_heldout`; the tokenizer and model
    only see the training split. Writes ``model.safetensors``, config,
    tokenizer files and ``pretrain.json`` (returned as a dict) atomically:
    everything is built in a temporary sibling directory that is renamed to
    ``out_dir`` at the end.
    """
    import tokenizers
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    if docs is None:
        docs = load_kjv()
        corpus = (
            f"King James Bible (Debian bible-kjv-text, public domain), one document per chapter "
            f"({len(docs)} chapters)"
        )
    else:
        corpus = f"user documents ({len(docs)} documents)"
    train_docs, heldout_docs = split_heldout(docs, spec.heldout_every)
    if not train_docs or not heldout_docs:
        raise ValueError(
            f"need at least 2 documents for a train/held-out split, got {len(docs)}"
        )
    corpus += f"; every {spec.heldout_every}th held out: {len(train_docs)} train / {len(heldout_docs)} held-out"

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is meant to be shareable
    try:
        with _torch_threads(build_threads(spec)):
            torch.manual_seed(spec.seed)
            t0 = time.time()
            tokenizer = train_tokenizer((d.text for d in train_docs), spec.vocab_size)
            train_tokens = _encode_docs(tokenizer, train_docs)
            heldout_tokens = _encode_docs(tokenizer, heldout_docs)
            train_blocks = _blocks(train_tokens, spec.seq_len)
            eval_blocks = _blocks(heldout_tokens, spec.seq_len)[: spec.eval_batches * spec.batch_size]
            if train_blocks.shape[0] == 0 or eval_blocks.shape[0] == 0:
                raise ValueError(
                    f"corpus too small for seq_len={spec.seq_len}: {train_tokens.numel()} train / "
                    f"{heldout_tokens.numel()} held-out tokens"
                )
            log(
                f"[tiny] tokenizer: vocab {len(tokenizer)}; {train_tokens.numel():,} train tokens "
                f"({train_blocks.shape[0]} blocks), {heldout_tokens.numel():,} held-out tokens; "
                f"{time.time() - t0:.1f}s"
            )

            eos = tokenizer.eos_token_id
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=spec.hidden_size,
                intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers,
                num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads,
                max_position_embeddings=max(MIN_POSITIONS, spec.seq_len),
                rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                tie_word_embeddings=True,
                bos_token_id=eos,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                initializer_range=0.02,
                use_cache=True,
            )
            model = LlamaForCausalLM(config)
            model.train()
            n_params = sum(p.numel() for p in model.parameters())
            log(
                f"[tiny] model: {n_params:,} params ({spec.num_layers} layers, hidden {spec.hidden_size}, "
                f"vocab {config.vocab_size}); threads={torch.get_num_threads()}"
            )

            decay = [p for p in model.parameters() if p.ndim >= 2]
            no_decay = [p for p in model.parameters() if p.ndim < 2]
            opt = torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": spec.weight_decay},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=spec.lr,
                betas=(0.9, 0.95),
                eps=1e-8,
            )
            gen = torch.Generator().manual_seed(spec.seed)
            batches = _batches(train_blocks, spec.batch_size, gen)
            max_s = spec.max_minutes * 60.0
            losses: list[float] = []
            tokens_seen = 0
            step = 0
            t_train = time.time()
            stop_reason = "max_steps"
            while step < spec.max_steps:
                elapsed = time.time() - t_train
                if elapsed >= max_s:
                    stop_reason = "max_minutes"
                    break
                progress = max(step / spec.max_steps, elapsed / max_s)
                lr = _lr_at(spec, step, progress)
                for g in opt.param_groups:
                    g["lr"] = lr
                x = next(batches)
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                tokens_seen += x.numel()
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    raise RuntimeError(f"training diverged at step {step} (loss {losses[-1]})")
                if step == 1 or step % spec.log_every == 0 or step == spec.max_steps:
                    el = time.time() - t_train
                    recent = losses[-spec.log_every :]
                    log(
                        f"[tiny] step {step} loss {sum(recent) / len(recent):.4f} lr {lr:.2e} "
                        f"tok/s {tokens_seen / max(el, 1e-9):,.0f} elapsed {el / 60:.1f}min"
                    )
            train_seconds = time.time() - t_train
            tail = losses[-min(len(losses), 50) :]
            train_loss = sum(tail) / len(tail)

            t_eval = time.time()
            nll, n_eval = _heldout_nll(model, eval_blocks, spec.batch_size)
            ppl = math.exp(nll)
            log(
                f"[tiny] done: {step} steps ({stop_reason}) in {train_seconds / 60:.1f}min, "
                f"train loss {train_loss:.4f}, held-out nll {nll:.4f} ppl {ppl:.2f} "
                f"over {n_eval:,} tokens ({time.time() - t_eval:.1f}s)"
            )

            model.generation_config = GenerationConfig(
                bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
            )
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            info = {
                "name_hash": spec_hash(spec),
                "build_version": _BUILD_VERSION,
                "spec": dataclasses.asdict(spec),
                "params": n_params,
                "vocab_size": config.vocab_size,
                "steps": step,
                "stop_reason": stop_reason,
                "tokens_seen": tokens_seen,
                "train_tokens": train_tokens.numel(),
                "heldout_tokens_evaluated": n_eval,
                "train_seconds": round(train_seconds, 2),
                "wall_seconds": round(time.time() - t_start, 2),
                "train_loss": train_loss,
                "heldout_nll": nll,
                "heldout_ppl": ppl,
                "corpus": corpus,
                "threads": torch.get_num_threads(),
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "tokenizers": tokenizers.__version__,
                },
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
            for f in tmp.iterdir():
                os.chmod(f, 0o666 & ~umask)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


# --------------------------------------------------------------------------- cache


class EmbeddedDecoderNotBuilt(FileNotFoundError):
    """An embedded decoder was asked for by name and has not been built on this machine."""


def build_command(name: str) -> str:
    """The command line that builds the embedded decoder ``name``."""
    return f"cache-aug pretrain-tiny --name {name}"


def _build_dir(name: str, root: str | Path | None) -> Path:
    """``<root or cache_home()>/models/<name>-<spec hash>``; unknown ``name`` -> ``ValueError``."""
    if name not in TINY_SPECS:
        raise ValueError(f"unknown embedded decoder {name!r}; known: {', '.join(sorted(TINY_SPECS))}")
    home = Path(root).expanduser() if root is not None else cache_home()
    return home / "models" / f"{name}-{spec_hash(TINY_SPECS[name])}"


def built_tiny_decoder(name: str, *, root: str | Path | None = None) -> Path:
    """The directory of the finished build of the embedded decoder ``name``; never builds anything.

    A build is finished once its ``pretrain.json`` exists (a build is renamed into place complete).
    Not built -> :class:`EmbeddedDecoderNotBuilt`, naming the command that builds it.
    """
    out = _build_dir(name, root)
    if not (out / "pretrain.json").exists():
        raise EmbeddedDecoderNotBuilt(
            f"embedded decoder {name!r} is not built on this machine (no {out}); loading never trains one. "
            f"Build it once with `{build_command(name)}` (tiny-kjv: about 11 min on 2 cores; test: seconds), "
            "on every machine that loads it, with the same CACHE_AUG_HOME; or set model.path to a checkpoint "
            "directory or an s3:// copy of one"
        )
    return out


def build_if_embedded(path: str, *, log: Log = print) -> Path | None:
    """The explicit build step of a job or script whose ``model.path`` may name an embedded decoder.

    Call it first, in the process that starts the work (a job's driver), before any worker loads the
    decoder: an embedded name is built here once (later calls reuse the build), so workers on this
    machine find it. Any other path: nothing is done, None.
    """
    return ensure_tiny_decoder(path, log=log) if is_embedded_name(path) else None


def ensure_tiny_decoder(
    name: str = "tiny-kjv",
    *,
    root: str | Path | None = None,
    force: bool = False,
    log: Log = print,
) -> Path:
    """Return the directory of the embedded decoder ``name``, building it once (the explicit build).

    Cached under ``<root or cache_home()>/models/<name>-<spec hash>``. An
    ``fcntl`` lock serialises builders: a second process waits for the first
    and then reuses its result. ``force=True`` rebuilds (atomically replacing
    the old checkpoint). Unknown ``name`` -> ``ValueError``.
    """
    out = _build_dir(name, root)
    spec = TINY_SPECS[name]
    models = out.parent
    done = out / "pretrain.json"
    if done.exists() and not force:
        return out
    models.mkdir(parents=True, exist_ok=True)
    lock_path = models / f".{out.name}.lock"
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[tiny] {out.name} is locked by another process; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
            if done.exists():  # the other builder finished: reuse, even with force
                return out
        try:
            if done.exists() and not force:
                return out
            log(f"[tiny] building embedded decoder {name!r} into {out}")
            pretrain_tiny(out, spec, log=log)
            return out
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
