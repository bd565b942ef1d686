"""Bytes per document and time to first token for each storage mode, measured side by side.

    python -m bench.storage_modes [--doc-tokens 256 1024] [--repeats 5]

For every document length it augments one document, encodes a record in each mode (bf16 and
fp32), and times `restore` + the first decoded token against (a) plain decoding with no cache
(prefill of document + prompt) and (b) continuing from the in-memory augmented cache. Ratios are
taken within one run, since timings on a shared machine are noisy. Writes
bench/results/storage_modes.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.results_io import write_result
from cache_aug.augment import augment, decode_steps
from cache_aug.config import CoprocessorConfig
from cache_aug.coprocessor import build_latent_module, latent_fingerprint
from cache_aug.decoder import Decoder, freeze
from cache_aug.records import encode_record, restore
from cache_aug.testing import byte_tokenizer


def tiny_kjv_shaped_decoder() -> Decoder:
    """Random weights with the embedded default's shapes (4 layers, d=256, 4 KV heads, vocab 4096)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    return Decoder(freeze(AutoModelForCausalLM.from_config(cfg)), byte_tokenizer(), "random:tiny-kjv-shape")


def first_token_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemma2_2b_arithmetic(doc_tokens: int, n_latents: int = 64) -> dict:
    """method.md's storage arithmetic for Gemma-2 2B in bf16 (L=26, H_kv=4, D=256, d=2304)."""
    per_token = 26 * 2 * 4 * 256 * 2
    return {
        "full_bytes": per_token * (doc_tokens + n_latents),
        "latent_kv_bytes": per_token * n_latents,
        "latents_bytes": n_latents * 2304 * 2,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc-tokens", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--n-latents", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    decoder = tiny_kjv_shaped_decoder()
    module = build_latent_module(decoder, CoprocessorConfig(mode="full"), args.n_latents).eval()
    fp = latent_fingerprint(decoder, module)
    prompt = [5, 6, 7, 8]
    rows = []
    for n in args.doc_tokens:
        doc = torch.randint(3, 4096, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        aug = augment(decoder, module, [doc])[0]

        def first(a, p):
            return next(decode_steps(decoder, a, p, max_new_tokens=1, stop_token_ids=[]))

        ttft_plain = first_token_seconds(lambda doc=doc: first(augment(decoder, None, [doc])[0], prompt), args.repeats)
        ttft_memory = first_token_seconds(lambda aug=aug: first(aug, prompt), args.repeats)
        ttft_online = first_token_seconds(lambda doc=doc: first(augment(decoder, module, [doc])[0], prompt),
                                          args.repeats)
        row = {
            "doc_tokens": n,
            "ttft_s": {"plain_no_cache": ttft_plain, "in_memory_augmented": ttft_memory,
                       "online_augmentation": ttft_online},
            "modes": {},
        }
        for mode in ("latents", "latent_kv", "full"):
            for dtype in ("bfloat16", "float32"):
                rec = encode_record(aug, doc_id="d", fingerprint=fp, mode=mode, dtype=dtype, spec=decoder.cache_spec)
                ttft = first_token_seconds(lambda rec=rec: first(restore(rec, decoder, fp), prompt), args.repeats)
                row["modes"][f"{mode}/{dtype}"] = {
                    "payload_bytes": len(rec.payload),
                    "bytes_per_doc_token": len(rec.payload) / n,
                    "ttft_s": ttft,
                    "ttft_vs_plain": ttft / ttft_plain,
                }
        row["gemma2_2b_bf16_arithmetic_n_latents_64"] = gemma2_2b_arithmetic(n)
        rows.append(row)
        print(f"doc {n} tokens: plain {ttft_plain * 1e3:.1f} ms, in-memory {ttft_memory * 1e3:.1f} ms, online "
              f"{ttft_online * 1e3:.1f} ms")
        for k, v in row["modes"].items():
            print(f"  {k:<20} {v['payload_bytes']:>10,} B  ttft {v['ttft_s'] * 1e3:7.1f} ms  "
                  f"({v['ttft_vs_plain']:.2f}x plain)")

    write_result("storage_modes", {
        "bench": "storage_modes",
        "decoder": "random Llama with the tiny-kjv shape (4 layers, d=256, 4 KV heads x 32, vocab 4096)",
        "n_latents": args.n_latents,
        "threads": args.threads,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
