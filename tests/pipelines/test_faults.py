"""Faults injected for real: S3 stopped mid-run, worker processes SIGKILLed, damaged files, pickled payloads.

Each test asserts the exact outcome (counts, steps, refusals), not just "no crash". All traffic is on
loopback; every wait is bounded in count and time.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import pickle
import signal
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pyarrow.fs import LocalFileSystem

from cache_aug.checksum import payload_checksum
from cache_aug.config import ModelConfig
from cache_aug.coprocessor import build_latent_module, save_latent_module
from cache_aug.corpus import ensure_embedded_corpus
from cache_aug.decoder import load_decoder
from cache_aug.kv import CacheSpec
from cache_aug.records import (
    CacheRecord,
    CacheRecordError,
    decode_payload,
    write_records,
)
from cache_aug.store import (
    AugmentedCacheReader,
    done_documents,
    kind_files,
    read_kind,
    run_ids,
)
from pipelines.config import load_job_config
from tests.conftest import SeaweedFS

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- stored data is never unpickled

_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve", "jsonpickle"}


def _unpickling_calls(path: Path) -> list[str]:
    """Every place in a source file that could unpickle: pickle-family imports, and loaders that unpickle by default."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLE_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            const = lambda key, kwargs=kwargs: isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value  # noqa: E731
            if name.endswith("read_pickle") or name.endswith("Unpickler"):
                found.append(f"{where} {name}")
            elif name == "torch.load" and const("weights_only") is not True:
                found.append(f"{where} torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and "allow_pickle" in kwargs and const("allow_pickle") is not False:
                found.append(f"{where} {name}(allow_pickle=...)")
            elif name.split(".")[0] in _PICKLE_MODULES:
                found.append(f"{where} {name}")
    return found


def test_no_code_path_unpickles_stored_data():
    files = [p for d in ("cache_aug", "pipelines", "jobs") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 10
    found = [hit for p in files for hit in _unpickling_calls(p)]
    assert not found, (
        "code that can unpickle (stored data must go through safetensors/Arrow/JSON):\n" + "\n".join(found))
    # the scanner itself sees what it must refuse
    probe = ROOT / "tests" / "pipelines" / "_unpickle_probe.py"
    probe.write_text("import pickle\nimport torch\nimport numpy as np\nimport pandas as pd\n"
                     "pickle.loads(b'')\ntorch.load('x')\ntorch.load('x', weights_only=False)\ntorch.load('x', "
                     "weights_only=True)\nnp.load('x', allow_pickle=True)\nnp.load('x')\npd.read_pickle('x')\n")
    try:
        hits = _unpickling_calls(probe)
    finally:
        probe.unlink()
    assert [h.split(" ", 1)[1] for h in hits] == [
        "import pickle", "pickle.loads", "torch.load without weights_only=True", "torch.load without weights_only=True",
        "np.load(allow_pickle=...)", "pd.read_pickle"], hits


class _Plant:
    """Unpickling this creates a file: the proof that a pickle stream was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("unpickled!",))


def _record(payload: bytes, doc_id: str = "evil") -> CacheRecord:
    return CacheRecord(doc_id=doc_id, fingerprint="fp", mode="latents", dtype="float32", n_latents=2, doc_tokens=3,
                       seq_len=5, shapes="{}", payload=payload, payload_checksum=payload_checksum(payload))


def test_pickled_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    spec = CacheSpec(layers=(), hidden_size=8, vocab_size=16, dtype=torch.float32)
    stream = pickle.dumps(_Plant(str(marker)), protocol=pickle.HIGHEST_PROTOCOL)
    framed = len(stream).to_bytes(8, "little") + stream  # a pickle where the safetensors header should be
    buf = tmp_path / "torch.pt"
    torch.save({"x": _Plant(str(marker))}, buf)  # torch's own zip+pickle format
    payloads = {"raw pickle": stream, "framed pickle": framed, "torch.save": buf.read_bytes(),
                "pickle protocol 0": pickle.dumps(_Plant(str(marker)), protocol=0)}
    for what, payload in payloads.items():
        with pytest.raises(CacheRecordError, match="record 'evil': payload"):
            decode_payload(_record(payload), spec, "fp")
        assert not marker.exists(), what
    # the same records stored in Parquet and looked up through the reader: still refused
    out = tmp_path / "store"
    files = out / "runs" / "20260101T000000Z-00000000" / "kind=record" / "bucket=0000"
    files.mkdir(parents=True)
    write_records(str(files / "part-0.parquet"), [_record(p, doc_id="evil") for p in payloads.values()][:1])
    rec = AugmentedCacheReader(LocalFileSystem(), str(out), n_buckets=1).get("evil")
    with pytest.raises(CacheRecordError):
        decode_payload(rec, spec, "fp")
    assert not marker.exists()
    pickle.loads(stream)  # the test is meaningful: unpickling this payload does run code
    assert marker.read_text() == "unpickled!"


# ---------------------------------------------------------------- damaged Parquet files are never read as data


def _record_table(doc_ids: list[str], fingerprint: str = "fp") -> pa.Table:
    from cache_aug.records import records_to_table

    recs = [dataclasses.replace(_record(b"x" * 16, doc_id=d), fingerprint=fingerprint, content_sha256=f"h-{d}")
            for d in doc_ids]
    return records_to_table(recs)


def _plant_damaged(directory: Path, good: Path) -> list[Path]:
    """Next to a good file: a cut-short copy, an empty file, and one whose footer bytes are garbage."""
    data = good.read_bytes()
    planted = {"cut.parquet": data[: len(data) // 2], "empty.parquet": b"",
               "nofooter.parquet": data[:-12] + b"\0" * 8 + b"PAR1"}
    for name, content in planted.items():
        (directory / name).write_bytes(content)
    return [directory / n for n in planted]


def test_damaged_parquet_files_are_ignored_by_accounting_and_reader(tmp_path):
    fs, root = LocalFileSystem(), str(tmp_path)
    run = "20260101T000000Z-00000001"
    bucket = tmp_path / "runs" / run / "kind=record" / "bucket=0000"
    bucket.mkdir(parents=True)
    pq.write_table(_record_table(["a", "b"]), bucket / "good.parquet")
    # a half-written file that holds a document no good file has: it must not count as done
    pq.write_table(_record_table(["c", "d", "e"] * 50), bucket / "half.parquet")
    whole = (bucket / "half.parquet").read_bytes()
    (bucket / "half.parquet").write_bytes(whole[: len(whole) - 100])
    damaged = _plant_damaged(bucket, bucket / "good.parquet")
    for p in damaged + [bucket / "half.parquet"]:
        with pytest.raises((pa.ArrowInvalid, OSError)):  # a bad footer is an OSError, the rest ArrowInvalid
            pq.read_table(p)  # really unreadable
    assert kind_files(fs, root, "record") == [str(bucket / "good.parquet")]
    assert sorted(read_kind(fs, root, "record", ["doc_id"], run).column("doc_id").to_pylist()) == ["a", "b"]
    assert done_documents(fs, root, "fp") == {("a", "h-a"), ("b", "h-b")}
    reader = AugmentedCacheReader(fs, root, n_buckets=1)
    assert reader.get("a").doc_id == "a" and reader.get("c") is None


# ---------------------------------------------------------------- the corpus job under S3 outages and SIGKILL


@pytest.fixture(scope="module")
def corpus_setup(tiny_default_dir, tmp_path_factory):
    """A local coprocessor; 160 KJV documents as one local Parquet file, and 480 as 12 files (blocks stream through)."""
    decoder = load_decoder(ModelConfig(path=str(tiny_default_dir)))
    cfg0 = load_job_config(None, overrides=[f"model.path={tiny_default_dir}"])
    cop = save_latent_module(build_latent_module(decoder, cfg0.coprocessor, 2), decoder, tmp_path_factory.mktemp("cop"))
    rows = pq.read_table(ensure_embedded_corpus("kjv") / "train.parquet").slice(0, 480).to_pylist()
    table = pa.table({"doc_id": [r["doc_id"] for r in rows], "text": [r["text"][:600] for r in rows]})
    inp, many = tmp_path_factory.mktemp("faults-in"), tmp_path_factory.mktemp("faults-in-many")
    pq.write_table(table.slice(0, 160), inp / "part-0.parquet")
    for i in range(12):
        pq.write_table(table.slice(40 * i, 40), many / f"part-{i:02d}.parquet")
    ids = table.column("doc_id").to_pylist()
    return {"dir": tiny_default_dir, "cop": str(cop), "input": str(inp), "ids": sorted(ids[:160]), "many": str(many),
            "many_ids": sorted(ids)}


def _corpus_cfg(setup, output, *extra, inputs=None):
    overrides = {
        "model.path": str(setup["dir"]), "augmentation.n_latents": 2, "storage.mode": "latent_kv",
        "storage.dtype": "float32", "corpus.input_paths": f"[{inputs or setup['input']}]", "corpus.output": output,
        "corpus.coprocessor": setup["cop"],
        "corpus.max_tokens": 400, "corpus.batch_size": 8, "corpus.augment_batch_size": 8, "corpus.index_buckets": 4,
        "corpus.max_rows_per_file": 16,
    }
    return load_job_config(None, overrides=[f"{k}={v}" for k, v in overrides.items()] + list(extra))


class _Background:
    """run_corpus_job (or any call) in a thread; keeps its result or exception."""

    def __init__(self, fn, *args, **kwargs):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def join(self, timeout_s: float):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"still running after {timeout_s}s"
        return self


def _wait(cond, timeout_s: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _processes(title: str) -> list:
    """Our cluster's live processes whose title (Ray sets it to the actor's class) contains `title`.

    Only descendants of this process (ray.init started the raylet here): other Ray clusters on the machine are not ours.
    """
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _record_ids_all_runs(fs, root) -> list[str]:
    return read_kind(fs, root, "record", ["doc_id"]).column("doc_id").to_pylist()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_corpus_job_through_an_s3_outage(corpus_setup, tmp_path):
    """S3 stopped while the job writes, started again on the same ports and data: the run retries through or fails
    naming the S3 error; either way the re-run completes exactly, and a cut-short file is never taken for data."""
    (tmp_path / "weed").mkdir()
    server = SeaweedFS(tmp_path / "weed", max_volumes=30).start()
    try:
        client = server.client()
        client.create_bucket(Bucket="caches")
        cfg = _corpus_cfg(corpus_setup, "s3://caches/kjv", f"s3.endpoint_url={server.endpoint}")
        from pipelines.storage import s3_filesystem

        fs, root = s3_filesystem(cfg.s3), "caches/kjv"

        def written():
            keys = [o["Key"] for o in client.list_objects_v2(Bucket="caches", Prefix="kjv/runs/").get("Contents", [])]
            return [k for k in keys if "/kind=record/" in k]

        from pipelines.corpus import run_corpus_job

        job = _Background(run_corpus_job, cfg)
        _wait(written, 120, "the first record file on S3")
        server.stop()
        time.sleep(8)
        assert job.result is None  # it cannot have succeeded with S3 down: its manifest goes there
        server.start()
        job.join(240)
        first_ids = _record_ids_all_runs(fs, root)
        assert len(first_ids) == len(set(first_ids))  # no document written twice by a retried write
        # Which outcome depends on the S3 call the outage hits: Ray Data retries what it knows as transient
        # (e.g. INTERNAL_FAILURE on an upload) with backoff, but not a HeadBucket 500, which aborts the run.
        print(f"outage outcome: {'failed: ' + repr(job.error)[:300] if job.error else 'retried through'}")
        if job.error is None:  # retried through the outage: the run itself is exact
            assert job.result["status"] == "succeeded"
            assert job.result["counts"] == {"read": 160, "written": 160, "skipped": 0, "failed": 0}
            assert sorted(first_ids) == corpus_setup["ids"]
        else:  # failed, naming the storage error rather than a later one (the manifest write also fails)
            assert "AWS Error" in str(job.error) and "caches" in str(job.error), repr(job.error)
            assert 0 < len(first_ids) <= 160, len(first_ids)

        # a cut-short file planted in the run's record dir is not data: the re-run skips exactly what was done
        part = next(k for k in written() if k.endswith(".parquet"))
        body = client.get_object(Bucket="caches", Key=part)["Body"].read()
        client.put_object(Bucket="caches", Key=part.rsplit("/", 1)[0] + "/zz-cut.parquet", Body=body[: len(body) // 2])
        rerun = run_corpus_job(cfg)
        n = len(first_ids)
        assert rerun["counts"] == {"read": 160, "written": 160 - n, "skipped": n, "failed": 0}
        assert sorted(_record_ids_all_runs(fs, root)) == corpus_setup["ids"]
        assert len(run_ids(fs, root)) == 2
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_corpus_job_survives_sigkill_of_the_augmenter_actor(corpus_setup, tmp_path):
    """SIGKILL the Augmenter actor's process mid-run: Ray Data restarts it and retries; the accounting stays exact."""
    from pipelines.corpus import run_corpus_job

    out = tmp_path / "out"
    cfg = _corpus_cfg(corpus_setup, str(out), inputs=corpus_setup["many"])
    fs = LocalFileSystem()
    job = _Background(run_corpus_job, cfg)
    actors = _wait(lambda: _processes("MapBatches(Augmenter)"), 120, "the Augmenter actor's process")
    assert len(actors) == 1, actors
    victim = actors[0]
    _wait(lambda: list(out.glob("runs/*/kind=record/*/*.parquet")), 120, "the first record file")
    assert job.thread.is_alive()  # mid-run
    written_before = len(read_kind(fs, str(out), "record", ["doc_id"]))
    assert written_before < 480
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)  # reaped or gone: it really died
    job.join(240)
    print(f"killed pid {victim.pid} after {written_before} records; job error: {job.error!r}")
    assert job.error is None, repr(job.error)  # Ray Data restarted the actor and retried its batches
    assert job.result["counts"] == {"read": 480, "written": 480, "skipped": 0, "failed": 0}
    assert sorted(_record_ids_all_runs(fs, str(out))) == corpus_setup["many_ids"]  # each document exactly once
    rerun = run_corpus_job(cfg)
    assert rerun["counts"] == {"read": 480, "written": 0, "skipped": 480, "failed": 0}


