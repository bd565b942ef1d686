"""Serve endpoint under faults: the replica SIGKILLed mid-request, overload, limits under concurrency.

Every 200 response is checked against offline greedy decoding for its document; errors are allowed,
wrong answers never. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from cache_aug.augment import augment, generate
from cache_aug.config import to_dict
from cache_aug.coprocessor import latent_fingerprint
from cache_aug.corpus import ensure_embedded_corpus
from cache_aug.records import restore
from cache_aug.store import AugmentedCacheReader
from pipelines.config import load_job_config
from pipelines.corpus import run_corpus_job
from pipelines.storage import s3_filesystem
from tests.conftest import free_port
from tests.pipelines.shared import upload_fresh_coprocessor

pytestmark = pytest.mark.usefixtures("ray_cluster")

BUCKETS = 4
PROMPT = " And the LORD said"
N = 12  # max_tokens of every request
REPLICA_TITLE = "ServeReplica:cache-aug:CompletionServer"


def replica_pids() -> list[int]:
    """PIDs of this test process's own Serve replicas (descendants of the local cluster it started)."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if REPLICA_TITLE in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


@pytest.fixture(scope="module")
def site(s3_server, tiny_default_dir, tmp_path_factory):
    """latent_kv caches for 4 documents written by the corpus job to S3, 2 more documents only in the corpus
    (served online), and each document's expected greedy answer computed offline."""
    from ray import serve

    client = s3_server["client"]
    decoder, module, cfg0 = upload_fresh_coprocessor(client, ("faults-in", "faults-caches", "faults-models"),
                                                     tiny_default_dir,
                                                     "s3://faults-models/cop", tmp_path_factory.mktemp("cop"))

    rows = pq.read_table(ensure_embedded_corpus("kjv") / "train.parquet").slice(20, 6).to_pylist()
    docs = {r["doc_id"]: r["text"][:300] for r in rows}
    stored, late = dict(list(docs.items())[:4]), dict(list(docs.items())[4:])
    fs = s3_filesystem(cfg0.s3)
    with fs.open_output_stream("faults-in/docs/part-0.parquet") as f:
        pq.write_table(pa.table({"doc_id": list(stored), "text": list(stored.values())}), f)
    base = {"model.path": str(tiny_default_dir), "augmentation.n_latents": 2, "storage.dtype": "bfloat16",
            "storage.mode": "latent_kv",
            "corpus.input_paths": "[s3://faults-in/docs/]", "corpus.coprocessor": "s3://faults-models/cop",
            "corpus.output": "s3://faults-caches/latent_kv", "corpus.index_buckets": BUCKETS, "corpus.max_tokens": 512}
    assert run_corpus_job(load_job_config(None, overrides=[f"{k}={v}" for k, v in base.items()]))["counts"][
        "written"] == len(stored)
    with fs.open_output_stream("faults-in/docs/part-1.parquet") as f:
        pq.write_table(pa.table({"doc_id": list(late), "text": list(late.values())}), f)

    tok, fp = decoder.tokenizer, latent_fingerprint(decoder, module)
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False)
    reader = AugmentedCacheReader(fs, "faults-caches/latent_kv", BUCKETS)
    want = {d: generate(decoder, restore(reader.get(d), decoder, fp), prompt_ids, max_new_tokens=N) for d in stored}
    for d, text in late.items():
        want[d] = generate(decoder, augment(decoder, module, [tok.encode(text, add_special_tokens=False)])[0],
                           prompt_ids, max_new_tokens=N)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"base": base, "stored": stored, "late": late, "want": want, "url": f"http://127.0.0.1:{port}"}
    serve.shutdown()


def deploy(site, *extra: str, **options) -> str:
    """(Re)deploy the app with config overrides and deployment options; returns the base URL."""
    from ray import serve

    from pipelines.serve import CompletionServer

    over = site["base"] | {"serve.max_tokens": 32, "serve.max_prompt_tokens": 64, "serve.max_request_bytes": 4096}
    cfg = load_job_config(None, overrides=[f"{k}={v}" for k, v in over.items()] + list(extra))
    dep = CompletionServer.options(ray_actor_options={"num_cpus": 1}, **options)
    serve.run(dep.bind(to_dict(cfg)), name="cache-aug", route_prefix="/")
    return site["url"]


def body(doc_id: str, **kw) -> dict:
    return {"model": "cache-aug", "prompt": PROMPT, "max_tokens": N, "temperature": 0, "document_id": doc_id} | kw


def call(url: str, doc_id: str, timeout: float = 60) -> tuple[object, list[int] | None]:
    """(status or exception name, token_ids of a 200)."""
    try:
        r = requests.post(f"{url}/v1/completions", json=body(doc_id), timeout=timeout)
    except requests.RequestException as e:
        return type(e).__name__, None
    return r.status_code, (r.json()["cache_aug"]["token_ids"] if r.status_code == 200 else None)


