"""Training throughput and the one-pass speedup over the per-point loop, measured side by side.

    python -m bench.train [--decoder tiny-kjv] [--B 8] [--repeats 3]

On the same batch and points it times a full training step (forward + backward) of the one-pass
loss and of the per-point reference loop, and reports tokens/s of the one-pass step. Writes
bench/results/train.json with {"tokens_per_s", "B", "one_pass_speedup", ...}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.results_io import write_result
from cache_aug.blocks import pack_blocks
from cache_aug.config import CoprocessorConfig, ModelConfig
from cache_aug.coprocessor import build_latent_module
from cache_aug.corpus import load_kjv, split_heldout
from cache_aug.decoder import load_decoder
from cache_aug.losses import one_pass_loss, reference_loss, sample_points
from cache_aug.tiny import build_if_embedded


def step_seconds(fn, decoder, module, ids, points, n_ahead, repeats) -> tuple[float, float]:
    times, loss = [], None
    for _ in range(repeats):
        module.zero_grad(set_to_none=True)
        t = time.perf_counter()
        out = fn(decoder, module, ids, points, n_ahead)
        out.loss.backward()
        times.append(time.perf_counter() - t)
        loss = out.loss.item()
    return statistics.median(times), loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", default="tiny-kjv")
    ap.add_argument("--B", type=int, default=8, help="augmentation points per sequence")
    ap.add_argument("--n-latents", type=int, default=8)
    ap.add_argument("--n-ahead", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    build_if_embedded(args.decoder)  # the explicit build of an embedded decoder: loading never builds
    decoder = load_decoder(ModelConfig(path=args.decoder))
    module = build_latent_module(decoder, CoprocessorConfig(mode="full"), args.n_latents).train()
    train, _ = split_heldout(load_kjv())
    tok = decoder.tokenizer
    ids = pack_blocks((tok.encode(d.text) for d in train[:50]), args.seq_len, tok.eos_token_id)[: args.batch]
    points = sample_points(ids.shape[0], args.seq_len, args.B, args.n_ahead, 8, torch.Generator().manual_seed(0))

    step_seconds(one_pass_loss, decoder, module, ids, points, args.n_ahead, 1)  # warm-up
    fast, fast_loss = step_seconds(one_pass_loss, decoder, module, ids, points, args.n_ahead, args.repeats)
    slow, slow_loss = step_seconds(reference_loss, decoder, module, ids, points, args.n_ahead, args.repeats)
    result = {
        "bench": "train",
        "decoder": args.decoder,
        "B": args.B,
        "n_latents": args.n_latents,
        "n_ahead": args.n_ahead,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "tokens_per_s": args.batch * args.seq_len / fast,
        "one_pass_step_s": fast,
        "loop_step_s": slow,
        "one_pass_speedup": slow / fast,
        "loss_one_pass": fast_loss,
        "loss_loop": slow_loss,
        "device": "cpu",
    }
    write_result("train", result)


if __name__ == "__main__":
    main()
