"""One-pass multi-position loss == the per-point reference loop, for several architectures."""

from __future__ import annotations

import pytest
import torch

from cache_aug.config import CacheAugConfig, ConfigError, CoprocessorConfig, from_dict
from cache_aug.coprocessor import build_latent_module
from cache_aug.losses import (
    one_pass_loss,
    plain_ahead_loss,
    reference_loss,
    sample_points,
)
from cache_aug.masks import block_attention_mask, block_position_ids
from cache_aug.testing import tiny_decoder

ARCHS = ["llama", "qwen2", "qwen2-sliding", "mistral", "gpt2", "gemma2", "phi3"]
T, B, N_L, N_A = 40, 5, 3, 5  # sequences longer than the sliding windows (12-16) of the sliding configs


def _module(decoder, mode, first="last_latent", rule="shift", channel="embeds"):
    cfg = CoprocessorConfig(mode=mode, lora_rank=4, first_ahead_from=first, position_rule=rule, latent_channel=channel)
    module = build_latent_module(decoder, cfg, n_latents=N_L).eval()
    if mode == "lora":  # fresh LoRA B is zero; make the adapters matter
        for name, p in module.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return module


def _loss_and_grads(fn, decoder, module, ids, points):
    out = fn(decoder, module, ids, points, N_A)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    return out, grads


def _assert_one_pass_equals_reference(decoder, module, seed):
    """Loss, per-position loss and every trainable gradient: one-pass == the per-point loop."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, decoder.config.vocab_size, (2, T), generator=g)
    points = sample_points(2, T, B, N_A, min_prefix=2, generator=g)

    fast, g_fast = _loss_and_grads(one_pass_loss, decoder, module, ids, points)
    slow, g_slow = _loss_and_grads(reference_loss, decoder, module, ids, points)

    assert fast.n_targets == slow.n_targets == 2 * B * N_A
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.per_position, slow.per_position, rtol=1e-4, atol=1e-6)
    assert len(g_fast) == len(g_slow) > 0
    for a, b in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-9)
    assert any(a.abs().sum() > 0 for a in g_fast)


@pytest.mark.parametrize("rule", ["shift", "keep"])
@pytest.mark.parametrize("first", ["last_latent", "last_token"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["full", "lora", "pause"])
def test_one_pass_equals_reference(arch, mode, first, rule):
    """min_prefix=2 < N_L: under "keep" some latents are clamped to position 0."""
    decoder = tiny_decoder(arch)
    _assert_one_pass_equals_reference(decoder, _module(decoder, mode, first, rule), seed=7)


@pytest.mark.parametrize("rule", ["shift", "keep"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_kv_channel_one_pass_equals_reference(arch, mode, rule):
    """latent_channel="kv": C's own per-layer KV at the latent slots; the one-pass masks (picked out of the trace
    layout) against the per-point loop over the model's own caches and masks, loss and gradients."""
    decoder = tiny_decoder(arch)
    _assert_one_pass_equals_reference(decoder, _module(decoder, mode, "last_token", rule, channel="kv"), seed=11)


