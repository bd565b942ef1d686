"""Headroom: what the modules' training budget buys when spent on the decoder itself.

    python -m bench.headroom [--config jobs/configs/sweep_tiny.yaml] [--set optim.max_steps=1000] [--threads 2]

Cache augmentation keeps the decoder frozen, so everything it gains has to come through the latents.
This is the reference it is judged against here: a copy of the decoder, unfrozen, trained with the
sweep's recipe (same training blocks and batch order, the same optim section: AdamW, schedule, clipping and
steps, and the sweep's batch size) on its own objective, next-token loss over every token of each block.
It is then scored exactly as the sweep scores its conditions: ahead-token perplexity at the sweep's
held-out points (`cache_aug.evaluate`, same windows and points, paired bootstrap), next to the frozen
decoder. If more training of the decoder itself buys little, the decoder is near what its size and this
corpus allow, and a frozen-decoder method has little to win back by being a better language model.

The held-out scores are taken every --check-every steps too, so the curve shows where the fine-tune
overfits (they are a reference curve, nothing is selected by them). Writes bench/results/headroom.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

from bench.results_io import write_result
from cache_aug.blocks import iterate_batches
from cache_aug.config import to_dict
from cache_aug.decoder import Decoder, load_decoder
from cache_aug.devices import choose_device
from cache_aug.evaluate import evaluate_documents, read_documents
from cache_aug.optim import Schedule, adamw, optimizer_step
from cache_aug.stats import summarise
from cache_aug.sweep import training_blocks
from cache_aug.tiny import build_if_embedded
from pipelines.config import load_job_config


def paired_report(cfg, rows_frozen: list[dict], rows_tuned: list[dict]) -> dict:
    """The evaluation report of two decoders at the same points: conditions "none" and "finetuned"."""
    rows = []
    for a, b in zip(rows_frozen, rows_tuned, strict=True):
        if (a["doc_id"], a["window"], a["points"]) != (b["doc_id"], b["window"], b["points"]):
            raise RuntimeError(f"points differ at {a['doc_id']} window {a['window']}")
        rows.append(a | {"ce_finetuned": b["ce_none"]})
    return summarise(rows, ["none", "finetuned"], cfg.augmentation.n_ahead, cfg.eval)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/sweep_tiny.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. optim.max_steps=1000 or sweep.batch_size=16")
    ap.add_argument("--check-every", type=int, default=250)
    ap.add_argument("--max-documents", type=int, default=0, help="held-out documents scored (0: all, as the sweep)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="headroom")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_job_config(args.config, overrides=args.set)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_documents=args.max_documents))
    steps = cfg.optim.max_steps
    build_if_embedded(cfg.model.path)  # the explicit build of an embedded decoder: loading never builds
    frozen = load_decoder(cfg.model, device=choose_device(cfg.eval.device))
    train = training_blocks(cfg, frozen, cfg.data.paths)
    docs = read_documents(cfg.eval)
    score = lambda dec: evaluate_documents(dec, {"none": None}, docs, cfg.eval, cfg.augmentation.min_prefix)  # noqa: E731
    rows_frozen = score(frozen)

    model = copy.deepcopy(frozen.model).train().requires_grad_(True)  # tied embeddings stay tied
    tuned = Decoder(model=model, tokenizer=frozen.tokenizer, source=f"{frozen.source} (fine-tuned)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, cfg.optim)
    sched = Schedule(opt, cfg.optim)
    batches = iterate_batches(train, cfg.sweep.batch_size, seed=cfg.coprocessor.seed)

    curve: list[dict] = []

    def check(step: int) -> dict:
        """Score the fine-tuned copy, append the point to the curve, return the full report."""
        model.eval()
        with torch.no_grad():
            report = paired_report(cfg, rows_frozen, score(tuned))
        model.train()
        curve.append({"step": step, "ppl_none": report["ppl"]["none"], "ppl_finetuned": report["ppl"]["finetuned"],
                      "vs_none": -report["relative_reduction"]["finetuned"],
                      "vs_none_ci": [-x for x in report["relative_reduction_ci"]["finetuned"][::-1]]})
        print(f"[headroom] step {step}: ahead ppl none {report['ppl']['none']:.3f}, fine-tuned "
              f"{report['ppl']['finetuned']:.3f} ({100 * curve[-1]['vs_none']:+.1f}%)", flush=True)
        return report

    final = check(0)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        batch = next(batches).to(frozen.device)  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer_step(loss, opt, params, cfg.optim.grad_clip, sched)
        losses.append(loss.item())
        if (step + 1) % args.check_every == 0 or step + 1 == steps:
            final = check(step + 1)
    train_s = time.perf_counter() - t0
    best = min(curve, key=lambda p: p["ppl_finetuned"])
    write_result(args.name, {
        "bench": "headroom",
        "config": args.config,
        "decoder": cfg.model.path,
        "decoder_fingerprint": frozen.fingerprint,
        "recipe": {"optim": to_dict(cfg.optim), "batch_size": cfg.sweep.batch_size, "seq_len": cfg.data.seq_len,
                   "objective": "next-token loss over every token", "batch_order_seed": cfg.coprocessor.seed},
        "train_tokens": int(train.numel()),
        "points": final["points"],
        "positions_sha256": final["positions_sha256"]["none"],
        "n_ahead": final["n_ahead"],
        "ppl": final["ppl"],
        "ppl_ci": final["ppl_ci"],
        "vs_none": curve[-1]["vs_none"],
        "vs_none_ci": curve[-1]["vs_none_ci"],
        "per_position_ppl": {c: final["per_position"][c]["ppl"] for c in ("none", "finetuned")},
        "curve": curve,
        "best_check": best,
        "final_train_loss_mean_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "train_s": round(train_s, 1),
        "threads": args.threads,
    })


if __name__ == "__main__":
    main()
