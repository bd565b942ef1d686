"""Reaching storage: local paths, or `s3://` on AWS or any S3-compatible endpoint.

The same code reaches AWS and a loopback S3 server: the endpoint and region come from the config
or the standard AWS variables, and the keys from environment variables only (`S3Config.storage_options`
resolves them, for the library's fsspec reads and for the pyarrow filesystem Ray Data uses here).
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from cache_aug.config import S3Config
from cache_aug.corpus import resolve_embedded_path


def is_remote(path: str) -> bool:
    return path.startswith("s3://")


def s3_filesystem(cfg: S3Config) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for the configured endpoint (Ray Data, Ray Train storage): the endpoint, region and keys
    the library's fsspec options resolve (`S3Config.storage_options`)."""
    opts = cfg.storage_options()
    kwargs: dict = {"region": opts["client_kwargs"]["region_name"]}
    if endpoint := opts["client_kwargs"].get("endpoint_url"):
        scheme, _, host = endpoint.rpartition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=scheme or "https")
    if "key" in opts:
        kwargs.update(access_key=opts["key"], secret_key=opts["secret"])
    return pafs.S3FileSystem(**kwargs)


def _target(path: str) -> str:
    return path.removeprefix("s3://") if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def resolve(path: str, cfg: S3Config) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path for it): `s3://b/k` -> (S3FileSystem, "b/k"); a local path -> (None, abs path)."""
    return (s3_filesystem(cfg) if is_remote(path) else None), _target(path)


def resolve_inputs(paths: list[str], cfg: S3Config, setting: str) -> tuple[pafs.FileSystem | None, list[str],
                                                                           list[str]]:
    """Input files as one filesystem reads them: (filesystem, each path for it, the paths with embedded names such as
    "embedded:kjv/heldout" made their local files). Refuses a mix of local and s3:// paths, naming `setting`."""
    named = [resolve_embedded_path(p) for p in paths]
    if len({is_remote(p) for p in named}) > 1:
        raise ValueError(f"{setting}: the paths mix local and s3:// locations: {named}")
    return resolve(named[0], cfg)[0], [_target(p) for p in named], named


def upload_dir(local_dir: str, dest: str, cfg: S3Config) -> str:
    """Copy a local directory to `dest` (local or s3://); returns dest."""
    fs, target = resolve(dest, cfg)
    if fs is None:
        os.makedirs(target, exist_ok=True)
    pafs.copy_files(local_dir, target, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs or pafs.LocalFileSystem())
    return dest


def portable(path: str) -> str:
    """`path` as another process can name it: s3:// unchanged, a local path made absolute.

    Ray actors may run in another working directory, or on another node, than the driver that read the
    config; a local path must then be on storage both see (a shared volume), an s3:// one works anywhere.
    """
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def download_dir(src: str, local_dir: str, cfg: S3Config) -> str:
    """Copy `src` (local or s3://) into a local directory; returns local_dir."""
    fs, source = resolve(src, cfg)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(source, local_dir, source_filesystem=fs or pafs.LocalFileSystem(),
                    destination_filesystem=pafs.LocalFileSystem())
    return local_dir
