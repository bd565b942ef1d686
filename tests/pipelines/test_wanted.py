"""The wanted queue end to end, on a real local Ray cluster, SeaweedFS and HTTP: a replica's misses reach the queue,
the corpus job takes them (from the queued text or from its input) and the same request is then answered from the
stored record; several replicas missing the same documents make one ledger row each; a corpus driver killed while
it takes the queue loses and duplicates nothing; a store outage under a running replica fails no request and is
counted. The writer and the engine alone: tests/cache_aug/test_wanted.py."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from cache_aug.augment import generate
from cache_aug.config import to_dict
from cache_aug.coprocessor import latent_fingerprint
from cache_aug.corpus import ensure_embedded_corpus
from cache_aug.records import restore
from cache_aug.store import MANIFESTS, AugmentedCacheReader, read_kind
from cache_aug.wanted import WantedQueue, queue_files, text_sha256
from pipelines.config import load_job_config
from pipelines.corpus import EXIT_AT_ENV, run_corpus_job
from pipelines.storage import s3_filesystem
from tests.conftest import SeaweedFS, free_port
from tests.pipelines.shared import upload_fresh_coprocessor

pytestmark = pytest.mark.usefixtures("ray_cluster")

BUCKETS = 4
PROMPT = " And the LORD said"
N = 6  # max_tokens of every request
FLUSH_S = 0.2
REPLICA_CPUS = 0.25  # the cluster has 2 CPUs: two replicas and the corpus job's actor and tasks must fit together
ROOT = Path(__file__).resolve().parents[2]
KINDS = ("record", "skipped", "error")


@pytest.fixture(scope="module")
def site(s3_server, tiny_default_dir, tmp_path_factory):
    """A fresh coprocessor on S3 (and on local disk), short KJV documents, and Serve's HTTP proxy."""
    from ray import serve

    cop_dir = tmp_path_factory.mktemp("cop")
    decoder, module, cfg0 = upload_fresh_coprocessor(s3_server["client"],
                                                     ("wanted-in", "wanted-caches", "wanted-models"),
                                                     tiny_default_dir, "s3://wanted-models/cop", cop_dir)
    rows = pq.read_table(ensure_embedded_corpus("kjv") / "train.parquet").slice(40, 24).to_pylist()
    texts = [r["text"][:160] for r in rows]
    base = {"model.path": str(tiny_default_dir), "augmentation.n_latents": 2, "storage.mode": "latent_kv",
            "storage.dtype": "float32", "corpus.coprocessor": "s3://wanted-models/cop",
            "corpus.index_buckets": BUCKETS, "corpus.max_tokens": 256, "corpus.batch_size": 8,
            "corpus.cpus_per_actor": 0.5,
            "serve.max_tokens": 16, "serve.max_prompt_tokens": 64, "serve.max_request_bytes": 8192,
            "serve.store_list_s": 0, "serve.wanted.flush_s": FLUSH_S}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"decoder": decoder, "fp": latent_fingerprint(decoder, module), "fs": s3_filesystem(cfg0.s3),
           "texts": texts, "base": base, "cop_dir": str(cop_dir), "url": f"http://127.0.0.1:{port}"}
    serve.shutdown()


def _overrides(site, name: str, **extra) -> list[str]:
    """One scenario's config: input under s3://wanted-in/<name>/, output (the cache prefix) s3://wanted-caches/<name>;
    a replica's document store is the corpus input (serve.documents unset)."""
    over = site["base"] | {"corpus.input_paths": f"[s3://wanted-in/{name}/]",
                           "corpus.output": f"s3://wanted-caches/{name}"} | extra
    return [f"{k}={v}" for k, v in over.items()]


def _put_input(site, name: str, docs: dict[str, str]) -> None:
    with site["fs"].open_output_stream(f"wanted-in/{name}/part-0.parquet") as f:
        pq.write_table(pa.table({"doc_id": list(docs), "text": list(docs.values())}), f)


def deploy(site, overrides: list[str], replicas: int = 1) -> str:
    from ray import serve

    from pipelines.serve import CompletionServer

    cfg = load_job_config(None, overrides=overrides)
    dep = CompletionServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": REPLICA_CPUS},
                                   graceful_shutdown_timeout_s=5)
    serve.run(dep.bind(to_dict(cfg)), name="cache-aug", route_prefix="/")
    return site["url"]


