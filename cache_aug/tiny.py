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
much smaller model that builds in seconds, for tests. The recipe and its hash are
:mod:`cache_aug.tiny_spec`; the tokenizer and training loop, :mod:`cache_aug.tiny_pretrain`.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from .paths import cache_home
from .stage_config import OptimConfig
from .tiny_pretrain import Log, pretrain_tiny
from .tiny_spec import TinySpec, spec_hash

__all__ = [
    "TINY_SPECS",
    "EmbeddedDecoderNotBuilt",
    "build_command",
    "build_if_embedded",
    "built_tiny_decoder",
    "ensure_tiny_decoder",
    "is_embedded_name",
]


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
        optim=OptimConfig(lr=2e-3, warmup_steps=100, max_steps=1300, weight_decay=0.1, betas=[0.9, 0.95]),
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
        optim=OptimConfig(lr=5e-3, warmup_steps=20, max_steps=150, weight_decay=0.1, betas=[0.9, 0.95]),
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
