"""The one packer and batch stream of training text: documents -> (N, seq_len) blocks -> shuffled batches.

Every trainer cuts text the same way: the local loop, the sweep, the tiny decoder's pretraining, and the Ray
Data stage of the distributed job (one Ray Data batch of documents at a time).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

__all__ = ["iterate_batches", "pack_blocks"]


def pack_blocks(token_ids: Iterable[list[int]], seq_len: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into (N, seq_len) blocks; the tail is dropped."""
    flat: list[int] = []
    for ids in token_ids:
        flat.extend(ids)
        if eos_id is not None:
            flat.append(eos_id)
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def iterate_batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled (batch_size, T) batches over the blocks, reshuffled every epoch.

    Refuses at once (not at the first batch, and not by spinning forever) blocks that make no batch.
    """
    if blocks.shape[0] < batch_size:
        raise ValueError(f"training data: {blocks.shape[0]} packed blocks of {blocks.shape[-1]} tokens, fewer than one "
                         f"batch of {batch_size}: add text, or lower the batch size or seq_len")

    def batches() -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(blocks.shape[0], generator=g)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield blocks[order[i : i + batch_size]]

    return batches()
