"""Continuous batching: every running sequence of a replica advances in one forward pass per step.

    loop = DecodeLoop(decoder, BatchLimits(max_running=32, max_batched_tokens=2048))
    seq = Sequence(cache, prompt_ids, params, on_token, on_finish)   # callbacks run on the loop's thread
    loop.submit([seq]); ...; seq.cancel()                              # a cancelled sequence leaves at the next step
    loop.close()

Each step the loop admits waiting sequences (within the limits), chooses every running sequence's next token
from its logits, lets the finished ones leave, and runs one forward over the rest.

**Sequences of any cache length and position share a step.** The batch keeps, per layer, the rows' KV
right-aligned in one tensor (N, H_kv, W, D), with padding on the left; an index table says, for each
column of each row, which entry of that row's own cache it is (-1: padding). A step's mask follows
the table: a row's new token sees its own entries only, and on a sliding-window layer only its last
window - 1 of them, exactly the entries its model cache would hold when decoded alone. Position ids are
given per row, so the `keep` rule (positions that are not cache indices) holds as it does alone.
Layers of one attention kind (`cache_aug.masks.attention_kinds`) share a table; the columns no row can
see any more on a sliding layer are dropped as they fall out of every row's window.

**A new sequence's prompt runs alone**, on a copy of its cache (`AugmentedCache.to_model_cache`), exactly
as `cache_aug.augment.decode_steps` feeds it; sequences with the same cache and prompt (n choices of one
request) share that forward. Then the sequence joins the batch.

A request's answer therefore does not depend on what else is in the batch, up to the rounding of the
batched arithmetic: tests/cache_aug/test_batching.py holds every test architecture to that.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from cache_aug.augment import AugmentedCache
from cache_aug.decoder import Decoder
from cache_aug.kv import KV, layer_kv
from cache_aug.masks import attention_kinds
from cache_aug.passes import logits_at
from cache_aug.sampling import Sampler, SamplingParams, token_logprobs


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a sequence."""

    token: int
    logprob: float | None = None  # the token's log-probability, when the sequence asked for logprobs
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens and theirs, when asked for
    logits: torch.Tensor | None = None  # (V,) the model's scores it was chosen from


class Sequence:
    """One sequence to decode: after `cache` (None: nothing, plain decoding of the prompt) and `prompt_ids`.

    on_token(event) -> bool: called for each generated token; True ends the sequence there (e.g. a stop string).
    on_finish(reason, error): called once at the end; reason is "stop" (a stop token, or on_token said so),
    "length" (max_tokens), "cancelled" or "error" (then `error` is the exception).
    """

    def __init__(self, cache: AugmentedCache | None, prompt_ids: list[int], params: SamplingParams,
                 on_token: Callable[[TokenEvent], bool], on_finish: Callable[[str, BaseException | None], None]):
        if cache is None and not prompt_ids:
            raise ValueError("a sequence needs a cache or a prompt")
        self.cache, self.prompt_ids, self.params = cache, list(prompt_ids), params
        self.on_token, self.on_finish = on_token, on_finish
        self.cancelled = self.finished = False

    def cancel(self) -> None:
        """Stop decoding this sequence: it leaves the batch at the next step (its slot is free again)."""
        self.cancelled = True


@dataclass
class _Row:
    """A running sequence's state in the batch."""

    seq: Sequence
    sampler: Sampler
    logits: torch.Tensor  # (V,) the scores of its next token
    entries: int  # entries of its own (full-layer) cache: the next token's index in cache order
    position: int  # the next token's position id
    generated: int = 0
    token: int = -1  # the token chosen this step, fed at the next forward


