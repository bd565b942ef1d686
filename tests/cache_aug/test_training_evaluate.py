"""Held-out evaluation: `evaluate` is the mean over every target at its seeded points, whatever the batch sizes."""

from __future__ import annotations

import pytest
import torch

from cache_aug.config import AugmentationConfig, CoprocessorConfig
from cache_aug.coprocessor import build_latent_module
from cache_aug.losses import one_pass_ce, sample_points
from cache_aug.testing import tiny_decoder
from cache_aug.training import evaluate

AUG = AugmentationConfig(n_latents=2, n_ahead=3, points_per_sequence=3, min_prefix=2)


@pytest.mark.parametrize("training", [True, False], ids=["from-train-mode", "from-eval-mode"])
def test_evaluate_is_the_mean_over_every_target_at_the_seeded_points(training):
    decoder = tiny_decoder("llama")
    module = build_latent_module(decoder, CoprocessorConfig(mode="full"), AUG.n_latents).train(training)
    blocks = torch.randint(3, 96, (7, 24), generator=torch.Generator().manual_seed(0))
    got = evaluate(decoder, module, blocks, AUG, batch_size=3, seed=5)  # batches of 3, 3 and 1 blocks
    assert module.training == training  # the module's mode is given back

    g = torch.Generator().manual_seed(5)  # the same points, batch after batch, written out here
    batches = [(b, sample_points(b.shape[0], b.shape[1], 3, AUG.n_ahead, AUG.min_prefix, g)) for b in blocks.split(3)]
    with torch.no_grad():
        ce = {name: torch.cat([one_pass_ce(decoder, m, b, p, AUG.n_ahead).flatten(0, 1) for b, p in batches]).double()
              for name, m in (("augmented", module.eval()), ("none", None))}  # (7 * 3 points, N_A)
    assert got.n_targets == ce["none"].numel() == 7 * 3 * AUG.n_ahead
    assert got.loss_augmented == pytest.approx(float(ce["augmented"].mean()), rel=1e-6)
    assert got.loss_none == pytest.approx(float(ce["none"].mean()), rel=1e-6)
    assert got.per_position_augmented == pytest.approx(ce["augmented"].mean(0).tolist(), rel=1e-6)
    assert got.per_position_none == pytest.approx(ce["none"].mean(0).tolist(), rel=1e-6)
    assert abs(got.loss_augmented - got.loss_none) > 1e-3  # the two conditions really differ
