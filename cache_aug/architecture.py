"""What cache augmentation needs of a decoder, found out by asking the model itself.

Augmentation feeds input embeddings at explicit positions, on top of a KV cache, under custom 4-D masks.
Signatures are a poor guide to that: transformers renames arguments (the cache was `past_key_values` until
5.23 and is `cache` from 5.24), and wrappers hide them behind **kwargs. So the name a model takes its cache
under is the one a probe forward fills (trying the name its signature gives first), and a model is refused
only when tiny forwards show it cannot do the job:

- it keeps no cache under either name, or does not continue from one;
- it takes no `inputs_embeds`;
- its output does not depend on the position ids it is given (ALiBi, e.g. Bloom): latents cannot be placed;
- it ignores a custom attention mask.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from transformers import DynamicCache

from cache_aug.masks import UnsupportedArchitecture, attention_kinds

CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24, then the older name
_cache_argument: dict[type, str] = {}  # by model class: a class takes its cache under one name


def _fills_cache(model, name: str) -> bool:
    """Whether a one-token forward given a cache under `name` writes into it."""
    cache = DynamicCache(config=model.config)
    ids = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an older name may still be taken, with a deprecation warning
        try:
            model(input_ids=ids, use_cache=True, **{name: cache})
        except TypeError:  # a signature that names its arguments refuses an unknown one
            return False
    return cache.get_seq_length() == 1


def cache_argument(model) -> str:
    """The keyword under which `model`'s forward takes a KV cache: the first that a one-token probe fills, trying
    what its signature names first (one probe per model class, remembered)."""
    kind = type(model)
    if kind not in _cache_argument:
        params = inspect.signature(model.forward).parameters
        tried = sorted(CACHE_ARGUMENTS, key=lambda name: name not in params)  # what the signature names, first
        found = next((name for name in tried if _fills_cache(model, name)), None)
        if found is None:
            raise UnsupportedArchitecture(
                f"{model.config.model_type}: its forward keeps no KV cache given as {' or '.join(CACHE_ARGUMENTS)}; "
                "cache augmentation extends the decoder's cache, so this architecture cannot be used"
            )
        _cache_argument[kind] = found
    return _cache_argument[kind]


def with_cache(model, cache, **kwargs) -> dict:
    """Forward keywords with the cache under the name this model takes it (`cache_argument`)."""
    return {**kwargs, cache_argument(model): cache}


def _logits(model, cache=None, **kwargs) -> torch.Tensor:
    """Last-position logits of one probe forward (1, V), in float32."""
    if cache is not None:
        kwargs = with_cache(model, cache, **kwargs)
    with torch.no_grad():
        return model(**kwargs).logits[:, -1].float()


def _differs(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """More apart than rounding explains: relative to the logits' scale, 1e-4 (float32) or 16 eps of the dtype."""
    tol = max(1e-4, 16 * torch.finfo(dtype).eps) * max(1.0, float(a.abs().max()))
    return float((a - b).abs().max()) > tol


def check_architecture(model) -> None:
    """Refuse, naming the model type and the reason, a causal LM that tiny forwards show cannot be augmented.

    `model` is a transformers causal LM (with an LM head). Costs a handful of forwards over 3 tokens.
    """
    kind = model.config.model_type
    cache_argument(model.base_model)  # the coprocessor's trunk is a copy of it
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(3, device=device) % vocab + (1 if vocab > 3 else 0)) % vocab  # (3,)
    ids = ids[None]  # (1, 3)
    pos = torch.arange(3, device=device)[None]  # (1, 3)
    full = _logits(model, input_ids=ids, position_ids=pos)  # (1, V)

    cache = DynamicCache(config=model.config)
    _logits(model, cache, input_ids=ids[:, :2], position_ids=pos[:, :2], use_cache=True)
    if cache.get_seq_length() != 2:
        raise UnsupportedArchitecture(f"{kind}: a forward given a cache left {cache.get_seq_length()} entries in it, "
                                      "not 2")
    resumed = _logits(model, cache, input_ids=ids[:, 2:], position_ids=pos[:, 2:], use_cache=True)
    if _differs(full, resumed, dtype):
        raise UnsupportedArchitecture(f"{kind}: continuing from its own cache does not give the logits of one forward; "
                                      "augmented caches could not be decoded from")

    try:
        embedded = _logits(model, inputs_embeds=model.get_input_embeddings()(ids), position_ids=pos)
    except (TypeError, ValueError) as err:
        raise UnsupportedArchitecture(f"{kind}: its forward takes no inputs_embeds ({err}); latents are fed as "
                                      "input embeddings") from None
    if _differs(full, embedded, dtype):
        raise UnsupportedArchitecture(f"{kind}: inputs_embeds of its own embedding table do not give the logits of "
                                      "the token ids; latents are fed as input embeddings")

    moved = _logits(model, input_ids=ids, position_ids=pos + torch.tensor([[0, 0, 5]], device=device))
    if not _differs(full, moved, dtype):
        raise UnsupportedArchitecture(
            f"{kind}: its output does not depend on the position_ids it is given (relative positions such as ALiBi "
            "follow the order of cache entries); cache augmentation places latents at explicit positions, so this "
            "architecture cannot be used"
        )

    hide = torch.zeros(1, 1, 3, 3, dtype=dtype, device=device)
    hide.masked_fill_(torch.ones(3, 3, dtype=torch.bool, device=device).triu(1), torch.finfo(dtype).min)
    hide[..., 2, 0] = torch.finfo(dtype).min  # the last query may not see the first token
    as_dict, kinds = attention_kinds(model.config)
    mask = {k: hide for k in kinds} if as_dict else hide
    masked = _logits(model, input_ids=ids, position_ids=pos, attention_mask=mask)
    if not _differs(full, masked, dtype):
        raise UnsupportedArchitecture(f"{kind}: it ignores a custom 4-D attention mask; many augmentation points in "
                                      "one pass need block-diagonal masks")
