"""Held-out evaluation: the decoder alone ("none"), pause tokens and the coprocessor, at the same points.

    docs = read_documents(cfg.eval)                                   # [(doc_id, text)], id order
    rows = evaluate_documents(decoder, modules, docs, cfg.eval, min_prefix)   # one row per window
    report = summarise(rows, conditions, n_ahead, cfg.eval, meta)     # cache_aug.stats: ppl, per ahead position, CIs
    write_report(report, rows, "runs/eval")                           # cache_aug.report: eval.json, eval.md, PNG, ...

Each document is cut into windows of `eval.window` tokens; each window gets `points_per_window`
augmentation points, sampled ONCE from a seed derived from (seed, doc_id, window index). Every
condition is then measured at exactly those points, on ahead positions 1..max_ahead (the losses
of `cache_aug.losses`, so evaluation computes what training optimises). Because the points depend
only on the document, any split of the documents over workers (pipelines/evaluate.py) gives the
same points and the same report. The statistics are `cache_aug.stats`, the tables, plots and files
`cache_aug.report`; `run_eval` is the whole evaluation in one process, writing a local directory.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from cache_aug.config import EvalConfig, S3Config
from cache_aug.decoder import Decoder
from cache_aug.documents import usable_text
from cache_aug.losses import conditions_ce, sample_points
from cache_aug.report import write_report
from cache_aug.stats import summarise

CONDITIONS = ("none", "pause", "coprocessor")


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


def read_documents(ev: EvalConfig, s3: S3Config | None = None,
                   skipped: Counter | None = None) -> list[tuple[str, str]]:
    """(doc_id, text) of every held-out document, in id order (at most ev.max_documents); s3:// ones reached as
    `s3` says.

    Rows without usable text are counted in `skipped` by reason; duplicated ids are refused.
    """
    import pyarrow.parquet as pq

    from cache_aug.corpus import resolve_embedded_path
    from cache_aug.paths import url_to_fs

    docs: list[tuple[str, str]] = []
    ids: list = []
    for path in map(resolve_embedded_path, ev.paths):
        fs, root = url_to_fs(path, s3)
        columns = pq.read_table(root, filesystem=fs).to_pydict()
        ids += columns.get(ev.id_column) or []
        docs.extend(document_rows(columns, ev, skipped))
    check_unique_ids(ids, ev.id_column)
    docs.sort()
    return docs[: ev.max_documents] if ev.max_documents else docs


def check_unique_ids(ids: Iterable, column: str) -> None:
    """Refuse an id given to more than one row: its document would count twice, its windows tie in order."""
    counts = Counter(str(i) for i in ids if i is not None)
    dups = sorted((k, n) for k, n in counts.items() if n > 1)
    if dups:
        shown = ", ".join(f"{k!r} ({n} rows)" for k, n in dups[:5])
        raise ValueError(f"eval.id_column {column!r}: {len(dups)} ids name more than one row: {shown}")


def document_rows(columns: dict[str, Sequence], ev: EvalConfig,
                  skipped: Counter | None = None) -> list[tuple[str, str]]:
    """(doc_id, text) pairs from a column batch; documents without an id are named by their text's hash.

    Null, empty and invalid UTF-8 texts are left out, counted by reason in `skipped`; a text column
    holding something other than text raises ValueError naming it.
    """
    if ev.text_column not in columns:
        raise ValueError(f"eval.text_column: column {ev.text_column!r} not found (columns: {sorted(columns)})")
    texts = columns[ev.text_column]
    ids = columns.get(ev.id_column) or [None] * len(texts)
    out = []
    for doc_id, raw in zip(ids, texts, strict=True):
        text, reason = usable_text(raw, ev.text_column)
        if reason:
            if skipped is not None:
                skipped[reason] += 1
            continue
        out.append((str(doc_id) if doc_id is not None else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16],
                    text))
    return out


# --------------------------------------------------------------------------- #
# Windows and points
# --------------------------------------------------------------------------- #


def window_points(doc_id: str, index: int, length: int, ev: EvalConfig, min_prefix: int) -> torch.Tensor:
    """(B,) sorted prefix lengths for one window; depends only on (seed, doc_id, index, length)."""
    available = length - ev.max_ahead - min_prefix + 1
    digest = hashlib.sha256(f"{ev.seed}|{doc_id}|{index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    n = min(ev.points_per_window, available)
    return sample_points(1, length, n, ev.max_ahead, min_prefix, g)[0]  # (B,)


def document_windows(doc_id: str, ids: list[int], ev: EvalConfig, min_prefix: int) -> list[tuple[str, int, list[int]]]:
    """(doc_id, index, tokens) of each window long enough to hold a point with max_ahead tokens ahead."""
    out = []
    for index, start in enumerate(range(0, len(ids), ev.window)):
        chunk = ids[start : start + ev.window]
        if len(chunk) >= min_prefix + ev.max_ahead:
            out.append((doc_id, index, chunk))
    return out


@torch.no_grad()
def evaluate_documents(decoder: Decoder, modules: dict[str, object], docs: Iterable[tuple[str, str]],
                       ev: EvalConfig, min_prefix: int) -> list[dict]:
    """One row per window: its points and, per condition, the cross-entropy (B, max_ahead) at them.

    modules: condition name -> module (None for "none"). Windows of equal length are batched.
    """
    tok = decoder.tokenizer
    windows = [w for doc_id, text in docs for w in document_windows(doc_id, tok.encode(text), ev, min_prefix)]
    by_len: dict[int, list] = {}
    for w in windows:
        by_len.setdefault(len(w[2]), []).append(w)
    rows = []
    for length in sorted(by_len):
        group = by_len[length]
        for i in range(0, len(group), ev.batch_size):
            chunk = group[i : i + ev.batch_size]
            ids = torch.tensor([w[2] for w in chunk], device=decoder.device)  # (n, T)
            # (n, B)
            points = torch.stack([window_points(d, k, length, ev, min_prefix) for d, k, _ in chunk]).to(decoder.device)
            # (n, B, A)
            ce = {name: c.cpu() for name, c in conditions_ce(decoder, modules, ids, points, ev.max_ahead).items()}
            for j, (doc_id, index, _) in enumerate(chunk):
                rows.append({"doc_id": doc_id, "window": index, "points": points[j].tolist()}
                            | {f"ce_{name}": ce[name][j].tolist() for name in modules})
    return sorted(rows, key=lambda r: (r["doc_id"], r["window"]))


# --------------------------------------------------------------------------- #
# The whole evaluation in one process
# --------------------------------------------------------------------------- #


def module_meta(decoder: Decoder, modules: dict[str, object], paths: dict[str, str]) -> dict:
    """What was evaluated: decoder and modules, with fingerprints (goes into the report)."""
    from cache_aug.coprocessor import latent_fingerprint

    described = {
        name: {"path": paths.get(name), "mode": m.mode, "n_latents": m.n_latents,
               "first_ahead_from": m.first_ahead_from,
               "position_rule": m.position_rule, "latent_channel": m.latent_channel,
               "fingerprint": latent_fingerprint(decoder, m)}
        for name, m in modules.items() if m is not None
    }
    n_latents = sorted({d["n_latents"] for d in described.values()})
    return {
        "n_latents": n_latents[0] if len(n_latents) == 1 else n_latents or None,
        "decoder": {"source": decoder.source, "fingerprint": decoder.fingerprint},
        "modules": described,
    }


def load_conditions(decoder: Decoder, ev: EvalConfig, s3: S3Config | None = None) -> dict[str, object]:
    """condition -> module: always "none", then "pause" / "coprocessor" where a path is configured."""
    from cache_aug.coprocessor import load_latent_module

    modules: dict[str, object] = {"none": None}
    for name in ("pause", "coprocessor"):
        path = getattr(ev, name)
        if path:
            modules[name] = load_latent_module(path, decoder, s3).eval()
    return modules


def run_eval(cfg, *, decoder: Decoder | None = None, modules: dict[str, object] | None = None,
             name: str = "eval", output: str | None = None) -> dict:
    """Evaluate in this process and write the report to `output` (default cfg.eval.output), a local directory;
    s3:// inputs are reached as cfg.s3 says."""
    from cache_aug.decoder import load_decoder
    from cache_aug.devices import choose_device

    ev = cfg.eval
    out = output or ev.output
    if "://" in out:
        raise ValueError(f"run_eval writes a local directory, not {out!r}: write it there, then copy it")
    t0 = time.perf_counter()
    if decoder is None:
        decoder = load_decoder(cfg.model, device=choose_device(ev.device), s3=cfg.s3)
    if modules is None:
        modules = load_conditions(decoder, ev, cfg.s3)
    skipped: Counter = Counter()
    docs = read_documents(ev, cfg.s3, skipped)
    rows = evaluate_documents(decoder, modules, docs, ev, cfg.augmentation.min_prefix)
    meta = module_meta(decoder, modules,
                       {"pause": ev.pause, "coprocessor": ev.coprocessor}) | {"skipped_documents": dict(skipped)}
    report = summarise(rows, list(modules), cfg.augmentation.n_ahead, ev, meta | {"device": str(decoder.device)})
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    write_report(report, rows, out, name)
    return report
