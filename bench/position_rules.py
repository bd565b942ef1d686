"""How near a no-op each position rule starts: held-out ahead-token perplexity of untrained modules.

    python -m bench.position_rules [--config jobs/configs/sweep_tiny.yaml] [--n-latents 16]
    python -m bench.position_rules --config jobs/configs/sweep_smollm2.yaml --name position_rules_smollm2 --all

For each position rule ("shift", "keep") and each module (pause tokens, coprocessor), a freshly
initialised module (the sweep's seed and settings) is scored on the sweep's held-out check set (the
first 16 packed blocks of data.eval_paths, the same points for every condition) next to the decoder
alone. This is the sweep's step-0 check, for both rules side by side. With --all, also each latent
channel of the coprocessor and each soft-token initialisation. Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench.results_io import write_result
from cache_aug.coprocessor import build_latent_module
from cache_aug.decoder import load_decoder
from cache_aug.devices import choose_device
from cache_aug.masks import POSITION_RULES
from cache_aug.sweep import condition_config, training_blocks
from cache_aug.tiny import build_if_embedded
from cache_aug.training import evaluate
from pipelines.config import load_job_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/sweep_tiny.yaml")
    ap.add_argument("--n-latents", type=int, default=16)
    ap.add_argument("--check-blocks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--all", action="store_true", help="every latent channel and soft-token init too")
    ap.add_argument("--name", default="position_rules")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_job_config(args.config)
    build_if_embedded(cfg.model.path)  # the explicit build of an embedded decoder: loading never builds
    decoder = load_decoder(cfg.model, device=choose_device(cfg.eval.device))
    held = training_blocks(cfg, decoder, cfg.data.eval_paths)[: args.check_blocks].to(decoder.device)
    ppl, none = {}, None
    t0 = time.perf_counter()
    channels = ("embeds", "kv") if args.all else (cfg.coprocessor.latent_channel,)
    inits = ("vocab", "normal") if args.all else (cfg.coprocessor.soft_token_init,)
    for rule in POSITION_RULES:
        for init in inits:
            for condition, channel in [("pause", "embeds"), *(("coprocessor", c) for c in channels)]:
                cop = dataclasses.replace(cfg.coprocessor, position_rule=rule, soft_token_init=init,
                                          latent_channel=channel)
                run_cfg = condition_config(dataclasses.replace(cfg, coprocessor=cop), condition, args.n_latents)
                module = build_latent_module(decoder, run_cfg.coprocessor, args.n_latents).eval()
                r = evaluate(decoder, module, held, run_cfg.augmentation, batch_size=16)
                name = (condition if not args.all
                        else f"{condition}-{channel}-{init}" if condition != "pause" else f"pause-{init}")
                ppl.setdefault(rule, {})[name] = r.ppl_augmented
                none = r.ppl_none
    write_result(args.name, {
        "bench": "position_rules",
        "config": args.config,
        "decoder": cfg.model.path,
        "n_latents": args.n_latents,
        "first_ahead_from": cfg.coprocessor.first_ahead_from,
        "check_blocks": int(held.shape[0]),
        "ppl_none": none,
        "ppl_untrained": ppl,
        "vs_none": {rule: {c: v / none - 1 for c, v in by.items()} for rule, by in ppl.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
        "device": str(decoder.device),
    })


if __name__ == "__main__":
    main()
