"""Paths handed from the driver to Ray actors: s3:// as is, local paths made absolute; the pyarrow S3 filesystem."""

from __future__ import annotations

from cache_aug.config import S3Config
from pipelines.storage import portable, s3_filesystem


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