class DecodeBatch:
    """The running sequences of one decoder and their batched KV (not thread-safe: one loop owns it)."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        config = decoder.config.get_text_config(decoder=True)
        self.as_dict, self.windows = attention_kinds(decoder.config)  # kind -> sliding window (None: full)
        n = len(decoder.cache_spec.layers)
        self.layer_kind = list(config.layer_types[:n]) if self.as_dict else ["all"] * n
        self.rows: list[_Row] = []
        self.cache: _BatchCache | None = None  # per layer (N, H_kv, W_kind, D), in buffers with room to grow
        self.index: dict[str, torch.Tensor] = {}  # per kind (N, W_kind): cache-order index of each column, -1: pad
        self.steps = self.tokens = 0  # forwards run, tokens generated

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def layers(self) -> list[KV]:
        """Per layer (keys, values) of the running rows, each (N, H_kv, W_kind, D)."""
        return [] if self.cache is None else layer_kv(self.cache)

    # -- admission ------------------------------------------------------------------------------------- #

    @torch.no_grad()
    def admit(self, seqs: list[Sequence]) -> None:
        """Feed each new sequence's prompt alone (one forward per distinct cache and prompt) and add its rows."""
        model, device = self.decoder.model, self.decoder.device
        fed: dict[tuple[int, tuple[int, ...]], tuple[list[KV], torch.Tensor, int, int]] = {}
        new: list[tuple[_Row, list[KV]]] = []
        for seq in seqs:
            key = (id(seq.cache), tuple(seq.prompt_ids))
            if key not in fed:
                aug = seq.cache
                cache = DynamicCache(config=model.config) if aug is None else aug.to_model_cache(model.config)
                entries, pos = (0, 0) if aug is None else (aug.seq_len, aug.next_position)
                logits = None if aug is None else aug.next_logits
                if seq.prompt_ids:
                    ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=device)  # (1, S)
                    positions = torch.arange(pos, pos + ids.shape[1], device=device)[None]  # (1, S)
                    last = torch.tensor([ids.shape[1] - 1], device=device)
                    logits = logits_at(self.decoder, last, input_ids=ids, cache=cache, position_ids=positions,
                                       use_cache=True)[0, -1]
                    entries, pos = entries + ids.shape[1], pos + ids.shape[1]
                fed[key] = (layer_kv(cache), logits, entries, pos)
            layers, logits, entries, pos = fed[key]
            new.append((_Row(seq, Sampler(seq.params), logits, entries, pos), layers))
        self._join(new)

    def _join(self, new: list[tuple[_Row, list[KV]]]) -> None:
        """Append rows to the batch, left-padding every row's KV (and index) to the widest of its kind."""
        if not new:
            return
        parts: list[list[KV]] = [self.layers] if self.rows else []
        index_parts: list[dict[str, torch.Tensor]] = [self.index] if self.rows else []
        for row, layers in new:
            kept, index = self._own_columns(row.entries, layers)
            parts.append(kept)
            index_parts.append(index)
        width = {kind: max(ix[kind].shape[1] for ix in index_parts) for kind in self.windows}
        self.index = {kind: torch.cat([F.pad(ix[kind], (width[kind] - ix[kind].shape[1], 0), value=-1)
                                       for ix in index_parts]) for kind in self.windows}
        self.cache = _BatchCache([_Columns([p[i] for p in parts], width[kind])
                                  for i, kind in enumerate(self.layer_kind)])
        self.rows += [row for row, _ in new]

    def _own_columns(self, entries: int, layers: list[KV]) -> tuple[list[KV], dict[str, torch.Tensor]]:
        """One sequence's layers cut to what its model cache needs (a sliding kind: the last window - 1
        entries), and their index per kind."""
        device = self.decoder.device
        keep = {}
        for kind, window in self.windows.items():
            held = min(k.shape[2] for (k, _), lk in zip(layers, self.layer_kind, strict=True) if lk == kind)
            if window is None and held != entries:
                raise ValueError(f"a full-attention layer holds {held} entries of a cache of {entries}")
            keep[kind] = held if window is None else min(held, window - 1)
        kept = [(k[:, :, k.shape[2] - keep[kind]:], v[:, :, v.shape[2] - keep[kind]:])
                for (k, v), kind in zip(layers, self.layer_kind, strict=True)]
        index = {kind: torch.arange(entries - n, entries, device=device)[None] for kind, n in keep.items()}
        return kept, index

    # -- one step ----------------------------------------------------------------------------------------- #

    @torch.no_grad()
    def step(self) -> None:
        """Choose every row's next token, let finished and cancelled rows leave, run one forward for the rest."""
        stay: list[int] = []
        for i, row in enumerate(self.rows):
            seq = row.seq
            if seq.cancelled:
                _finish(seq, "cancelled")
                continue
            token = row.sampler.choose(row.logits)
            k = seq.params.logprobs
            logprob, top = (None, ()) if k is None else token_logprobs(row.logits, token, k)
            row.generated += 1
            self.tokens += 1
            done = bool(seq.on_token(TokenEvent(token, logprob, tuple(top), row.logits)))
            if done or token in seq.params.stop_token_ids:
                _finish(seq, "stop")
            elif row.generated >= seq.params.max_tokens:
                _finish(seq, "length")
            else:
                row.token = token
                stay.append(i)
        self._keep(stay)
        if self.rows:
            self._forward()

    def _keep(self, stay: list[int]) -> None:
        if len(stay) == len(self.rows):
            return
        if not stay:
            self.rows, self.cache, self.index = [], None, {}
            return
        sel = torch.tensor(stay, device=self.decoder.device)
        self.rows = [self.rows[i] for i in stay]
        for layer in self.cache.layers:
            layer.select(sel)
        self.index = {kind: ix.index_select(0, sel) for kind, ix in self.index.items()}
        self._trim()

    def _forward(self) -> None:
        device, dtype = self.decoder.device, self.decoder.dtype
        ids = torch.tensor([[r.token] for r in self.rows], dtype=torch.long, device=device)  # (N, 1)
        positions = torch.tensor([[r.position] for r in self.rows], device=device)  # (N, 1)
        q = torch.tensor([r.entries for r in self.rows], device=device)  # (N,) the new token's index in cache order
        masks = {}
        for kind, window in self.windows.items():
            ix = self.index[kind]  # (N, W)
            seen = ix >= 0
            if window is not None:
                seen &= (q[:, None] - ix) < window
            seen = torch.cat([seen, seen.new_ones(len(self.rows), 1)], 1)  # (N, W+1): and itself
            masks[kind] = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(
                ~seen, torch.finfo(dtype).min)[:, None, None]  # (N, 1, 1, W+1)
        logits = logits_at(self.decoder, torch.tensor([0], device=device), input_ids=ids, cache=self.cache,
                           position_ids=positions, attention_mask=masks if self.as_dict else masks["all"],
                           use_cache=True)[:, -1]  # (N, V); each layer wrote its new column in place
        self.index = {kind: torch.cat([ix, q[:, None]], 1) for kind, ix in self.index.items()}
        for i, row in enumerate(self.rows):
            row.logits, row.entries, row.position = logits[i], row.entries + 1, row.position + 1
        self.steps += 1
        self._trim()

    def _trim(self) -> None:
        """Drop the leading columns of a sliding kind that no row can see any more."""
        q = torch.tensor([r.entries for r in self.rows], device=self.decoder.device)[:, None]  # (N, 1)
        for kind, window in self.windows.items():
            if window is None:
                continue
            ix = self.index[kind]
            live = ((ix >= 0) & (q - ix < window)).any(0)  # (W,) a column some row still sees
            drop = int(live.long().argmax()) if bool(live.any()) else ix.shape[1]
            if drop == 0:
                continue
            self.index[kind] = ix[:, drop:]
            for layer, lk in zip(self.cache.layers, self.layer_kind, strict=True):
                if lk == kind:
                    layer.drop_leading(drop)

    def fail(self, error: BaseException) -> None:
        """End every running sequence with `error` (the batch is empty afterwards)."""
        for row in self.rows:
            _finish(row.seq, "error", error)
        self.rows, self.cache, self.index = [], None, {}


