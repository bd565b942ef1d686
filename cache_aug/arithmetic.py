"""A reasoning-flavoured check: arithmetic answered with and without augmentation at `=`.

    report = run_arithmetic(cfg, ArithmeticSpec(), work_dir="runs/arith", results_dir="docs/results/arith")

1. A synthetic corpus: documents of `problems_per_doc` lines `a+b=c` (or `a*b=c`) with `digits`-digit
   operands (seeded). The evaluation documents use operand pairs that never occur in training.
2. A tiny character-level decoder is pretrained on the training documents (`cache_aug.tiny_pretrain`).
   Answers are written most-significant digit first, so the first answer digit already depends on
   every carry: the decoder must do that work in the positions it has, which is where latent
   computation at `=` could help.
3. Pause tokens and a coprocessor are trained and evaluated for each N_L with the N_L sweep
   (`cache_aug.sweep`): the same ahead-token perplexity report as the headline sweep, on this corpus.
   Training is the paper's general recipe (random augmentation points), not tuned to `=`.
4. Exact match: for every evaluation problem, the document up to and including its `=` is the
   context (the earlier lines of the document give the format), it is augmented there by each
   condition, and the answer is decoded greedily up to the end of the line. Accuracy per condition
   over the same problems, with paired bootstrap intervals over problems.

Outputs under results_dir: corpus + decoder facts, nl<N_L>.json/.md/.png (perplexity), and
arithmetic.json / arithmetic.md (exact match per N_L). Resumable like the sweep.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache_aug.config import OptimConfig, to_dict
from cache_aug.corpus import Document, write_documents
from cache_aug.decoder import Decoder
from cache_aug.stats import interval

FORMAT = "cache-aug/arithmetic"
CONDITIONS = ("none", "pause", "coprocessor")


@dataclass(frozen=True)
class ArithmeticSpec:
    """The synthetic corpus and the tiny decoder pretrained on it."""

    op: str = "*"
    """The operation: "+" or "*". A tiny decoder learns 3-digit addition perfectly in this budget (100% exact
    match, nothing left to gain), so the default is 2-digit multiplication, which it only partly learns."""
    digits: int = 2
    """Digits of each operand (no leading zeros)."""
    problems_per_doc: int = 10
    """Lines `a+b=c` (or `a*b=c`) per document."""
    train_docs: int = 6000
    """Training documents (the decoder's and the modules' training text)."""
    eval_docs: int = 60
    """Evaluation documents: their problems are the exact-match test set; pairs never in training."""
    eval_from_problem: int = 5
    """Problems before this index in an evaluation document only give context (the format)."""
    seed: int = 0
    """Seed of the corpus."""
    hidden_size: int = 128
    """Decoder width."""
    num_layers: int = 4
    """Decoder layers."""
    steps: int = 1500
    """Decoder pretraining steps (batch 16 x 256 tokens)."""
    max_minutes: float = 60.0
    """Wall-clock safety cap on the decoder's pretraining (~6 min on 2 idle cores): a build that reaches it
    stops there, with fewer steps than asked (keep it loose)."""
    threads: int = 2
    """torch threads while pretraining the decoder."""

    def tiny_spec(self):
        from cache_aug.tiny_spec import TinySpec

        heads = max(1, self.hidden_size // 32)
        # pretrained on 256-token blocks, twice what the modules train and evaluate on (128): augmentation shifts
        # the tokens after a point by N_L+1 positions, which must stay inside the positions the decoder has seen
        return TinySpec(vocab_size=258, hidden_size=self.hidden_size,
                        intermediate_size=round(self.hidden_size * 2.6875),
                        num_layers=self.num_layers, num_heads=heads, num_kv_heads=max(1, heads // 2), seq_len=256,
                        batch_size=16, optim=OptimConfig(lr=3e-3, warmup_steps=100, max_steps=self.steps,
                                                         weight_decay=0.1, betas=[0.9, 0.95]),
                        max_minutes=self.max_minutes,
                        threads=self.threads, seed=self.seed, heldout_every=20, eval_batches=8, log_every=100)


def problem_line(a: int, b: int, op: str = "+") -> str:
    if op not in ("+", "*"):
        raise ValueError(f"op must be '+' or '*', got {op!r}")
    return f"{a}{op}{b}={a + b if op == '+' else a * b}\n"


def make_corpus(spec: ArithmeticSpec) -> tuple[list[Document], list[Document]]:
    """(training documents, evaluation documents); no operand pair of the evaluation set is in training."""
    rng = random.Random(spec.seed)
    lo, hi = 10 ** (spec.digits - 1), 10**spec.digits - 1

    def pair() -> tuple[int, int]:
        return rng.randint(lo, hi), rng.randint(lo, hi)

    n_eval = spec.eval_docs * spec.problems_per_doc
    if n_eval > (hi - lo + 1) ** 2 // 2:
        raise ValueError(f"{n_eval} evaluation problems would leave too few {spec.digits}-digit pairs for training")
    eval_pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    while len(eval_pairs) < n_eval:
        p = pair()
        if p not in seen:
            seen.add(p)
            eval_pairs.append(p)
    train_pairs = []
    while len(train_pairs) < spec.train_docs * spec.problems_per_doc:
        p = pair()
        if p not in seen:  # repeats inside training are fine; evaluation pairs never appear
            train_pairs.append(p)

    def docs(pairs: list[tuple[int, int]], prefix: str) -> list[Document]:
        k = spec.problems_per_doc
        return [Document(f"{prefix}{i:05d}",
                         "".join(problem_line(a, b, spec.op) for a, b in pairs[i * k : (i + 1) * k]))
                for i in range(len(pairs) // k)]

    return docs(train_pairs, "arith-train-"), docs(eval_pairs, "arith-eval-")


def eval_problems(docs: Sequence[Document], start: int) -> list[dict]:
    """Each evaluation problem: its context (document text through `=`) and its answer."""
    out = []
    for d in docs:
        lines = d.text.splitlines(keepends=True)
        for i in range(start, len(lines)):
            head, answer = lines[i].rstrip("\n").split("=")
            out.append({"doc_id": d.doc_id, "index": i, "context": "".join(lines[:i]) + head + "=", "answer": answer})
    return out


@torch.no_grad()
def exact_match(decoder: Decoder, modules: dict[str, object], problems: Sequence[dict], *,
                batch_size: int = 16) -> list[dict]:
    """Greedy answer of every problem under every condition (same problems, same contexts)."""
    from cache_aug.augment import augment, generate

    tok = decoder.tokenizer
    newline = tok.encode("\n", add_special_tokens=False)
    stops = newline[-1:] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    rows = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        ids = [tok.encode(p["context"], add_special_tokens=False) for p in chunk]
        for name, module in modules.items():
            for p, cache in zip(chunk, augment(decoder, module, ids), strict=True):
                max_new = len(p["answer"]) + 2
                out = generate(decoder, cache, [], max_new_tokens=max_new, temperature=0.0, stop_token_ids=stops)
                text = tok.decode([t for t in out if t not in stops], skip_special_tokens=True)
                rows.append({"doc_id": p["doc_id"], "index": p["index"], "condition": name, "answer": p["answer"],
                             "output": text, "correct": text == p["answer"]})
    return rows


@torch.no_grad()
def position_gap_ppl(decoder: Decoder, docs: Sequence[Document], gaps: Sequence[int], *, n_ahead: int = 5,
                     stride: int = 3, min_prefix: int = 8) -> dict[int, dict]:
    """The decoder alone, with the tokens after a point moved `gap` positions later and nothing inserted.

    Augmentation moves every token after the point N_L (+1 re-read) positions on. This measures what
    that move alone costs the frozen decoder: ahead-token perplexity over the n_ahead tokens after points
    every `stride` tokens, and over those right after `=`.
    """
    tok, model = decoder.tokenizer, decoder.model
    eq = tok.encode("=", add_special_tokens=False)[-1]
    out = {}
    for gap in gaps:
        total = {"all": [0.0, 0], "after_equals": [0.0, 0]}
        for d in docs:
            ids = torch.tensor([tok.encode(d.text, add_special_tokens=False)], device=decoder.device)  # (1, T)
            T = ids.shape[1]
            for p in range(min_prefix, T - n_ahead, stride):
                pos = torch.arange(p + 1 + n_ahead, device=ids.device)
                pos[p + 1 :] += gap
                logits = model(input_ids=ids[:, : p + 1 + n_ahead], position_ids=pos[None]).logits[0, p : p + n_ahead]
                nll = -torch.log_softmax(logits.float(), -1).gather(
                    1, ids[0, p + 1 : p + 1 + n_ahead, None]).sum().item()
                for key in ("all",) + (("after_equals",) if ids[0, p] == eq else ()):
                    total[key][0] += nll
                    total[key][1] += n_ahead
        out[gap] = {k: (float(np.exp(v / n)) if n else None) for k, (v, n) in total.items()}
    return out


def summarise_exact(rows: Sequence[dict], conditions: Sequence[str], *, samples: int = 2000, confidence: float = 0.95,
                    seed: int = 0) -> dict:
    """Accuracy per condition and differences vs none, with paired bootstrap intervals over problems."""
    keys = sorted({(r["doc_id"], r["index"]) for r in rows})
    where = {k: i for i, k in enumerate(keys)}
    hits = np.zeros((len(conditions), len(keys)))
    for r in rows:
        hits[conditions.index(r["condition"]), where[(r["doc_id"], r["index"])]] = r["correct"]
    rng = np.random.default_rng(seed)
    boot = hits[:, rng.integers(0, len(keys), size=(samples, len(keys)))].mean(-1)  # (C, samples)
    acc = {c: float(hits[i].mean()) for i, c in enumerate(conditions)}
    return {
        "problems": len(keys),
        "accuracy": acc,
        "accuracy_ci": {c: interval(boot[i], confidence) for i, c in enumerate(conditions)},
        "minus_none": {c: acc[c] - acc["none"] for c in conditions if c != "none"},
        "minus_none_ci": {c: interval(boot[i] - boot[0], confidence) for i, c in enumerate(conditions) if c != "none"},
        "confidence": confidence,
        "bootstrap_samples": samples,
    }


def markdown(report: dict) -> str:
    lines = ["| N_L | none | pause | coprocessor | pause - none | coprocessor - none |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report["by_n_latents"]:
        a, ci, d, dci = r["accuracy"], r["accuracy_ci"], r["minus_none"], r["minus_none_ci"]
        cells = [f"{100 * a[c]:.1f}% [{100 * ci[c][0]:.1f}, {100 * ci[c][1]:.1f}]" for c in CONDITIONS]
        cells += [f"{100 * d[c]:+.1f} pts [{100 * dci[c][0]:+.1f}, {100 * dci[c][1]:+.1f}]"
                  for c in ("pause", "coprocessor")]
        lines.append(f"| {r['n_latents']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_decoder(spec: ArithmeticSpec, train_docs: list[Document], out: Path,
                  log: Callable[[str], None] = print) -> Path:
    """Pretrain the character-level decoder once (reused when its pretrain.json is there)."""
    from cache_aug.tiny_pretrain import pretrain_tiny

    if not (out / "pretrain.json").exists():
        pretrain_tiny(out, spec.tiny_spec(), docs=train_docs, log=log)
    return out


def run_arithmetic(cfg, spec: ArithmeticSpec, *, work_dir: str | Path, results_dir: str | Path,
                   modules_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """The whole check (see module docstring); `cfg` gives the sweep's N_L values, steps and module settings.

    The corpus and decoder live in work_dir, the trained modules in modules_dir (default work_dir/sweep).
    """
    from cache_aug.coprocessor import load_latent_module
    from cache_aug.decoder import load_decoder
    from cache_aug.devices import choose_device
    from cache_aug.sweep import run_sweep

    work, results = Path(work_dir), Path(results_dir)
    modules_at = Path(modules_dir) if modules_dir is not None else work / "sweep"
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_docs, eval_docs = make_corpus(spec)
    train_path = write_documents(train_docs, work / "corpus" / "train.parquet")
    eval_path = write_documents(eval_docs, work / "corpus" / "eval.parquet")
    decoder_dir = build_decoder(spec, train_docs, work / "decoder", log)
    pretrain = json.loads((decoder_dir / "pretrain.json").read_text())

    run_cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=str(decoder_dir)),
        data=dataclasses.replace(cfg.data, paths=[str(train_path)], eval_paths=[str(eval_path)], seq_len=128),
        eval=dataclasses.replace(cfg.eval, paths=[str(eval_path)], window=128, max_ahead=min(cfg.eval.max_ahead, 16)),
        sweep=dataclasses.replace(cfg.sweep, work_dir=str(modules_at), results_dir=str(results)),
    )
    reports = run_sweep(run_cfg, log=log)

    decoder = load_decoder(run_cfg.model, device=choose_device(run_cfg.eval.device))
    problems = eval_problems(eval_docs, spec.eval_from_problem)
    by_nl = []
    for n_latents in run_cfg.sweep.n_latents:
        modules = {"none": None} | {c: load_latent_module(modules_at / f"nl{n_latents}-{c}" / "module", decoder).eval()
                                    for c in ("pause", "coprocessor")}
        rows = exact_match(decoder, modules, problems)
        summary = summarise_exact(rows, list(CONDITIONS), seed=run_cfg.eval.seed)
        (results / f"arithmetic_nl{n_latents}.answers.json").write_text(json.dumps(rows) + "\n")
        by_nl.append({"n_latents": n_latents} | summary)
        log(f"[arith] N_L={n_latents}: exact match " + ", ".join(f"{c} {100 * summary['accuracy'][c]:.1f}%"
                                                                 for c in CONDITIONS))
    # how far augmentation moves the text after a point: N_L (+1 re-read) under "shift", nothing under "keep"
    layout = modules["coprocessor"].layout
    moved = {dataclasses.replace(layout, n_latents=n).text_shift for n in run_cfg.sweep.n_latents}
    shifts = sorted({0, 1} | moved)
    gap = position_gap_ppl(decoder, eval_docs, shifts, n_ahead=run_cfg.augmentation.n_ahead)
    log("[arith] decoder alone, tokens after a point moved on by g positions: " +
        ", ".join(f"g={g} ppl {v['all']:.2f}" for g, v in gap.items()))
    report = {
        "format": FORMAT,
        "spec": dataclasses.asdict(spec),
        "corpus": {"train_documents": len(train_docs), "eval_documents": len(eval_docs), "eval_problems": len(problems),
                   "example": eval_docs[0].text.splitlines()[0]},
        "decoder": {k: pretrain[k] for k in ("params", "steps", "train_seconds", "heldout_ppl", "train_loss")},
        "modules": {"optim": to_dict(run_cfg.optim), "batch_size": run_cfg.sweep.batch_size,
                    "n_ahead": run_cfg.augmentation.n_ahead,
                    "points_per_sequence": run_cfg.augmentation.points_per_sequence,
                    "first_ahead_from": run_cfg.coprocessor.first_ahead_from,
                    "position_rule": run_cfg.coprocessor.position_rule},
        "ppl": {r["n_latents"]: r["ppl"] for r in reports},
        "by_n_latents": by_nl,
        "position_gap_ppl": {str(g): v for g, v in gap.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (results / "arithmetic.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / "arithmetic.md").write_text(markdown(report))
    return report
