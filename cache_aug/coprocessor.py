"""The coprocessor C and the pause-token baseline: the trainable modules that produce latents z.

Both are `LatentModule`s: `forward(cache, position_ids, attention_mask, n_blocks)`
returns z of shape (N, n_blocks * N_L, d), or, for a coprocessor with latent_channel="kv", its own
keys and values at the latent slots, per layer (N, H_kv, n_blocks * N_L, D). All trainable tensors
live inside the module, and all computation goes through `forward`, so DeepSpeed (ZeRO-3 included)
can wrap it whole.

- `Coprocessor`: a copy of D's transformer trunk (full fine-tune, or frozen + LoRA adapters)
  reading N_L soft tokens on top of D's cache; z = its final hidden states.
- `PauseTokens`: N_L soft tokens fed straight into D (Goyal et al. 2023); same loss, no C.

Either module carries its `LatentLayout` (`module.layout`, cache_aug/layout.py): N_L, which slot
predicts the first token after the latents (`CoprocessorConfig.first_ahead_from`: the last latent,
`reread = 0`, or the document's last token fed once more after the latents, `reread = 1`), where the
latents and the text after them sit (`CoprocessorConfig.position_rule`, `module.position_ids`) and the
latent channel. Losses, `augment` and `restore` read it off the module (records carry it too), so a
trained module carries its layout into corpus augmentation and serving.

A trained module is saved as a directory:
    latents.json          mode, N_L, first_ahead_from, position_rule, latent_channel, hidden size, LoRA config,
                          decoder fingerprint, fingerprint
    model.safetensors     trunk weights (full) or adapter weights (lora); absent for pause
    soft_tokens.safetensors
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cache_aug.architecture import check_architecture, with_cache
from cache_aug.config import CoprocessorConfig, S3Config
from cache_aug.decoder import Decoder, fetch_checkpoint
from cache_aug.fingerprint import FingerprintMismatch, augmentation_fingerprint
from cache_aug.kv import layer_kv
from cache_aug.layout import CHANNELS, REREAD, LatentLayout
from cache_aug.masks import POSITION_RULES

FORMAT = "cache-aug/latents"
FORMAT_VERSION = 1


def init_soft_tokens(decoder: Decoder, n_latents: int, how: str, seed: int) -> torch.Tensor:
    """(N_L, d) initial soft tokens on the decoder's input-embedding scale."""
    g = torch.Generator().manual_seed(seed)
    vocab = decoder.model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        if how == "vocab":  # embeddings of random real tokens, as the model's forward expects them
            ids = torch.randint(0, vocab, (1, n_latents), generator=g).to(decoder.device)
            return decoder.embed(ids)[0].detach().clone().float()  # (N_L, d)
        table = decoder.embed(torch.arange(vocab, device=decoder.device)[None])[0].float()  # (V, d)
        return torch.randn(n_latents, table.shape[-1], generator=g) * table.std().cpu()


