"""Held-out evaluation: the decoder alone ("none"), pause tokens and the coprocessor, at the same points.

    docs = read_documents(cfg.eval)                                   # [(doc_id, text)], id order
    rows = evaluate_documents(decoder, modules, docs, cfg.eval, min_prefix)   # one row per window
    report = summarise(rows, conditions, n_ahead, cfg.eval, meta)     # ppl, per ahead position, CIs
    write_report(report, rows, "runs/eval")                           # eval.json, eval.md, PNG, positions

Each document is cut into windows of `eval.window` tokens; each window gets `points_per_window`
augmentation points, sampled ONCE from a seed derived from (seed, doc_id, window index). Every
condition is then measured at exactly those points, on ahead positions 1..max_ahead (the losses
of `cache_aug.losses`, so evaluation computes what training optimises). Because the points depend
only on the document, any split of the documents over workers (pipelines/evaluate.py) gives the
same points and the same report.

The headline perplexity is exp(mean cross-entropy over ahead positions 1..N_A), N_A being the
range the modules were trained on; the relative reduction is 1 - ppl(condition) / ppl(none).
Confidence intervals come from a paired bootstrap over augmentation points: the same resample of
points is applied to every condition, so the interval of a reduction accounts for the pairing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from cache_aug.config import EvalConfig
from cache_aug.decoder import Decoder
from cache_aug.documents import usable_text
from cache_aug.losses import one_pass_ce, sample_points

FORMAT = "cache-aug/eval"
FORMAT_VERSION = 1
CONDITIONS = ("none", "pause", "coprocessor")


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


def read_documents(ev: EvalConfig, storage_options: dict | None = None,
                   skipped: Counter | None = None) -> list[tuple[str, str]]:
    """(doc_id, text) of every held-out document, in id order (at most ev.max_documents).

    Rows without usable text are counted in `skipped` by reason; duplicated ids are refused.
    """
    import fsspec
    import pyarrow.parquet as pq

    from cache_aug.corpus import resolve_embedded_path

    docs: list[tuple[str, str]] = []
    ids: list = []
    for path in map(resolve_embedded_path, ev.paths):
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
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
            ce = {name: one_pass_ce(decoder, m, ids, points, ev.max_ahead).float().cpu() for name, m in modules.items()}
            for j, (doc_id, index, _) in enumerate(chunk):
                rows.append({"doc_id": doc_id, "window": index, "points": points[j].tolist()}
                            | {f"ce_{name}": ce[name][j].tolist() for name in modules})
    return sorted(rows, key=lambda r: (r["doc_id"], r["window"]))


# --------------------------------------------------------------------------- #
# Summary
# --------------------------------------------------------------------------- #


def positions_digest(rows: Sequence[dict], condition: str) -> str:
    """sha256 of the (doc_id, window, point) triples at which `condition` was measured."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: (r["doc_id"], r["window"])):
        measured = len(r[f"ce_{condition}"])
        h.update(json.dumps([r["doc_id"], r["window"], r["points"][:measured]]).encode())
    return h.hexdigest()


