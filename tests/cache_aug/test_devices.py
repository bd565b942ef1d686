"""A job's device setting, resolved in one place (`cache_aug.devices.choose_device`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cache_aug.devices import choose_device

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def threads(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    return calls


@pytest.mark.parametrize("visible", [True, False])
def test_auto_takes_a_gpu_only_when_given_one_and_visible(monkeypatch, threads, visible):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
    want = "cuda" if visible else "cpu"
    assert [choose_device("auto", gpus=g).type for g in (0, 0.5, 1, 2)] == ["cpu", want, want, want]
    assert choose_device().type == "cpu"  # a local process is given no GPU
    assert threads == []  # no CPUs named: torch's default stays


def test_a_device_name_is_taken_as_it_is(monkeypatch, threads):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("cpu", gpus=1) == torch.device("cpu")  # a GPU given, the CPU asked for
    assert choose_device("cuda") == torch.device("cuda")
    assert choose_device("cuda:1") == torch.device("cuda", 1)


def test_threads_follow_the_cpus_given_on_either_device(monkeypatch, threads):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    choose_device("auto", cpus=2.5)
    choose_device("auto", gpus=1, cpus=4)
    choose_device("cpu", cpus=0.5)  # a fraction of a CPU still gets a thread
    assert threads == [2, 4, 1]


def test_devices_are_chosen_nowhere_else():
    """The library, the Ray glue and the entrypoints leave CUDA detection to choose_device, and the glue leaves it
    the threads as well (the CLI's --threads flags and a tiny build's scoped threads are no device choice)."""
    offenders = []
    for package in ("cache_aug", "pipelines", "jobs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text, rel = path.read_text(), path.relative_to(ROOT).as_posix()
            if rel == "cache_aug/devices.py":
                continue
            if "cuda.is_available" in text or (package == "pipelines" and "set_num_threads" in text):
                offenders.append(rel)
    assert offenders == []
