"""Paths handed from the driver to Ray actors: s3:// as is, local paths made absolute; the pyarrow S3 filesystem."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from cache_aug.config import S3Config
from pipelines.storage import portable, resolve_inputs, s3_filesystem


def test_local_paths_are_made_absolute_and_s3_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert portable("module") == str(tmp_path / "module")
    assert portable("~/m").endswith("/m") and not portable("~/m").startswith("~")
    assert portable("s3://bucket/key") == "s3://bucket/key"


def test_the_pyarrow_filesystem_reaches_what_the_s3_section_resolves(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("K", "key")
    monkeypatch.setenv("S", "secret")
    cfg = S3Config(access_key_env="K", secret_key_env="S")
    opts = cfg.storage_options()
    args = s3_filesystem(cfg).__reduce__()[1][0]  # the filesystem's constructor arguments
    want = ("http://127.0.0.1:9", "eu-west-1")
    assert (args["scheme"] + "://" + args["endpoint_override"], args["region"]) == want
    assert (opts["client_kwargs"]["endpoint_url"], opts["client_kwargs"]["region_name"]) == want
    assert (args["access_key"], args["secret_key"]) == (opts["key"], opts["secret"]) == ("key", "secret")
    args = s3_filesystem(S3Config(endpoint_url="s3.example.com", region="ap-south-1")).__reduce__()[1][0]
    assert (args["scheme"], args["endpoint_override"], args["region"]) == ("https", "s3.example.com", "ap-south-1")


def test_inputs_are_named_for_one_filesystem_and_never_mixed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, targets, named = resolve_inputs(["a.parquet", "embedded:kjv/heldout"], S3Config(), "eval.paths")
    assert fs is None and named[0] == "a.parquet" and targets[0] == str(tmp_path / "a.parquet")
    assert named[1] == targets[1] and named[1].endswith("heldout.parquet")  # the embedded corpus's local file
    fs, targets, named = resolve_inputs(["s3://b/x.parquet", "s3://b/dir"], S3Config(), "corpus.input_paths")
    assert isinstance(fs, pafs.S3FileSystem) and targets == ["b/x.parquet", "b/dir"] and named[0] == "s3://b/x.parquet"
    with pytest.raises(ValueError, match=r"^serve\.documents: the paths mix local and s3:// locations"):
        resolve_inputs(["s3://b/x", "local.parquet"], S3Config(), "serve.documents")
