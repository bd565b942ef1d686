"""Paths handed from the driver to Ray actors: s3:// as is, local paths made absolute."""

from __future__ import annotations

from pipelines.storage import portable


def test_local_paths_are_made_absolute_and_s3_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert portable("module") == str(tmp_path / "module")
    assert portable("~/m").endswith("/m") and not portable("~/m").startswith("~")
    assert portable("s3://bucket/key") == "s3://bucket/key"
