"""The N_L sweep: at each N_L, train pause tokens and a coprocessor with one budget, evaluate all three.

    reports = run_sweep(cfg)     # cfg.sweep: N_L values, batch size, work and results dirs; cfg.optim: the budget

For each N_L the two trainable conditions get the same steps, batch size, learning rate and
seed; then `cache_aug.evaluate` measures none / pause / coprocessor at the same held-out points.
Outputs, under sweep.results_dir: nl<N_L>.json (the evaluation report plus a "training" section),
.md, .png, .positions.json, and sweep.md + gain_vs_nl.png over all N_L.

Resumable: a condition whose module is saved is not trained again; one that was interrupted
resumes from its latest checkpoint (local trainer) or its Ray Train run (the trainer pipelines/sweep.py
passes in, since this library knows no Ray). Both trainers take the one optim section.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cache_aug.config import CacheAugConfig, to_dict
from cache_aug.decoder import Decoder

TRAINED = ("pause", "coprocessor")
TrainFn = Callable[[CacheAugConfig, str, Path], Path]  # (config for this run, condition, run dir) -> module dir


def training_blocks(cfg: CacheAugConfig, decoder: Decoder, paths: list[str]) -> torch.Tensor:
    """(N, data.seq_len) packed blocks of the documents at `paths` (Parquet, text column)."""
    from cache_aug.blocks import pack_blocks
    from cache_aug.evaluate import read_documents

    ev = dataclasses.replace(cfg.eval, paths=paths, max_documents=0, id_column=cfg.eval.id_column,
                             text_column=cfg.data.text_column)
    tok = decoder.tokenizer
    return pack_blocks((tok.encode(text) for _, text in read_documents(ev)), cfg.data.seq_len, tok.eos_token_id)


def condition_config(cfg: CacheAugConfig, condition: str, n_latents: int) -> CacheAugConfig:
    """The config one training run uses: N_L set, and the module mode of the condition."""
    mode = "pause" if condition == "pause" else cfg.coprocessor.mode
    return dataclasses.replace(
        cfg,
        augmentation=dataclasses.replace(cfg.augmentation, n_latents=n_latents),
        coprocessor=dataclasses.replace(cfg.coprocessor, mode=mode),
    )


def train_local_condition(cfg: CacheAugConfig, condition: str, run_dir: Path, *, decoder: Decoder,
                          train: torch.Tensor, heldout: torch.Tensor, log: Callable[[str], None] = print) -> Path:
    """Train one condition with the library's loop (resumable); returns the saved module's directory."""
    from cache_aug.blocks import iterate_batches
    from cache_aug.coprocessor import build_latent_module, save_latent_module
    from cache_aug.training import evaluate, train_local

    sw = cfg.sweep
    module = build_latent_module(decoder, cfg.coprocessor, cfg.augmentation.n_latents)
    curve_file = run_dir / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else []

    def on_step(step: int) -> None:
        if sw.curve_every and (step % sw.curve_every == 0 or step == cfg.optim.max_steps):
            r = evaluate(decoder, module, heldout.to(decoder.device), cfg.augmentation, batch_size=sw.batch_size)
            curve.append({"step": step, "ppl": r.ppl_augmented, "ppl_none": r.ppl_none})
            curve_file.write_text(json.dumps(curve) + "\n")
            log(f"[sweep] {run_dir.name} step {step}: held-out ppl {r.ppl_augmented:.3f} (none {r.ppl_none:.3f})")

    if not curve:
        on_step(0)  # the untrained module: how near a no-op training starts
    batches = iterate_batches(train, sw.batch_size, seed=cfg.coprocessor.seed)
    t0 = time.perf_counter()
    losses = train_local(decoder, module, batches, cfg.augmentation, cfg.optim, seed=cfg.train.seed,
                         log_every=max(1, cfg.optim.max_steps // 10), log=log,
                         checkpoint_path=run_dir / "checkpoint.pt", checkpoint_every=sw.checkpoint_every,
                         on_step=on_step)
    module.eval()
    out = save_latent_module(module, decoder, run_dir / "module")
    (run_dir / "training.json").write_text(json.dumps({
        "trainer": "local", "optim": to_dict(cfg.optim), "batch_size": sw.batch_size, "seq_len": cfg.data.seq_len,
        "points_per_sequence": cfg.augmentation.points_per_sequence, "n_ahead": cfg.augmentation.n_ahead,
        "device": str(decoder.device),
        "dtype": str(decoder.dtype).removeprefix("torch."), "wall_s_last_session": round(time.perf_counter() - t0, 1),
        "final_train_loss_mean_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])), "curve": curve,
    }, indent=1) + "\n")
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return out


def sweep_table(reports: list[dict]) -> str:
    """Markdown: one row per N_L with the three perplexities and the reductions vs none."""
    lines = [
        "| N_L | none | pause | coprocessor | pause vs none | coprocessor vs none | coprocessor vs pause |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(reports, key=lambda r: r["n_latents"]):
        p, ci, red, rci = r["ppl"], r["ppl_ci"], r["relative_reduction"], r["relative_reduction_ci"]
        cells = [f"{p[c]:.2f} [{ci[c][0]:.2f}, {ci[c][1]:.2f}]" for c in ("none", "pause", "coprocessor")]
        cells += [f"{-100 * red[c]:+.1f}% [{-100 * rci[c][1]:+.1f}, {-100 * rci[c][0]:+.1f}]" for c in TRAINED]
        cells.append(f"{100 * (p['coprocessor'] / p['pause'] - 1):+.1f}%")
        lines.append(f"| {r['n_latents']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(cfg: CacheAugConfig, *, train_fn: TrainFn | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Train and evaluate every N_L of cfg.sweep; returns the reports (also written to results_dir)."""
    from cache_aug.coprocessor import load_latent_module
    from cache_aug.decoder import load_decoder
    from cache_aug.devices import choose_device
    from cache_aug.evaluate import run_eval
    from cache_aug.report import plot_gain_vs_latents

    sw = cfg.sweep
    decoder = load_decoder(cfg.model, device=choose_device(cfg.eval.device))
    results, work = Path(sw.results_dir), Path(sw.work_dir)
    results.mkdir(parents=True, exist_ok=True)
    train_blocks = heldout_blocks = None
    reports = []
    for n_latents in sw.n_latents:
        walls = {}
        for condition in TRAINED:
            run_dir = work / f"nl{n_latents}-{condition}"
            run_dir.mkdir(parents=True, exist_ok=True)
            if (run_dir / "module" / "latents.json").exists():
                log(f"[sweep] {run_dir.name}: trained module found, not training again")
                continue
            run_cfg = condition_config(cfg, condition, n_latents)
            t0 = time.perf_counter()
            if train_fn is not None:
                train_fn(run_cfg, condition, run_dir)
            else:
                if train_blocks is None:
                    train_blocks = training_blocks(cfg, decoder, cfg.data.paths)
                    heldout_blocks = training_blocks(cfg, decoder, cfg.data.eval_paths)[:16]
                    log(f"[sweep] {train_blocks.shape[0]} training blocks of {cfg.data.seq_len} tokens")
                train_local_condition(run_cfg, condition, run_dir, decoder=decoder, train=train_blocks,
                                      heldout=heldout_blocks, log=log)
            walls[condition] = round(time.perf_counter() - t0, 1)
            (run_dir / "wall_s").write_text(f"{walls[condition]}\n")
        modules = {"none": None} | {c: load_latent_module(work / f"nl{n_latents}-{c}" / "module", decoder).eval()
                                    for c in TRAINED}
        ev_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(
            cfg.eval, pause=str(work / f"nl{n_latents}-pause" / "module"),
            coprocessor=str(work / f"nl{n_latents}-coprocessor" / "module")))
        report = run_eval(ev_cfg, decoder=decoder, modules=modules, name=f"nl{n_latents}", output=str(results))
        training = {}
        for c in TRAINED:
            run_dir = work / f"nl{n_latents}-{c}"
            info = json.loads((run_dir / "training.json").read_text()) if (run_dir / "training.json").exists() else {}
            wall = (run_dir / "wall_s").read_text().strip() if (run_dir / "wall_s").exists() else None
            training[c] = info | {"wall_s": float(wall) if wall else None}
        report["training"] = training
        (results / f"nl{n_latents}.json").write_text(json.dumps(report, indent=1) + "\n")
        reports.append(report)
        log(f"[sweep] N_L={n_latents}: " + ", ".join(f"{c} {report['ppl'][c]:.3f}" for c in report["conditions"]))
    (results / "sweep.md").write_text(sweep_table(reports))
    if len(reports) > 1:
        plot_gain_vs_latents(reports, results / "gain_vs_nl.png")
    return reports


def headline(reports: list[dict]) -> dict:
    """{N_L: {condition: ppl}} for printing."""
    return {r["n_latents"]: {c: round(v, 3) for c, v in r["ppl"].items()} for r in reports}