def _interval(samples: np.ndarray, confidence: float) -> list[float]:
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
        "ppl_ci": {c: _interval(np.exp(boot_head[c]), ev.confidence) for c in conditions},
        "ppl_all_positions": {c: math.exp(float(ce[c].mean())) for c in conditions},
        "per_position": {
            c: {
                "loss": ce[c].mean(0).tolist(),
                "ppl": np.exp(ce[c].mean(0)).tolist(),
                "ppl_ci": _interval(np.exp(boot_pos[c]), ev.confidence),
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
            c: _interval(1 - np.exp(boot_head[c] - boot_head["none"]), ev.confidence) for c in others
        }
    return report


# --------------------------------------------------------------------------- #
# Outputs
# --------------------------------------------------------------------------- #

_SHOWN_POSITIONS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def markdown_table(report: dict) -> str:
    """The headline table and a per-position table, in Markdown."""
    conds, n_a = report["conditions"], report["n_ahead"]
    head = f"N_L={report.get('n_latents')}, " if report.get("n_latents") else ""
    lines = [
        f"{head}{report['points']} points in {report['windows']} windows of {report['documents']} documents; "
        f"{int(report['bootstrap']['confidence'] * 100)}% bootstrap intervals over points.",
        "",
        f"| condition | ppl, ahead 1..{n_a} | change vs none | ppl, ahead 1..{report['max_ahead']} |",
        "| --- | --- | --- | --- |",
    ]
    for c in conds:
        lo, hi = report["ppl_ci"][c]
        if c == "none" or "relative_reduction" not in report:
            vs = "-"
        else:
            r, (rlo, rhi) = report["relative_reduction"][c], report["relative_reduction_ci"][c]
            vs = f"{-100 * r:+.1f}% [{-100 * rhi:+.1f}, {-100 * rlo:+.1f}]"
        lines.append(f"| {c} | {report['ppl'][c]:.2f} [{lo:.2f}, {hi:.2f}] | {vs} | "
                     f"{report['ppl_all_positions'][c]:.2f} |")
    shown = [k for k in _SHOWN_POSITIONS if k <= report["max_ahead"]]
    lines += ["", "| ahead k | " + " | ".join(conds) + " |", "| --- |" + " --- |" * len(conds)]
    for k in shown:
        cells = [f"{report['per_position'][c]['ppl'][k - 1]:.2f}" for c in conds]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ahead(report: dict, path: str | Path) -> Path:
    """Perplexity by ahead position, one line (with its interval band) per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.arange(1, report["max_ahead"] + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in report["conditions"]:
        pp = report["per_position"][c]
        ci = np.asarray(pp["ppl_ci"])
        ax.plot(ks, pp["ppl"], marker=".", label=f"{c} ({report['ppl'][c]:.2f})")
        ax.fill_between(ks, ci[:, 0], ci[:, 1], alpha=0.2)
    ax.axvline(report["n_ahead"] + 0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("ahead position k (token x_{t+k})")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    title = f"N_L={report['n_latents']}: " if report.get("n_latents") else ""
    ax.set_title(f"{title}held-out perplexity by ahead position (dashed: trained range N_A={report['n_ahead']})",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_gain_vs_latents(reports: Sequence[dict], path: str | Path) -> Path:
    """Relative perplexity reduction vs none (with intervals) against N_L, per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = sorted(reports, key=lambda r: r["n_latents"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in [c for c in reports[0]["conditions"] if c != "none"]:
        xs = [r["n_latents"] for r in reports]
        ys = np.array([100 * r["relative_reduction"][c] for r in reports])
        ci = 100 * np.array([r["relative_reduction_ci"][c] for r in reports])
        ax.errorbar(xs, ys, yerr=[ys - ci[:, 0], ci[:, 1] - ys], marker="o", capsize=4, label=c)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["n_latents"] for r in reports], [str(r["n_latents"]) for r in reports])
    ax.set_xlabel("N_L (latents)")
    ax.set_ylabel(f"perplexity reduction vs none, % (ahead 1..{reports[0]['n_ahead']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(report: dict, rows: Sequence[dict], directory: str | Path, name: str = "eval") -> dict[str, Path]:
    """<name>.json, <name>.md, <name>.png and <name>.positions.json (the points, for re-checking) in a local dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / f"{name}.json",
        "md": directory / f"{name}.md",
        "png": directory / f"{name}.png",
        "positions": directory / f"{name}.positions.json",
    }
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["md"].write_text(markdown_table(report))
    plot_ahead(report, paths["png"])
    positions = [{"doc_id": r["doc_id"], "window": r["window"], "points": r["points"]} for r in rows]
    paths["positions"].write_text(json.dumps(positions) + "\n")
    return paths


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


def load_conditions(decoder: Decoder, ev: EvalConfig, storage_options: dict | None = None) -> dict[str, object]:
    """condition -> module: always "none", then "pause" / "coprocessor" where a path is configured."""
    from cache_aug.coprocessor import load_latent_module

    modules: dict[str, object] = {"none": None}
    for name in ("pause", "coprocessor"):
        path = getattr(ev, name)
        if path:
            modules[name] = load_latent_module(path, decoder, storage_options).eval()
    return modules


def run_eval(cfg, *, decoder: Decoder | None = None, modules: dict[str, object] | None = None,
             storage_options: dict | None = None, name: str = "eval", output: str | None = None) -> dict:
    """Evaluate in this process and write the report to `output` (default cfg.eval.output, a local dir)."""
    from cache_aug.decoder import load_decoder

    ev = cfg.eval
    t0 = time.perf_counter()
    if decoder is None:
        decoder = load_decoder(cfg.model, device=ev.device, storage_options=storage_options)
    if modules is None:
        modules = load_conditions(decoder, ev, storage_options)
    skipped: Counter = Counter()
    docs = read_documents(ev, storage_options, skipped)
    rows = evaluate_documents(decoder, modules, docs, ev, cfg.augmentation.min_prefix)
    meta = module_meta(decoder, modules,
                       {"pause": ev.pause, "coprocessor": ev.coprocessor}) | {"skipped_documents": dict(skipped)}
    report = summarise(rows, list(modules), cfg.augmentation.n_ahead, ev, meta | {"device": str(decoder.device)})
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    out = output or ev.output
    if "://" not in out:
        write_report(report, rows, out, name)
        return report
    import tempfile

    import fsspec

    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_report(report, rows, tmp, name).values():
            fs.put_file(str(path), f"{root.rstrip('/')}/{path.name}")
    return report
