"""Text corpora for pretraining the embedded tiny decoder.

The default corpus is the King James Bible as shipped by Debian's
``bible-kjv-text`` package (public domain), read through the ``bible``
program of the ``bible-kjv`` package. Each chapter becomes one
:class:`Document`; :func:`split_heldout` then holds out whole chapters so
evaluation text is never seen in training.

Users can bring their own plain text with :func:`load_text_documents`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cache_aug.paths import cache_home

__all__ = [
    "KJV_CHAPTERS",
    "KJV_VERSES",
    "Document",
    "load_kjv",
    "load_text_documents",
    "split_heldout",
]

KJV_CHAPTERS = 1189
"""Number of chapters in the 66-book KJV canon."""
KJV_VERSES = 31102
"""Number of verses in the 66-book KJV canon."""

_KJV_RANGE = "Genesis 1:1-Revelation 22:21"
_INSTALL_HINT = (
    "the KJV corpus needs the Debian packages 'bible-kjv bible-kjv-text' "
    "(install with: sudo apt-get install bible-kjv bible-kjv-text)"
)
# "Ge1:1 In the beginning ..." / "1Sm3:4 That the LORD called Samuel ..."
_VERSE_RE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*\S.*)$")


@dataclass(frozen=True)
class Document:
    """One unit of training/evaluation text (a KJV chapter, a file, a paragraph block)."""

    doc_id: str
    """Stable identifier, e.g. ``"Ge 1"`` or ``"notes/a.txt"``."""
    text: str
    """The document's text."""


def _run_bible(bible_exe: str) -> str:
    exe = shutil.which(bible_exe)
    if exe is None:
        raise RuntimeError(f"'{bible_exe}' program not found: {_INSTALL_HINT}")
    try:
        proc = subprocess.run(
            [exe, "-f", "-l100000", _KJV_RANGE],
            capture_output=True,
            text=True,
            encoding="utf-8",
            check=False,
            timeout=300,
        )
    except OSError as e:  # pragma: no cover - exotic exec failures
        raise RuntimeError(f"could not run '{exe}': {e}; {_INSTALL_HINT}") from e
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(
            f"'{exe} -f -l100000 \"{_KJV_RANGE}\"' failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[:500]!r}; {_INSTALL_HINT}"
        )
    return proc.stdout


def parse_kjv(output: str) -> list[Document]:
    """Parse ``bible -f`` output (one verse per line) into one Document per chapter.

    Every non-empty line must look like ``Ge1:1 text``; verses must be
    consecutive within a chapter. Raises ``ValueError`` naming the offending
    (1-based) line number otherwise.
    """
    docs: list[Document] = []
    cur_key: tuple[str, int] | None = None
    cur_lines: list[str] = []
    last_verse = 0
    seen: set[tuple[str, int]] = set()

    def flush() -> None:
        if cur_key is not None:
            docs.append(Document(doc_id=f"{cur_key[0]} {cur_key[1]}", text="\n".join(cur_lines)))

    for lineno, raw in enumerate(output.splitlines(), start=1):
        line = raw.rstrip()
        if not line:
            continue
        m = _VERSE_RE.match(line)
        if m is None:
            raise ValueError(f"KJV parse error at line {lineno}: unexpected format {line[:80]!r}")
        key = (m["book"], int(m["chapter"]))
        verse = int(m["verse"])
        if key != cur_key:
            if key in seen:
                raise ValueError(f"KJV parse error at line {lineno}: chapter {key[0]} {key[1]} repeats")
            if verse != 1:
                raise ValueError(f"KJV parse error at line {lineno}: chapter starts at verse {verse}")
            flush()
            seen.add(key)
            cur_key, cur_lines, last_verse = key, [], 0
        if verse != last_verse + 1:
            raise ValueError(
                f"KJV parse error at line {lineno}: verse {verse} follows verse {last_verse}"
            )
        last_verse = verse
        cur_lines.append(m["text"].strip())
    flush()
    return docs


