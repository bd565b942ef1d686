"""Paired-bootstrap statistics of an evaluation: the report's perplexities and their intervals.

    report = summarise(rows, conditions, n_ahead, cfg.eval, meta)   # rows: cache_aug.evaluate's, one per window

The headline perplexity is exp(mean cross-entropy over ahead positions 1..N_A), N_A being the
range the modules were trained on; the relative reduction is 1 - ppl(condition) / ppl(none).
Confidence intervals come from a paired bootstrap over augmentation points: the same resample of
points is applied to every condition, so the interval of a reduction accounts for the pairing.
`interval` is the quantile interval every bootstrap of the package reports (cache_aug.arithmetic too).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import numpy as np

from cache_aug.config import EvalConfig

FORMAT = "cache-aug/eval"
FORMAT_VERSION = 1


def positions_digest(rows: Sequence[dict], condition: str) -> str:
    """sha256 of the (doc_id, window, point) triples at which `condition` was measured."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: (r["doc_id"], r["window"])):
        measured = len(r[f"ce_{condition}"])
        h.update(json.dumps([r["doc_id"], r["window"], r["points"][:measured]]).encode())
    return h.hexdigest()


def interval(samples: np.ndarray, confidence: float) -> list[float]:
    """The central `confidence` quantile interval of bootstrap samples: [lo, hi], or one per column of (R, A)."""
    lo, hi = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return [float(lo), float(hi)] if np.ndim(lo) == 0 else np.stack([lo, hi], -1).tolist()


def summarise(rows: Sequence[dict], conditions: Sequence[str], n_ahead: int, ev: EvalConfig,
              meta: dict | None = None) -> dict:
    """The report: headline and per-position perplexities with paired-bootstrap intervals."""
    rows = sorted(rows, key=lambda r: (r["doc_id"], r["window"]))
    if not rows:
        raise ValueError("no window of the held-out documents is long enough to evaluate")
    ce = {c: np.concatenate([np.asarray(r[f"ce_{c}"], dtype=np.float64) for r in rows]) for c in conditions}  # (P, A)
    n_points = len(ce[conditions[0]])
    for c in conditions:
        if ce[c].shape != (n_points, ev.max_ahead):
            raise ValueError(f"condition {c!r}: losses of shape {ce[c].shape}, expected {(n_points, ev.max_ahead)}")

    rng = np.random.default_rng(ev.seed)
    weights = rng.multinomial(n_points, np.full(n_points, 1 / n_points), size=ev.bootstrap_samples) / n_points  # (R, P)
    boot_pos = {c: weights @ ce[c] for c in conditions}  # (R, A) mean loss per ahead position
    boot_head = {c: boot_pos[c][:, :n_ahead].mean(1) for c in conditions}  # (R,)

    loss = {c: float(ce[c][:, :n_ahead].mean()) for c in conditions}
    report = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **(meta or {}),
        "n_ahead": n_ahead,
        "max_ahead": ev.max_ahead,
        "conditions": list(conditions),
        "documents": len({r["doc_id"] for r in rows}),
        "windows": len(rows),
        "points": n_points,
        "positions_sha256": {c: positions_digest(rows, c) for c in conditions},
        "loss": loss,
        "ppl": {c: math.exp(loss[c]) for c in conditions},
        "ppl_ci": {c: interval(np.exp(boot_head[c]), ev.confidence) for c in conditions},
        "ppl_all_positions": {c: math.exp(float(ce[c].mean())) for c in conditions},
        "per_position": {
            c: {
                "loss": ce[c].mean(0).tolist(),
                "ppl": np.exp(ce[c].mean(0)).tolist(),
                "ppl_ci": interval(np.exp(boot_pos[c]), ev.confidence),
            }
            for c in conditions
        },
        "bootstrap": {"samples": ev.bootstrap_samples, "confidence": ev.confidence, "seed": ev.seed,
                      "unit": "augmentation point"},
        "settings": {"window": ev.window, "points_per_window": ev.points_per_window, "seed": ev.seed},
    }
    if "none" in conditions:
        others = [c for c in conditions if c != "none"]
        report["relative_reduction"] = {c: 1 - math.exp(loss[c] - loss["none"]) for c in others}
        report["relative_reduction_ci"] = {
            c: interval(1 - np.exp(boot_head[c] - boot_head["none"]), ev.confidence) for c in others
        }
    return report
