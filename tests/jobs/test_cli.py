"""The `cache-aug` command: every option documented, and the local training command works end to end."""

from __future__ import annotations

import inspect
import json

import pytest

from jobs import cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_help_documents_every_option(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    _, helps = cli._arg_docs(cli.COMMANDS[name])
    for param in inspect.signature(cli.COMMANDS[name]).parameters:
        assert "--" + param.replace("_", "-") in out
        assert helps.get(param), f"{name} --{param} has no help text"


def test_config_command_rejects_bad_override(capsys):
    from cache_aug.config import ConfigError

    with pytest.raises(ConfigError, match="augmentation.n_latents"):
        cli.main(["config", "--set", "augmentation.n_latents=0"])


def test_train_local_end_to_end(tiny_default_dir, tmp_path, capsys):
    out_dir = tmp_path / "cop"
    cli.main([
        "train-local", "--set", f"model.path={tiny_default_dir}", "--set", "augmentation.n_latents=2",
        "--set", "augmentation.points_per_sequence=4", "--set", "optim.max_steps=3", "--set", "data.seq_len=64",
        "--set", "train.micro_batch_size=2",
        "--eval-blocks", "4", "--output", str(out_dir), "--threads", "1",
    ])
    out = capsys.readouterr().out
    assert "none (decoder alone)" in out and "after 3" in out
    meta = json.loads((out_dir / "latents.json").read_text())
    assert meta["n_latents"] == 2 and meta["mode"] == "full"
