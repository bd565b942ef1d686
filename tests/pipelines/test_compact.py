"""Compaction with each bucket a Ray task: the same snapshot as the local loop."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from cache_aug.store import AugmentedCacheReader, read_pointer
from pipelines.compact import run_compaction
from pipelines.config import load_job_config
from tests.cache_aug.test_store import FP, NB, payload, run_id, write_run

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_ray_tasks_write_the_same_snapshot_as_the_local_loop(tmp_path):
    fs = pafs.LocalFileSystem()
    pointers = {}
    for name in ("ray", "local"):
        root = str(tmp_path / name)
        write_run(fs, root, run_id(1), [f"d{i}" for i in range(20)])
        write_run(fs, root, run_id(2), [f"d{i}" for i in range(5)])
        cfg = load_job_config(None, overrides=[f"corpus.output={root}", f"corpus.index_buckets={NB}",
                                               "corpus.rows_per_group=2"])
        if name == "ray":
            out = run_compaction(cfg, fingerprint=FP)
        else:
            import ray

            assert ray.is_initialized()
            from cache_aug.compaction import compact

            out = compact(fs, root, fingerprint=FP, n_buckets=NB, options=cfg.compaction, rows_per_group=2,
                          max_rows_per_file=cfg.corpus.max_rows_per_file)
        assert out["status"] == "compacted" and out["counts"]["records"] == 20
        reader = AugmentedCacheReader(fs, root, NB)
        assert reader.get("d3").payload == payload(run_id(2), "d3")
        assert reader.get("d13").payload == payload(run_id(1), "d13")
        p = read_pointer(fs, root)
        pointers[name] = (p["bucket_files"], p["counts"], list(p["runs"]))
    assert pointers["ray"] == pointers["local"]
