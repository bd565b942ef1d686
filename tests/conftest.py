"""Shared fixtures: tiny random transformers models of several architectures, built from configs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_default_dir(tmp_path_factory):
    """The embedded default decoder's small "test" preset, pretrained on the KJV once per session."""
    from cache_aug.tiny import ensure_tiny_decoder

    return ensure_tiny_decoder("test", root=tmp_path_factory.mktemp("cache-aug-home"))
