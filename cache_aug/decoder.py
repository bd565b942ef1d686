"""The frozen decoder D: any Hugging Face causal LM, from a local dir, `s3://`, or the embedded default."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from cache_aug.config import ModelConfig, S3Config
from cache_aug.dtypes import torch_dtype
from cache_aug.fingerprint import decoder_fingerprint
from cache_aug.kv import CacheSpec
from cache_aug.paths import cache_home, materialise, url_to_fs


@dataclass
class Decoder:
    """A frozen causal LM with its tokenizer: gets no gradient step, but gradients flow through it."""

    model: PreTrainedModel
    tokenizer: object
    source: str = ""
    source_sha256: str | None = None  # of the GGUF file the weights were converted from, if any

    @cached_property
    def fingerprint(self) -> str:
        """Identifies weights + tokenizer + dtype (+ the GGUF file's content) (computed once)."""
        return decoder_fingerprint(self.model, self.tokenizer, self.source_sha256)

    @cached_property
    def cache_spec(self) -> CacheSpec:
        """Per-layer KV shapes and sliding windows of this decoder."""
        return CacheSpec.from_model(self.model)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> the input embeddings the model's forward expects (N, S) -> (N, S, d)."""
        return self.model.get_input_embeddings()(input_ids)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no parameter takes a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def fetch_checkpoint(uri: str, cache_dir: str | os.PathLike | None = None, s3: S3Config | None = None) -> Path:
    """Download an `s3://` (or any fsspec) checkpoint dir once; later calls reuse the local copy.

    The local copy is keyed by the URI and the remote files' ETags/sizes, so a changed
    checkpoint at the same URI is fetched again. Credentials and endpoint come from the
    config's `s3` section (`S3Config`), or without one the standard AWS variables (AWS_ENDPOINT_URL, ...).
    """
    fs, root = url_to_fs(uri, s3)
    listing = fs.find(root, detail=True)
    if not listing:
        raise FileNotFoundError(f"no checkpoint files under {uri}")
    manifest = sorted(
        (name, str(info.get("ETag") or info.get("etag") or ""), int(info.get("size") or 0))
        for name, info in listing.items()
    )
    key = hashlib.sha256(json.dumps([uri, manifest]).encode()).hexdigest()[:16]
    base = Path(cache_dir) if cache_dir else cache_home() / "checkpoints"

    def fill(tmp: Path) -> None:
        for name, _, _ in manifest:
            rel = os.path.relpath(name, root)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(tmp / rel))

    return materialise(base / key, fill, uri)


def resolve_checkpoint(path: str, cache_dir: str | None = None, s3: S3Config | None = None,
                       gguf_file: str | None = None, dtype: str = "float32") -> Path:
    """Local HF checkpoint dir for a model given as a local path or remote URI (a checkpoint dir, or the dir
    holding `gguf_file`), a named real model (`gguf_checkpoint.NAMED_MODELS`), or an embedded default name: only
    a finished build of it, loading never trains one (`cache-aug pretrain-tiny --name <preset>` builds it)."""
    from cache_aug.gguf_checkpoint import NAMED_MODELS, convert_gguf, named_model_file
    from cache_aug.tiny import built_tiny_decoder, is_embedded_name

    if path in NAMED_MODELS:
        return convert_gguf(named_model_file(path), dtype)
    if is_embedded_name(path):  # only a finished build: loading never trains (`cache-aug pretrain-tiny` builds)
        return built_tiny_decoder(path)
    local = fetch_checkpoint(path, cache_dir, s3) if "://" in path else Path(path).expanduser()
    if gguf_file:
        return convert_gguf(local / gguf_file, dtype)
    if not (local / "config.json").exists():
        raise FileNotFoundError(f"model.path: {path} is not a Hugging Face checkpoint dir (no config.json); "
                                "for a GGUF file set model.gguf_file to its name")
    return local


def load_decoder(cfg: ModelConfig, *, device: str | torch.device = "cpu", s3: S3Config | None = None) -> Decoder:
    """Load any HF causal LM + tokenizer (or a GGUF file, converted once) as the frozen decoder; an ``s3://`` path is
    reached as `s3` says."""
    from cache_aug.gguf_checkpoint import gguf_source

    local = resolve_checkpoint(cfg.path, cfg.revision_cache_dir, s3, cfg.gguf_file, cfg.dtype)
    kwargs = {"dtype": torch_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(local, **kwargs).to(device)
    tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=cfg.trust_remote_code)
    return Decoder(model=freeze(model), tokenizer=tokenizer, source=cfg.path, source_sha256=gguf_source(local))
