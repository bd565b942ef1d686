"""The one optimiser and schedule: the rates it gives, as a torch scheduler and resumed, and the settings it owns."""

from __future__ import annotations

import math

import pytest
import torch

from cache_aug.config import CacheAugConfig, ConfigError, OptimConfig, load_config
from cache_aug.optim import Schedule, adamw, learning_rate, optimizer_step

OPT = OptimConfig(lr=2.0, warmup_steps=4, max_steps=10)


def test_warmup_then_cosine_to_the_floor():
    assert [learning_rate(s, OPT) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert learning_rate(4, OPT) == pytest.approx(2.0)  # the decay starts at the peak
    assert learning_rate(7, OPT) == pytest.approx(2.0 * 0.55)  # halfway down to 10%
    assert learning_rate(10, OPT) == pytest.approx(0.2) == learning_rate(50, OPT)  # and stays at the floor
    assert learning_rate(9, OptimConfig(lr=2.0, warmup_steps=4, max_steps=10, decay="constant")) == 2.0
    assert learning_rate(0, OptimConfig(lr=2.0, warmup_steps=0, max_steps=10)) == 2.0  # no warmup: the peak at once
    # a loop with its own budget (the tiny pretraining's wall-clock cap) says how far the decay has got
    assert learning_rate(5, OPT, progress=1.0) == pytest.approx(0.2)
    assert learning_rate(5, OPT, progress=0.5) == pytest.approx(2.0 * 0.55)


def test_schedule_gives_those_rates_and_resumes_from_its_state():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    opt = adamw([w], OPT)
    sched = Schedule(opt, OPT)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        w.grad = torch.ones_like(w)
        opt.step()
        sched.step()
    assert seen == [learning_rate(s, OPT) for s in range(12)]
    state = sched.state_dict()
    assert "optim" not in state  # the settings come from the run's config, not from the checkpoint
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    again = Schedule(adamw([w], OPT), OPT)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.get_last_lr() == sched.get_last_lr() == [learning_rate(12, OPT)]


def test_adamw_decays_matrices_only_and_steps_clip_in_the_given_order():
    m = torch.nn.Linear(4, 3)
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    opt = adamw([*m.parameters(), frozen], OptimConfig(weight_decay=0.1, betas=[0.8, 0.9], eps=1e-6))
    groups = [(g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups]
    assert groups == [(0.1, [(3, 4)]), (0.0, [(3,)])]  # the frozen one is not trained
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6
    assert [g["weight_decay"] for g in adamw(m.parameters(), OptimConfig()).param_groups] == [0.0]

    params = list(m.parameters())
    loss = (m(torch.ones(1, 4)) * 100).sum()
    optimizer_step(loss, opt, params, grad_clip=0.5)
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
    assert norm == pytest.approx(0.5, rel=1e-5)  # clipped before the step


def test_the_section_is_checked_and_old_keys_say_where_they_went():
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        load_config({"optim": {"min_lr_ratio": 2}})
    with pytest.raises(ConfigError, match="optim.betas"):
        load_config({"optim": {"betas": [0.9]}})
    with pytest.raises(ConfigError, match=r"train\.lr: moved to optim\.lr"):
        load_config({"train": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"sweep\.steps: moved to optim\.max_steps"):
        load_config(None, overrides=["sweep.steps=5"])
    assert load_config(None, overrides=["optim.max_steps=5"]).optim.max_steps == 5
    assert isinstance(CacheAugConfig().optim, OptimConfig)
