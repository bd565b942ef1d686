"""The per-document gain probe: its points, and batched gains == each document alone == the naive per-point loop."""

from __future__ import annotations

import pytest
import torch

from cache_aug.config import CoprocessorConfig
from cache_aug.coprocessor import build_latent_module
from cache_aug.losses import plain_ahead_loss, reference_loss
from cache_aug.selection import probe_gains, probe_points
from cache_aug.testing import tiny_decoder

N_POINTS, N_A, MIN_PREFIX = 4, 5, 2
# ragged on purpose: equal lengths, one too short to probe (None), one whose range is shorter than N_POINTS
# (repeated points), lengths past qwen2-sliding's window (12) so right padding meets the sliding masks
LENGTHS = [40, 23, 6, 31, 40, 9, 17, 35]


def test_probe_points_spread_and_bounds():
    pts = probe_points(192, 4, 16, 16)
    assert pts == [16, 69, 122, 176]
    for doc_len, n, a, m in [(192, 4, 16, 16), (50, 7, 8, 3), (30, 1, 5, 2), (13, 3, 4, 9), (100, 10, 1, 1)]:
        pts = probe_points(doc_len, n, a, m)
        assert len(pts) == n
        assert pts == sorted(pts)
        assert pts[0] == (m if n > 1 else doc_len - a)
        assert pts[-1] == doc_len - a  # the last point's ahead tokens are the document's last n_ahead tokens
        assert all(m <= p <= doc_len - a for p in pts)
        assert probe_points(doc_len, n, a, m) == pts  # deterministic


def test_probe_points_short_documents():
    assert probe_points(20, 4, 8, 13) is None  # 20 < 13 + 8
    assert probe_points(21, 4, 8, 13) == [13, 13, 13, 13]  # exactly one possible point: repeated
    assert probe_points(23, 4, 8, 13) == [13, 13, 14, 15]  # three possible points for four: repeats
    assert probe_points(0, 4, 8, 1) is None
    with pytest.raises(ValueError, match="min_prefix"):
        probe_points(50, 4, 8, 0)
    with pytest.raises(ValueError, match="n_points"):
        probe_points(50, 0, 8, 2)


def _docs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in LENGTHS]


def _naive_gain(decoder, module, doc):
    """The specification: per document, unpadded, the per-point reference loop against the plain decoder."""
    pts = probe_points(len(doc), N_POINTS, N_A, MIN_PREFIX)
    if pts is None:
        return None
    ids, points = torch.tensor([doc]), torch.tensor([pts])
    with torch.no_grad():
        return float(plain_ahead_loss(decoder, ids, points, N_A).loss - reference_loss(decoder, module, ids, points,
                                                                                     N_A).loss)


def _module(decoder, first, rule, channel):
    torch.manual_seed(0)
    cfg = CoprocessorConfig(mode="full", first_ahead_from=first, position_rule=rule, latent_channel=channel)
    module = build_latent_module(decoder, cfg, n_latents=3).eval()
    with torch.no_grad():  # off its initial copy of D, so the latents matter (for "kv": not the pause tokens)
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return module


@pytest.mark.parametrize("arch, first, rule, channel", [
    ("llama", "last_latent", "shift", "embeds"),  # the defaults
    ("llama", "last_token", "keep", "kv"),
    ("qwen2-sliding", "last_token", "keep", "kv"),
    ("qwen2-sliding", "last_latent", "shift", "embeds"),
], ids=lambda x: str(x))
def test_batched_gains_equal_alone_and_naive(arch, first, rule, channel):
    decoder = tiny_decoder(arch)
    module = _module(decoder, first, rule, channel)
    docs = _docs()
    batched = probe_gains(decoder, module, docs, n_points=N_POINTS, n_ahead=N_A, min_prefix=MIN_PREFIX, batch_size=3)
    alone = [probe_gains(decoder, module, [d], n_points=N_POINTS, n_ahead=N_A, min_prefix=MIN_PREFIX)[0] for d in docs]
    naive = [_naive_gain(decoder, module, d) for d in docs]
    assert [g is None for g in batched] == [n < MIN_PREFIX + N_A for n in LENGTHS]
    assert [g is None for g in alone] == [g is None for g in naive] == [g is None for g in batched]
    for b, a, n in zip(batched, alone, naive, strict=True):
        if n is not None:
            assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
            assert b == pytest.approx(n, rel=1e-4, abs=1e-5)
    assert any(abs(n) > 1e-3 for n in naive if n is not None)  # the latents change something: equality means much
    assert not module.training


def test_probe_gains_batch_order_and_mode():
    """The batch size and the order of documents do not change a document's gain; the module's mode is restored."""
    decoder = tiny_decoder("llama")
    module = _module(decoder, "last_token", "keep", "kv").train()
    docs = _docs(seed=5)
    kw = dict(n_points=N_POINTS, n_ahead=N_A, min_prefix=MIN_PREFIX)
    one = probe_gains(decoder, module, docs, batch_size=1, **kw)
    assert module.training
    many = probe_gains(decoder, module, docs[::-1], batch_size=8, **kw)[::-1]
    for a, b in zip(one, many, strict=True):
        assert (a is None and b is None) or a == pytest.approx(b, rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="needs a module"):
        probe_gains(decoder, None, docs, **kw)


def test_gain_histogram_counts_every_record_once():
    """Bins are [edges[k-1], edges[k]) with two open ends; batches add up; null gains are unmeasured; plain
    records are counted among the measured ones."""
    import pyarrow as pa

    from cache_aug.selection import gain_count_columns, gain_counts, gain_histogram

    edges = [-0.01, 0.0, 0.01]
    a = pa.table({"gain": pa.array([-0.5, -0.01, 0.0, None, 0.0099], pa.float64()),
                  "mode": ["plain", "plain", "plain", "latent_kv", "latent_kv"]})
    b = pa.table({"gain": pa.array([None, None], pa.float64()), "mode": ["full", "full"]})
    rows = [gain_counts(t, edges).to_pylist()[0] for t in (a, b)]
    totals = {k: sum(r[k] for r in rows) for k in rows[0]}
    assert list(totals) == gain_count_columns(edges) == [f"bin_{k}" for k in range(4)] + [
        "measured", "unmeasured", "plain", "gain_sum"]
    h = gain_histogram(totals, edges)
    assert h["counts"] == [1, 1, 2, 0]  # -0.5 | -0.01 | 0.0, 0.0099 | none at or above 0.01
    assert (h["measured"], h["unmeasured"], h["plain"], h["augmented"]) == (4, 3, 3, 4)
    assert h["gain_mean"] == pytest.approx((-0.5 - 0.01 + 0.0 + 0.0099) / 4)
    assert gain_histogram({}, edges)["gain_mean"] is None