# ---------------------------------------------------------------- training under SIGKILL


def _registered(run_dir: Path) -> list[dict]:
    """Metrics of the checkpoints Ray Train has registered (its snapshot); files on disk alone do not count."""
    import json

    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or caught mid-write
        return []
    return [r["metrics"] for r in snap["checkpoint_results"]]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_training_resumes_from_last_checkpoint_after_sigkill_of_a_worker(tiny_default_dir, tmp_path):
    """SIGKILL one TorchTrainer worker process after a checkpoint: the group restarts from the last one."""
    from pipelines.train import run_training

    root = ensure_embedded_corpus("kjv")
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "heldout").mkdir()
    train = pq.read_table(root / "train.parquet").slice(0, 240)
    for i in range(3):
        pq.write_table(train.slice(i * 80, 80), data / "train" / f"shard-{i}.parquet")
    pq.write_table(pq.read_table(root / "heldout.parquet"), data / "heldout" / "part-0.parquet")
    name = f"sigkill-{uuid.uuid4().hex[:8]}"
    overrides = {
        "model.path": str(tiny_default_dir),
        "augmentation.n_latents": 2, "augmentation.n_ahead": 4, "augmentation.points_per_sequence": 4,
        "data.paths": f"[{data}/train/]", "data.eval_paths": f"[{data}/heldout/]", "data.seq_len": 64,
        "data.docs_per_batch": 32,
        "train.run_name": name, "train.storage_path": str(tmp_path / "runs"), "train.num_workers": 2,
        "train.micro_batch_size": 2, "optim.warmup_steps": 1, "train.eval_batches": 1,
        "train.deepspeed_config": "cluster/deepspeed/cpu.json", "train.zero_stage": 2, "optim.max_steps": 60,
        "train.checkpoint_every": 20, "train.eval_every": 60, "train.max_failures": 1, "train.checkpoints_to_keep": 10,
    }
    cfg = load_job_config(None, overrides=[f"{k}={v}" for k, v in overrides.items()])
    run_dir = tmp_path / "runs" / name
    job = _Background(run_training, cfg)
    # a checkpoint is resumable once Ray Train's controller has registered it; a written but unregistered one is not
    _wait(lambda: _registered(run_dir), 240, "the step-20 checkpoint to be registered", every=0.05)
    workers = _processes("RayTrainWorker")
    assert len(workers) == 2, workers
    assert job.thread.is_alive()
    os.kill(workers[-1].pid, signal.SIGKILL)
    workers[-1].wait(10)
    job.join(420)
    assert job.error is None, repr(job.error)
    result = job.result
    registered = _registered(run_dir)
    first = [m["step"] for m in registered if m["resumed_from_step"] == 0]  # the killed group's checkpoints
    resumed = result.metrics["resumed_from_step"]
    print(f"checkpoints of the killed group: {first}; resumed_from_step={resumed}; all: "
          f"{[m['step'] for m in registered]}")
    assert resumed > 0, "the restarted group began from scratch"
    assert first and max(first) < 60  # killed mid-run, after at least one checkpoint
    assert resumed == max(first)  # the restarted group loaded the last registered checkpoint, not step 0
    assert result.metrics["step"] == 60
    assert [m["step"] for m in registered if m["resumed_from_step"] == resumed] == list(range(resumed + 20, 61, 20))
    assert (run_dir / "export" / "latents.json").exists()
