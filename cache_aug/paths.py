"""Where the project keeps what it builds or fetches (embedded decoders and corpora, converted GGUF files, downloaded
checkpoints), how a cached directory is written once, and how a remote path is opened."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from cache_aug.model_config import S3Config


def cache_home() -> Path:
    """Where the project caches what it builds or fetches: ``$CACHE_AUG_HOME``, else ``~/.cache/cache-aug``."""
    env = os.environ.get("CACHE_AUG_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cache-aug"


def materialise(out: Path, fill, note: str) -> Path:
    """A cached directory, built once: `fill(tmp)` writes into a temporary directory beside `out`, which becomes
    `out` in one rename (a concurrent builder that finished first wins); `.complete` marks a finished one."""
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        fill(tmp)
        (tmp / ".complete").write_text(note)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def url_to_fs(uri: str, s3: S3Config | None = None):
    """fsspec's (filesystem, path) for `uri`; an ``s3://`` one reached as `s3` says (None: fsspec's own defaults)."""
    import fsspec

    return fsspec.core.url_to_fs(uri, **(s3.storage_options() if s3 is not None and uri.startswith("s3://") else {}))
