"""Continuous batching: a sequence's answer does not depend on what else shares its steps.

Every test architecture decodes stored, online and plain sequences (documents longer than the sliding windows,
under the `shift` and `keep` position rules, greedy and seeded sampling, with penalties) joining and leaving
one batch at different steps, against each decoded alone by `decode_steps`:
- the logits of every step agree within TOL (fp32, relative to the logits' scale);
- the tokens are equal, up to the first step where the alone run's top two choices are within TOL of each other
  (there rounding may pick either; after it the sequences may rightly differ).
"""

from __future__ import annotations

import threading

import pytest
import torch

from cache_aug.augment import augment, decode_steps
from cache_aug.batching import BatchLimits, DecodeBatch, DecodeLoop, Sequence, run_alone
from cache_aug.config import CoprocessorConfig
from cache_aug.coprocessor import build_latent_module, latent_fingerprint
from cache_aug.records import encode_record, restore
from cache_aug.sampling import SamplingParams
from cache_aug.testing import tiny_decoder

ARCHS = ["llama", "qwen2", "qwen2-sliding", "mistral", "gpt2", "gemma2", "phi3", "gpt_neox", "gemma3", "qwen3",
         "olmo2", "falcon", "opt"]
TOL = 1e-4  # fp32: batched and alone arithmetic round differently, by ~1e-6 of the logits' scale here


def _docs(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in (29, 17, 23, 9)]


def _sequences(decoder, module, fingerprint):
    """(name, cache, prompt, params) of a mix: stored (restored from a record), online, plain with a document,
    plain without one; greedy, seeded sampling, penalties, empty and long prompts."""
    docs = _docs(1)
    online = augment(decoder, module, docs[:2])
    record = encode_record(online[1], doc_id="s", fingerprint=fingerprint, mode="full", dtype="float32",
                           spec=decoder.cache_spec)
    stored = restore(record, decoder, fingerprint, layout=module.layout)
    plain = augment(decoder, None, [docs[2]])[0]
    greedy = SamplingParams(max_tokens=14, stop_token_ids=())
    sampled = SamplingParams(max_tokens=11, temperature=1.0, top_p=0.9, seed=5, stop_token_ids=())
    penal = SamplingParams(max_tokens=9, temperature=0.8, seed=7, presence_penalty=0.5, frequency_penalty=0.3,
                           stop_token_ids=())
    return [
        ("online-greedy", online[0], [7, 8, 9], greedy),
        ("stored-greedy", stored, [], greedy),
        ("plain-doc-sampled", plain, [40, 41], sampled),
        ("online-sampled", online[0], docs[3], sampled),
        ("none-greedy", None, docs[3] + [5, 6], greedy),
        ("stored-penalties", stored, [11], penal),
        ("none-sampled", None, [12, 13, 14], sampled),
        ("online-penalties", online[1], [], penal),
    ]


def _alone(decoder, cache, prompt, p: SamplingParams):
    if cache is None:  # plain decoding of the prompt: its prefill is the cache
        cache, prompt = augment(decoder, None, [prompt])[0], []
    out = list(decode_steps(decoder, cache, prompt, max_new_tokens=p.max_tokens, temperature=p.temperature,
                            top_p=p.top_p, seed=p.seed, presence_penalty=p.presence_penalty,
                            frequency_penalty=p.frequency_penalty, stop_token_ids=list(p.stop_token_ids)))
    return [t for t, _ in out], [lg for _, lg in out]


class Recorder:
    def __init__(self):
        self.tokens, self.logits, self.finish = [], [], None

    def on_token(self, event):
        self.tokens.append(event.token)
        self.logits.append(event.logits)
        return False

    def on_finish(self, reason, error):
        self.finish = (reason, error)


def _assert_same(name, alone, batched):
    tokens, logits = alone
    got_tokens, got_logits = batched
    assert len(got_tokens) >= 1, name
    for t, (a, b) in enumerate(zip(logits, got_logits, strict=False)):
        tol = TOL * max(1.0, float(a.abs().max()))
        diff = float((a.float() - b.float()).abs().max())
        assert diff <= tol, f"{name}: step {t}: logits differ by {diff:.3g} (> {tol:.3g})"
        top2 = torch.topk(a.float(), 2).values
        if float(top2[0] - top2[1]) <= tol:  # a near tie: rounding may choose either, and what follows differs
            return
        assert got_tokens[t] == tokens[t], f"{name}: step {t}: token {got_tokens[t]} != alone {tokens[t]}"
    assert got_tokens == tokens, name


@pytest.fixture(scope="module", params=[(a, r) for a in ARCHS for r in ("shift", "keep")], ids="-".join)
def models(request):
    arch, rule = request.param
    decoder = tiny_decoder(arch)
    first = "last_latent" if rule == "shift" else "last_token"
    module = build_latent_module(decoder, CoprocessorConfig(first_ahead_from=first, position_rule=rule), 3).eval()
    return decoder, module, latent_fingerprint(decoder, module)