class _Columns(DynamicLayer):
    """One layer's keys and values of the batch, in buffers with room to grow: a step writes its column in
    place (a DynamicLayer would concatenate the whole cache into a new tensor every step), dropping leading
    columns moves a start offset, and rows leave by one index_select. `keys`/`values` view the live columns."""

    ROOM = 64  # columns allocated beyond the live ones

    def __init__(self, parts: list[KV], width: int):
        """The rows of `parts` (each (n_i, H, w_i, D), w_i <= width) right-aligned to `width`, zeros before."""
        super().__init__()
        k0, v0 = parts[0]
        self.device, self.is_initialized = k0.device, True
        n, cap = sum(k.shape[0] for k, _ in parts), width + max(self.ROOM, width // 2)
        self._k = k0.new_empty(n, k0.shape[1], cap, k0.shape[3])
        self._v = v0.new_empty(n, v0.shape[1], cap, v0.shape[3])
        row = 0
        for k, v in parts:
            m, pad = k.shape[0], width - k.shape[2]
            for buf, t in ((self._k, k), (self._v, v)):
                buf[row : row + m, :, :pad] = 0  # masked out, but finite: 0 x NaN would still be NaN
                buf[row : row + m, :, pad:width] = t
            row += m
        self._start, self._end = 0, width
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, self._start : self._end], self._v[:, :, self._start : self._end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> KV:
        s = key_states.shape[2]
        if self._end + s > self._k.shape[2]:  # full: the live columns move to fresh buffers with room again
            live = self._end - self._start
            cap = live + s + max(self.ROOM, live // 2)
            k = self._k.new_empty(self._k.shape[0], self._k.shape[1], cap, self._k.shape[3])
            v = self._v.new_empty(self._v.shape[0], self._v.shape[1], cap, self._v.shape[3])
            k[:, :, :live], v[:, :, :live] = self.keys, self.values
            self._k, self._v, self._start, self._end = k, v, 0, live
        self._k[:, :, self._end : self._end + s] = key_states
        self._v[:, :, self._end : self._end + s] = value_states
        self._end += s
        self._views()
        return self.keys, self.values

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows."""
        self._k, self._v = self._k.index_select(0, rows), self._v.index_select(0, rows)
        self._views()

    def drop_leading(self, n: int) -> None:
        self._start += n
        self._views()


class _BatchCache(DynamicCache):
    """The batch's model cache: one `_Columns` per layer (every layer full: the step's masks apply windows)."""

    def __init__(self, layers: list[_Columns]):
        Cache.__init__(self, layers=layers)


def _finish(seq: Sequence, reason: str, error: BaseException | None = None) -> None:
    if not seq.finished:  # once
        seq.finished = True
        seq.on_finish(reason, error)


@dataclass(frozen=True)
class BatchLimits:
    """How much one step may take on (`cache_aug.config.ServeConfig` holds the configured values)."""

    max_running: int = 32  # sequences decoded together; more wait for a free slot
    max_batched_tokens: int = 4096  # tokens fed in one step: one per running sequence, plus new prompts


def run_alone(decoder: Decoder, seqs: list[Sequence]) -> None:
    """Decode `seqs` to the end in this thread, in their own batch (the sequential engine: no other request's
    sequences share its forwards)."""
    batch = DecodeBatch(decoder)
    try:
        batch.admit([s for s in seqs if not s.cancelled])
        while batch.rows:
            batch.step()
    except Exception as e:  # noqa: BLE001 - each sequence hears of it
        batch.fail(e)
        raise


class DecodeLoop:
    """One thread that owns the decoder's decoding: admits submitted sequences between steps (within the
    limits) and steps the batch while anything runs. Thread-safe `submit`; callbacks run on the loop's thread."""

    def __init__(self, decoder: Decoder, limits: BatchLimits):
        self.batch, self.limits = DecodeBatch(decoder), limits
        self.waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.admitted = 0
        self._thread = threading.Thread(target=self._run, name="cache-aug-decode", daemon=True)
        self._thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode loop is closed")
            self.waiting.extend(seqs)
            self._cond.notify()

    def stats(self) -> dict:
        return {"running": len(self.batch), "waiting": len(self.waiting), "admitted": self.admitted,
                "steps": self.batch.steps, "tokens": self.batch.tokens}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _take(self) -> list[Sequence]:
        """Waiting sequences that fit this step: free slots, and the token budget (a prompt longer than the
        whole budget still runs when nothing else does)."""
        take: list[Sequence] = []
        budget = self.limits.max_batched_tokens - len(self.batch)
        while self.waiting and len(self.batch) + len(take) < self.limits.max_running:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                _finish(seq, "cancelled")
                continue
            cost = max(1, len(seq.prompt_ids))
            if cost > budget and (take or len(self.batch)):
                break
            budget -= cost
            take.append(self.waiting.popleft())
        return take

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not len(self.batch):
                    self._cond.wait()
                if self._closed:
                    break
                new = self._take()
            try:
                self.batch.admit(new)
                self.admitted += len(new)
                self.batch.step()
            except Exception as e:  # noqa: BLE001 - the running sequences end with it; the loop goes on
                admitted = {id(r.seq) for r in self.batch.rows}
                for seq in new:
                    if id(seq) not in admitted:
                        _finish(seq, "error", e)
                self.batch.fail(e)
        self.batch.fail(RuntimeError("the decode loop was closed"))
        for seq in self.waiting:
            _finish(seq, "error", RuntimeError("the decode loop was closed"))
