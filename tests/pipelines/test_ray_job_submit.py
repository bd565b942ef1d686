"""The whole system the way Ray users run it: `ray start --head` on 127.0.0.1, `ray job submit` of the
training job and then the corpus job, `serve deploy` of the Serve config, a real HTTP query, cluster stopped.

Slow (a few minutes): run with `python -m pytest -m slow tests/pipelines/test_ray_job_submit.py`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml

from cache_aug.corpus import ensure_embedded_corpus
from pipelines.local_head import (
    free_port,
    local_head,
    run_cli,
    serve_deploy,
    submit_job,
    wait_job,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], env: dict) -> str:
    try:
        return run_cli(cmd, env, cwd=REPO)
    except RuntimeError as e:
        pytest.fail(str(e))


def _submit(cmd: list[str], env: dict) -> str:
    try:
        return submit_job(cmd, env, cwd=REPO)
    except RuntimeError as e:
        pytest.fail(str(e))


def _wait_job(job_id: str, env: dict, address: str, timeout: float = 900) -> str:
    try:
        return wait_job(job_id, env, address, timeout=timeout)
    except (RuntimeError, TimeoutError) as e:
        pytest.fail(str(e))


@pytest.fixture
def head(tmp_path):
    """A Ray head on 127.0.0.1 with token auth; stopped (only this cluster) at the end."""
    with local_head(tmp_path / "head.log", num_cpus=2, cwd=REPO) as h:
        yield h


def test_train_augment_serve_through_the_ray_cli(head, tiny_default_dir, tmp_path):
    env, address = head["env"], head["address"]
    work = tmp_path / "work"
    (work / "in").mkdir(parents=True)
    docs = pq.read_table(ensure_embedded_corpus("kjv") / "heldout.parquet").slice(0, 12)
    pq.write_table(docs, work / "in" / "docs.parquet")
    common = [f"--set=model.path={tiny_default_dir}", "--set=augmentation.n_latents=4"]
    runtime_env = json.dumps({"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token"}})
    submit = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json", runtime_env,
              "--no-wait"]

    train_id = f"train-{int(time.time())}"
    _submit(submit + ["--submission-id", train_id, "--", "python", "-m", "jobs.train", "--config",
                      "jobs/configs/tiny_cpu.yaml",
                   *common, f"--set=train.storage_path={work / 'train'}", "--set=train.run_name=cli", "--debug-steps",
                   "4"], env)
    logs = _wait_job(train_id, env, address)
    assert "[train] exported coprocessor" in logs
    export = work / "train" / "cli" / "export"
    assert (export / "latents.json").exists()

    augment_id = f"augment-{int(time.time())}"
    _submit(submit + ["--submission-id", augment_id, "--", "python", "-m", "jobs.augment", "--config",
                      "jobs/configs/augment_tiny.yaml",
                   *common, f"--set=corpus.input_paths=[{work / 'in'}]", f"--set=corpus.output={work / 'caches'}",
                   f"--set=corpus.coprocessor={export}", "--set=corpus.truncate=true"], env)
    logs = _wait_job(augment_id, env, address)
    manifest = json.loads(next((work / "caches" / "manifests").glob("*.json")).read_text())
    assert manifest["counts"] == {"read": 12, "written": 12, "skipped": 0, "failed": 0}, manifest

    # serve deploy of the shipped Serve config, pointed at this run's models and caches
    serve_cfg = yaml.safe_load((REPO / "cluster/serve/serve_tiny.yaml").read_text())
    port = free_port()
    serve_cfg["http_options"] |= {"host": "127.0.0.1", "port": port}
    app = serve_cfg["applications"][0]
    app["args"]["overrides"] = [c.removeprefix("--set=") for c in common] + [
        f"serve.cache_prefix={work / 'caches'}", f"serve.coprocessor={export}", f"serve.documents=[{work / 'in'}]"]
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))
    try:
        url = serve_deploy(tmp_path / "serve.yaml", head, port, cwd=REPO)
    except TimeoutError as e:
        pytest.fail(str(e))
    doc_id = docs.column("doc_id")[0].as_py()
    r = requests.post(f"{url}/v1/completions",
                      json={"model": "cache-aug", "prompt": " And", "max_tokens": 8, "temperature": 0,
                                                     "document_id": doc_id}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["cache_aug"]["source"] == "stored" and len(r.json()["cache_aug"]["token_ids"]) >= 1
    # the same request streamed through the ingress: server-sent events that join to the same text
    pieces = []
    with requests.post(f"{url}/v1/completions",
                       json={"model": "cache-aug", "prompt": " And", "max_tokens": 8, "temperature": 0,
                                                      "document_id": doc_id, "stream": True}, stream=True,
                       timeout=120) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in s.iter_lines() if line.startswith(b"data: ")]
    assert lines[-1] == b"data: [DONE]"
    for line in lines[:-1]:
        pieces += [c["text"] for c in json.loads(line[6:]).get("choices", [])]
    assert "".join(pieces) == r.json()["choices"][0]["text"]
    print(f"checked jobs {train_id} and {augment_id}; serve answered {r.json()['choices'][0]['text']!r}")
    shutil.rmtree(work / "train", ignore_errors=True)
