"""Reaching storage: a module directory copied out of S3 for loading leaves nothing behind; local paths are used in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cache_aug.config import S3Config
from pipelines.storage import local_copy, portable, upload_dir


def test_local_copy_of_s3_is_complete_and_removed_on_exit(s3_server, tmp_path):
    s3_server["client"].create_bucket(Bucket="storage-test")
    src = tmp_path / "module"
    (src / "sub").mkdir(parents=True)
    files = {"latents.json": b'{"a": 1}', "model.safetensors": os.urandom(3000), "sub/x.bin": b"x"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    upload_dir(str(src), "s3://storage-test/m", S3Config())
    with local_copy("s3://storage-test/m", S3Config(), prefix="cache-aug-test-") as local:
        assert Path(local).name.startswith("cache-aug-test-")
        assert {str(p.relative_to(local)): p.read_bytes() for p in Path(local).rglob("*") if p.is_file()} == files
    assert not Path(local).exists()
    with pytest.raises(ValueError), local_copy("s3://storage-test/m", S3Config()) as local:
        raise ValueError("a failed load")
    assert not Path(local).exists()  # removed on errors too


def test_local_paths_are_used_in_place_and_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "module").mkdir()
    monkeypatch.chdir(tmp_path)
    with local_copy("module", S3Config()) as local:
        assert local == str(tmp_path / "module")
    assert (tmp_path / "module").is_dir()  # never deleted: it is the user's
    assert portable("module") == str(tmp_path / "module")
    assert portable("s3://bucket/key") == "s3://bucket/key"
