"""Decoder loading, coprocessor construction, save/load and fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

from cache_aug.augment import augment
from cache_aug.config import CoprocessorConfig, ModelConfig, S3Config
from cache_aug.coprocessor import (
    build_latent_module,
    latent_fingerprint,
    load_latent_module,
    save_latent_module,
)
from cache_aug.decoder import Decoder, fetch_checkpoint, freeze, load_decoder
from cache_aug.fingerprint import FingerprintMismatch, decoder_fingerprint
from cache_aug.losses import one_pass_loss, sample_points
from cache_aug.testing import byte_tokenizer, tiny_decoder
from tests.conftest import free_port


def _step(decoder, module, lr=1e-2):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ids = torch.randint(3, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    points = sample_points(2, 32, 4, 4, 2, torch.Generator().manual_seed(0))
    one_pass_loss(decoder, module, ids, points, 4).loss.backward()
    opt.step()


@pytest.mark.parametrize("mode", ["full", "lora", "pause"])
def test_decoder_stays_frozen(mode):
    decoder = tiny_decoder("llama")
    module = build_latent_module(decoder, CoprocessorConfig(mode=mode, lora_rank=4), n_latents=3)
    before_dec = {k: v.clone() for k, v in decoder.model.state_dict().items()}
    before_mod = {k: v.clone() for k, v in module.state_dict().items()}
    assert not any(p.requires_grad for p in decoder.model.parameters())
    _step(decoder, module)
    for k, v in decoder.model.state_dict().items():
        assert torch.equal(v, before_dec[k]), k
    assert all(p.grad is None for p in decoder.model.parameters())
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before_mod[k])]
    assert "soft_tokens" in changed
    if mode == "full":
        assert any(k.startswith("trunk.layers.") and "lora_" not in k for k in changed)
    if mode == "lora":
        assert changed and all("lora_" in k or k == "soft_tokens" for k in changed)
        assert any("lora_" in k for k in changed)


def test_coprocessor_is_a_copy_initialised_from_the_decoder():
    decoder = tiny_decoder("gemma2")
    module = build_latent_module(decoder, CoprocessorConfig(mode="full"), n_latents=2)
    dec = dict(decoder.model.base_model.named_parameters())
    cop = dict(module.trunk.named_parameters())
    shared = {id(p) for p in dec.values()} & {id(p) for p in cop.values()}
    assert not shared
    for name, p in cop.items():
        if "embed_tokens" not in name:  # the embedding table is never used by C, so not copied
            assert torch.equal(p, dec[name]), name
    assert module.trunk.get_input_embeddings().weight.shape[0] == 1


@pytest.mark.parametrize("mode,first,rule,channel", [
    ("full", "last_latent", "shift", "embeds"), ("lora", "last_latent", "shift", "embeds"),
    ("pause", "last_latent", "shift", "embeds"),
    ("full", "last_token", "shift", "embeds"), ("pause", "last_token", "shift", "embeds"),
    ("full", "last_token", "keep", "embeds"),
    ("lora", "last_latent", "keep", "embeds"), ("full", "last_token", "keep", "kv"),
    ("lora", "last_token", "shift", "kv")])
def test_save_load_round_trip(mode, first, rule, channel, tmp_path):
    decoder = tiny_decoder("qwen2")
    cfg = CoprocessorConfig(mode=mode, lora_rank=4, first_ahead_from=first, position_rule=rule, latent_channel=channel)
    module = build_latent_module(decoder, cfg, n_latents=3)
    _step(decoder, module)  # trained weights differ from the decoder's
    module.eval()
    path = save_latent_module(module, decoder, tmp_path / "cop")
    meta = json.loads((path / "latents.json").read_text())
    assert meta["n_latents"] == 3 and meta["mode"] == mode and meta["first_ahead_from"] == first
    assert meta["position_rule"] == rule and meta["latent_channel"] == channel
    assert meta["decoder_fingerprint"] == decoder.fingerprint
    assert (path / "soft_tokens.safetensors").exists()
    assert (path / "model.safetensors").exists() == (mode != "pause")

    loaded = load_latent_module(path, decoder)
    assert latent_fingerprint(decoder, loaded) == meta["fingerprint"] == latent_fingerprint(decoder, module)
    doc = [list(range(5, 25))]
    a, b = augment(decoder, module, doc)[0], augment(decoder, loaded, doc)[0]
    assert torch.equal(a.next_logits, b.next_logits)
    if channel == "kv":  # the trained C's own KV at the latent slots, no input embeddings
        assert loaded.latent_channel == "kv" and a.latents is None and b.latents is None
        for (k, v), (k2, v2) in zip(a.layers, b.layers, strict=True):
            assert torch.equal(k, k2) and torch.equal(v, v2)
    else:
        assert torch.equal(a.latents, b.latents)
    assert loaded.reread == module.reread and a.seq_len == b.seq_len == 20 + 3 + module.reread
    assert loaded.position_rule == rule and a.next_position == b.next_position == (20 if rule == "keep" else a.seq_len)


def test_load_refuses_other_decoder(tmp_path):
    decoder = tiny_decoder("llama")
    module = build_latent_module(decoder, CoprocessorConfig(mode="full"), n_latents=2)
    path = save_latent_module(module, decoder, tmp_path / "cop")
    with pytest.raises(FingerprintMismatch, match="trained against decoder"):
        load_latent_module(path, tiny_decoder("llama", seed=3))
    # tampered weights are caught by the recorded fingerprint
    from safetensors.torch import load_file, save_file

    state = load_file(path / "soft_tokens.safetensors")
    state["soft_tokens"] += 1
    save_file(state, path / "soft_tokens.safetensors")
    with pytest.raises(FingerprintMismatch, match="do not match"):
        load_latent_module(path, decoder)


def test_fingerprint_covers_each_part():
    decoder = tiny_decoder("llama")
    module = build_latent_module(decoder, CoprocessorConfig(mode="full"), n_latents=2)
    base = latent_fingerprint(decoder, module)
    assert latent_fingerprint(decoder, module) == base  # deterministic
    # decoder weights
    assert latent_fingerprint(tiny_decoder("llama", seed=1), module) != base
    # tokenizer
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    assert latent_fingerprint(Decoder(decoder.model, tok), module) != base
    # coprocessor weights
    with torch.no_grad():
        module.trunk.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert latent_fingerprint(decoder, module) != base
    # N_L and mode
    assert latent_fingerprint(decoder, build_latent_module(decoder, CoprocessorConfig(mode="full"), 3)) != base
    assert latent_fingerprint(decoder, build_latent_module(decoder, CoprocessorConfig(mode="pause"), 2)) != base
    # the slot that predicts the first ahead token (same weights, other position rule)
    reread = build_latent_module(decoder, CoprocessorConfig(mode="full", first_ahead_from="last_token"), 2)
    reread.load_state_dict(module.state_dict())
    assert latent_fingerprint(decoder, reread) != latent_fingerprint(decoder, module)
    # where the latents and the text after them sit
    keep = build_latent_module(decoder, CoprocessorConfig(mode="full", position_rule="keep"), 2)
    keep.load_state_dict(module.state_dict())
    assert latent_fingerprint(decoder, keep) != latent_fingerprint(decoder, module)
    # how C's work reaches D: its own KV at the latent slots instead of input embeddings (same weights)
    kv_cfg = dict(mode="full", first_ahead_from="last_token")
    embeds = build_latent_module(decoder, CoprocessorConfig(**kv_cfg), 2)
    kv = build_latent_module(decoder, CoprocessorConfig(**kv_cfg, latent_channel="kv"), 2)
    kv.load_state_dict(embeds.state_dict())
    assert latent_fingerprint(decoder, kv) != latent_fingerprint(decoder, embeds)
    # dtype
    bf16 = Decoder(freeze(decoder.model.to(torch.bfloat16)), decoder.tokenizer)
    assert decoder_fingerprint(bf16.model, bf16.tokenizer) != decoder.fingerprint


def _save_checkpoint(decoder, path):
    decoder.model.save_pretrained(path)
    decoder.tokenizer.save_pretrained(path)
    return path


def test_load_decoder_from_local_dir(tmp_path):
    src = tiny_decoder("gpt2")
    path = _save_checkpoint(src, tmp_path / "ckpt")
    loaded = load_decoder(ModelConfig(path=str(path)))
    assert loaded.fingerprint == src.fingerprint
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_decoder(ModelConfig(path=str(tmp_path)))


@pytest.fixture(scope="module")
def moto_s3():
    """A real S3 server on loopback (moto's), reached through s3fs as an `s3` section names it (keys in the
    environment variables it names)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTO_TEST_KEY", "testing")
        mp.setenv("MOTO_TEST_SECRET", "testing")
        yield S3Config(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", access_key_env="MOTO_TEST_KEY",
                       secret_key_env="MOTO_TEST_SECRET")
    server.stop()


