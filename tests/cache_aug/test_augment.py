"""Augmentation and decoding: stored == computed, fallback == generate, serving agrees with training."""

from __future__ import annotations

import pytest
import torch

from cache_aug.augment import augment, decode_steps, generate
from cache_aug.config import CoprocessorConfig
from cache_aug.coprocessor import build_latent_module, latent_fingerprint
from cache_aug.losses import ahead_targets, reference_loss
from cache_aug.records import encode_record, read_records, restore, write_records
from cache_aug.testing import tiny_decoder

ARCHS = ["llama", "gemma2", "gpt2", "qwen2-sliding", "mistral"]
# (architecture, which slot predicts the first ahead token, position rule): the paper's rules everywhere; the
# re-read last token, and the text keeping its positions, on the architectures with embedding scaling (gemma2),
# sliding layers and learned absolute positions (gpt2)
SETUPS = ([(a, "last_latent", "shift") for a in ARCHS]
          + [(a, "last_token", "shift") for a in ("llama", "gemma2", "qwen2-sliding")]
          + [(a, "last_token", "keep") for a in ("llama", "gemma2", "qwen2-sliding", "gpt2")]
          + [("mistral", "last_latent", "keep")])
SETUPS = [(*s, "embeds") for s in SETUPS]
# the coprocessor writing its own KV at the latent slots (latent_channel="kv"), under both position rules
SETUPS += [("llama", "last_token", "keep", "kv"), ("gemma2", "last_token", "shift", "kv"),
           ("qwen2-sliding", "last_token", "keep", "kv"), ("gpt2", "last_token", "shift", "kv")]
N_L = 3


@pytest.fixture(scope="module", params=SETUPS, ids=lambda s: "-".join(s))
def setup(request):
    arch, first, rule, channel = request.param
    decoder = tiny_decoder(arch)
    cfg = CoprocessorConfig(mode="full", first_ahead_from=first, position_rule=rule, latent_channel=channel)
    module = build_latent_module(decoder, cfg, n_latents=N_L).eval()
    if channel == "kv":  # move C off its initial copy of D, so its KV is not the pause tokens' (test_one_pass)
        with torch.no_grad():
            for p in module.trunk.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return decoder, module, latent_fingerprint(decoder, module)


def _doc(n, seed=0):
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _steps(decoder, aug, prompt, n=6):
    return list(decode_steps(decoder, aug, prompt, max_new_tokens=n, stop_token_ids=[]))


@pytest.mark.parametrize("mode", ["latents", "latent_kv", "full"])
def test_stored_equals_computed(setup, mode, tmp_path):
    """augment -> record -> Parquet -> load -> greedy continue: the very same logits, bit for bit."""
    decoder, module, fp = setup
    aug = augment(decoder, module, [_doc(30)])[0]  # 30 tokens: past every sliding window used here
    if mode == "latents" and module.latent_channel == "kv":  # no input-embedding latents exist to store
        assert aug.latents is None
        with pytest.raises(ValueError, match="latent_kv"):
            encode_record(aug, doc_id="doc-1", fingerprint=fp, mode=mode, dtype="float32", spec=decoder.cache_spec)
        return
    expected = _steps(decoder, aug, [5, 6, 7])
    empty_prompt = _steps(decoder, aug, [])

    record = encode_record(aug, doc_id="doc-1", fingerprint=fp, mode=mode, dtype="float32", spec=decoder.cache_spec)
    write_records(str(tmp_path / "part.parquet"), [record])
    (loaded,) = read_records(str(tmp_path / "part.parquet"))
    assert loaded == record
    restored = restore(loaded, decoder, fp)

    assert restored.seq_len == aug.seq_len == 30 + N_L + module.reread
    assert restored.n_reread == aug.n_reread == module.reread
    assert restored.position_rule == aug.position_rule == loaded.position_rule == module.position_rule
    assert restored.next_position == aug.next_position == (30 if module.position_rule == "keep" else aug.seq_len)
    got = _steps(decoder, restored, [5, 6, 7])
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert [t for t, _ in _steps(decoder, restored, [])] == [t for t, _ in empty_prompt]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_record_round_trip_bit_exact_in_stored_dtype(setup, dtype):
    decoder, module, fp = setup
    aug = augment(decoder, module, [_doc(20)])[0]
    record = encode_record(aug, doc_id="d", fingerprint=fp, mode="full", dtype=dtype, spec=decoder.cache_spec)
    restored = restore(record, decoder, fp)
    want = getattr(torch, dtype)
    for (k, v), (k2, v2) in zip(aug.layers, restored.layers, strict=True):
        s = k2.shape[2]  # sliding layers keep their window only
        assert torch.equal(k[..., -s:, :].to(want), k2.to(want))
        assert torch.equal(v[..., -s:, :].to(want), v2.to(want))
    assert torch.equal(aug.next_logits.to(want), restored.next_logits.to(want))