def undeploy() -> None:
    from ray import serve

    serve.delete("cache-aug")


def ask(url: str, doc_id: str, document: str | None = None, timeout: float = 120) -> requests.Response:
    body = {"model": "cache-aug", "prompt": PROMPT, "max_tokens": N, "temperature": 0, "document_id": doc_id}
    return requests.post(f"{url}/v1/completions", json=body | ({"document": document} if document else {}),
                         timeout=timeout)


def ok(r: requests.Response) -> dict:
    assert r.status_code == 200, (r.status_code, r.text[:500])
    return r.json()


def entries(fs, root: str) -> list[dict]:
    """Every entry of the queue's files on storage."""
    rows = []
    for f in queue_files(fs, root):
        rows += pq.read_table(f, filesystem=fs).to_pylist()
    return rows


def wait_for(get, until, timeout: float, what: str):
    """Poll get() until until(value); returns that value (fails with the last one after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        got = get()
        if until(got):
            return got
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}; last: {got}"
        time.sleep(0.1)


def ledger(fs, root: str, run_id: str) -> list[dict]:
    """Every ledger row of one run, each kind's."""
    return [r | {"kind": kind} for kind in KINDS
            for r in read_kind(fs, root, kind, ["doc_id", "wanted", "queued"], run_id).to_pylist()]


def offline(site, root: str, doc_id: str) -> tuple[list[int], str, str]:
    """(token ids, text, content hash) of greedy decoding after the stored record, in this process."""
    dec = site["decoder"]
    record = AugmentedCacheReader(site["fs"], root, BUCKETS, list_ttl_s=0).get(doc_id)
    assert record is not None, doc_id
    tok = dec.tokenizer
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False)
    ids = generate(dec, restore(record, dec, site["fp"]), prompt_ids, max_new_tokens=N)
    return ids, tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True), record.content_sha256


def test_miss_queued_then_taken_then_served_stored(site):
    """A document of the input without a record (its text from the replica's document store: queued without it)
    and a document only the request knows (queued with its text) are answered online and queued; one corpus run
    takes both, counted exactly, and deletes the queue; the same requests are then answered from the stored
    records, equal to offline decoding; a second run takes nothing."""
    fs, name = site["fs"], "roundtrip"
    root = f"wanted-caches/{name}"
    t = site["texts"]
    in_input, only_queued, unknown, never_asked = "rt-input", "rt-queued", "rt-unknown", "rt-other"
    _put_input(site, name, {in_input: t[0], never_asked: t[1]})
    url = deploy(site, _overrides(site, name))

    meta = ok(ask(url, in_input))["cache_aug"]
    assert meta["source"] == "online" and "no stored cache" in meta["reason"], meta
    assert ok(ask(url, only_queued, document=t[2]))["cache_aug"]["source"] == "online"
    meta = ok(ask(url, unknown))["cache_aug"]  # no record, no text anywhere: plain decoding, nothing to queue
    assert meta["source"] == "none", meta
    wait_for(lambda: entries(fs, root), lambda e: len(e) >= 2, 30, "two queue entries")
    time.sleep(5 * FLUSH_S)  # nothing else comes
    got = entries(fs, root)
    assert sorted((e["doc_id"], e["content_sha256"], e["reason"], e["text"]) for e in got) == sorted([
        (in_input, text_sha256(t[0]), "missing", None),  # the document store holds it: the input has the text
        (only_queued, text_sha256(t[2]), "missing", t[2])])
    files = [f.rsplit("/", 1)[-1] for f in queue_files(fs, root)]
    health = requests.get(f"{url}/healthz", timeout=30).json()["wanted"]
    assert health["written"] == 2 and health["pending"] == 0 and health["write_errors"] == 0, health

    first = run_corpus_job(load_job_config(None, overrides=_overrides(site, name)))
    assert first["counts"] == {"read": 3, "written": 3, "skipped": 0, "failed": 0}
    assert first["wanted"] == {"mode": "alongside", "files": files, "entries": 2, "documents": 2, "queue_only": 1,
                               "written": 2, "skipped": 0, "failed": 0, "already_taken_files": 0}
    rows = ledger(fs, root, first["run_id"])
    assert sorted((r["doc_id"], r["kind"], r["wanted"], r["queued"]) for r in rows) == sorted([
        (in_input, "record", "missing", None), (only_queued, "record", "missing", True),
        (never_asked, "record", None, None)])
    assert queue_files(fs, root) == []  # taken: deleted after the manifest

    for doc_id, document in ((in_input, None), (only_queued, t[2])):
        body = ok(ask(url, doc_id, document=document))
        assert body["cache_aug"]["source"] == "stored", (doc_id, body["cache_aug"])
        ids, text, sha = offline(site, root, doc_id)
        assert body["cache_aug"]["token_ids"] == ids and body["choices"][0]["text"] == text, doc_id
        assert sha == text_sha256(document or t[0])  # the record is of the text serving saw (queued or input)
    assert ok(ask(url, unknown))["cache_aug"]["source"] == "none"
    undeploy()

    second = run_corpus_job(load_job_config(None, overrides=_overrides(site, name)))
    assert second["counts"] == {"read": 2, "written": 0, "skipped": 2, "failed": 0}
    assert second["wanted"] | {"files": None} == {"mode": "alongside", "files": None, "entries": 0, "documents": 0,
                                                  "queue_only": 0, "written": 0, "skipped": 0, "failed": 0,
                                                  "already_taken_files": 0}
    assert second["wanted"]["files"] == []


