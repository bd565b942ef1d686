"""Reaching storage: local paths, or `s3://` on AWS or any S3-compatible endpoint.

The same code reaches AWS and a loopback S3 server: the endpoint and region come from the config
or the standard AWS variables, and the keys from environment variables only.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from cache_aug.config import S3Config


def _endpoint(cfg: S3Config) -> str | None:
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region(cfg: S3Config) -> str:
    return cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def is_remote(path: str) -> bool:
    return path.startswith("s3://")


def s3_filesystem(cfg: S3Config) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for the configured endpoint (Ray Data, Ray Train storage)."""
    kwargs: dict = {"region": _region(cfg)}
    endpoint = _endpoint(cfg)
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=scheme or "https")
    key, secret = os.environ.get(cfg.access_key_env), os.environ.get(cfg.secret_key_env)
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
    return pafs.S3FileSystem(**kwargs)


def fsspec_options(cfg: S3Config) -> dict:
    """storage_options for s3fs / fsspec (checkpoint downloads, small files)."""
    opts: dict = {"client_kwargs": {"region_name": _region(cfg)}}
    endpoint = _endpoint(cfg)
    if endpoint:
        opts["client_kwargs"]["endpoint_url"] = endpoint
    key, secret = os.environ.get(cfg.access_key_env), os.environ.get(cfg.secret_key_env)
    if key and secret:
        opts.update(key=key, secret=secret)
    return opts


def resolve(path: str, cfg: S3Config) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path for it): `s3://b/k` -> (S3FileSystem, "b/k"); a local path -> (None, abs path)."""
    if is_remote(path):
        return s3_filesystem(cfg), path.removeprefix("s3://")
    return None, os.path.abspath(os.path.expanduser(path))


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