def test_fallback_equals_generate(setup):
    """No coprocessor: decoding from the plain cache equals the decoder's own greedy generate."""
    decoder, _, _ = setup
    doc, prompt = _doc(25, 1), [9, 10, 11]
    plain = augment(decoder, None, [doc])[0]
    assert plain.n_latents == 0 and plain.seq_len == 25
    ours = generate(decoder, plain, prompt, max_new_tokens=12, stop_token_ids=[])
    theirs = decoder.model.generate(
        torch.tensor([doc + prompt]), attention_mask=torch.ones(1, 28, dtype=torch.long),
        max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
    )[0, 28:].tolist()
    assert ours == theirs


def test_a_cache_serves_many_decodes_unchanged(setup):
    """A cache (e.g. one the server's LRU holds) is shared, not copied, by each decode: it must never be written to."""
    decoder, module, _ = setup
    aug = augment(decoder, module, [_doc(25, 2)])[0]
    before = [(k.clone(), v.clone()) for k, v in aug.layers]
    first = _steps(decoder, aug, [9, 10, 11])
    other = _steps(decoder, aug, [12])  # another request on the same cache in between
    again = _steps(decoder, aug, [9, 10, 11])
    assert [t for t, _ in again] == [t for t, _ in first] and len(other) == 6
    for (k, v), (k0, v0) in zip(aug.layers, before, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(first, again, strict=True))  # the same logits, bit for bit


def test_batched_augment_equals_one_by_one(setup):
    """Ragged batches (right padding) give the per-document result."""
    decoder, module, _ = setup
    docs = [_doc(n, seed=n) for n in (7, 30, 19)]
    batch = augment(decoder, module, docs)
    for doc, got in zip(docs, batch, strict=True):
        want = augment(decoder, module, [doc])[0]
        assert got.seq_len == want.seq_len == len(doc) + N_L + module.reread
        assert torch.equal(got.input_ids, want.input_ids)
        for (k, v), (k2, v2) in zip(got.layers, want.layers, strict=True):
            torch.testing.assert_close(k, k2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.next_logits, want.next_logits, rtol=1e-5, atol=1e-5)
        if module.latent_channel == "kv":
            assert got.latents is None and want.latents is None
        else:
            torch.testing.assert_close(got.latents, want.latents, rtol=1e-5, atol=1e-5)


def test_serving_agrees_with_training(setup):
    """Decoding the true continuation from an augmented cache reproduces the training loss at that point."""
    decoder, module, _ = setup
    seq = torch.tensor([_doc(40, 3)])
    p, n_ahead = 26, 5
    aug = augment(decoder, module, [seq[0, :p].tolist()])[0]
    ahead = seq[0, p : p + n_ahead].tolist()
    # the cache's own next_logits predict ahead[0]; feeding ahead[:k] predicts ahead[k]
    step_logits = [aug.next_logits]
    for k in range(1, n_ahead):
        (_, logits), = decode_steps(decoder, aug, ahead[:k], max_new_tokens=1, stop_token_ids=[])
        step_logits.append(logits)
    ce = torch.nn.functional.cross_entropy(torch.stack(step_logits).float(), torch.tensor(ahead))
    ref = reference_loss(decoder, module, seq, torch.tensor([[p]]), n_ahead)
    assert torch.equal(ahead_targets(seq, torch.tensor([[p]]), n_ahead)[0, 0], torch.tensor(ahead))
    torch.testing.assert_close(ce, ref.loss.detach(), rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_stops(setup):
    decoder, module, _ = setup
    aug = augment(decoder, module, [_doc(12)])[0]
    a = generate(decoder, aug, [4], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5, stop_token_ids=[])
    b = generate(decoder, aug, [4], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5, stop_token_ids=[])
    assert a == b and len(a) == 8
    greedy = generate(decoder, aug, [4], max_new_tokens=8, stop_token_ids=[])
    stop = greedy[2]
    cut = generate(decoder, aug, [4], max_new_tokens=8, stop_token_ids=[stop])
    assert cut == greedy[: greedy.index(stop) + 1]
