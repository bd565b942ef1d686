"""The whole system the way Ray users run it: `ray start --head` on 127.0.0.1, `ray job submit` of the
training job and then the corpus job, `serve deploy` of the Serve config, a real HTTP query, cluster stopped.

Slow (a few minutes): run with `python -m pytest -m slow tests/pipelines/test_ray_job_submit.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml

from cache_aug.corpus import ensure_embedded_corpus

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, timeout: float = 600) -> str:
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _submit(cmd: list[str], env: dict, tries: int = 30) -> str:
    """`ray job submit`, retried while the head's job agent is still starting (bounded)."""
    for _ in range(tries):
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode == 0:
            return out.stdout
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(2)
    pytest.fail(f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def _wait_job(job_id: str, env: dict, address: str, timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _run(["ray", "job", "status", "--address", address, job_id], env)
        for state in ("SUCCEEDED", "FAILED", "STOPPED"):
            if f"'{job_id}' {state.lower()}" in status.lower() or state in status.split():
                if state != "SUCCEEDED":
                    logs = _run(["ray", "job", "logs", "--address", address, job_id], env)
                    pytest.fail(f"job {job_id} {state}:\n{logs[-4000:]}")
                return _run(["ray", "job", "logs", "--address", address, job_id], env)
        time.sleep(3)
    pytest.fail(f"job {job_id} did not finish in {timeout}s")


def _haproxy_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "haproxy"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@pytest.fixture
def head(tmp_path):
    import tempfile

    """A Ray head on 127.0.0.1 with token auth; stopped (only this cluster) at the end."""
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {"RAY_AUTH_MODE": "token", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                        "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
                        "RAY_SERVE_ENABLE_HA_PROXY": "1",  # Serve's HAProxy ingress, as the shipped RayService runs it
                        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(_port())}
    haproxy_before = _haproxy_pids()
    gcs, dash = _port(), _port()
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # every port its own: another Ray instance on this machine (e.g. a test session's) holds the defaults
    ports = [f"--{name}={_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                                                "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
                                                "object-manager-port")]
    proc = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                             f"--temp-dir={temp_dir}", *ports],
                            cwd=REPO, env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            if requests.get(f"{address}/api/version", timeout=2).status_code < 500:  # 401 without the token: up
                break
        except requests.RequestException:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("ray head did not start:\n" + (tmp_path / "head.log").read_text()[-3000:])
        time.sleep(1)
    yield {"env": env | {"RAY_ADDRESS": address}, "address": address, "gcs": f"127.0.0.1:{gcs}"}
    os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started; `ray stop` would stop every cluster
    proc.wait(timeout=60)
    for pid in _haproxy_pids() - haproxy_before:  # HAProxy outlives a cluster stopped this way: stop ours
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_train_augment_serve_through_the_ray_cli(head, tiny_default_dir, tmp_path):
    env, address = head["env"], head["address"]
    work = tmp_path / "work"
    (work / "in").mkdir(parents=True)
    docs = pq.read_table(ensure_embedded_corpus("kjv") / "heldout.parquet").slice(0, 12)
    pq.write_table(docs, work / "in" / "docs.parquet")
    common = [f"--set=model.path={tiny_default_dir}", "--set=augmentation.n_latents=4"]
    runtime_env = json.dumps({"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token"}})
    submit = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json", runtime_env, "--no-wait"]

    train_id = f"train-{int(time.time())}"
    _submit(submit + ["--submission-id", train_id, "--", "python", "-m", "jobs.train", "--config", "jobs/configs/tiny_cpu.yaml",
                   *common, f"--set=train.storage_path={work / 'train'}", "--set=train.run_name=cli", "--debug-steps", "4"], env)
    logs = _wait_job(train_id, env, address)
    assert "[train] exported coprocessor" in logs
    export = work / "train" / "cli" / "export"
    assert (export / "latents.json").exists()

    augment_id = f"augment-{int(time.time())}"
    _submit(submit + ["--submission-id", augment_id, "--", "python", "-m", "jobs.augment", "--config", "jobs/configs/augment_tiny.yaml",
                   *common, f"--set=corpus.input_paths=[{work / 'in'}]", f"--set=corpus.output={work / 'caches'}",
                   f"--set=corpus.coprocessor={export}", "--set=corpus.truncate=true"], env)
    logs = _wait_job(augment_id, env, address)
    manifest = json.loads(next((work / "caches" / "manifests").glob("*.json")).read_text())
    assert manifest["counts"] == {"read": 12, "written": 12, "skipped": 0, "failed": 0}, manifest

    # serve deploy of the shipped Serve config, pointed at this run's models and caches
    serve_cfg = yaml.safe_load((REPO / "cluster/serve/serve_tiny.yaml").read_text())
    port = _port()
    serve_cfg["http_options"] |= {"host": "127.0.0.1", "port": port}
    app = serve_cfg["applications"][0]
    app["args"]["overrides"] = [c.removeprefix("--set=") for c in common] + [
        f"corpus.output={work / 'caches'}", f"corpus.coprocessor={export}", f"corpus.input_paths=[{work / 'in'}]"]
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))
    _run(["serve", "deploy", "--address", address, str(tmp_path / "serve.yaml")], env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).ok:
                break
        except requests.RequestException:
            pass
        if time.time() > deadline:
            pytest.fail("serve deploy did not come up:\n" + _run(["serve", "status", "--address", address], env))
        time.sleep(2)
    doc_id = docs.column("doc_id")[0].as_py()
    r = requests.post(f"{url}/v1/completions", json={"model": "cache-aug", "prompt": " And", "max_tokens": 8, "temperature": 0,
                                                     "document_id": doc_id}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["cache_aug"]["source"] == "stored" and len(r.json()["cache_aug"]["token_ids"]) >= 1
    # the same request streamed through the ingress: server-sent events that join to the same text
    pieces = []
    with requests.post(f"{url}/v1/completions", json={"model": "cache-aug", "prompt": " And", "max_tokens": 8, "temperature": 0,
                                                      "document_id": doc_id, "stream": True}, stream=True, timeout=120) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in s.iter_lines() if line.startswith(b"data: ")]
    assert lines[-1] == b"data: [DONE]"
    for line in lines[:-1]:
        pieces += [c["text"] for c in json.loads(line[6:]).get("choices", [])]
    assert "".join(pieces) == r.json()["choices"][0]["text"]
    print(f"checked jobs {train_id} and {augment_id}; serve answered {r.json()['choices'][0]['text']!r}")
    shutil.rmtree(work / "train", ignore_errors=True)
