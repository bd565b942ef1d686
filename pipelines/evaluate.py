"""Ray Data job: evaluate none / pause / coprocessor on held-out documents spread over an actor pool.

    read_parquet(eval.paths) -> DocumentEvaluator (actor pool: decoder + modules; one row per window)
                             -> collected on the driver -> cache_aug.stats.summarise -> report files

Points are sampled per (doc_id, window) inside `cache_aug.evaluate`, so the report does not depend
on how documents land on actors: it equals the in-process `cache-aug eval` (tests/pipelines).
The report goes to eval.output, local or s3://.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import ray

from cache_aug.config import from_dict, to_dict
from cache_aug.tiny import build_if_embedded
from pipelines.config import JobConfig
from pipelines.ray_session import check_driver_models, init_ray
from pipelines.storage import portable, resolve_inputs, upload_dir

SKIPPED = -1  # the window index of a row that reports a document left out, not a window


class DocumentEvaluator:
    """Actor: holds the decoder and the condition modules; documents in, per-window losses out."""

    def __init__(self, config: dict, modules: dict[str, str], fingerprints: dict[str, str]):
        from cache_aug.coprocessor import load_latent_module
        from cache_aug.decoder import load_decoder
        from cache_aug.devices import choose_device

        self.cfg = from_dict(JobConfig, config)
        ev = self.cfg.eval
        device = choose_device(ev.device, gpus=ev.gpus_per_actor, cpus=ev.cpus_per_actor)
        self.decoder = load_decoder(self.cfg.model, device=device, s3=self.cfg.s3)
        self.modules = {"none": None} | {name: load_latent_module(uri, self.decoder, self.cfg.s3).eval()
                                         for name, uri in modules.items()}
        for name, m in self.modules.items():  # the report describes the models the driver loaded: these must be them
            if m is not None:
                check_driver_models(self.decoder, m, fingerprints[name], f"eval.{name}", modules[name])

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cache_aug.evaluate import document_rows, evaluate_documents

        ev = self.cfg.eval
        skipped: Counter = Counter()
        docs = document_rows(batch.to_pydict(), ev, skipped)
        rows = evaluate_documents(self.decoder, self.modules, docs, ev, self.cfg.augmentation.min_prefix)
        # a document left out (no usable text) comes back as a row of window SKIPPED naming the reason
        rows += [{"doc_id": reason, "window": SKIPPED, "points": [], **{f"ce_{name}": [] for name in self.modules}}
                 for reason, n in skipped.items() for _ in range(n)]
        columns = ["doc_id", "window", "points"] + [f"ce_{name}" for name in self.modules]
        return pa.table({c: [r[c] for r in rows] for c in columns}) if rows else pa.table({c: [] for c in columns})


def _read_documents(cfg: JobConfig) -> tuple[ray.data.Dataset, Counter]:
    """The documents to evaluate, and the documents the driver already left out (by reason)."""
    import pyarrow.dataset as pads

    from cache_aug.evaluate import check_unique_ids, document_rows

    ev = cfg.eval
    fs, targets, paths = resolve_inputs(ev.paths, cfg.s3, "eval.paths")
    ds = ray.data.read_parquet(targets, filesystem=fs)
    schema = ds.schema()
    names = schema.names if schema is not None else []
    if ev.text_column not in names:
        raise ValueError(f"eval.text_column: column {ev.text_column!r} not found in {paths} (columns: {names})")
    columns = [c for c in (ev.id_column, ev.text_column) if c in names]
    ds = ds.select_columns(columns)

    def tables(cols: list[str]) -> list[pa.Table]:  # these columns of every input file, read on the driver
        return [pads.dataset(t, filesystem=fs, format="parquet").to_table(columns=cols) for t in targets]

    if ev.id_column in names:  # the id column only: a duplicate would count twice, whichever actor sees it
        check_unique_ids([i for t in tables([ev.id_column]) for i in t.column(0).to_pylist()], ev.id_column)
    skipped: Counter = Counter()
    if ev.max_documents:  # the first documents in id order, as the in-process evaluation takes them
        found = [d for t in tables(columns) for d in document_rows(t.to_pydict(), ev, skipped)]
        keep = {doc_id for doc_id, _ in sorted(found)[: ev.max_documents]}
        ds = ds.filter(lambda row: any(d in keep for d, _ in document_rows({k: [v] for k, v in row.items()}, ev)))
    # a single input file is one block: split it so every actor gets work
    return ds.repartition(4 * ev.num_actors), skipped


def run_eval_job(cfg: JobConfig) -> dict:
    """Evaluate with Ray Data and write the report to eval.output; returns the report."""
    from cache_aug.coprocessor import load_latent_module
    from cache_aug.decoder import load_decoder
    from cache_aug.evaluate import module_meta
    from cache_aug.report import write_report
    from cache_aug.stats import summarise

    ev = cfg.eval
    t0 = time.perf_counter()
    # each actor loads the modules from where they are: the driver's disk may not be theirs
    module_uris = {name: portable(getattr(ev, name)) for name in ("pause", "coprocessor") if getattr(ev, name)}
    decoder = load_decoder(cfg.model, s3=cfg.s3)  # the driver describes what is evaluated
    modules = {"none": None} | {name: load_latent_module(uri, decoder, cfg.s3)
                                for name, uri in module_uris.items()}
    meta = module_meta(decoder, modules, {"pause": ev.pause, "coprocessor": ev.coprocessor})
    del decoder, modules

    documents, skipped = _read_documents(cfg)
    windows = documents.map_batches(
        DocumentEvaluator, batch_format="pyarrow", batch_size=ev.docs_per_batch,
        fn_constructor_kwargs={"config": to_dict(cfg), "modules": module_uris,
                               "fingerprints": {name: d["fingerprint"] for name, d in meta["modules"].items()}},
        compute=ray.data.ActorPoolStrategy(size=ev.num_actors),
        num_cpus=ev.cpus_per_actor, num_gpus=ev.gpus_per_actor or None,
    )
    rows = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in windows.take_all()]
    skipped.update(r["doc_id"] for r in rows if r["window"] == SKIPPED)
    rows = [r | {k: [list(map(float, x)) for x in r[k]] for k in r if k.startswith("ce_")}
            | {"points": list(map(int, r["points"]))}
            for r in rows if r["window"] != SKIPPED]
    report = summarise(rows, ["none", *module_uris], cfg.augmentation.n_ahead, ev,
                       meta | {"skipped_documents": dict(skipped), "workers": ev.num_actors})
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    with tempfile.TemporaryDirectory() as tmp:
        write_report(report, rows, tmp)
        upload_dir(tmp, ev.output, cfg.s3)
    return report


def eval_job(config: str | None, overrides: list[str], num_cpus: int | None = None) -> dict:
    """The evaluation job as `ray job submit` and `cache-aug eval --ray` run it; returns the report."""
    from cache_aug.config import dump_config
    from pipelines.config import load_job_config

    cfg = load_job_config(config, overrides=overrides)
    print(dump_config(cfg), flush=True)
    build_if_embedded(cfg.model.path)  # here, before any actor loads it: loading never builds
    init_ray(num_cpus)
    report = run_eval_job(cfg)
    print(json.dumps({k: report[k] for k in ("ppl", "relative_reduction", "points", "wall_s") if k in report},
                     indent=2), flush=True)
    return report
