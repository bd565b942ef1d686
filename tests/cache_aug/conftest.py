"""Fixtures shared by the library's tests."""

import pytest
import torch

from cache_aug.config import CoprocessorConfig
from cache_aug.coprocessor import build_latent_module, latent_fingerprint
from cache_aug.testing import tiny_decoder


@pytest.fixture(scope="module", params=[("last_latent", "shift"), ("last_token", "shift"), ("last_token", "keep")],
                ids=lambda p: "-".join(p))
def setup(request):
    """A tiny Llama, a fresh coprocessor (N_L=3) under each re-read and position rule, and their fingerprint."""
    torch.manual_seed(0)
    dec = tiny_decoder("llama")
    first, rule = request.param
    module = build_latent_module(dec, CoprocessorConfig(first_ahead_from=first, position_rule=rule), 3).eval()
    return dec, module, latent_fingerprint(dec, module)
