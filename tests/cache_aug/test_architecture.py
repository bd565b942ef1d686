"""The architecture check reasons from what a model does, not from its signature."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from cache_aug.architecture import CACHE_ARGUMENTS, cache_argument, check_architecture
from cache_aug.config import CoprocessorConfig
from cache_aug.coprocessor import build_latent_module
from cache_aug.decoder import Decoder, freeze
from cache_aug.losses import one_pass_loss, reference_loss
from cache_aug.masks import UnsupportedArchitecture
from cache_aug.testing import byte_tokenizer, tiny_config, tiny_decoder


def _planted(cls_name: str, forward, arch: str = "llama") -> Decoder:
    """A tiny Llama whose forward is replaced by `forward(self, **kwargs)` (signature shows no argument names)."""
    torch.manual_seed(0)
    cls = type(cls_name, (LlamaForCausalLM,), {"forward": forward})
    model = cls(tiny_config(arch))
    return Decoder(model=freeze(model), tokenizer=byte_tokenizer(), source=f"planted:{cls_name}")


def _renamed_forward(self, **kwargs):
    """Same behaviour as LlamaForCausalLM, but the signature names nothing (like a rename hidden by a wrapper)."""
    return LlamaForCausalLM.forward(self, **kwargs)


def test_signature_only_rename_is_accepted_and_augments_exactly():
    decoder = _planted("RenamedLlama", _renamed_forward)
    params = inspect.signature(decoder.model.forward).parameters
    assert not any(name in params for name in (*CACHE_ARGUMENTS, "position_ids", "inputs_embeds"))
    check_architecture(decoder.model)  # a signature check would refuse it: it names no cache, positions or embeds
    assert cache_argument(decoder.model) == cache_argument(AutoModelForCausalLM.from_config(tiny_config("llama")))

    # and the whole method runs on it: the one-pass loss equals the naive loop
    module = build_latent_module(decoder, CoprocessorConfig(mode="full", position_rule="keep"), n_latents=3)
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    points = torch.tensor([[5, 11], [8, 14]])
    fast = one_pass_loss(decoder, module, ids, points, n_ahead=4)
    slow = reference_loss(decoder, module, ids, points, n_ahead=4)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-4, atol=1e-5)


def _drop(*names):
    def forward(self, **kwargs):
        for name in names:
            kwargs.pop(name, None)
        return LlamaForCausalLM.forward(self, **kwargs)
    return forward


@pytest.mark.parametrize("dropped, reason", [
    (CACHE_ARGUMENTS, "keeps no KV cache"),
    (("position_ids",), "does not depend on the position_ids"),
    (("attention_mask",), "ignores a custom 4-D attention mask"),
])
def test_a_model_that_ignores_what_augmentation_needs_is_refused(dropped, reason):
    decoder = _planted("Ignores_" + "_".join(dropped), _drop(*dropped))
    with pytest.raises(UnsupportedArchitecture, match=f"llama: .*{reason}"):
        build_latent_module(decoder, CoprocessorConfig(mode="full"), n_latents=2)


def test_alibi_is_refused_with_its_reason():
    """Bloom (ALiBi) takes position ids without using them, so latents cannot be placed: refused up front."""
    decoder = tiny_decoder("bloom")
    with pytest.raises(UnsupportedArchitecture, match="bloom: .*does not depend on the position_ids.*ALiBi"):
        build_latent_module(decoder, CoprocessorConfig(mode="full"), n_latents=2)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "qwen2-sliding", "opt", "falcon"])
def test_supported_architectures_pass(arch):
    check_architecture(tiny_decoder(arch).model)
