"""The Ray Data evaluation job (documents on S3, two actors) gives the report of the in-process evaluation."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cache_aug.config import CoprocessorConfig, ModelConfig, S3Config, to_dict
from cache_aug.coprocessor import build_latent_module, save_latent_module
from cache_aug.decoder import load_decoder
from cache_aug.evaluate import run_eval
from pipelines.config import load_job_config
from pipelines.evaluate import DocumentEvaluator, _read_documents, run_eval_job
from pipelines.storage import upload_dir

pytestmark = pytest.mark.usefixtures("ray_cluster")

TEXTS = [
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
    "And God said, Let there be light: and there was light. And God saw the light, that it was good.",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures.",
    "Blessed is the man that walketh not in the counsel of the ungodly, nor standeth in the way of sinners.",
    "tiny",
]


def test_ray_eval_equals_local(s3_server, tiny_default_dir, tmp_path):
    decoder = load_decoder(ModelConfig(path=str(tiny_default_dir)))
    torch.manual_seed(0)
    for name, mode in (("pause", "pause"), ("coprocessor", "full")):
        save_latent_module(build_latent_module(decoder, CoprocessorConfig(mode=mode), n_latents=2), decoder,
                           tmp_path / name)
    texts = [*TEXTS, None, ""]  # no usable text: both paths leave them out and count them
    table = pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts})
    pq.write_table(table, tmp_path / "heldout.parquet")
    client = s3_server["client"]
    client.create_bucket(Bucket="eval-docs")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket="eval-docs", Key="heldout/part-0.parquet", Body=buf.getvalue())

    common = [f"model.path={tiny_default_dir}", f"eval.pause={tmp_path / 'pause'}",
              f"eval.coprocessor={tmp_path / 'coprocessor'}",
              "eval.window=32", "eval.max_ahead=5", "eval.points_per_window=3", "augmentation.n_ahead=3",
              "augmentation.min_prefix=4", "eval.bootstrap_samples=100", "eval.docs_per_batch=2"]
    local = run_eval(load_job_config(None, overrides=[*common, f"eval.paths=[{tmp_path / 'heldout.parquet'}]",
                                                  f"eval.output={tmp_path / 'local'}"]))
    # the actors load the coprocessor from S3 themselves (the pause module from its local path) and keep no copy
    upload_dir(str(tmp_path / "coprocessor"), "s3://eval-docs/coprocessor", S3Config())
    copies = {p.name for p in Path(tempfile.gettempdir()).glob("cache-aug-*")}
    remote_cfg = load_job_config(None, overrides=[*common, "eval.paths=[s3://eval-docs/heldout/]", "eval.num_actors=2",
                                              "eval.cpus_per_actor=0.5", "eval.output=s3://eval-docs/report",
                                              "eval.coprocessor=s3://eval-docs/coprocessor"])
    remote = run_eval_job(remote_cfg)
    assert {p.name for p in Path(tempfile.gettempdir()).glob("cache-aug-*")} == copies

    assert remote["documents"] == local["documents"] == 4 and remote["points"] == local["points"] > 0
    assert remote["skipped_documents"] == local["skipped_documents"] == {"null text": 1, "empty text": 1}
    assert remote["positions_sha256"] == local["positions_sha256"]
    assert len(set(remote["positions_sha256"].values())) == 1
    for c in ("none", "pause", "coprocessor"):
        assert remote["ppl"][c] == pytest.approx(local["ppl"][c], rel=1e-5)
        assert remote["per_position"][c]["loss"] == pytest.approx(local["per_position"][c]["loss"], rel=1e-5)
    stored = json.loads(client.get_object(Bucket="eval-docs", Key="report/eval.json")["Body"].read())
    assert stored["ppl"] == remote["ppl"] and stored["workers"] == 2
    assert remote["modules"]["coprocessor"]["fingerprint"] == local["modules"]["coprocessor"]["fingerprint"]

    # an actor that finds other models than the driver described refuses to evaluate
    modules = {"pause": str(tmp_path / "pause"), "coprocessor": "s3://eval-docs/coprocessor"}
    good = {name: remote["modules"][name]["fingerprint"] for name in modules}
    assert DocumentEvaluator(to_dict(remote_cfg), modules, good).modules.keys() == {"none", "pause", "coprocessor"}
    with pytest.raises(RuntimeError, match="eval.coprocessor / model.path changed during the run"):
        DocumentEvaluator(to_dict(remote_cfg), modules, good | {"coprocessor": "deadbeef"})


def test_first_documents_are_chosen_past_unusable_rows_and_duplicates_refused(s3_server, tmp_path):
    """eval.max_documents picks the first usable documents in id order; rows without text are counted, not a crash."""
    pq.write_table(pa.table({"doc_id": ["c", "a", "b", "d"], "text": [TEXTS[0], None, TEXTS[1], ""]}),
                   tmp_path / "docs.parquet")
    cfg = load_job_config(None, overrides=[f"eval.paths=[{tmp_path / 'docs.parquet'}]", "eval.max_documents=1"])
    documents, skipped = _read_documents(cfg)
    assert [r["doc_id"] for r in documents.take_all()] == ["b"]
    assert skipped == {"null text": 1, "empty text": 1}
    pq.write_table(pa.table({"doc_id": ["c", "a", "c"], "text": TEXTS[:3]}), tmp_path / "dups.parquet")
    with pytest.raises(ValueError, match="1 ids name more than one row: 'c' \\(2 rows\\)"):
        _read_documents(load_job_config(None, overrides=[f"eval.paths=[{tmp_path / 'dups.parquet'}]"]))
