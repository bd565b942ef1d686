"""The method's layout: what an augmentation adds after a document, and where it sits.

One `LatentLayout` value fixes everything the passes, losses, `augment`, records and serving used to
work out from loose switches:

    n_latents      N_L latent slots after an augmentation point (0: a plain cache, no augmentation)
    reread         0, or 1: the point's last token is fed once more after the latents and its logits
                   predict the next token (`CoprocessorConfig.first_ahead_from`: "last_latent" / "last_token")
    position_rule  "shift" (the paper's: latents and text after the point move on) or "keep" (the text keeps
                   its own positions; `masks.block_position_ids`)
    channel        "embeds" (the paper's: z is fed to the decoder as input embeddings) or "kv" (the coprocessor
                   writes its own keys and values at the latent slots; needs reread = 1)

For a document (or prefix) of n tokens the cache holds n + n_latents + reread entries (`cache_len`), in the
order [document, latents, re-read token]; `latent_positions`, `text_positions` and `next_position` say which
positions those entries and the text after them take. The layout is carried by the latent module, by
`AugmentedCache` and by stored records, which hold it as JSON (`to_json` / `from_json`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from cache_aug.masks import POSITION_RULES, block_position_ids

if TYPE_CHECKING:
    from cache_aug.config import CoprocessorConfig

REREAD = {"last_latent": 0, "last_token": 1}  # first_ahead_from -> tokens fed again after the latents
CHANNELS = ("embeds", "kv")
STORAGE_MODES = ("latents", "latent_kv", "full")  # what a stored record holds (cache_aug.records)


@dataclass(frozen=True)
class LatentLayout:
    """N_L, the re-read count, the position rule and the latent channel of one augmentation setup."""

    n_latents: int
    reread: int = 0
    position_rule: str = "shift"
    channel: str = "embeds"

    def __post_init__(self) -> None:
        if not isinstance(self.n_latents, int) or isinstance(self.n_latents, bool) or self.n_latents < 0:
            raise ValueError(f"n_latents must be an int >= 0, got {self.n_latents!r}")
        if self.reread not in (0, 1) or isinstance(self.reread, bool):
            raise ValueError(f"reread must be 0 or 1, got {self.reread!r}")
        if self.position_rule not in POSITION_RULES:
            raise ValueError(f"position_rule {self.position_rule!r} not in {POSITION_RULES}")
        if self.channel not in CHANNELS:
            raise ValueError(f"latent_channel {self.channel!r} not in {CHANNELS}")
        if self.channel == "kv" and not self.reread:
            raise ValueError('latent_channel="kv" needs first_ahead_from="last_token": no decoder logits exist at a '
                             'latent slot')
        if self.n_latents == 0 and (self.reread or self.channel != "embeds"):
            raise ValueError("a layout without latents (a plain cache) re-reads nothing and writes no latent KV")

    # -- construction ----------------------------------------------------------------------------------- #

    @classmethod
    def from_names(cls, n_latents: int, first_ahead_from: str = "last_latent", position_rule: str = "shift",
                   latent_channel: str = "embeds") -> LatentLayout:
        """From the option names of `CoprocessorConfig` (and a saved module's latents.json)."""
        if first_ahead_from not in REREAD:
            raise ValueError(f"first_ahead_from {first_ahead_from!r} not in {tuple(REREAD)}")
        return cls(n_latents, REREAD[first_ahead_from], position_rule, latent_channel)

    @classmethod
    def from_config(cls, cfg: CoprocessorConfig, n_latents: int) -> LatentLayout:
        """The layout of a module built from `cfg` with N_L latents; pause tokens are always fed as embeddings."""
        channel = "embeds" if cfg.mode == "pause" else cfg.latent_channel
        return cls.from_names(n_latents, cfg.first_ahead_from, cfg.position_rule, channel)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces), as a record's payload header holds it."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LatentLayout:
        """The layout `to_json` wrote; ValueError for anything else (stored data is untrusted input)."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"latent layout is not valid JSON ({e})") from None
        names = {"n_latents", "reread", "position_rule", "channel"}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"latent layout must be a mapping of exactly {sorted(names)}, got {text[:200]!r}")
        return cls(**data)

    # -- what the code asks ----------------------------------------------------------------------------- #

    @property
    def first_ahead_from(self) -> str:
        """The `CoprocessorConfig.first_ahead_from` name of the re-read count."""
        return "last_token" if self.reread else "last_latent"

    @property
    def writes_kv(self) -> bool:
        """Whether the module writes keys and values at the latent slots (no input-embedding latents exist)."""
        return self.channel == "kv"

    @property
    def n_added(self) -> int:
        """Entries after an augmentation point: the latents, and the re-read token if any."""
        return self.n_latents + self.reread

    @property
    def storage_modes(self) -> tuple[str, ...]:
        """The record storage modes that can hold a cache of this layout ("latents" needs input-embedding latents)."""
        return tuple(m for m in STORAGE_MODES if not (m == "latents" and self.writes_kv))

    def allows_storage(self, mode: str) -> bool:
        return mode in self.storage_modes

    def cache_len(self, n: int) -> int:
        """Entries an augmented cache of an n-token document holds per (full) layer."""
        return n + self.n_added

    def latent_positions(self, n: int) -> list[int]:
        """Positions of the N_L latents after an n-token prefix: n.. ("shift"), or the prefix's last N_L ("keep")."""
        if self.position_rule == "keep":
            return [max(0, n - self.n_latents + j) for j in range(self.n_latents)]
        return list(range(n, n + self.n_latents))

    def text_positions(self, n: int, count: int) -> list[int]:
        """Positions of the `count` entries after the latents (the re-read token first, if any) for an n-token
        prefix."""
        start = n - self.reread if self.position_rule == "keep" else n + self.n_latents
        return list(range(start, start + count))

    @property
    def text_shift(self) -> int:
        """How far the text after an augmentation point is moved on: N_L (+1 re-read) under "shift", 0 under "keep"."""
        return 0 if self.position_rule == "keep" else self.n_added

    def next_position(self, n: int) -> int:
        """The position the next real token takes after the augmented cache of an n-token document."""
        return n + self.text_shift

    def position_ids(self, points: torch.Tensor, block_len: int) -> torch.Tensor:
        """Positions of blocks [latents, (re-read token), following tokens] at points (N, B): (N, B*block_len)."""
        return block_position_ids(points, block_len, self.position_rule, self.n_latents, self.reread)

    def describe(self) -> str:
        return (f"N_L={self.n_latents}, first_ahead_from={self.first_ahead_from}, position_rule={self.position_rule}, "
                f"latent_channel={self.channel}")


PLAIN = LatentLayout(0)  # the fallback cache: the document alone
