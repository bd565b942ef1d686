"""Fingerprints: content hashes that tie a stored cache to the exact models that made it.

A stored augmented cache is only valid for the decoder weights, tokenizer, coprocessor
weights, N_L and dtype that produced it; loading checks the fingerprint and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

FINGERPRINT_CHARS = 32  # hex characters kept (128 bits)


class FingerprintMismatch(ValueError):
    """Something was made for other model weights than the ones loaded."""


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalisation, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # slow tokenizers: the vocab and special tokens define the mapping
        text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return hashlib.sha256(text.encode()).hexdigest()


def combine(**parts) -> str:
    """A short hash of named parts (JSON-canonical)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:FINGERPRINT_CHARS]


def decoder_fingerprint(model, tokenizer, source_sha256: str | None = None) -> str:
    """Identifies decoder weights + tokenizer + compute dtype (+ the sha256 of the file they came from, for a
    decoder converted from a GGUF file)."""
    return combine(
        kind="decoder",
        model_type=model.config.model_type,
        weights=tensor_digest(model.state_dict()),
        tokenizer=tokenizer_digest(tokenizer),
        dtype=str(next(model.parameters()).dtype),
        **({"source_sha256": source_sha256} if source_sha256 else {}),
    )


def augmentation_fingerprint(decoder_fp: str, latent_state: Mapping[str, torch.Tensor] | None,
                             mode: str, n_latents: int, dtype: torch.dtype, *, first_ahead_from: str = "last_latent",
                             position_rule: str = "shift", latent_channel: str = "embeds") -> str:
    """Identifies decoder + tokenizer + coprocessor (or pause tokens) + N_L + dtype + first-ahead slot + position rule
    + latent channel."""
    # the paper's rules add nothing, so fingerprints of modules made before the options stay valid
    extra = {} if first_ahead_from == "last_latent" else {"first_ahead_from": first_ahead_from}
    if position_rule != "shift":
        extra["position_rule"] = position_rule
    if latent_channel != "embeds":
        extra["latent_channel"] = latent_channel
    return combine(
        kind="augmentation",
        decoder=decoder_fp,
        mode=mode,
        latents=tensor_digest(latent_state) if latent_state is not None else None,
        n_latents=n_latents,
        dtype=str(dtype),
        **extra,
    )
