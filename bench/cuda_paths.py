"""CUDA checks of the library paths that CI (CPU only) cannot run, plus serving-path timings on a GPU.

    python -m bench.cuda_paths [--out bench/results/cuda_paths.json]
    python -m bench.cuda_paths --device cpu --skip-ttft --archs llama --out cuda_paths_cpu.json   # the checks on CPU

1. Equivalences on CUDA in bf16, for several architectures: one-pass loss == per-point loop (relative difference
   at most LOSS_RTOL); a record written in each storage mode restores to a cache that decodes identically to the
   in-memory one; and the serving engine, asked for a stored document (a request with its document_id, its
   record read back from an output prefix laid out as the corpus job writes it), answers with the stored path
   and exactly the tokens the library decodes offline from that record.
2. Time to first token on a ~1B-parameter Llama-shaped decoder (random weights, bf16, sdpa), 1,000-token
   documents: plain prefill of document + prompt vs each stored mode (restore + prompt), medians.

The JSON names every failed check under "failures" ("passed": false), and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DEVICE = "cuda"
ARCHS = ("llama", "qwen2", "gemma2", "mistral")
MODES = ("latents", "latent_kv", "full")
LOSS_RTOL = 1e-3
"""Largest relative difference accepted between the one-pass loss and the per-point loop (H100, bf16: 0.0)."""
PROMPT = [5, 6]
NEW_TOKENS = 8


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def store_records(root: Path, records: list, n_buckets: int) -> None:
    """Records under `root` as the corpus job lays them out: runs/<run>/kind=record/bucket=<b>/part-0.parquet."""
    from cache_aug.records import write_records
    from cache_aug.store import RUNS, bucket_of, new_run_id

    run = new_run_id()
    for rec in records:
        bucket = root / RUNS / run / "kind=record" / f"bucket={bucket_of(rec.doc_id, n_buckets)}"
        bucket.mkdir(parents=True, exist_ok=True)
        write_records(str(bucket / f"part-{rec.doc_id}.parquet"), [rec])


def serving_request(doc_id: str) -> dict:
    """The request body: the stored document `doc_id`, continued after PROMPT, greedily."""
    return {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "document_id": doc_id}


def offline_decode(dec, cache, stop_token_ids: list[int]) -> list[int]:
    """The library's own greedy decoding after `cache` and PROMPT (what the engine must answer)."""
    from cache_aug.augment import generate

    return generate(dec, cache, PROMPT, max_new_tokens=NEW_TOKENS, stop_token_ids=stop_token_ids)


def serving_check(dec, module, fp, rec, work: Path) -> dict:
    """Serve the stored record `rec` through the engine and compare with the offline decode of the same record."""
    import pyarrow.fs as pafs

    from cache_aug.engine import CompletionEngine
    from cache_aug.records import restore
    from cache_aug.store import AugmentedCacheReader
    from pipelines.config import RayServeConfig
    from pipelines.protocol import parse_request

    cfg, n_buckets = RayServeConfig(), 8  # the request is parsed as the endpoint parses it (its HTTP settings too)
    root = work / rec.mode
    store_records(root, [rec], n_buckets)
    reader = AugmentedCacheReader(pafs.LocalFileSystem(), str(root), n_buckets)
    eng = CompletionEngine(dec, module, fp, cfg, records=reader)
    req = parse_request(serving_request(rec.doc_id), dec.tokenizer, cfg)
    out = eng.complete(req)  # planned, prepared and decoded by the engine, alone
    plan, served = out["plan"], out["token_ids"]
    offline = offline_decode(dec, restore(rec, dec, fp), eng.stop_token_ids())
    return {"source": plan.source, "reason": plan.reason, "served": served, "offline": offline,
            "equal": plan.source == "stored" and served == offline}


