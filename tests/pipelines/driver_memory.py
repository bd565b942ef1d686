"""A corpus job driver that measures its own Python allocations, in a fresh process (tests/pipelines/test_corpus.py).

    python -m tests.pipelines.driver_memory '{"address": "<gcs address>", "runs": [[override, ...], ...]}'

Connects to the running cluster at `address`, runs `run_corpus_job` once per list of config overrides, in order,
and prints one line `RESULT [{"counts": ..., "peak_bytes": ...}, ...]`: per run, the manifest's counts and the peak
of the driver's traced Python allocations during the run, above what was allocated when it started.
"""

from __future__ import annotations

import json
import os
import sys
import tracemalloc


def main() -> None:
    spec = json.loads(sys.argv[1])
    import ray

    from pipelines.config import load_job_config
    from pipelines.corpus import run_corpus_job

    ray.init(address=spec["address"], log_to_driver=False)
    tracemalloc.start()
    results = []
    for overrides in spec["runs"]:
        cfg = load_job_config(None, overrides=overrides)
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        manifest = run_corpus_job(cfg)
        results.append({"counts": manifest["counts"], "peak_bytes": tracemalloc.get_traced_memory()[1] - base})
    print("RESULT " + json.dumps(results), flush=True)
    sys.stderr.flush()
    # never tracemalloc.stop() nor a normal exit (which stops it): stopping it while Ray's own threads allocate can
    # crash the process
    os._exit(0)


if __name__ == "__main__":
    main()
