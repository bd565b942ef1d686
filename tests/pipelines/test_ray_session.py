"""Jobs joining Ray log Ray Data's progress a line at a time where stdout is no terminal; actors refuse models other
than their driver's."""

from __future__ import annotations

import io
import sys

import pytest
import ray

from cache_aug.config import CoprocessorConfig
from cache_aug.coprocessor import build_latent_module, latent_fingerprint
from cache_aug.testing import tiny_decoder
from pipelines.ray_session import check_driver_models, line_progress


def test_no_terminal_means_line_progress_in_workers_too(monkeypatch):
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "use_ray_tqdm", True)  # Ray's default: workers' bars forwarded to the driver
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a log file, `ray job logs`, `kubectl logs`
    line_progress()
    assert ctx.use_ray_tqdm is False


def test_a_terminal_keeps_the_bars(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "use_ray_tqdm", True)
    monkeypatch.setattr(sys, "stdout", Terminal())
    line_progress()
    assert ctx.use_ray_tqdm is True


def test_an_actor_refuses_models_other_than_its_drivers():
    decoder = tiny_decoder("llama")
    module = build_latent_module(decoder, CoprocessorConfig(mode="pause"), 2)
    fp = latent_fingerprint(decoder, module)
    assert check_driver_models(decoder, module, fp, "eval.pause", "runs/pause") == fp
    with pytest.raises(RuntimeError) as e:
        check_driver_models(decoder, module, "deadbeef", "eval.pause", "s3://m/pause")
    assert str(e.value) == (f"eval.pause / model.path changed during the run: the driver loaded fingerprint deadbeef, "
                            f"this actor {fp} from s3://m/pause; run the job again")
