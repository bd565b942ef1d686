"""Joining (or starting) the Ray cluster a job runs on, with logs a person can read; the check each actor makes that
it holds the models its driver checked."""

from __future__ import annotations

import sys

import ray


def line_progress() -> None:
    """Where stdout is no terminal (a log file, `ray job logs`, `kubectl logs`), Ray Data logs its progress a line
    at a time instead of redrawing bars, here and in every actor and train worker that runs this driver's datasets.

    Ray Data already does so for the driver's own datasets; what it cannot know is that a train worker's or
    actor's bars (distributed tqdm, forwarded to the driver) end up in a file too.
    """
    if not sys.stdout.isatty():
        ray.data.DataContext.get_current().use_ray_tqdm = False


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """`ray.init` (joins RAY_ADDRESS's cluster when set, else starts a local one), then `line_progress`."""
    ray.init(num_cpus=num_cpus, ignore_reinit_error=True, **kwargs)
    line_progress()


def check_driver_models(decoder, module, want: str, setting: str, source: str) -> str:
    """The fingerprint of the models an actor loaded, if the driver checked the same (`want`): a re-export during a run
    could reach some actors only. RuntimeError naming `setting` and `source` otherwise."""
    from cache_aug.coprocessor import latent_fingerprint

    got = latent_fingerprint(decoder, module)
    if got != want:
        raise RuntimeError(f"{setting} / model.path changed during the run: the driver loaded fingerprint {want}, "
                           f"this actor {got} from {source}; run the job again")
    return got