def burst(fn, n: int, timeout: float) -> list:
    """Run fn(i) for i < n on n threads released together; every thread must finish within `timeout`."""
    gate, out = threading.Barrier(n), [None] * n

    def run(i):
        gate.wait(timeout)
        out[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "requests still hanging after the burst's time limit"
    return out


def test_limits_hold_under_concurrency(site):
    """413 (declared and chunked bodies), 400 for max_tokens / prompt / document over their caps, mixed with good
    requests."""
    url = deploy(site)
    doc = list(site["stored"])[0]
    post = lambda **kw: requests.post(f"{url}/v1/completions", timeout=60, **kw)  # noqa: E731
    padded = (json.dumps(body(doc)) + " " * 5000).encode()  # valid JSON and a valid request, over the byte limit only
    cases = [
        ("good", lambda: post(json=body(doc)), 200),
        ("body too large", lambda: post(data=padded, headers={"Content-Type": "application/json"}), 413),
        ("chunked body too large",  # no Content-Length: the limit must hold while reading the stream
         lambda: post(data=(padded[i:i + 512] for i in range(0, len(padded), 512))), 413),
        ("document over token cap", lambda: post(json=body(doc, document="x" * 3000)), 400),
        ("max_tokens over cap", lambda: post(json=body(doc, max_tokens=33)), 400),
        ("prompt over cap", lambda: post(json=body(doc, prompt=" the" * 200)), 400),
    ]
    results = burst(lambda i: cases[i % len(cases)][0:1] + (cases[i % len(cases)][1](),), 3 * len(cases), timeout=90)
    for (name, r), (_, _, status) in zip(results, cases * 3, strict=True):
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        if status == 200:
            assert r.json()["cache_aug"]["token_ids"] == site["want"][doc]
        else:
            assert r.json()["error"]["message"], name


def test_overload_gets_503_not_an_unbounded_queue(site):
    """One request at a time and one queued: a burst of 12 slow requests sees 503/429, never a wrong answer."""
    url = deploy(site, max_ongoing_requests=1, max_queued_requests=1)
    docs = list(site["want"])
    assert call(url, docs[0])[0] == 200  # warm
    results = burst(lambda i: (docs[i % len(docs)],) + call(url, docs[i % len(docs)], timeout=60), 12, timeout=90)
    statuses = [s for _, s, _ in results]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert sum(s in (429, 503) for s in statuses) >= 1, f"no request refused: the queue is unbounded? {statuses}"
    assert statuses.count(200) >= 1, statuses
    for doc, status, ids in results:
        if status == 200:
            assert ids == site["want"][doc], doc
    status, ids = call(url, docs[-1])  # after the burst, a normal request is served
    assert status == 200 and ids == site["want"][docs[-1]]


@pytest.mark.slow
def test_replica_sigkill_mid_requests_never_wrong_and_recovers(site):
    """SIGKILL the replica's process under load: requests fail or are retried, no 200 is wrong, a new replica serves."""
    url = deploy(site)
    pids = replica_pids()
    assert len(pids) == 1, pids
    docs = list(site["want"])
    log: list[tuple[float, float, object, str, list[int] | None]] = []  # start, end, status, doc, token_ids
    lock, stop = threading.Lock(), threading.Event()

    def client(k: int) -> None:
        for i in range(400):  # bounded; stopped by `stop` long before
            if stop.is_set():
                return
            doc = docs[(k + i) % len(docs)]
            t = time.monotonic()
            status, ids = call(url, doc, timeout=60)
            with lock:
                log.append((t, time.monotonic(), status, doc, ids))
            if status != 200:
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while sum(e[2] == 200 for e in log) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(e[2] == 200 for e in log) >= 8, log
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)

        deadline = killed_at + 120  # the controller notices the dead actor and starts a new replica
        recovered = None
        while time.monotonic() < deadline:
            with lock:
                recovered = next((e for e in log if e[0] > killed_at and e[2] == 200), None)
            if recovered is not None:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(70)
    assert recovered is not None, f"no 200 within 120 s of the kill: {[e[2] for e in log if e[0] > killed_at][-10:]}"
    new = replica_pids()
    assert len(new) == 1 and new[0] != pids[0], (pids, new)
    in_flight = [e for e in log if e[0] < killed_at < e[1]]
    assert in_flight, "the kill hit no request in flight"
    wrong = [(doc, ids) for _, _, status, doc, ids in log if status == 200 and ids != site["want"][doc]]
    assert not wrong, wrong
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
