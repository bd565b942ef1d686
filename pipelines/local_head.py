"""A Ray head on 127.0.0.1 started the way users start one (`ray start --head`), for the CLI round trips:
`ray job submit`, `serve deploy` and HTTP against what they deployed. Stopped, only this cluster, on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _haproxy_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "haproxy"], check=False, capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@contextlib.contextmanager
def local_head(log_path: Path, num_cpus: int = 2, cwd: Path | None = None, env: dict | None = None,
               start_timeout_s: float = 120) -> Iterator[dict]:
    """Yields {"env", "address", "gcs"}: `env` has RAY_ADDRESS (the dashboard) and the token-auth settings the CLI
    needs. Every port is its own, so another Ray instance on this machine (a test session's) is left alone."""
    bin_dir = str(Path(sys.executable).parent)
    env = (env or dict(os.environ)) | {
        "RAY_AUTH_MODE": "token", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",  # Serve's HAProxy ingress, as the shipped RayService runs it
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}
    haproxy_before = _haproxy_pids()
    gcs, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={num_cpus}",
                                 f"--temp-dir={temp_dir}", *ports],
                                cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + start_timeout_s
        while True:
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code < 500:  # 401 without the token: up
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("ray head did not start:\n" + Path(log_path).read_text()[-3000:])
            time.sleep(1)
        yield {"env": env | {"RAY_ADDRESS": address}, "address": address, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started; `ray stop` stops all
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _haproxy_pids() - haproxy_before:  # HAProxy outlives a cluster stopped this way: stop ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        shutil.rmtree(temp_dir, ignore_errors=True)


def serve_deploy(config_path: Path, head: dict, port: int, timeout: float = 300, cwd: Path | None = None) -> str:
    """`serve deploy` of a Serve config onto the head, then waits until its HTTP ingress answers /healthz; the base
    URL. A deployment that does not come up raises with `serve status`."""
    run_cli(["serve", "deploy", "--address", head["address"], str(config_path)], head["env"], cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).ok:
                return url
        except requests.RequestException:
            pass
        if time.time() > deadline:
            status = run_cli(["serve", "status", "--address", head["address"]], head["env"])
            raise TimeoutError(f"serve deploy did not come up in {timeout}s:\n{status}")
        time.sleep(2)


def run_cli(cmd: list[str], env: dict, cwd: Path | None = None, timeout: float = 600) -> str:
    """A CLI command that must succeed; its output, or an error with the tail of both streams."""
    out = subprocess.run(cmd, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def submit_job(cmd: list[str], env: dict, cwd: Path | None = None, tries: int = 30) -> str:
    """`ray job submit`, retried while the head's job agent is still starting (bounded)."""
    for _ in range(tries):
        out = subprocess.run(cmd, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=600)
        if out.returncode == 0:
            return out.stdout
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(2)
    raise RuntimeError(f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def job_state(job_id: str, env: dict, address: str) -> str:
    """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED, from `ray job status`."""
    status = run_cli(["ray", "job", "status", "--address", address, job_id], env)
    for state in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
        if f"'{job_id}' {state.lower()}" in status.lower() or state in status.split():
            return state
    return "UNKNOWN"


def job_logs(job_id: str, env: dict, address: str) -> str:
    return run_cli(["ray", "job", "logs", "--address", address, job_id], env)


def wait_job(job_id: str, env: dict, address: str, timeout: float = 900, until: str | None = None) -> str:
    """Waits for the job to end (or, with `until`, for that text in its logs); its logs. A job that fails or is
    stopped raises with the tail of them."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job_id, env, address)
        if until is not None and state in ("RUNNING", "SUCCEEDED"):
            logs = job_logs(job_id, env, address)
            if until in logs:
                return logs
            if state == "SUCCEEDED":
                raise RuntimeError(f"job {job_id} ended without logging {until!r}:\n{logs[-4000:]}")
        if state in ("FAILED", "STOPPED"):
            raise RuntimeError(f"job {job_id} {state}:\n{job_logs(job_id, env, address)[-4000:]}")
        if state == "SUCCEEDED" and until is None:
            return job_logs(job_id, env, address)
        time.sleep(3)
    raise TimeoutError(f"job {job_id} did not {'log ' + repr(until) if until else 'finish'} in {timeout}s")