def test_s3_section_gives_fsspec_options_from_config_then_environment(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "K", "S"):
        monkeypatch.delenv(name, raising=False)
    cfg = S3Config(access_key_env="K", secret_key_env="S")
    assert cfg.storage_options() == {"client_kwargs": {"region_name": "us-east-1"}}  # AWS, no keys: s3fs finds its own
    monkeypatch.setenv("K", "key")
    assert "key" not in cfg.storage_options()  # keys only as a pair
    monkeypatch.setenv("S", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    assert cfg.storage_options() == {"key": "key", "secret": "secret",
                                     "client_kwargs": {"region_name": "eu-west-1", "endpoint_url": "http://general:1"}}
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert cfg.storage_options()["client_kwargs"] == {"region_name": "eu-north-1", "endpoint_url": "http://s3-only:2"}
    written = S3Config(endpoint_url="http://written:3", region="ap-south-1", access_key_env="K", secret_key_env="S")
    assert written.storage_options()["client_kwargs"] == {"region_name": "ap-south-1", "endpoint_url": "http://written:3"}
    assert "K" not in written.storage_options().values()  # the keys come from the variables, never their names


def test_load_decoder_from_s3(moto_s3, tmp_path):
    import boto3
    import s3fs

    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **moto_s3.storage_options()["client_kwargs"]).create_bucket(Bucket="models")
    fs = s3fs.S3FileSystem(**moto_s3.storage_options())
    src = tiny_decoder("llama")
    local = _save_checkpoint(src, tmp_path / "ckpt")
    fs.put(str(local) + "/", "models/tiny/", recursive=True)

    cache_dir = tmp_path / "cache"
    cfg = ModelConfig(path="s3://models/tiny", revision_cache_dir=str(cache_dir))
    loaded = load_decoder(cfg, s3=moto_s3)
    assert loaded.fingerprint == src.fingerprint
    first = fetch_checkpoint("s3://models/tiny", cache_dir, moto_s3)
    assert fetch_checkpoint("s3://models/tiny", cache_dir, moto_s3) == first  # reused, not fetched again
    # a changed checkpoint at the same URI is fetched again
    fs.pipe("models/tiny/README.md", b"v2")
    assert fetch_checkpoint("s3://models/tiny", cache_dir, moto_s3) != first
    with pytest.raises(FileNotFoundError, match="no checkpoint files"):
        fetch_checkpoint("s3://models/missing", cache_dir, moto_s3)