def test_batched_equals_alone(models):
    decoder, module, fp = models
    seqs = _sequences(decoder, module, fp)
    alone = {name: _alone(decoder, cache, prompt, p) for name, cache, prompt, p in seqs}
    batch = DecodeBatch(decoder)
    rec = {name: Recorder() for name, *_ in seqs}
    made = [Sequence(cache, prompt, p, rec[name].on_token, rec[name].on_finish) for name, cache, prompt, p in seqs]
    # join at different steps: 3 at once, then one per step; the first leave while later ones run
    batch.admit(made[:3])
    for s in made[3:]:
        batch.step()
        batch.admit([s])
    widest = 0
    while len(batch):
        widest = max(widest, len(batch))
        batch.step()
    assert widest >= 5  # the sequences really shared steps
    for name, *_ in seqs:
        assert rec[name].finish == ("length", None), name
        _assert_same(name, alone[name], (rec[name].tokens, rec[name].logits))


def test_sliding_layers_hold_only_their_window():
    """Columns that no row's window reaches any more leave the batch (memory stays bounded on sliding layers)."""
    decoder = tiny_decoder("gemma3")  # sliding layers of window 12 beside full ones
    cache = augment(decoder, None, [_docs(2)[0]])[0]
    batch = DecodeBatch(decoder)
    r = Recorder()
    batch.admit([Sequence(cache, [], SamplingParams(max_tokens=40), r.on_token, r.on_finish)])
    for _ in range(30):
        batch.step()
    kinds = dict(zip(batch.layer_kind, (k.shape[2] for k, _ in batch.layers), strict=False))
    assert kinds["sliding_attention"] == 11  # window - 1
    assert kinds["full_attention"] == 29 + 30


def test_stop_token_and_on_token_end_a_sequence(models):
    decoder, module, fp = models
    cache = augment(decoder, module, [_docs(3)[0]])[0]
    tokens, _ = _alone(decoder, cache, [], SamplingParams(max_tokens=6))
    batch = DecodeBatch(decoder)
    by_token, by_callback = Recorder(), Recorder()
    by_callback.on_token = lambda e: (by_callback.tokens.append(e.token), len(by_callback.tokens) == 2)[1]
    batch.admit([Sequence(cache, [], SamplingParams(max_tokens=6, stop_token_ids=(tokens[3],)),
                          by_token.on_token, by_token.on_finish),
                 Sequence(cache, [], SamplingParams(max_tokens=6), by_callback.on_token, by_callback.on_finish)])
    while len(batch):
        batch.step()
    assert by_token.tokens == tokens[: tokens.index(tokens[3]) + 1] and by_token.finish == ("stop", None)
    assert by_callback.tokens == tokens[:2] and by_callback.finish == ("stop", None)


def test_logprobs_are_the_model_distribution():
    decoder = tiny_decoder("llama")
    cache = augment(decoder, None, [_docs(4)[0]])[0]
    r = Recorder()
    events = []
    r.on_token = lambda e: (events.append(e), False)[1]
    run_alone(decoder, [Sequence(cache, [3], SamplingParams(max_tokens=3, logprobs=2, temperature=0.7, seed=1),
                                 r.on_token, r.on_finish)])
    _, logits = _alone(decoder, cache, [3], SamplingParams(max_tokens=3, temperature=0.7, seed=1))
    for e, lg in zip(events, logits, strict=True):
        logp = torch.log_softmax(lg.float(), -1)
        assert e.logprob == pytest.approx(float(logp[e.token]), abs=1e-5)
        assert [i for i, _ in e.top] == torch.topk(logp, 2).indices.tolist()


def test_loop_limits_cancel_and_errors():
    """The loop thread: no more than max_running at once, a cancelled sequence frees its slot at the next step,
    and an error ends the sequences it hit without stopping the loop."""
    decoder = tiny_decoder("llama")
    cache = augment(decoder, None, [_docs(5)[0]])[0]
    loop = DecodeLoop(decoder, BatchLimits(max_running=2, max_batched_tokens=64))
    done = threading.Event()
    finished: dict[int, tuple] = {}
    seen_running: list[int] = []

    def seq(i, n, **kw):
        def on_token(_e):
            seen_running.append(len(loop.batch))
            return False

        def on_finish(reason, error):
            finished[i] = (reason, error)
            if len(finished) == 4:
                done.set()

        return Sequence(cache, [], SamplingParams(max_tokens=n, **kw), on_token, on_finish)

    long = seq(0, 10_000)
    loop.submit([long, seq(1, 5), seq(2, 5)])
    while loop.admitted < 2:
        threading.Event().wait(0.01)
    long.cancel()
    loop.submit([seq(3, 4)])
    assert done.wait(60), finished
    assert finished[0][0] == "cancelled" and all(finished[i] == ("length", None) for i in (1, 2, 3))
    assert max(seen_running) <= 2
    # a failing forward (a token id outside the vocabulary in the prompt) ends only that sequence
    bad = Recorder()
    ok = Recorder()
    flag = threading.Event()
    loop.submit([Sequence(cache, [10**6], SamplingParams(max_tokens=2), bad.on_token,
                          lambda r, e: (setattr(bad, "finish", (r, e)), flag.set()))])
    assert flag.wait(60) and bad.finish[0] == "error" and bad.finish[1] is not None
    flag.clear()
    loop.submit([Sequence(cache, [], SamplingParams(max_tokens=2), ok.on_token,
                          lambda r, e: (setattr(ok, "finish", (r, e)), flag.set()))])
    assert flag.wait(60) and ok.finish == ("length", None)
    loop.close()
