"""More decoder families, one setting each: the training loss, the stored cache and serving agree.

The full grids (every module mode, slot and position rule; every storage mode) run on the core test
architectures in test_one_pass.py and test_augment.py. Here each further family (partial rotary, local and
global RoPE layers, q/k norms, post-norms, multi-query attention, learned offset positions) gets the
paper's rules, the `keep`/`last_token` setting and the coprocessor writing its own KV (`latent_channel="kv"`)
once each, through all three equivalences.
"""

from __future__ import annotations

import pytest
import torch

from cache_aug.augment import augment, decode_steps
from cache_aug.config import CoprocessorConfig
from cache_aug.coprocessor import build_latent_module, latent_fingerprint
from cache_aug.losses import one_pass_loss, reference_loss, sample_points
from cache_aug.records import encode_record, restore
from cache_aug.testing import tiny_decoder

ARCHS = ["gpt_neox", "gemma3", "qwen3", "olmo2", "falcon", "opt"]
RULES = [("last_latent", "shift", "embeds"), ("last_token", "keep", "embeds"), ("last_token", "shift", "kv")]
N_L, N_A = 3, 4


@pytest.fixture(scope="module", params=[(a, *r) for a in ARCHS for r in RULES], ids=lambda s: "-".join(s))
def setup(request):
    arch, first, rule, channel = request.param
    decoder = tiny_decoder(arch)
    cfg = CoprocessorConfig(mode="full", first_ahead_from=first, position_rule=rule, latent_channel=channel)
    module = build_latent_module(decoder, cfg, N_L).eval()
    return decoder, module


def test_one_pass_equals_reference(setup):
    decoder, module = setup
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 96, (2, 36), generator=g)
    points = sample_points(2, 36, 4, N_A, min_prefix=2, generator=g)
    fast = one_pass_loss(decoder, module, ids, points, N_A)
    slow = reference_loss(decoder, module, ids, points, N_A)
    torch.testing.assert_close(fast.per_position, slow.per_position, rtol=1e-4, atol=1e-6)
    params = [p for p in module.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(fast.loss, params), torch.autograd.grad(slow.loss, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-9)


def test_serving_agrees_with_training(setup):
    """Decode the true continuation from a stored, restored cache: its loss is the training loss at that point."""
    decoder, module = setup
    seq = torch.randint(3, 96, (1, 36), generator=torch.Generator().manual_seed(3))
    p = 24  # a prefix longer than the sliding windows (12)
    aug = augment(decoder, module, [seq[0, :p].tolist()])[0]
    fp = latent_fingerprint(decoder, module)
    restored = restore(encode_record(aug, doc_id="d", fingerprint=fp, mode="latent_kv", dtype="float32",
                                     spec=decoder.cache_spec), decoder, fp)
    ahead = seq[0, p : p + N_A].tolist()
    logits = [restored.next_logits]
    for k in range(1, N_A):
        ((_, step),) = decode_steps(decoder, restored, ahead[:k], max_new_tokens=1, stop_token_ids=[])
        logits.append(step)
    ce = torch.nn.functional.cross_entropy(torch.stack(logits).float(), torch.tensor(ahead))
    ref = reference_loss(decoder, module, seq, torch.tensor([[p]]), N_A).loss.detach()
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-5)
    plain = torch.nn.functional.cross_entropy(decoder.model(seq[:, : p + N_A - 1]).logits[0, p - 1 :].float(),
                                              torch.tensor(ahead))
    assert abs(float(plain) - float(ref)) > 1e-4  # the latents change what is predicted
