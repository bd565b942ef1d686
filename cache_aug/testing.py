"""Tiny random decoders of several architectures, built from configs (for tests and benchmarks).

Nothing is downloaded: each model is a transformers config with small dimensions and random
weights, paired with a small byte-level tokenizer.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from cache_aug.decoder import Decoder, freeze

VOCAB = 96


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer over printable ASCII characters (vocab of VOCAB ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in range(32, 32 + VOCAB - 3):
        vocab[chr(c)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(arch: str, **overrides):
    """A small random config of the named architecture."""
    from transformers import (
        BloomConfig,
        FalconConfig,
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    # initializer_range 0.2 (not the usual 0.02): with near-zero queries and keys attention is uniform and
    # positions would not matter, so tests of position handling could not fail
    common = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=1, initializer_range=0.2)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, **common)
    elif arch == "qwen2-sliding":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=True,
                          sliding_window=12, max_window_layers=1, **common)
    elif arch == "mistral":
        cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=512, sliding_window=16, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **common)
    elif arch == "gemma2":
        cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=12,
                           attn_implementation="eager", **common)
    elif arch == "phi3":
        cfg = Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, **common)
    elif arch == "bloom":
        cfg = BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)
    elif arch == "gpt_neox":  # Pythia: partial rotary, parallel residual
        cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=512, rotary_pct=0.25, **common)
    elif arch == "gemma3":  # local (sliding) and global layers with their own RoPE bases
        cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=12,
                               sliding_window_pattern=2, attn_implementation="eager", **common)
    elif arch == "qwen3":  # q/k norms
        cfg = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=512, **common)
    elif arch == "olmo2":  # norms after attention and MLP
        cfg = Olmo2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, **common)
    elif arch == "falcon":  # multi-query attention, parallel attention + MLP
        cfg = FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False,
                           multi_query=True, alibi=False, **common)
    elif arch == "opt":  # learned absolute positions with an offset
        cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=512, word_embed_proj_dim=32, **common)
    else:
        raise ValueError(f"unknown test architecture {arch!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_decoder(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Decoder:
    """A frozen random decoder of the named architecture with a byte tokenizer."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return Decoder(model=freeze(model), tokenizer=byte_tokenizer(), source=f"random:{arch}")
