"""Pretraining an embedded tiny decoder: the byte-level BPE tokenizer and the training loop.

:func:`pretrain_tiny` builds one :class:`~cache_aug.tiny_spec.TinySpec` into an ordinary HF checkpoint
directory; :mod:`cache_aug.tiny` decides where a preset's build lives and when to run it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .blocks import iterate_batches, pack_blocks
from .corpus import Document, load_kjv, split_heldout
from .optim import adamw, learning_rate, optimizer_step
from .tiny_spec import _BUILD_VERSION, TinySpec, build_threads, spec_hash

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "pretrain_tiny", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
"""Document separator; used as both bos and eos."""
PAD_TOKEN = "<|pad|>"
"""Padding token (never trained on)."""
MIN_POSITIONS = 2048
"""Lower bound for ``max_position_embeddings`` so augmentation with extra latent positions fits."""

Log = Callable[[str], None]


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


def _blocks(tokenizer, docs: list[Document], seq_len: int) -> tuple[torch.Tensor, int]:
    """(N, seq_len) blocks of ``docs`` (the one packer: eos after each), and how many tokens they came from."""
    # The raw backend avoids transformers' "longer than model_max_length" warning.
    ids = [enc.ids for enc in tokenizer.backend_tokenizer.encode_batch([d.text for d in docs],
                                                                      add_special_tokens=False)]
    return pack_blocks(ids, seq_len, tokenizer.eos_token_id), sum(len(i) + 1 for i in ids)


# --------------------------------------------------------------------------- training


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
            train_blocks, train_tokens = _blocks(tokenizer, train_docs, spec.seq_len)
            eval_blocks, heldout_tokens = _blocks(tokenizer, heldout_docs, spec.seq_len)
            eval_blocks = eval_blocks[: spec.eval_batches * spec.batch_size]
            if train_blocks.shape[0] == 0 or eval_blocks.shape[0] == 0:
                raise ValueError(
                    f"corpus too small for seq_len={spec.seq_len}: {train_tokens} train / "
                    f"{heldout_tokens} held-out tokens"
                )
            log(
                f"[tiny] tokenizer: vocab {len(tokenizer)}; {train_tokens:,} train tokens "
                f"({train_blocks.shape[0]} blocks), {heldout_tokens:,} held-out tokens; "
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

            o = spec.optim
            params = list(model.parameters())
            opt = adamw(params, o)
            batches = iterate_batches(train_blocks, min(spec.batch_size, train_blocks.shape[0]), seed=spec.seed)
            max_s = spec.max_minutes * 60.0
            losses: list[float] = []
            tokens_seen = 0
            step = 0
            t_train = time.time()
            stop_reason = "max_steps"
            while step < o.max_steps:
                elapsed = time.time() - t_train
                if elapsed >= max_s:
                    stop_reason = "max_minutes"
                    break
                # the decay runs over the steps (from step 0, warmup included), never over the clock: a build
                # slowed down by other work on the machine still builds the same bytes
                lr = learning_rate(step, o, progress=step / o.max_steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                x = next(batches)
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                optimizer_step(loss, opt, params, o.grad_clip)
                step += 1
                tokens_seen += x.numel()
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    raise RuntimeError(f"training diverged at step {step} (loss {losses[-1]})")
                if step == 1 or step % spec.log_every == 0 or step == o.max_steps:
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
                "train_tokens": train_tokens,
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