class LatentModule(nn.Module):
    """N_L trainable soft tokens; subclasses turn them into latents z."""

    mode: str
    uses_cache: bool  # whether forward reads D's cache (pass 2 runs only then)

    def __init__(self, soft_tokens: torch.Tensor, layout: LatentLayout):
        super().__init__()
        if layout.n_latents != soft_tokens.shape[0] or layout.n_latents < 1:
            raise ValueError(f"{soft_tokens.shape[0]} soft tokens for a layout of N_L={layout.n_latents}")
        self.soft_tokens = nn.Parameter(soft_tokens)  # (N_L, d)
        # kept as plain ints: under ZeRO-3 a parameter's own shape is empty outside forward
        self.hidden_size = soft_tokens.shape[1]
        self.layout = layout  # N_L, re-read count, position rule, latent channel (cache_aug/layout.py)

    # the layout's parts under the names the configs and saved modules use
    @property
    def n_latents(self) -> int:
        return self.layout.n_latents

    @property
    def reread(self) -> int:
        """1: the last real token is fed again after the latents."""
        return self.layout.reread

    @property
    def first_ahead_from(self) -> str:
        return self.layout.first_ahead_from

    @property
    def position_rule(self) -> str:
        """Where the latents and the text after them sit (masks.block_position_ids)."""
        return self.layout.position_rule

    @property
    def latent_channel(self) -> str:
        """"kv": forward returns per-layer latent KV, not z (pause tokens: always embeds)."""
        return self.layout.channel

    def position_ids(self, points: torch.Tensor, block_len: int) -> torch.Tensor:
        """Positions of blocks [latents, (re-read token), following tokens] at points (N, B): (N, B*block_len)."""
        return self.layout.position_ids(points, block_len)

    def tiled_soft_tokens(self, n_rows: int, n_blocks: int) -> torch.Tensor:
        """The soft tokens once per block and row: (n_rows, n_blocks*N_L, d)."""
        return self.soft_tokens.repeat(n_blocks, 1)[None].expand(n_rows, -1, -1)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a trained module consists of (saved, and hashed into the fingerprint)."""
        return {"soft_tokens": self.soft_tokens}


class Coprocessor(LatentModule):
    """C: D's trunk (a trainable copy, or frozen with LoRA adapters) over N_L soft tokens on D's cache."""

    uses_cache = True

    def __init__(self, trunk: nn.Module, soft_tokens: torch.Tensor, layout: LatentLayout, mode: str,
                 lora: dict | None = None):
        super().__init__(soft_tokens, layout)
        self.trunk = trunk
        self.mode = mode
        self.lora = lora

    def forward(self, cache, position_ids: torch.Tensor, attention_mask=None, n_blocks: int = 1):
        """z (N, n_blocks*N_L, d); with latent_channel="kv", per layer (keys, values) (N, H_kv, n_blocks*N_L, D).

        For the kv channel the new columns are read back off every layer of the cache, so each layer
        must keep them: a plain cache (`kv.plain_cache`, as `passes.latent_pass` uses), or a model cache
        whose sliding windows are longer than the latents.
        """
        x = self.tiled_soft_tokens(position_ids.shape[0], n_blocks).to(self.trunk.dtype)  # (N, n_blocks*N_L, d)
        out = self.trunk(**with_cache(self.trunk, cache, inputs_embeds=x, position_ids=position_ids,
                                      attention_mask=attention_mask, use_cache=True))
        if not self.layout.writes_kv:
            return out.last_hidden_state  # (N, n_blocks*N_L, d)
        n = x.shape[1]
        layers = layer_kv(cache)
        if min(k.shape[2] for k, _ in layers) < n:
            raise ValueError(f"a cache layer kept fewer than the {n} latent columns (a sliding window shorter than "
                             "them); pass a plain cache")
        return [(k[:, :, -n:], v[:, :, -n:]) for k, v in layers]  # the latent slots' own KV

    def trainable_state(self) -> dict[str, torch.Tensor]:
        table = {id(p) for p in self.trunk.get_input_embeddings().parameters()}  # unused by C, not saved
        trunk = {n: p for n, p in self.trunk.named_parameters() if id(p) not in table}
        if self.mode == "lora":
            trunk = {k: v for k, v in trunk.items() if "lora_" in k}
        return {**{f"trunk.{k}": v for k, v in trunk.items()}, **super().trainable_state()}


class PauseTokens(LatentModule):
    """The pause-token baseline: the N_L trainable embeddings are z, fed straight into D."""

    mode = "pause"
    uses_cache = False

    def __init__(self, soft_tokens: torch.Tensor, layout: LatentLayout):
        if layout.writes_kv:
            raise ValueError("pause tokens have no coprocessor to write keys and values: their latent channel is "
                             "\"embeds\"")
        super().__init__(soft_tokens, layout)

    def forward(self, cache, position_ids: torch.Tensor, attention_mask=None, n_blocks: int = 1) -> torch.Tensor:
        return self.tiled_soft_tokens(position_ids.shape[0], n_blocks)  # (N, n_blocks*N_L, d)




def _lora_config(cfg: CoprocessorConfig) -> dict:
    return {
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": cfg.lora_targets,
    }


def _copy_trunk(decoder: Decoder) -> nn.Module:
    """A deep copy of D's trunk without its input-embedding table.

    C reads soft tokens as inputs_embeds and never looks a token up, so the (often huge) table
    is replaced by a one-row placeholder instead of being copied.
    """
    trunk = decoder.model.base_model
    table = trunk.get_input_embeddings()
    placeholder = nn.Embedding(1, table.embedding_dim, dtype=table.weight.dtype, device=table.weight.device)
    return copy.deepcopy(trunk, memo={id(table): placeholder})


def _make_trunk(decoder: Decoder, mode: str, lora: dict | None) -> nn.Module:
    trunk = _copy_trunk(decoder)
    if mode == "full":
        trunk.requires_grad_(True)
        trunk.get_input_embeddings().requires_grad_(False)
        return trunk
    from peft import LoraConfig, inject_adapter_in_model

    trunk = inject_adapter_in_model(LoraConfig(**lora), trunk)
    for name, p in trunk.named_parameters():
        p.requires_grad_("lora_" in name)
    return trunk


def _freeze_unreachable(module: Coprocessor, decoder: Decoder) -> None:
    """Freeze the trainable tensors that cannot reach the latent KV (kv channel), found by one probe backward.

    Keys and values are computed before each layer's attention, so the last layer's attention output, MLP and
    the final norm (and any adapters on them) never touch what a kv-channel coprocessor writes; left trainable
    they would hold optimizer state and get no gradient.
    """
    from cache_aug.passes import latent_pass, prefill

    ids = torch.zeros(1, 2, dtype=torch.long, device=decoder.device)
    prefix, _ = prefill(decoder, ids)
    latent = latent_pass(decoder, module, prefix, torch.tensor([[2]], device=decoder.device))
    probe = sum(k.float().sum() + v.float().sum() for k, v in latent)
    params = [p for p in module.parameters() if p.requires_grad]
    for p, g in zip(params, torch.autograd.grad(probe, params, allow_unused=True), strict=True):
        if g is None:
            p.requires_grad_(False)


def build_latent_module(decoder: Decoder, cfg: CoprocessorConfig, n_latents: int) -> LatentModule:
    """A fresh coprocessor (initialised from D's weights) or pause-token module, in D's dtype/device."""
    check_architecture(decoder.model)
    layout = LatentLayout.from_config(cfg, n_latents)
    soft = init_soft_tokens(decoder, n_latents, cfg.soft_token_init, cfg.seed).to(decoder.device, decoder.dtype)
    if cfg.mode == "pause":
        module = PauseTokens(soft, layout)
    else:
        lora = _lora_config(cfg) if cfg.mode == "lora" else None
        module = Coprocessor(_make_trunk(decoder, cfg.mode, lora), soft, layout, cfg.mode, lora)
        if layout.writes_kv:
            _freeze_unreachable(module, decoder)
    return module.train()


def latent_fingerprint(decoder: Decoder, module: LatentModule | None) -> str:
    """Fingerprint of the full augmentation setup (decoder alone when module is None)."""
    if module is None:
        return augmentation_fingerprint(decoder.fingerprint, None, "none", 0, decoder.dtype)
    layout = module.layout
    return augmentation_fingerprint(
        decoder.fingerprint, module.trainable_state(), module.mode, layout.n_latents, decoder.dtype,
        first_ahead_from=layout.first_ahead_from, position_rule=layout.position_rule, latent_channel=layout.channel,
    )


def save_latent_module(module: LatentModule, decoder: Decoder, directory: str | Path) -> Path:
    """Write a trained module as safetensors + JSON (see module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.trainable_state().items()}
    save_file({"soft_tokens": state.pop("soft_tokens")}, directory / "soft_tokens.safetensors")
    if state:
        save_file(state, directory / "model.safetensors")
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "mode": module.mode,
        "n_latents": module.layout.n_latents,
        "first_ahead_from": module.layout.first_ahead_from,
        "position_rule": module.layout.position_rule,
        "latent_channel": module.layout.channel,
        "hidden_size": module.hidden_size,
        "dtype": str(decoder.dtype).removeprefix("torch."),
        "lora": getattr(module, "lora", None),
        "decoder_model_type": decoder.config.model_type,
        "decoder_fingerprint": decoder.fingerprint,
        "fingerprint": latent_fingerprint(decoder, module),
    }
    (directory / "latents.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def module_dir(path: str | Path, s3: S3Config | None = None) -> Path:
    """The local directory of a saved module: `path` itself, or for a remote one (s3://, reached as `s3` says) the
    node's cached copy (`decoder.fetch_checkpoint`: fetched once per node, fetched again when the files change)."""
    return fetch_checkpoint(str(path), s3=s3) if "://" in str(path) else Path(path)


def load_latent_module(directory: str | Path, decoder: Decoder, s3: S3Config | None = None) -> LatentModule:
    """Load a saved module (local or s3://) for `decoder`; refuses one trained against other decoder weights."""
    check_architecture(decoder.model)
    directory = module_dir(directory, s3)
    meta_path = directory / "latents.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory}: no latents.json (not a saved coprocessor)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: unsupported format {meta.get('format')!r} v{meta.get('version')}")
    if meta["decoder_fingerprint"] != decoder.fingerprint:
        raise FingerprintMismatch(
            f"{directory}: trained against decoder {meta['decoder_fingerprint']}, "
            f"but the loaded decoder is {decoder.fingerprint} ({decoder.source})"
        )
    soft = load_file(directory / "soft_tokens.safetensors")["soft_tokens"].to(decoder.device)
    first = meta.get("first_ahead_from", "last_latent")  # modules saved before the option existed
    if first not in REREAD:
        raise ValueError(f"{meta_path}: unknown first_ahead_from {first!r}")
    rule = meta.get("position_rule", "shift")  # modules saved before the option existed
    if rule not in POSITION_RULES:
        raise ValueError(f"{meta_path}: unknown position_rule {rule!r}")
    channel = meta.get("latent_channel", "embeds")  # modules saved before the option existed
    if channel not in CHANNELS:
        raise ValueError(f"{meta_path}: unknown latent_channel {channel!r}")
    layout = LatentLayout.from_names(soft.shape[0], first, rule, channel)
    if meta["mode"] == "pause":
        module = PauseTokens(soft, layout)
    else:
        module = Coprocessor(_make_trunk(decoder, meta["mode"], meta["lora"]), soft, layout, meta["mode"], meta["lora"])
        state = load_file(directory / "model.safetensors", device=str(decoder.device))
        trunk_state = {k.removeprefix("trunk."): v for k, v in state.items()}
        missing, unexpected = module.trunk.load_state_dict(trunk_state, strict=False)
        saved = {k.removeprefix("trunk.") for k in module.trainable_state()}
        expected_missing = [k for k in module.trunk.state_dict() if k not in saved]
        if unexpected or sorted(missing) != sorted(expected_missing):
            raise ValueError(f"{directory}: weights do not fit the decoder (missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]})")
    module = module.eval()
    if latent_fingerprint(decoder, module) != meta["fingerprint"]:
        raise FingerprintMismatch(f"{directory}: weights do not match the fingerprint recorded in latents.json")
    return module


def saved_fingerprint(directory: str | Path, decoder: Decoder, s3: S3Config | None = None) -> str:
    """The fingerprint recorded for a saved module, without loading its weights (for checking stored caches)."""
    meta_path = module_dir(directory, s3) / "latents.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory}: no latents.json (not a saved coprocessor)")
    meta = json.loads(meta_path.read_text())
    if meta.get("decoder_fingerprint") != decoder.fingerprint:
        raise FingerprintMismatch(f"{directory}: trained against decoder {meta.get('decoder_fingerprint')}, "
                                  f"but the loaded decoder is {decoder.fingerprint} ({decoder.source})")
    return meta["fingerprint"]