def load_kjv(bible_exe: str = "bible") -> list[Document]:
    """Load the King James Bible as 1,189 chapter documents (31,102 verses).

    ``doc_id`` is the book abbreviation as printed by ``bible`` plus the
    chapter (``"Ge 1"``, ``"1Sm 3"``, ``"Rev 22"``); ``text`` is the chapter's
    verses joined by ``"\\n"`` without verse references.

    Raises ``RuntimeError`` if the ``bible`` program (Debian packages
    ``bible-kjv bible-kjv-text``) is missing or fails, ``ValueError`` if its
    output does not parse.
    """
    docs = parse_kjv(_run_bible(bible_exe))
    n_verses = sum(d.text.count("\n") + 1 for d in docs)
    if len(docs) != KJV_CHAPTERS or n_verses != KJV_VERSES:
        raise ValueError(
            f"KJV parse produced {len(docs)} chapters / {n_verses} verses, "
            f"expected {KJV_CHAPTERS} / {KJV_VERSES}"
        )
    return docs


def load_text_documents(path: str | Path) -> list[Document]:
    """Load a user's plain-text (UTF-8) corpus.

    * a file: documents are separated by one or more blank lines;
    * a directory: every ``*.txt`` file below it (sorted, recursive) is one
      document, ``doc_id`` being its path relative to the directory.

    Empty documents are dropped; ``ValueError`` if nothing is left.
    """
    p = Path(path)
    docs: list[Document] = []
    if p.is_dir():
        for f in sorted(p.rglob("*.txt")):
            if not f.is_file():
                continue
            text = f.read_text(encoding="utf-8").strip()
            if text:
                docs.append(Document(doc_id=f.relative_to(p).as_posix(), text=text))
    elif p.is_file():
        text = p.read_text(encoding="utf-8")
        for block in re.split(r"\n[ \t\r\f\v]*\n", text):
            block = block.strip()
            if block:
                docs.append(Document(doc_id=f"{p.name}#{len(docs)}", text=block))
    else:
        raise FileNotFoundError(f"no such file or directory: {p}")
    if not docs:
        raise ValueError(f"no non-empty documents found in {p}")
    return docs


def split_heldout(
    docs: list[Document], heldout_every: int = 20
) -> tuple[list[Document], list[Document]]:
    """Split by whole documents: every ``heldout_every``-th document is held out.

    Deterministic (depends only on document order). Returns ``(train, heldout)``.
    If that rule holds out nothing but there are at least two documents, the
    last document is held out so evaluation is always possible.
    """
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
    train: list[Document] = []
    heldout: list[Document] = []
    for i, d in enumerate(docs):
        (heldout if i % heldout_every == heldout_every - 1 else train).append(d)
    if not heldout and len(train) >= 2:
        heldout.append(train.pop())
    return train, heldout


EMBEDDED_CORPORA = ("kjv",)
EMBEDDED_PREFIX = "embedded:"


def ensure_embedded_corpus(name: str = "kjv", *, root: str | Path | None = None, heldout_every: int = 20) -> Path:
    """Write an embedded corpus once as Parquet (`train.parquet`, `heldout.parquet`; columns doc_id, text).

    The split is the one the embedded decoder was pretrained with, so held-out chapters stay unseen.
    """
    if name not in EMBEDDED_CORPORA:
        raise ValueError(f"unknown embedded corpus {name!r} (known: {', '.join(EMBEDDED_CORPORA)})")
    out = (Path(root) if root else cache_home()) / "corpora" / f"{name}-every{heldout_every}"
    if (out / "heldout.parquet").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = split_heldout(load_kjv(), heldout_every)
    for split, docs in (("train", train), ("heldout", heldout)):
        write_documents(docs, out / f"{split}.parquet")
    return out


def write_documents(docs: Iterable[Document], path: str | Path) -> Path:
    """Documents as a Parquet file of (doc_id, text), written atomically: readers never see half a file."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = list(docs)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    pq.write_table(pa.table({"doc_id": [d.doc_id for d in docs], "text": [d.text for d in docs]}), tmp)
    tmp.rename(path)
    return path


def resolve_embedded_path(path: str) -> str:
    """"embedded:kjv/train" -> the local Parquet file; any other path is returned unchanged."""
    if not path.startswith(EMBEDDED_PREFIX):
        return path
    name, _, split = path.removeprefix(EMBEDDED_PREFIX).partition("/")
    if split not in ("train", "heldout"):
        raise ValueError(f"{path}: expected {EMBEDDED_PREFIX}<corpus>/train or /heldout")
    return str(ensure_embedded_corpus(name) / f"{split}.parquet")