@pytest.mark.parametrize("rule", ["shift", "keep"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2-sliding"])
def test_untrained_kv_channel_is_pause_tokens(arch, rule):
    """C starts as a copy of D, so before training the KV it writes at the latent slots is the KV D computes for
    the soft tokens: the kv channel starts exactly where pause tokens (same soft tokens) do. Once C's weights
    move, it does not (negative control)."""
    decoder = tiny_decoder(arch)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, decoder.config.vocab_size, (2, T), generator=g)
    points = sample_points(2, T, B, N_A, min_prefix=2, generator=g)
    kv = _module(decoder, "full", "last_token", rule, channel="kv")
    pause = _module(decoder, "pause", "last_token", rule)
    torch.testing.assert_close(kv.soft_tokens, pause.soft_tokens)
    want = one_pass_loss(decoder, pause, ids, points, N_A).per_position
    torch.testing.assert_close(one_pass_loss(decoder, kv, ids, points, N_A).per_position, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for name, p in kv.trunk.named_parameters():
            if "v_proj" in name and name.endswith("weight"):
                p.add_(0.05 * torch.randn_like(p))
    assert (one_pass_loss(decoder, kv, ids, points, N_A).per_position - want).abs().max() > 1e-3


def test_kv_channel_needs_the_reread_slot():
    with pytest.raises(ConfigError, match="last_token"):
        CoprocessorConfig(latent_channel="kv")
    with pytest.raises(ConfigError, match="storage.mode"):
        from_dict(CacheAugConfig, {"coprocessor": {"latent_channel": "kv", "first_ahead_from": "last_token"},
                                   "storage": {"mode": "latents"}})


def test_latents_change_the_loss():
    """Negative control: the augmented loss is not just the plain loss (so equivalence is not vacuous)."""
    decoder = tiny_decoder("llama")
    module = _module(decoder, "full")
    ids = torch.randint(3, 96, (2, T), generator=torch.Generator().manual_seed(1))
    points = sample_points(2, T, B, N_A, 2, torch.Generator().manual_seed(2))
    aug = one_pass_loss(decoder, module, ids, points, N_A).loss.detach()
    none = plain_ahead_loss(decoder, ids, points, N_A).loss
    assert abs(float(aug) - float(none)) > 1e-3
    reread = one_pass_loss(decoder, _module(decoder, "full", "last_token"), ids, points, N_A).loss.detach()
    assert abs(float(reread) - float(aug)) > 1e-3  # the slot choice changes what is computed
    keep = one_pass_loss(decoder, _module(decoder, "full", "last_token", "keep"), ids, points, N_A).loss.detach()
    assert abs(float(keep) - float(reread)) > 1e-3  # so does the position rule


def test_position_rules():
    """Positions of [N_L latents, re-read token, following tokens] per rule; "keep" clamps at 0."""
    points = torch.tensor([[5, 2]])
    shift = block_position_ids(points, 6, "shift", 3, 1)
    keep = block_position_ids(points, 6, "keep", 3, 1)
    assert shift.tolist() == [[5, 6, 7, 8, 9, 10, 2, 3, 4, 5, 6, 7]]
    assert keep.tolist() == [[2, 3, 4, 4, 5, 6, 0, 0, 1, 1, 2, 3]]
    assert block_position_ids(points, 5, "keep", 3, 0).tolist() == [[2, 3, 4, 5, 6, 0, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="position rule"):
        block_position_ids(points, 3, "later", 3, 0)


def test_block_mask_layout():
    """Blocks see their own prefix and themselves (causally), never another block."""
    points = torch.tensor([[2, 4]])
    m = block_attention_mask(points, cache_len=5, block_len=2, dtype=torch.float32)[0, 0] == 0  # (4, 9)
    expected = torch.tensor(
        [  # cache cols 0-4 | block0 q0 q1 | block1 q0 q1
            [1, 1, 0, 0, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 1, 0],
            [1, 1, 1, 1, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)
    # window 2: a query sees positions q-1 and q only (block1 starts at position 4)
    w = block_attention_mask(points, cache_len=5, block_len=2, dtype=torch.float32, window=2)[0, 0] == 0
    assert w[3].nonzero().flatten().tolist() == [7, 8]  # positions 4 and 5: its own block only
    assert w[2].nonzero().flatten().tolist() == [3, 7]  # position 4 sees cache col 3 and itself


def test_sample_points_range_and_errors():
    g = torch.Generator().manual_seed(0)
    p = sample_points(64, 30, 8, 5, 4, g)
    assert p.shape == (64, 8)
    assert int(p.min()) >= 4 and int(p.max()) <= 25
    assert all(len(set(row.tolist())) == 8 for row in p)
    assert torch.equal(p, p.sort(dim=1).values)
    with pytest.raises(ValueError, match="points_per_sequence=30"):
        sample_points(1, 30, 30, 5, 4, g)
