"""Selective augmentation: does storing latents only for the documents the probe says gain pay, on the embedded default?

    python -m bench.selection [--coprocessor DIR] [--doc-tokens 128] [--n-points 4] [--threads 2]

A serving user's documents are windows of the held-out chapters (`embedded:kjv/heldout`, never trained on):
document = D tokens, continuation = the next N_A tokens (N_A = augmentation.n_ahead, the range the coprocessor
was trained on), windows not overlapping. For each document:

- the probe (`cache_aug.selection.probe_gains`) measures on the document's own tokens, never the continuation,
  what augmentation buys it; the policy, fixed before any result was seen, augments a document iff its gain > 0;
- the continuation is scored at the document's end (point D): D alone ("none"), and D on the augmented cache
  (`losses.one_pass_ce` with points [[D]], what serving a stored record computes).

Conditions: (a) none, (b) every document augmented, (c) only the selected ones (the others keep their "none"
cross-entropy), as ahead-token perplexity over all continuation targets, with paired-bootstrap 95% intervals over
documents. For information only: (c) at fixed fractions of top probe gains, an oracle that selects by the
continuation's own gain (an upper bound no policy reaches), and the correlation of probe and continuation gains.

Costs, side by side in one run: wall time of the probe vs `augment` over the same documents at the same batch size;
payload bytes of a stored record (`records.encode_record`, latent_kv and full; a kv-channel module has no
`latents`) vs the token ids alone that an unselected document keeps; `records.restore` vs plain prefill of the
document (what serving does for an unselected one), median ms.

Without --coprocessor, one is trained first with the sweep's local loop (`cache_aug.sweep.train_local_condition`)
on the recipe of docs/RESULTS.md ("A wider channel": latent_channel kv, position_rule keep, N_L 16, 400 steps of
batch 16), under --work-dir; a later run takes it with --coprocessor <work-dir>/nl16-coprocessor/module.
Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.results_io import write_result
from bench.storage_modes import first_token_seconds
from cache_aug.augment import augment
from cache_aug.coprocessor import latent_fingerprint, load_latent_module
from cache_aug.decoder import Decoder, load_decoder
from cache_aug.evaluate import read_documents
from cache_aug.losses import one_pass_ce, plain_ahead_ce
from cache_aug.records import encode_plain, encode_record, restore
from cache_aug.selection import probe_gains
from cache_aug.stats import interval
from cache_aug.sweep import condition_config, train_local_condition, training_blocks
from cache_aug.tiny import build_if_embedded
from pipelines.config import load_job_config

# docs/RESULTS.md, "A wider channel": the best CPU recipe measured (-0.5% vs none at 400 steps)
RECIPE = ["coprocessor.first_ahead_from=last_token", "coprocessor.position_rule=keep", "coprocessor.latent_channel=kv",
          "optim.max_steps=400", "sweep.batch_size=16", "sweep.curve_every=200"]
FRACTIONS = (0.25, 0.5, 0.75)


def windows(decoder: Decoder, paths: list[str], cfg, doc_tokens: int, n_ahead: int,
            max_docs: int) -> list[tuple[str, int, list[int], list[int]]]:
    """(chapter id, window index, document D tokens, continuation N_A tokens), non-overlapping, in chapter order."""
    ev = dataclasses.replace(cfg.eval, paths=paths, max_documents=0, text_column=cfg.data.text_column)
    out = []
    for doc_id, text in read_documents(ev):
        ids = decoder.tokenizer.encode(text)
        stride = doc_tokens + n_ahead
        for k, start in enumerate(range(0, len(ids) - stride + 1, stride)):
            out.append((doc_id, k, ids[start : start + doc_tokens], ids[start + doc_tokens : start + stride]))
    return out[:max_docs] if max_docs else out


def train_coprocessor(cfg, decoder: Decoder, n_latents: int, work_dir: Path) -> tuple[Path, dict]:
    """The sweep's local loop for the coprocessor condition; returns its module dir and training record."""
    run_cfg = condition_config(cfg, "coprocessor", n_latents)
    run_dir = work_dir / f"nl{n_latents}-coprocessor"
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (run_dir / "module" / "latents.json").exists():
        train = training_blocks(cfg, decoder, cfg.data.paths)
        held = training_blocks(cfg, decoder, cfg.data.eval_paths)[:16]
        train_local_condition(run_cfg, "coprocessor", run_dir, decoder=decoder, train=train, heldout=held)
    info = json.loads((run_dir / "training.json").read_text()) if (run_dir / "training.json").exists() else {}
    return run_dir / "module", info | {"wall_s_this_run": round(time.perf_counter() - t0, 1)}