def test_many_replicas_missing_the_same_documents_make_one_ledger_row_each(site):
    """Two replicas, concurrent requests for the same three missing documents: each replica queues each document it
    missed once; the corpus run merges the replicas' entries into one ledger row per document, counted exactly."""
    fs, name = site["fs"], "replicas"
    root = f"wanted-caches/{name}"
    t = site["texts"]
    docs = {"rep-input": None, "rep-q1": t[4], "rep-q2": t[5]}  # the first is in the input, the others sent
    _put_input(site, name, {"rep-input": t[3], "rep-other": t[6]})
    url = deploy(site, _overrides(site, name), replicas=2)

    def one(i: int) -> dict:
        doc_id = list(docs)[i % len(docs)]
        return ok(ask(url, doc_id, document=docs[doc_id]))

    answered = []
    for _wave in range(6):  # until both replicas have queued something (bounded)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answered += list(pool.map(one, range(12), timeout=180))
        time.sleep(5 * FLUSH_S)
        if len({e["replica"] for e in entries(fs, root)}) == 2:
            break
    assert all(o["cache_aug"]["source"] == "online" for o in answered), [o["cache_aug"] for o in answered]
    # the replicas' writers are done when the queue stops growing and every health answer says nothing is pending
    previous = None
    for _ in range(50):
        now = entries(fs, root)
        health = [requests.get(f"{url}/healthz", timeout=30).json()["wanted"] for _ in range(4)]
        if previous is not None and len(now) == len(previous) and all(h["pending"] == 0 for h in health):
            break
        previous = now
        time.sleep(5 * FLUSH_S)
    queued = entries(fs, root)
    by_replica = collections.defaultdict(set)
    for e in queued:
        by_replica[e["replica"]].add(e["doc_id"])
    assert len(by_replica) == 2, f"one replica served every miss: {dict(by_replica)}"  # both replicas served
    assert set().union(*by_replica.values()) == set(docs)
    # one entry per replica and document (a replica's own buffer de-duplicates; requeue_s keeps it from re-queuing)
    assert len(queued) == sum(len(v) for v in by_replica.values())
    assert any(sum(d in v for v in by_replica.values()) == 2 for d in docs), "no document missed by both replicas"
    files = sorted(f.rsplit("/", 1)[-1] for f in queue_files(fs, root))

    run = run_corpus_job(load_job_config(None, overrides=_overrides(site, name)))
    rows = ledger(fs, root, run["run_id"])
    assert collections.Counter(r["doc_id"] for r in rows) == dict.fromkeys([*docs, "rep-other"], 1)
    assert all(r["kind"] == "record" for r in rows)
    assert {r["doc_id"]: (r["wanted"], r["queued"]) for r in rows} == {
        "rep-input": ("missing", None), "rep-q1": ("missing", True), "rep-q2": ("missing", True),
        "rep-other": (None, None)}
    assert run["counts"] == {"read": 4, "written": 4, "skipped": 0, "failed": 0}
    assert sorted(run["wanted"]["files"]) == files
    assert run["wanted"] | {"files": None} == {"mode": "alongside", "files": None, "entries": len(queued),
                                               "documents": 3, "queue_only": 2, "written": 3, "skipped": 0,
                                               "failed": 0, "already_taken_files": 0}
    assert queue_files(fs, root) == []
    for doc_id, document in docs.items():  # and either replica now answers from the record
        assert ok(ask(url, doc_id, document=document))["cache_aug"]["source"] == "stored", doc_id
    undeploy()


