"""Choosing each next token: one sequence's sampling settings and its sampler (greedy, temperature, top-p, seed,
presence and frequency penalties), and the log-probabilities a response may report.

    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=3, presence_penalty=0.5)
    sampler = Sampler(params)
    token = sampler.choose(logits)              # logits (V,): the model's scores for the next token
    chosen, top = token_logprobs(logits, token, k=2)

The offline decoder (`cache_aug.augment.decode_steps`) and the serving loop (`cache_aug.batching`) both choose
through a `Sampler`, so a sequence gets the same tokens whichever decodes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TopPLogitsWarper

MAX_LOGPROBS = 20  # top alternatives a response may ask for (OpenAI's limit for chat; completions allow 5)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence chooses its tokens and when it ends."""

    max_tokens: int  # tokens generated at most (the stop token, when one ends it, counts)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # None: torch's global generator
    presence_penalty: float = 0.0  # subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence from the logit of every token generated so far
    logprobs: int | None = None  # report the chosen token's log-probability and this many top ones; None: none
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the sequence (they are emitted)


class Sampler:
    """One sequence's token choice: its own random generator, and the counts its penalties read."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = None if params.seed is None else torch.Generator(device="cpu").manual_seed(params.seed)
        self.top_p = TopPLogitsWarper(params.top_p) if params.top_p < 1.0 else None
        self.counts: dict[int, int] = {}  # generated token -> how often

    def penalised(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (V,) less the presence and frequency penalties of the tokens generated so far."""
        p = self.params
        if not self.counts or (p.presence_penalty == 0 and p.frequency_penalty == 0):
            return logits
        ids = torch.tensor(list(self.counts), device=logits.device)
        counts = torch.tensor(list(self.counts.values()), device=logits.device, dtype=torch.float32)
        out = logits.float().clone()
        out[ids] -= p.frequency_penalty * counts + p.presence_penalty
        return out

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from the model's logits (V,); counted for the penalties."""
        logits = self.penalised(logits)
        if self.params.temperature <= 0:
            token = int(logits.argmax())
        else:
            scores = (logits.float() / self.params.temperature)[None]  # (1, V)
            if self.top_p is not None:
                scores = self.top_p(None, scores)
            probs = torch.softmax(scores, dim=-1).cpu()
            token = int(torch.multinomial(probs[0], 1, generator=self.generator))
        self.counts[token] = self.counts.get(token, 0) + 1
        return token


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the k most likely tokens with theirs, under the model's own
    distribution (the raw logits (V,): before temperature, top-p and penalties, as vLLM reports them)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, k) if k > 0 else None
    pairs = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]
    return float(logp[token]), pairs