def module_training(directory: Path) -> dict:
    """The training record saved beside a module by the sweep's loop, if any."""
    path = directory.parent / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}


@torch.no_grad()
def continuation_ce(decoder: Decoder, module, items, batch_size: int) -> dict[str, np.ndarray]:
    """Per document, the continuation's N_A cross-entropies at the document's end: (n_docs, N_A) per condition."""
    out = {"none": [], "augmented": []}
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        ids = torch.tensor([doc + cont for _, _, doc, cont in chunk], device=decoder.device)  # (n, D+N_A), all equal
        points = torch.tensor([[len(doc)] for _, _, doc, _ in chunk], device=decoder.device)  # (n, 1)
        n_ahead = len(chunk[0][3])
        out["none"].append(plain_ahead_ce(decoder, ids, points, n_ahead)[:, 0].double().cpu())
        out["augmented"].append(one_pass_ce(decoder, module, ids, points, n_ahead)[:, 0].double().cpu())
    return {c: torch.cat(v).numpy() for c, v in out.items()}


def paired_bootstrap(per_doc: dict[str, np.ndarray], pairs: list[tuple[str, str]], samples: int, seed: int,
                     confidence: float = 0.95) -> dict[str, dict]:
    """Relative perplexity change of a vs b (ppl_a / ppl_b - 1) with its paired-bootstrap interval over documents.

    per_doc: condition -> (n_docs,) mean cross-entropy of each document's continuation (every document has N_A
    targets, so the mean over documents is the mean over targets). One resample of documents serves every pair.
    """
    n = len(next(iter(per_doc.values())))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1 / n), size=samples) / n  # (R, n)
    boot = {c: weights @ v for c, v in per_doc.items()}  # (R,) mean loss per resample
    return {f"{a}_vs_{b}": {"change": math.exp(per_doc[a].mean() - per_doc[b].mean()) - 1,
                            "ci": interval(np.exp(boot[a] - boot[b]) - 1, confidence)} for a, b in pairs}


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/sweep_tiny.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides after the recipe's (" + " ".join(RECIPE) + ")")
    ap.add_argument("--n-latents", type=int, default=16)
    ap.add_argument("--coprocessor", help="a trained module's directory; none given: one is trained first")
    ap.add_argument("--work-dir", default="runs/selection", help="where a module trained here goes")
    ap.add_argument("--doc-tokens", type=int, default=128, help="D: tokens per document")
    ap.add_argument("--n-points", type=int, default=4, help="the probe's augmentation points per document")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-docs", type=int, default=0, help="0: every window of the held-out chapters")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes of probe and augment, interleaved")
    ap.add_argument("--ttft-docs", type=int, default=48, help="documents timed for restore vs plain prefill")
    ap.add_argument("--bootstrap", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="selection")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    walls: dict[str, float] = {}
    t_all = time.perf_counter()

    overrides = RECIPE + args.set
    cfg = load_job_config(args.config, overrides=overrides)
    build_if_embedded(cfg.model.path)  # the explicit build of an embedded decoder: loading never builds
    decoder = load_decoder(cfg.model)
    aug_cfg = cfg.augmentation
    n_ahead, min_prefix = aug_cfg.n_ahead, aug_cfg.min_prefix

    t = time.perf_counter()
    if args.coprocessor:
        module_dir, training = Path(args.coprocessor), module_training(Path(args.coprocessor))
    else:
        module_dir, training = train_coprocessor(cfg, decoder, args.n_latents, Path(args.work_dir))
    walls["train_s"] = round(time.perf_counter() - t, 1)
    if training.get("n_ahead", n_ahead) != n_ahead:
        raise SystemExit(f"{module_dir}: trained with n_ahead={training['n_ahead']}, the config says {n_ahead}")
    module = load_latent_module(module_dir, decoder).eval()
    meta = json.loads((module_dir / "latents.json").read_text())
    fp = latent_fingerprint(decoder, module)

    items = windows(decoder, list(cfg.data.eval_paths), cfg, args.doc_tokens, n_ahead, args.max_docs)
    docs = [doc for _, _, doc, _ in items]
    n = len(docs)
    print(f"[selection] {n} documents of {args.doc_tokens} tokens (+{n_ahead} continuation) from "
          f"{len({c for c, *_ in items})} held-out chapters; module {meta['mode']}/{meta['latent_channel']}/"
          f"{meta['position_rule']} N_L={meta['n_latents']}")

    # probe and augment, side by side: interleaved passes over the same documents, same batch size
    bs = args.batch_size
    probe_s, augment_s, gains = [], [], None
    t = time.perf_counter()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            augment(decoder, module, docs[i : i + bs])
        augment_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        g = probe_gains(decoder, module, docs, n_points=args.n_points, n_ahead=n_ahead, min_prefix=min_prefix,
                        batch_size=bs)
        probe_s.append(time.perf_counter() - t0)
        gains = g if gains is None else gains
    walls["probe_and_augment_s"] = round(time.perf_counter() - t, 1)
    gain = np.array([np.nan if x is None else x for x in gains])
    selected = gain > 0  # the a-priori policy; a document with nothing to probe (None) is not selected

    t = time.perf_counter()
    ce = continuation_ce(decoder, module, items, bs)  # (n, N_A) per condition
    walls["continuation_s"] = round(time.perf_counter() - t, 1)
    per_doc = {"none": ce["none"].mean(1), "all": ce["augmented"].mean(1)}  # (n,)
    per_doc["selected"] = np.where(selected, per_doc["all"], per_doc["none"])
    cont_gain = per_doc["none"] - per_doc["all"]  # (n,) nats/token, > 0: augmentation helped this continuation
    info: dict[str, np.ndarray] = {}
    order = np.argsort(-np.nan_to_num(gain, nan=-np.inf), kind="stable")  # highest probe gain first
    for f in FRACTIONS:
        top = np.zeros(n, dtype=bool)
        top[order[: round(f * n)]] = True
        info[f"top{round(100 * f)}"] = np.where(top, per_doc["all"], per_doc["none"])
    info["oracle"] = np.minimum(per_doc["all"], per_doc["none"])
    ppl = {c: math.exp(v.mean()) for c, v in (per_doc | info).items()}
    intervals = paired_bootstrap(per_doc | info, [("all", "none"), ("selected", "none"), ("selected", "all")]
                                 + [(c, "none") for c in info], args.bootstrap, args.seed)
    ok = ~np.isnan(gain)
    pearson = float(np.corrcoef(gain[ok], cont_gain[ok])[0, 1])
    spearman = float(np.corrcoef(ranks(gain[ok]), ranks(cont_gain[ok]))[0, 1])

    # storage: a selected document's record per mode, an unselected one's plain record (its token ids only)
    t = time.perf_counter()
    modes = [m for m in ("latents", "latent_kv", "full") if module.layout.allows_storage(m)]
    record_bytes: dict[str, list[int]] = {f"{m}/{d}": [] for m in modes for d in ("bfloat16", "float32")}
    ids_bytes, timed_records = [], []
    for i in range(0, n, bs):
        for j, a in enumerate(augment(decoder, module, docs[i : i + bs])):
            recs = {}
            for key in record_bytes:
                mode, dtype = key.split("/")
                rec = encode_record(a, doc_id=f"d{i + j}", fingerprint=fp, mode=mode, dtype=dtype,
                                    spec=decoder.cache_spec)
                record_bytes[key].append(len(rec.payload))
                recs[key] = rec
            ids_bytes.append(len(encode_plain(docs[i + j], doc_id=f"d{i + j}", fingerprint=fp,
                                              dtype=cfg.storage.dtype).payload))
            if i + j < args.ttft_docs:
                timed_records.append({k: r for k, r in recs.items() if k.endswith(cfg.storage.dtype)})
    n_sel = int(selected.sum())
    storage = {"ids_only_bytes_per_doc": statistics.mean(ids_bytes), "modes": {}}
    for key, sizes in record_bytes.items():
        per = statistics.mean(sizes)
        all_total = sum(sizes)
        sel_total = sum(s if sel else b for s, b, sel in zip(sizes, ids_bytes, selected, strict=True))
        storage["modes"][key] = {"record_bytes_per_doc": per, "all_augmented_total": all_total,
                                 "selected_total": sel_total, "selected_vs_all": sel_total / all_total}
    walls["storage_s"] = round(time.perf_counter() - t, 1)

    # time to first token: restore of a stored record vs plain prefill of the document (an unselected one)
    t = time.perf_counter()
    ttft: dict[str, list[float]] = {"plain_prefill": []} | {k: [] for k in timed_records[0]}
    for doc, recs in zip(docs, timed_records, strict=False):
        ttft["plain_prefill"].append(first_token_seconds(lambda doc=doc: augment(decoder, None, [doc]), 3))
        for k, rec in recs.items():
            ttft[k].append(first_token_seconds(lambda rec=rec: restore(rec, decoder, fp), 3))
    ttft_ms = {k: 1e3 * statistics.median(v) for k, v in ttft.items()}
    walls["ttft_s"] = round(time.perf_counter() - t, 1)
    walls["total_s"] = round(time.perf_counter() - t_all, 1)

    table = [{"condition": c, "augmented_docs": k, "ppl": ppl[c],
              "vs_none": intervals.get(f"{c}_vs_none")} for c, k in
             [("none", 0), ("all", n), ("selected", n_sel)]]
    result = {
        "bench": "selection",
        "command": "python -m bench.selection " + shlex.join(sys.argv[1:]),
        "settings": {
            "config": args.config, "overrides": overrides, "decoder": cfg.model.path, "doc_tokens": args.doc_tokens,
            "n_ahead": n_ahead, "min_prefix": min_prefix, "n_points": args.n_points, "batch_size": bs,
            "repeats": args.repeats, "ttft_docs": len(timed_records), "threads": args.threads,
            "bootstrap": {"samples": args.bootstrap, "seed": args.seed, "confidence": 0.95, "unit": "document"},
            "policy": "augment iff probe gain > 0 (fixed before any result was seen)",
            "documents": n, "chapters": len({c for c, *_ in items}), "split": list(cfg.data.eval_paths),
        },
        "coprocessor": {"dir": str(module_dir), "trained_here": not args.coprocessor, "meta": meta,
                        "training": training},
        "table": table,
        "intervals": intervals,
        "selected": {"count": n_sel, "fraction": n_sel / n,
                     "mean_continuation_gain_selected": float(cont_gain[selected].mean()) if n_sel else None,
                     "mean_continuation_gain_unselected": float(cont_gain[~selected].mean()) if n_sel < n else None},
        "information_only": {
            "ppl": {c: ppl[c] for c in info},
            "correlation_probe_vs_continuation_gain": {"pearson": pearson, "spearman": spearman},
            "probe_gain": {"mean": float(np.nanmean(gain)), "median": float(np.nanmedian(gain)),
                           "positive_fraction": float(selected.mean())},
            "continuation_gain": {"mean": float(cont_gain.mean()), "median": float(np.median(cont_gain)),
                                  "positive_fraction": float((cont_gain > 0).mean())},
        },
        "costs": {
            "probe_s": probe_s, "augment_s": augment_s,
            "probe_ms_per_doc": 1e3 * statistics.median(probe_s) / n,
            "augment_ms_per_doc": 1e3 * statistics.median(augment_s) / n,
            "probe_vs_augment": statistics.median(probe_s) / statistics.median(augment_s),
        },
        "storage": storage,
        "ttft_ms_median": ttft_ms,
        "wall_s": walls,
        "device": str(decoder.device),
    }
    write_result(args.name, result)

    print(f"\n{n} documents, {n_sel} selected ({100 * n_sel / n:.0f}%); continuation ppl over {n * n_ahead} targets")
    print(f"{'condition':<10} {'augmented':>9} {'ppl':>8}  vs none [95%]")
    for row in table:
        v = row["vs_none"]
        vs = f"{100 * v['change']:+.2f}% [{100 * v['ci'][0]:+.2f}, {100 * v['ci'][1]:+.2f}]" if v else ""
        print(f"{row['condition']:<10} {row['augmented_docs']:>9} {row['ppl']:>8.3f}  {vs}")
    v = intervals["selected_vs_all"]
    print(f"selected vs all: {100 * v['change']:+.2f}% [{100 * v['ci'][0]:+.2f}, {100 * v['ci'][1]:+.2f}]; "
          f"probe/continuation gain correlation: pearson {pearson:.3f}, spearman {spearman:.3f}")
    costs = result["costs"]
    print(f"probe {costs['probe_ms_per_doc']:.1f} ms/doc vs augment {costs['augment_ms_per_doc']:.1f} ms/doc "
          f"({costs['probe_vs_augment']:.2f}x); ttft ms: "
          + ", ".join(f"{k} {v:.1f}" for k, v in ttft_ms.items()))


if __name__ == "__main__":
    main()