def equivalences(results: dict, archs=ARCHS) -> list[str]:
    """Run every equivalence check; returns the failed ones ("<arch>: <check>"), also recorded in `results`."""
    from cache_aug.augment import augment, generate
    from cache_aug.config import CoprocessorConfig
    from cache_aug.coprocessor import build_latent_module, latent_fingerprint
    from cache_aug.losses import one_pass_loss, reference_loss, sample_points
    from cache_aug.records import encode_record, restore
    from cache_aug.testing import tiny_decoder

    failures: list[str] = []

    def check(arch: str, work: Path) -> dict:
        torch.manual_seed(0)
        dec = tiny_decoder(arch, dtype=torch.bfloat16)
        dec.model.to(DEVICE)
        module = build_latent_module(dec, CoprocessorConfig(), 4)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 90, (2, 48), generator=g).to(DEVICE)
        points = sample_points(2, 48, 4, 4, 4, g).to(DEVICE)
        a = float(one_pass_loss(dec, module, ids, points, 4).loss.detach())
        b = float(reference_loss(dec, module, ids, points, 4).loss.detach())
        rel = abs(a - b) / b
        row = {"one_pass_loss": a, "reference_loss": b, "loss_rel_diff": rel, "loss_within_rtol": rel <= LOSS_RTOL}
        module.eval()
        fp = latent_fingerprint(dec, module)
        docs = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (30, 17)]
        augs = augment(dec, module, docs)
        served = {}
        for mode in MODES:
            rec = encode_record(augs[0], doc_id="doc-0", fingerprint=fp, mode=mode, dtype="bfloat16",
                                spec=dec.cache_spec)
            back = restore(rec, dec, fp)
            row[f"{mode}_tokens_equal"] = generate(dec, back, PROMPT, max_new_tokens=NEW_TOKENS) == generate(
                dec, augs[0], PROMPT, max_new_tokens=NEW_TOKENS)
            served[mode] = serving_check(dec, module, fp, rec, work)
            row[f"{mode}_serving_equals_library"] = served[mode]["equal"]
        row["serving_equals_library"] = all(c["equal"] for c in served.values())
        row["serving"] = served
        return row

    for arch in archs:
        with tempfile.TemporaryDirectory(prefix="cuda-paths-") as work:
            try:
                row = check(arch, Path(work))
            except Exception as e:  # noqa: BLE001 - recorded as this architecture's failure; the others still run
                row = {"error": f"{type(e).__name__}: {e}"}
        results["equivalences"][arch] = row
        failures += [f"{arch}: {k}" for k, v in row.items() if isinstance(v, bool) and not v]
        failures += [f"{arch}: {row['error']}"] if "error" in row else []
        print(arch, {k: v for k, v in row.items() if k != "serving"}, flush=True)
    return failures


def ttft(results: dict, doc_tokens: int, reps: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cache_aug.augment import augment, decode_steps
    from cache_aug.config import CoprocessorConfig
    from cache_aug.coprocessor import build_latent_module, latent_fingerprint
    from cache_aug.decoder import Decoder, freeze
    from cache_aug.records import encode_record, restore
    from cache_aug.testing import byte_tokenizer

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=32,
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
        for mode, stored in recs.items():
            stored.append(encode_record(aug, doc_id="d", fingerprint=fp, mode=mode, dtype="bfloat16",
                                        spec=dec.cache_spec))

    def first_token(cache, prompt_ids):
        return next(iter(decode_steps(dec, cache, prompt_ids, max_new_tokens=1)))

    times = {k: [] for k in ("plain", "online", *recs)}
    for _ in range(2):  # warm-up
        first_token(augment(dec, None, [docs[0] + prompt])[0], [])
        first_token(restore(recs["full"][0], dec, fp), prompt)
    for i, d in enumerate(docs):
        for name, spent in times.items():
            _sync()
            t = time.perf_counter()
            if name == "plain":
                first_token(augment(dec, None, [d + prompt])[0], [])
            elif name == "online":
                first_token(augment(dec, module, [d])[0], prompt)
            else:
                first_token(restore(recs[name][i], dec, fp), prompt)
            _sync()
            spent.append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    results["ttft"] = {
        "model": f"Llama-shaped, {n_params / 1e9:.2f}B params, bf16, sdpa, random weights", "doc_tokens": doc_tokens,
        "prompt_tokens": 16, "n_latents": 16, "reps": reps, "median_s": med,
        "speedup_vs_plain": {k: med["plain"] / v for k, v in med.items() if k != "plain"},
        "record_bytes": {m: len(recs[m][0].payload) for m in recs},
    }
    print(json.dumps(results["ttft"], indent=2), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/cuda_paths.json")
    ap.add_argument("--doc-tokens", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the same code")
    ap.add_argument("--archs", default=",".join(ARCHS), help="architectures of the equivalence checks, comma-separated")
    ap.add_argument("--skip-ttft", action="store_true")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    import transformers

    results = {"bench": "cuda_paths", "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
               "torch": torch.__version__,
               "transformers": transformers.__version__, "platform": platform.platform(), "loss_rtol": LOSS_RTOL,
               "equivalences": {}}
    failures = equivalences(results, [a for a in args.archs.split(",") if a])
    results["passed"], results["failures"] = not failures, failures
    if not args.skip_ttft:
        ttft(results, args.doc_tokens, args.reps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
