"""CUDA checks of the library paths that CI (CPU only) cannot run, plus serving-path timings on a GPU.

    python -m bench.cuda_paths [--out bench/results/cuda_paths.json]

1. Equivalences on CUDA in bf16, for several architectures: one-pass loss == per-point loop; a record
   written in each storage mode restores to a cache that decodes bit-identically to the in-memory one;
   the serving engine's greedy answer equals library decoding.
2. Time to first token on a ~1B-parameter Llama-shaped decoder (random weights, bf16, sdpa), 1,000-token
   documents: plain prefill of document + prompt vs each stored mode (restore + prompt), medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


DEVICE = "cuda"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def equivalences(results: dict) -> None:
    from cache_aug.augment import augment, generate
    from cache_aug.config import CoprocessorConfig, ServeConfig
    from cache_aug.coprocessor import build_latent_module, latent_fingerprint
    from cache_aug.engine import CompletionEngine
    from cache_aug.losses import one_pass_loss, reference_loss, sample_points
    from cache_aug.records import encode_record, restore
    from cache_aug.testing import tiny_decoder
    from pipelines.protocol import parse_request

    for arch in ("llama", "qwen2", "gemma2", "mistral"):
        torch.manual_seed(0)
        dec = tiny_decoder(arch, dtype=torch.bfloat16)
        dec.model.to(DEVICE)
        module = build_latent_module(dec, CoprocessorConfig(), 4)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 90, (2, 48), generator=g).to(DEVICE)
        points = sample_points(2, 48, 4, 4, 4, g).to(DEVICE)
        a = one_pass_loss(dec, module, ids, points, 4)
        b = reference_loss(dec, module, ids, points, 4)
        row = {"one_pass_loss": float(a.loss), "reference_loss": float(b.loss), "loss_rel_diff": abs(float(a.loss - b.loss)) / float(b.loss)}
        module.eval()
        fp = latent_fingerprint(dec, module)
        docs = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (30, 17)]
        augs = augment(dec, module, docs)
        for mode in ("latents", "latent_kv", "full"):
            rec = encode_record(augs[0], doc_id="d", fingerprint=fp, mode=mode, dtype="bfloat16", spec=dec.cache_spec)
            back = restore(rec, dec, fp)
            row[f"{mode}_tokens_equal"] = generate(dec, back, [5, 6], max_new_tokens=8) == generate(dec, augs[0], [5, 6], max_new_tokens=8)
        eng = CompletionEngine(dec, module, fp, ServeConfig())
        req = parse_request({"prompt": [5, 6], "max_tokens": 8, "temperature": 0}, dec.tokenizer, ServeConfig())
        plan = eng.plan(req)
        row["serving_equals_library"] = eng.run(plan, eng.prepare([plan])[0], req)["token_ids"] == generate(
            dec, augment(dec, None, [[5, 6]])[0], [], max_new_tokens=8)
        results["equivalences"][arch] = row
        print(arch, row, flush=True)


def ttft(results: dict, doc_tokens: int, reps: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cache_aug.augment import augment, decode_steps
    from cache_aug.config import CoprocessorConfig
    from cache_aug.coprocessor import build_latent_module, latent_fingerprint
    from cache_aug.decoder import Decoder, freeze
    from cache_aug.records import encode_record, restore
    from cache_aug.testing import byte_tokenizer

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEVICE, torch.bfloat16)
    dec = Decoder(freeze(model), byte_tokenizer(), "random:llama-1b")
    module = build_latent_module(dec, CoprocessorConfig(), 16).eval()
    fp = latent_fingerprint(dec, module)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 32000, (doc_tokens,), generator=g).tolist() for _ in range(reps)]
    prompt = torch.randint(3, 32000, (16,), generator=g).tolist()
    recs = {mode: [] for mode in ("latents", "latent_kv", "full")}
    for d in docs:
        aug = augment(dec, module, [d])[0]
        for mode in recs:
            recs[mode].append(encode_record(aug, doc_id="d", fingerprint=fp, mode=mode, dtype="bfloat16", spec=dec.cache_spec))

    def first_token(cache, prompt_ids):
        return next(iter(decode_steps(dec, cache, prompt_ids, max_new_tokens=1)))

    times = {k: [] for k in ("plain", "online", *recs)}
    for _ in range(2):  # warm-up
        first_token(augment(dec, None, [docs[0] + prompt])[0], [])
        first_token(restore(recs["full"][0], dec, fp), prompt)
    for i, d in enumerate(docs):
        for name in times:
            _sync()
            t = time.perf_counter()
            if name == "plain":
                first_token(augment(dec, None, [d + prompt])[0], [])
            elif name == "online":
                first_token(augment(dec, module, [d])[0], prompt)
            else:
                first_token(restore(recs[name][i], dec, fp), prompt)
            _sync()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    results["ttft"] = {
        "model": f"Llama-shaped, {n_params / 1e9:.2f}B params, bf16, sdpa, random weights", "doc_tokens": doc_tokens, "prompt_tokens": 16,
        "n_latents": 16, "reps": reps, "median_s": med,
        "speedup_vs_plain": {k: med["plain"] / v for k, v in med.items() if k != "plain"},
        "record_bytes": {m: len(recs[m][0].payload) for m in recs},
    }
    print(json.dumps(results["ttft"], indent=2), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/cuda_paths.json")
    ap.add_argument("--doc-tokens", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the same code")
    ap.add_argument("--skip-ttft", action="store_true")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    import transformers

    results = {"bench": "cuda_paths", "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
               "transformers": transformers.__version__, "platform": platform.platform(), "equivalences": {}}
    equivalences(results)
    if not args.skip_ttft:
        ttft(results, args.doc_tokens, args.reps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
