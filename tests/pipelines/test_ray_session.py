"""Jobs joining Ray log Ray Data's progress a line at a time where stdout is no terminal."""

from __future__ import annotations

import io
import sys

import ray

from pipelines.ray_session import line_progress


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
