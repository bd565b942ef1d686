"""Where a process runs its models: a job's one device setting, resolved in one place.

Each job has one device setting: ``serve.device``, ``eval.device`` (the local run and the Ray actors alike),
``corpus.gpus_per_actor`` (its actors take a GPU when given one) and ``train.use_gpu``. "auto" means a GPU
when the process was given one, so a Ray actor, replica or worker follows the GPUs it was granted, and a
plain local process, given none, runs on the CPU unless its setting names a GPU.
"""

from __future__ import annotations

import torch


def choose_device(setting: str = "auto", *, gpus: float = 0, cpus: float | None = None) -> torch.device:
    """The torch device a process runs its models on; torch's CPU threads set to the CPUs it was given.

    ``setting``: "auto" takes a GPU when this process was given one (``gpus`` > 0: what Ray granted the actor,
    replica or worker; 0 for a local process) and CUDA is visible, else the CPU; anything else is a torch
    device name ("cpu", "cuda", "cuda:1") taken as it is. ``cpus``: the CPUs the process was given; torch's
    intra-op threads are set to that many (at least 1) on either device. None leaves torch's default.
    """
    if cpus is not None:
        torch.set_num_threads(max(1, int(cpus)))
    if setting == "auto":
        return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
    return torch.device(setting)
