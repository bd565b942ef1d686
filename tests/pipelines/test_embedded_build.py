"""Every job's driver builds the embedded decoder its config names before Ray starts any worker: the workers only
load it (`decoder.load_decoder` never trains one)."""

from __future__ import annotations

import importlib

import pytest

import cache_aug.tiny


class RayStarted(Exception):
    """Raised by a stand-in for `init_ray`: the job got as far as starting Ray."""


def _run(job: str) -> None:
    if job == "train":
        importlib.import_module("pipelines.train").train_job(None, [])
    elif job == "augment":
        importlib.import_module("pipelines.corpus").augment_job(None, [])
    elif job == "eval":
        importlib.import_module("pipelines.evaluate").eval_job(None, [])
    elif job == "serve":
        importlib.import_module("pipelines.serve").serve_job(None, [])
    elif job == "sweep":
        importlib.import_module("jobs.sweep").main([])
    else:
        importlib.import_module("pipelines.demo").run_demo(steps=2, docs=1)


@pytest.mark.parametrize("job", ["train", "augment", "eval", "serve", "sweep", "demo"])
def test_a_job_builds_its_embedded_decoder_before_ray_starts(job, monkeypatch):
    calls: list[tuple] = []

    def build(path, **kwargs):
        calls.append(("build", path))

    def start(*args, **kwargs):
        calls.append(("ray",))
        raise RayStarted

    modules = ["pipelines.ray_session", "pipelines.train", "pipelines.corpus", "pipelines.evaluate", "pipelines.serve",
               "pipelines.demo", "jobs.sweep"]
    monkeypatch.setattr(cache_aug.tiny, "build_if_embedded", build)
    for name in modules:  # the names each module imported at its top, where it did
        module = importlib.import_module(name)
        for attr, stand_in in (("build_if_embedded", build), ("init_ray", start)):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, stand_in)
    with pytest.raises(RayStarted):
        _run(job)
    assert calls == [("build", "tiny-kjv"), ("ray",)]  # the default config's model.path, built first