# a corpus job driver in its own process, connected to the test's cluster: it dies where EXIT_AT_ENV says
KILLED_DRIVER = """
import json, sys
import ray
from pipelines.config import load_job_config
from pipelines.corpus import run_corpus_job
spec = json.loads(sys.argv[1])
ray.init(address=spec["address"], log_to_driver=False)
run_corpus_job(load_job_config(None, overrides=spec["overrides"]))
print("FINISHED", flush=True)
"""


def _queue(fs, root: str, docs: list[tuple[str, str | None, str]]) -> str:
    """One replica's queue file of (doc_id, text or None, the text serving saw) misses; returns its name."""
    q = WantedQueue(fs, root, start=False)
    for doc_id, text, seen in docs:
        assert q.add(doc_id, text_sha256(seen), "missing", text)
    before = set(queue_files(fs, root))
    assert q.flush() == len(docs)
    [new] = set(queue_files(fs, root)) - before
    return new.rsplit("/", 1)[-1]


def _killed_driver(site, name: str, point: str) -> None:
    import ray

    spec = {"address": ray.get_runtime_context().gcs_address, "overrides": _overrides(site, name)}
    child = subprocess.run([sys.executable, "-c", KILLED_DRIVER, json.dumps(spec)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=os.environ | {EXIT_AT_ENV: point})
    assert child.returncode == 1 and f"{EXIT_AT_ENV}={point}" in child.stdout, (
        point, child.returncode, child.stdout[-3000:], child.stderr[-3000:])
    assert "FINISHED" not in child.stdout


def test_drivers_killed_while_taking_the_queue_lose_and_duplicate_nothing(site):
    """Queue files of two replicas (a document of the input in both, one only queued in both); a driver dies after
    writing its run (no manifest: the queue stays); a third replica's file arrives; the next driver takes the whole
    queue again, finds what the killed run wrote done, and dies after its manifest (the files not deleted); the next
    run deletes them without taking them again. Every queued document ends with exactly one current record (of the
    queued text where the input lacks it), every queue file is taken by exactly one succeeded run, and the queue
    ends empty."""
    fs, name = site["fs"], "killed"
    root = f"wanted-caches/{name}"
    t = site["texts"]
    _put_input(site, name, {"k-input": t[7], "k-other": t[8]})
    queued = {"k-q1": t[9], "k-q2": t[10], "k-q3": t[11]}  # only in the queue: augmented from the queued text
    files = [_queue(fs, root, [("k-input", None, t[7]), ("k-q1", t[9], t[9]), ("k-q2", t[10], t[10])]),
             _queue(fs, root, [("k-q1", t[9], t[9]), ("k-input", None, t[7])])]

    def current() -> collections.Counter:
        return collections.Counter(read_kind(fs, root, "record", ["doc_id"]).column("doc_id").to_pylist())

    _killed_driver(site, name, "after_write")
    assert _manifests(fs, root) == []  # died before its manifest: the queue is not taken
    assert sorted(f.rsplit("/", 1)[-1] for f in queue_files(fs, root)) == sorted(files)
    assert current() == dict.fromkeys(["k-input", "k-other", "k-q1", "k-q2"], 1)  # what it wrote counts as done

    files.append(_queue(fs, root, [("k-q3", t[11], t[11]), ("k-q2", t[10], t[10])]))  # a replica writes on
    _killed_driver(site, name, "after_manifest")
    [m] = _manifests(fs, root)
    assert m["status"] == "succeeded" and sorted(m["wanted"]["files"]) == sorted(files)
    assert m["counts"] == {"read": 5, "written": 1, "skipped": 4, "failed": 0}
    assert m["wanted"] | {"files": None} == {"mode": "alongside", "files": None, "entries": 7, "documents": 4,
                                             "queue_only": 3, "written": 1, "skipped": 3, "failed": 0,
                                             "already_taken_files": 0}
    assert sorted(f.rsplit("/", 1)[-1] for f in queue_files(fs, root)) == sorted(files)  # died before deleting

    rerun = run_corpus_job(load_job_config(None, overrides=_overrides(site, name)))
    assert queue_files(fs, root) == []
    assert rerun["counts"] == {"read": 2, "written": 0, "skipped": 2, "failed": 0}
    assert rerun["wanted"] | {"files": None} == {"mode": "alongside", "files": None, "entries": 0, "documents": 0,
                                                 "queue_only": 0, "written": 0, "skipped": 0, "failed": 0,
                                                 "already_taken_files": 3}
    assert rerun["wanted"]["files"] == []
    assert current() == dict.fromkeys(["k-input", "k-other", *queued], 1)
    records = read_kind(fs, root, "record", ["doc_id", "content_sha256"]).to_pylist()
    assert {r["doc_id"]: r["content_sha256"] for r in records} == {
        d: text_sha256(text) for d, text in ({"k-input": t[7], "k-other": t[8]} | queued).items()}
    done = [m for m in _manifests(fs, root) if m["status"] == "succeeded"]
    assert collections.Counter(f for m in done for f in m["wanted"]["files"]) == dict.fromkeys(files, 1)
    assert sum(m["wanted"]["entries"] for m in done) == 7


def _manifests(fs, root: str) -> list[dict]:
    import pyarrow.fs as pafs

    out = []
    for info in fs.get_file_info(pafs.FileSelector(f"{root}/{MANIFESTS}", allow_not_found=True)):
        if info.base_name.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                out.append(json.loads(f.read().decode()))
    return sorted(out, key=lambda m: m["run_id"])


def test_store_outage_under_a_running_replica_fails_no_request_and_is_counted(site, tmp_path_factory):
    """A replica whose cache prefix is on a second SeaweedFS server, which dies under it: every request is still
    answered (200: online where the text is known, else none); the misses it queues stay pending, and each failed
    write is counted in /healthz's wanted block."""
    second = SeaweedFS(tmp_path_factory.mktemp("seaweedfs-outage"), max_volumes=20).start()
    try:
        second.client().create_bucket(Bucket="outage")
        t = site["texts"]
        # the run listing is kept (there are no runs: a lookup is answered without storage), so misses are queued
        over = _overrides(site, "unused", **{"s3.endpoint_url": second.endpoint, "serve.coprocessor": site["cop_dir"],
                                             "serve.cache_prefix": "s3://outage/caches", "serve.documents": "[]",
                                             "serve.store_list_s": 3600})
        url = deploy(site, over)
        health = lambda: requests.get(f"{url}/healthz", timeout=30).json()  # noqa: E731
        assert ok(ask(url, "up-0", document=t[11]))["cache_aug"]["source"] == "online"
        wait_for(lambda: health()["wanted"], lambda w: w["written"] == 1, 30, "the first entry written")
        fs = s3_filesystem(load_job_config(None, overrides=[f"s3.endpoint_url={second.endpoint}"]).s3)
        assert [e["doc_id"] for e in entries(fs, "outage/caches")] == ["up-0"]

        second.stop(timeout_s=1)  # the store is gone
        sources = [ok(ask(url, f"down-{i}", document=t[12 + i] if i % 2 == 0 else None, timeout=60))["cache_aug"][
            "source"] for i in range(6)]
        assert sources == ["online", "none"] * 3, sources  # text known: augmented online; unknown: plain decoding
        got = wait_for(lambda: health()["wanted"], lambda w: w["write_errors"] >= 1 and w["added"] == 4, 60,
                       "a write error counted")
        assert got["pending"] == 3 and got["written"] == 1 and got["files"] == 1 and got["last_error"], got
        assert got["dropped_full_buffer"] == 0 and got["dropped_full_queue"] == 0, got
        assert health()["status"] == "ok"
        # the entries stay pending through the outage: more failed writes, nothing dropped
        later = wait_for(lambda: health()["wanted"], lambda w: w["write_errors"] > got["write_errors"], 60,
                         "more write errors")
        assert later["pending"] == 3 and later["written"] == 1 and later["dropped_full_buffer"] == 0, later
    finally:
        undeploy()
        second.stop(timeout_s=1)
