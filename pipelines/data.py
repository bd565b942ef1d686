"""Ray Data: pretraining shards -> tokenized, packed blocks of `seq_len` tokens, streamed into training.

    ds = read_documents(["s3://bucket/shards/"], "parquet", "text", s3)   # one column: text
    train = pack_dataset(ds, tokenizer, seq_len=256, docs_per_batch=256)  # one column: input_ids

Nothing is materialised: Ray Train workers pull blocks as they go. Held-out text comes from
`eval_paths`, or from a stable hash split of the training shards.
"""

from __future__ import annotations

import zlib
from collections import Counter

import numpy as np
import ray

from cache_aug.blocks import pack_blocks
from cache_aug.config import DataConfig, S3Config
from cache_aug.documents import usable_text
from pipelines.storage import resolve_inputs


def read_documents(paths: list[str], fmt: str, text_column: str, s3: S3Config) -> ray.data.Dataset:
    """Read shards (Parquet, JSONL, or plain text lines; local or s3://) into a dataset with a `text` column."""
    fs, targets, paths = resolve_inputs(paths, s3, "data paths")
    if fmt == "parquet":
        ds = ray.data.read_parquet(targets, filesystem=fs)
    elif fmt == "jsonl":
        ds = ray.data.read_json(targets, filesystem=fs, lines=True)
    elif fmt == "text":
        return ray.data.read_text(targets, filesystem=fs)
    else:
        raise ValueError(f"data.format: unknown format {fmt!r}")
    schema = ds.schema()  # reads file metadata only (Parquet footers, or the first JSON block)
    if schema is None:
        raise ValueError(f"data.paths: no rows could be read from {paths} (empty files?)")
    columns = schema.names
    if text_column not in columns:
        raise ValueError(f"data.text_column: column {text_column!r} not found in {paths} (columns: {columns})")
    if text_column != "text":
        ds = ds.rename_columns({text_column: "text"})
    return ds.select_columns(["text"])


def is_heldout(text: str, fraction: float) -> bool:
    """Stable membership of a document in the hash-split held-out set."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % 1_000_000 < fraction * 1_000_000


class TokenizeAndPack:
    """map_batches function: documents -> (n, seq_len) int32 blocks (EOS between documents).

    Null, empty and invalid UTF-8 texts are skipped, and each batch that skips any says how many and why
    in the worker's log; a column holding something other than text (numbers, lists) fails the job,
    naming it. `split` keeps only "train" or "heldout" documents of a hash split; None keeps all.
    """

    def __init__(self, tokenizer, seq_len: int, split: str | None = None, heldout_fraction: float = 0.0,
                 column: str | None = None):
        self.column = column  # the configured text column's name, for errors (the dataset calls it "text")
        self.tokenizer = tokenizer
        self.tokenizer.model_max_length = 1 << 60  # documents are packed here, any length is fine
        self.seq_len = seq_len
        self.split = split
        self.fraction = heldout_fraction

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts, skipped = [], Counter()
        for raw in batch["text"]:
            text, reason = usable_text(raw, "text" if self.column is None else self.column)
            if reason:
                skipped[reason] += 1
            else:
                texts.append(text)
        if skipped:
            print(f"[data] skipped {sum(skipped.values())} of {len(batch['text'])} documents of a batch: "
                  + ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())), flush=True)
        if self.split is not None:
            texts = [t for t in texts if is_heldout(t, self.fraction) == (self.split == "heldout")]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        blocks = pack_blocks(ids, self.seq_len, self.tokenizer.eos_token_id)
        return {"input_ids": blocks.numpy().astype(np.int32)}


def pack_dataset(ds: ray.data.Dataset, tokenizer, seq_len: int, docs_per_batch: int, split: str | None = None,
                 heldout_fraction: float = 0.0, column: str | None = None) -> ray.data.Dataset:
    return ds.map_batches(
        TokenizeAndPack(tokenizer, seq_len, split, heldout_fraction, column),
        batch_size=docs_per_batch,
        batch_format="numpy",
    )


def training_datasets(cfg: DataConfig, s3: S3Config, tokenizer) -> dict[str, ray.data.Dataset]:
    """{"train": packed training blocks, "eval": packed held-out blocks}."""
    docs = read_documents(cfg.paths, cfg.format, cfg.text_column, s3)
    if cfg.eval_paths:
        train = pack_dataset(docs, tokenizer, cfg.seq_len, cfg.docs_per_batch, column=cfg.text_column)
        heldout_docs = read_documents(cfg.eval_paths, cfg.format, cfg.text_column, s3)
        heldout = pack_dataset(heldout_docs, tokenizer, cfg.seq_len, cfg.docs_per_batch, column=cfg.text_column)
    else:
        train = pack_dataset(docs, tokenizer, cfg.seq_len, cfg.docs_per_batch, "train", cfg.heldout_fraction,
                             cfg.text_column)
        heldout = pack_dataset(docs, tokenizer, cfg.seq_len, cfg.docs_per_batch, "heldout", cfg.heldout_fraction,
                               cfg.text_column)
    return {"train": train, "eval": heldout}
