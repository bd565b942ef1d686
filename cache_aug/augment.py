"""Inference: document tokens -> augmented cache -> decoding that continues from it.

    aug = augment(decoder, coprocessor, [doc_ids])[0]   # D(doc) -> C -> D(z): cache of T + N_L
    tokens = generate(decoder, aug, prompt_ids, max_new_tokens=32)

With `coprocessor=None` the same calls are plain decoding (the fallback): the cache holds the
document only and the output equals the decoder's own `generate`.

Position rule (method.md): the document takes positions 0..T-1, the latents T..T+N_L-1 and the
next real token T+N_L. The logits at the last latent position predict the first token after the
document; they are kept as `next_logits`, so decoding can start with an empty prompt.

A module trained with first_ahead_from="last_token" (`module.reread == 1`) has the document's last
token fed once more after the latents, at position T+N_L: its logits are `next_logits`, the cache
holds T+N_L+1 positions and the next real token takes position T+N_L+1 (`seq_len` says so).

A module with position_rule="keep" puts the latents at the document's last N_L positions (and a
re-read token at its own, T-1): the cache holds the same entries, but the next real token takes
position T, as if nothing had been inserted (`next_position`).

A coprocessor with latent_channel="kv" writes its own keys and values at the N_L latent slots of every
layer; the decoder then reads only the re-read last token on top (such a module always re-reads). The
cache has the same layout and length; `latents` is None, since no input embeddings exist.

All of this is the module's `LatentLayout` (cache_aug/layout.py), which the cache carries as `layout`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cache_aug.decoder import Decoder
from cache_aug.kv import KV, model_cache
from cache_aug.layout import PLAIN, LatentLayout
from cache_aug.passes import (
    decoder_pass,
    kv_decoder_pass,
    latent_pass,
    logits_at,
    prefill,
)
from cache_aug.sampling import Sampler, SamplingParams


@dataclass
class AugmentedCache:
    """One document's augmented cache (batch dimension 1)."""

    input_ids: torch.Tensor  # (T,) the document's tokens
    layers: list[KV]  # per layer (1, H_kv, S, D) with S = T + N_L (a sliding layer may hold only its window)
    next_logits: torch.Tensor  # (V,) prediction of the first token after the cache
    layout: LatentLayout = PLAIN  # the module's layout; PLAIN (N_L = 0) for the plain (fallback) cache
    latents: torch.Tensor | None = None  # (N_L, d) z; None for the fallback and a latent_channel="kv" module
    gain: float | None = None  # a restored record's measured gain (cache_aug.selection), nats/token; None: unknown

    @property
    def n_latents(self) -> int:
        """N_L; 0 for the plain (fallback) cache."""
        return self.layout.n_latents

    @property
    def n_reread(self) -> int:
        """1 when the document's last token was fed again after the latents."""
        return self.layout.reread

    @property
    def position_rule(self) -> str:
        """"keep": the text after the document goes on at position T (masks.block_position_ids)."""
        return self.layout.position_rule

    @property
    def doc_len(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_added(self) -> int:
        """Positions after the document: the latents, and the re-read last token if any."""
        return self.layout.n_added

    @property
    def seq_len(self) -> int:
        """Entries held per (full) layer: the next real token is the entry after them."""
        return self.layout.cache_len(self.doc_len)

    @property
    def next_position(self) -> int:
        """The position (RoPE / position id) the next real token takes."""
        return self.layout.next_position(self.doc_len)

    def latent_kv(self) -> list[KV]:
        """KV of the positions after the document per layer: (1, H_kv, N_L (+1 re-read), D) each."""
        n = self.n_added
        return [(k[:, :, k.shape[2] - n :], v[:, :, v.shape[2] - n :]) for k, v in self.layers]

    def to_model_cache(self, config) -> DynamicCache:
        """A fresh transformers cache over these tensors (decoding mutates caches, this one is new)."""
        return model_cache(self.layers, config, self.seq_len)


def _as_batch(docs: Sequence[Sequence[int]] | torch.Tensor, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (N, T) ids + (N,) lengths."""
    if isinstance(docs, torch.Tensor):
        docs = [docs] if docs.dim() == 1 else list(docs)
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.long)
    if (lengths == 0).any():
        raise ValueError(f"document {int((lengths == 0).nonzero()[0])} of the batch has no tokens")
    ids = torch.full((len(docs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.as_tensor(d, dtype=torch.long)
    return ids.to(device), lengths.to(device)


@torch.no_grad()
def augment(decoder: Decoder, module, docs: Sequence[Sequence[int]] | torch.Tensor) -> list[AugmentedCache]:
    """Augment a batch of documents (token id lists, any lengths) in one set of passes.

    module: a `Coprocessor` or `PauseTokens`, or None for the plain fallback cache.
    """
    pad_id = decoder.tokenizer.pad_token_id or 0
    ids, lengths = _as_batch(docs, pad_id, decoder.device)  # (N, T), (N,)
    N, T = ids.shape
    ragged = bool((lengths != T).any())
    attn = (torch.arange(T, device=ids.device)[None] < lengths[:, None]).long() if ragged else None  # (N, T)

    if module is None:
        last = torch.unique(lengths - 1)  # logits needed only at each row's last token
        prefix, logits = prefill(decoder, ids, attn, keep=last)  # logits (N, |last|, V)
        col = torch.searchsorted(last, lengths - 1)
        return [
            AugmentedCache(
                input_ids=ids[i, : lengths[i]],
                layers=[(k[i : i + 1, :, : lengths[i]], v[i : i + 1, :, : lengths[i]]) for k, v in prefix],
                next_logits=logits[i, col[i]],
            )
            for i in range(N)
        ]

    layout = module.layout
    L, r = layout.n_latents, layout.reread
    points = lengths[:, None]  # (N, 1): one augmentation point, at the end of each document
    prefix, _ = prefill(decoder, ids, attn)
    z = latent_pass(decoder, module, prefix, points)  # (N, L, d), or per layer (N, H, L, D) for the kv channel
    positions = layout.position_ids(points, L + r)  # (N, L+r)
    if layout.writes_kv:  # the latents' KV from C, then D over the re-read last token (r == 1)
        last = decoder.embed(ids.gather(1, lengths[:, None] - 1))  # (N, 1, d)
        keep = torch.tensor([0], device=ids.device)
        # T + L + 1 columns
        logits, layers = kv_decoder_pass(decoder, prefix, z, points, last, 1, keep, positions[:, L:])
        z = None
    else:
        embeds = added_embeds(decoder, z, ids.gather(1, lengths[:, None] - 1), r)  # (N, L+r, d)
        keep = torch.tensor([L + r - 1], device=ids.device)
        # (N, 1, V); T + L + r columns
        logits, layers = decoder_pass(decoder, prefix, points, embeds, L + r, keep, positions)
    out = []
    for i in range(N):
        n = int(lengths[i])
        out.append(
            AugmentedCache(
                input_ids=ids[i, :n],
                layers=[
                    (torch.cat([k[i : i + 1, :, :n], k[i : i + 1, :, T:]], 2),
                     torch.cat([v[i : i + 1, :, :n], v[i : i + 1, :, T:]], 2))
                    for k, v in layers
                ],
                next_logits=logits[i, 0],
                layout=layout,
                latents=None if z is None else z[i],
            )
        )
    return out


def added_embeds(decoder: Decoder, z: torch.Tensor, last_ids: torch.Tensor, reread: int) -> torch.Tensor:
    """What follows a document in the cache: z (N, L, d), then its last token (N, 1) again if reread."""
    if not reread:
        return z
    last = decoder.embed(last_ids)  # (N, 1, d)
    return torch.cat([z.to(last.dtype), last], dim=1)  # (N, L+1, d)


@torch.no_grad()
def decode_steps(
    decoder: Decoder,
    aug: AugmentedCache,
    prompt_ids: Sequence[int] = (),
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Continue after the cache and a prompt, one sequence alone; yields (token id, the logits it was chosen from).

    Greedy when temperature == 0 (`cache_aug.sampling.Sampler` chooses). Stops after `max_new_tokens`, or
    after emitting a stop token (default: the model's EOS ids), which is yielded. This is the reference that
    the serving loop's batched decoding (`cache_aug.batching`) is tested against.
    """
    model = decoder.model
    if stop_token_ids is None:
        stop_token_ids = model_stop_ids(model)
    stops = set(stop_token_ids)
    sampler = Sampler(SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty))

    cache = aug.to_model_cache(model.config)
    pos = aug.next_position
    logits = aug.next_logits
    pending = list(prompt_ids)
    for _ in range(max_new_tokens):
        if pending:  # feed the prompt (first step) or the last chosen token
            step = torch.tensor([pending], dtype=torch.long, device=decoder.device)  # (1, S)
            positions = torch.arange(pos, pos + step.shape[1], device=decoder.device)[None]  # (1, S)
            last = torch.tensor([step.shape[1] - 1], device=decoder.device)
            logits = logits_at(decoder, last, input_ids=step, cache=cache, position_ids=positions,
                               use_cache=True)[0, -1]
            pos += step.shape[1]
        token = sampler.choose(logits)
        yield token, logits
        if token in stops:
            return
        pending = [token]


def model_stop_ids(model) -> list[int]:
    """The model's end-of-text token ids (its generation config's EOS), [] when it names none."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def generate(decoder: Decoder, aug: AugmentedCache, prompt_ids: Sequence[int] = (), **kwargs) -> list[int]:
    """All tokens of `decode_steps` as a list."""
    return [token for token, _ in decode_steps(decoder, aug, prompt_ids, **kwargs)]
