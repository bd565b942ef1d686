"""A local training run interrupted and resumed from its checkpoint ends exactly where an unbroken run does."""

from __future__ import annotations

import pytest
import torch

from cache_aug.blocks import iterate_batches, pack_blocks
from cache_aug.config import AugmentationConfig, CoprocessorConfig, OptimConfig
from cache_aug.coprocessor import build_latent_module
from cache_aug.testing import tiny_decoder
from cache_aug.training import evaluate, train_local

AUG = AugmentationConfig(n_latents=2, n_ahead=3, points_per_sequence=3, min_prefix=2)


class Interrupted(Exception):
    pass


def _run(decoder, blocks, checkpoint=None, stop_at=None):
    module = build_latent_module(decoder, CoprocessorConfig(mode="full", first_ahead_from="last_token"), 2)

    def on_step(step):
        if step == stop_at:
            raise Interrupted

    losses = train_local(decoder, module, iterate_batches(blocks, 2, seed=0), AUG,
                         OptimConfig(lr=1e-2, warmup_steps=2, max_steps=6), log_every=0, checkpoint_path=checkpoint,
                         checkpoint_every=2, on_step=on_step)
    return module, losses


def test_resumed_run_equals_unbroken(tmp_path):
    decoder = tiny_decoder("llama")
    blocks = torch.randint(3, 96, (8, 24), generator=torch.Generator().manual_seed(0))
    unbroken, want = _run(decoder, blocks)
    with pytest.raises(Interrupted):
        _run(decoder, blocks, tmp_path / "ckpt.pt", stop_at=5)  # the step-4 checkpoint survives
    resumed, got = _run(decoder, blocks, tmp_path / "ckpt.pt")
    assert got == pytest.approx(want, rel=1e-5)
    trained = unbroken.trainable_state()  # (not the unused one-row placeholder embedding)
    assert trained
    for name, b in resumed.trainable_state().items():
        torch.testing.assert_close(trained[name], b, rtol=1e-5, atol=1e-6, msg=name)


def test_too_little_text_is_refused_not_looped_over():
    """Fewer packed blocks than one batch used to make iterate_batches spin forever; no held-out block divided by
    zero."""
    blocks = pack_blocks([[5, 6, 7]] * 3, seq_len=8, eos_id=0)  # 12 tokens: 1 block
    assert blocks.shape == (1, 8)
    with pytest.raises(ValueError, match="1 packed blocks of 8 tokens, fewer than one batch of 4"):
        iterate_batches(blocks, 4, seed=0)
    assert next(iterate_batches(blocks, 1, seed=0)).shape == (1, 8)
    decoder = tiny_decoder("llama")
    module = build_latent_module(decoder, CoprocessorConfig(mode="pause"), 2)
    with pytest.raises(ValueError, match="held-out text packs into no block"):
        evaluate(decoder, module, pack_blocks([[5, 6]], seq_len=8, eos_id=0), AUG)
