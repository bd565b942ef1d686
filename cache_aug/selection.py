"""Selective augmentation: what augmentation buys each document, measured on the document alone.

The corpus job can store a document without latents when its augmentation does not help it. To decide, the
probe augments the document at a few points of its own text and compares D's ahead-token cross-entropy with
and without the module's latents there (method.md's training loss, on the document's own tokens):

    points = probe_points(len(doc), n_points=4, n_ahead=16, min_prefix=16)   # e.g. [16, 69, 122, 176] for 192
    gains = probe_gains(decoder, module, docs, n_points=4, n_ahead=16, min_prefix=16)   # nats/token, > 0: helps

The probe reads nothing after the document: every target lies inside it. Both conditions go through the
project's one evaluator (`losses.one_pass_ce`, `losses.plain_ahead_ce`), so the probe measures exactly what
training minimises and evaluation reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cache_aug.decoder import Decoder
from cache_aug.losses import one_pass_ce, plain_ahead_ce
from cache_aug.records import PLAIN_MODE


def probe_points(doc_len: int, n_points: int, n_ahead: int, min_prefix: int) -> list[int] | None:
    """The probe's augmentation points (prefix lengths) in a document of doc_len tokens: n_points points spread evenly
    over [min_prefix, doc_len - n_ahead], the last one at doc_len - n_ahead (so the last point's ahead tokens are the
    document's own last n_ahead tokens); repeats allowed when the range is shorter than n_points; None when
    doc_len < min_prefix + n_ahead (nothing to measure). Deterministic (depends only on the arguments).

    Point i of n is min_prefix + floor(i * (hi - min_prefix) / (n - 1)) with hi = doc_len - n_ahead (a single
    point sits at hi). min_prefix must be at least 1: a point needs a token before it (the re-read last token,
    and the plain decoder's logits that predict the first ahead token).
    """
    if n_points < 1 or n_ahead < 1 or min_prefix < 1:
        raise ValueError(f"probe_points needs n_points >= 1, n_ahead >= 1, min_prefix >= 1; got n_points={n_points}, "
                         f"n_ahead={n_ahead}, min_prefix={min_prefix}")
    lo, hi = min_prefix, doc_len - n_ahead
    if hi < lo:
        return None
    if n_points == 1:
        return [hi]
    return [lo + (i * (hi - lo)) // (n_points - 1) for i in range(n_points)]


@torch.no_grad()
def probe_gains(decoder: Decoder, module, docs: Sequence[Sequence[int]], *, n_points: int, n_ahead: int,
                min_prefix: int, batch_size: int = 8) -> list[float | None]:
    """Per document: mean ahead-token cross-entropy of the decoder alone minus that with the module's latents, at the
    probe_points, over the document's own tokens (nats per token; > 0: augmentation helps). None where probe_points is
    None.

    Documents are sorted by length and probed batch_size at a time, right-padded (the tokenizer's pad id, else 0) to
    the longest of the chunk. The padding is exact, not an approximation: the prefill runs causally, so a document's
    keys and values at its own positions do not depend on what follows them; every augmentation block sees only cache
    columns before its point (masks.block_attention_mask), and every point p has p + n_ahead <= the document's length,
    so no query, fed token or target reaches a pad column. A document's gains equal its gains probed alone, up to
    the rounding of batched arithmetic (tests/cache_aug/test_selection.py). The module runs in eval mode meanwhile.
    """
    if module is None:
        raise ValueError("probe_gains needs a module: the gain is the decoder alone minus the decoder with latents")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    points = [probe_points(len(d), n_points, n_ahead, min_prefix) for d in docs]
    gains: list[float | None] = [None] * len(docs)
    order = sorted((i for i, p in enumerate(points) if p is not None), key=lambda i: (len(docs[i]), i))
    pad_id = getattr(decoder.tokenizer, "pad_token_id", None) or 0
    was_training = module.training
    module.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            T = max(len(docs[i]) for i in chunk)
            ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)  # (n, T) right-padded
            for row, i in enumerate(chunk):
                ids[row, : len(docs[i])] = torch.as_tensor(list(docs[i]), dtype=torch.long)
            ids = ids.to(decoder.device)
            pts = torch.tensor([points[i] for i in chunk], dtype=torch.long, device=decoder.device)  # (n, B)
            augmented = one_pass_ce(decoder, module, ids, pts, n_ahead)  # (n, B, N_A)
            none = plain_ahead_ce(decoder, ids, pts, n_ahead)  # (n, B, N_A)
            gain = (none.double() - augmented.double()).mean(dim=(1, 2))  # (n,)
            for row, i in enumerate(chunk):
                gains[i] = float(gain[row])
    finally:
        module.train(was_training)
    return gains


def gain_count_columns(edges: Sequence[float]) -> list[str]:
    """The columns of a `gain_counts` row: one bin per gap between edges and beyond each end, then the counts of
    measured, unmeasured (null gain) and plain records, and the sum of the measured gains."""
    return [f"bin_{k}" for k in range(len(edges) + 1)] + ["measured", "unmeasured", "plain", "gain_sum"]


def gain_counts(batch: pa.Table, edges: Sequence[float]) -> pa.Table:
    """One row (`gain_count_columns`) summing a batch of records (columns `gain`, `mode`) for the corpus job's gain
    histogram: `bin_k` counts measured gains g with edges[k-1] <= g < edges[k] (bin_0: g < edges[0]; the last:
    g >= edges[-1]). Rows of several batches add up column by column."""
    gain = batch.column("gain")
    values = gain.drop_null().to_numpy() if gain.null_count < len(gain) else np.zeros(0)
    bins = np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right"),
                       minlength=len(edges) + 1)
    plain = int(pc.sum(pc.equal(batch.column("mode"), PLAIN_MODE)).as_py() or 0)
    counts = [*(int(n) for n in bins), len(values), gain.null_count, plain, float(values.sum())]
    return pa.table({name: [v] for name, v in zip(gain_count_columns(edges), counts, strict=True)})


def gain_histogram(totals: dict, edges: Sequence[float]) -> dict:
    """The manifest's block from the summed `gain_counts` columns: edges, counts per bin (len(edges) + 1), and the
    measured, unmeasured, plain and augmented records with the mean measured gain."""
    counts = [int(totals.get(f"bin_{k}", 0)) for k in range(len(edges) + 1)]
    measured, unmeasured, plain = (int(totals.get(k, 0)) for k in ("measured", "unmeasured", "plain"))
    return {"edges": list(edges), "counts": counts, "measured": measured, "unmeasured": unmeasured, "plain": plain,
            "augmented": measured + unmeasured - plain,
            "gain_mean": totals.get("gain_sum", 0.0) / measured if measured else None}
