"""`cache-aug compact`: the corpus job's runs folded into a snapshot from the command line, locally and as Ray tasks."""

from __future__ import annotations

import json

import pyarrow.fs as pafs

from cache_aug.store import AugmentedCacheReader, read_pointer
from jobs import cli
from tests.cache_aug.test_store import FP, NB, payload, run_id, write_run


def test_compact_command_folds_the_runs_then_collects_garbage(tmp_path, capsys):
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "caches")
    write_run(fs, root, run_id(1), ["a", "b"])
    write_run(fs, root, run_id(2), ["b"])
    overrides = [f"corpus.output={root}", f"corpus.index_buckets={NB}"]
    summary = cli.COMMANDS["compact"](set=overrides, fingerprint=FP)
    assert summary["status"] == "compacted" and summary["folded"] == [run_id(1), run_id(2)]
    assert list(read_pointer(fs, root)["runs"]) == [run_id(1), run_id(2)]
    assert AugmentedCacheReader(fs, root, NB).get("b").payload == payload(run_id(2), "b")
    capsys.readouterr()
    cli.main(["compact", "--gc-only", "--set", overrides[0], "--set", overrides[1], "--set", "compaction.grace_s=0"])
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["deleted_runs"]) == [run_id(1), run_id(2)]
    assert AugmentedCacheReader(fs, root, NB).get("a").payload == payload(run_id(1), "a")
