"""The Ray Train evaluation of a rank is the local `evaluate` of that rank's blocks: same points, same numbers."""

from __future__ import annotations

import pytest
import torch

import pipelines.train as train
from cache_aug.coprocessor import build_latent_module
from cache_aug.testing import tiny_decoder
from cache_aug.training import evaluate
from pipelines.config import load_job_config


class _Shard:
    """The eval dataset shard's batches, without a cluster."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def iter_torch_batches(self, batch_size: int, dtypes):
        for b in self.blocks.split(batch_size):
            yield {"input_ids": b.to(dtypes)}


# eval_batches=2 over 2 ranks: the first 4 micro-batches of 2 blocks, [0 1] [2 3] [4 5] [6], dealt out in turn
@pytest.mark.parametrize(("rank", "world", "rows"), [(0, 1, [0, 1, 2, 3]), (0, 2, [0, 1, 4, 5]), (1, 2, [2, 3, 6])])
def test_a_ranks_sums_are_the_local_evaluation_of_its_blocks(rank, world, rows, monkeypatch):
    cfg = load_job_config(None, overrides=["augmentation.n_latents=2", "augmentation.n_ahead=3",
                                           "augmentation.points_per_sequence=3", "augmentation.min_prefix=2",
                                           "train.micro_batch_size=2", "train.eval_batches=2", "train.seed=4"])
    decoder = tiny_decoder("llama")
    module = build_latent_module(decoder, cfg.coprocessor, 2)
    blocks = torch.randint(3, 96, (7, 24), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(train.ray.train, "get_dataset_shard", lambda name: _Shard(blocks))
    assert not torch.distributed.is_initialized()  # one process: the all-reduce leaves the rank's sums as they are

    got = train._evaluate(decoder, module, cfg, rank, world, torch.device("cpu"))
    assert module.training  # back in training mode
    want = evaluate(decoder, module, blocks[rows], cfg.augmentation, batch_size=2, seed=cfg.train.seed + 7)
    assert got == {"eval_ahead_loss": want.loss_augmented, "eval_ahead_loss_none": want.loss_none,
                   "eval_ppl": want.ppl_augmented, "eval_ppl_none": want.ppl_none, "eval_targets": want.n_targets}
