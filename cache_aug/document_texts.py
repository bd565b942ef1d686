"""Document texts by id from a Parquet corpus, so a serving replica can augment a document it has no cache for.

    texts = DocumentTexts(["s3://bucket/docs/"], filesystem=fs)   # files or directories, read lazily
    texts.get("Ge 20")                                            # the text, or None

Not to be confused with `cache_aug.documents`, which validates the corpus job's input rows.
"""

from __future__ import annotations

import time


class DocumentTexts:
    """Document texts by id from a Parquet corpus (the corpus job's input), for online augmentation."""

    def __init__(self, paths: list[str], *, filesystem=None, id_column: str = "doc_id", text_column: str = "text",
                 refresh_s: float = 60.0):
        self.paths, self.fs, self.id_column, self.text_column = paths, filesystem, id_column, text_column
        self.refresh_s = refresh_s
        self._dataset, self._made = None, float("-inf")

    def get(self, doc_id: str) -> str | None:
        """The text of `doc_id`, or None if it is absent, duplicated or not valid UTF-8."""
        import pyarrow as pa
        import pyarrow.dataset as pads

        if time.monotonic() - self._made > self.refresh_s:  # new files appear as the corpus grows
            parts = [pads.dataset(p, filesystem=self.fs, format="parquet") for p in self.paths]  # files or directories
            self._dataset = parts[0] if len(parts) == 1 else pads.dataset(parts)
            self._made = time.monotonic()
        # compared as strings: the corpus job accepts integer ids too, and stores them as str(id)
        match = pads.field(self.id_column).cast(pa.string()) == doc_id
        table = self._dataset.to_table(columns=[self.text_column], filter=match)
        if table.num_rows != 1:
            return None
        text = table.column(0)[0].as_py()
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                return None
        return text if text and text.strip() else None
