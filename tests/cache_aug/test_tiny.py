"""Tests for the embedded tiny decoder (cache_aug.corpus, cache_aug.tiny, .tiny_spec, .tiny_pretrain)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import random
import re
import shutil
import threading

import pytest
import torch

from cache_aug.corpus import (
    Document,
    load_kjv,
    load_text_documents,
    parse_kjv,
    split_heldout,
)
from cache_aug.paths import cache_home
from cache_aug.tiny import (
    TINY_SPECS,
    EmbeddedDecoderNotBuilt,
    build_if_embedded,
    built_tiny_decoder,
    ensure_tiny_decoder,
    is_embedded_name,
)
from cache_aug.tiny_pretrain import pretrain_tiny, train_tokenizer
from cache_aug.tiny_spec import build_threads, spec_hash

needs_bible = pytest.mark.skipif(
    shutil.which("bible") is None, reason="Debian packages bible-kjv bible-kjv-text not installed"
)


# --------------------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def kjv() -> list[Document]:
    if shutil.which("bible") is None:
        pytest.skip("Debian packages bible-kjv bible-kjv-text not installed")
    return load_kjv()


def test_kjv_chapters_and_verses(kjv):
    assert len(kjv) == 1189
    assert sum(len(d.text.split("\n")) for d in kjv) == 31102
    assert kjv[0].doc_id == "Ge 1"
    assert kjv[0].text.startswith("In the beginning God created the heaven and the earth.\n")
    assert kjv[-1].doc_id == "Rev 22"
    assert len({d.doc_id for d in kjv}) == 1189
    # books whose abbreviation starts with a digit are parsed as such
    assert any(re.match(r"^[1-3][A-Za-z]+ \d+$", d.doc_id) for d in kjv)
    # no verse references left in the text
    ref = re.compile(r"^[1-3]?[A-Za-z]+\d+:\d+ ", re.MULTILINE)
    assert not any(ref.search(d.text) for d in kjv)


def test_parse_errors_name_the_line():
    with pytest.raises(ValueError, match="line 2"):
        parse_kjv("Ge1:1 In the beginning.\nthis is not a verse\n")
    with pytest.raises(ValueError, match="line 2"):
        parse_kjv("Ge1:1 a.\nGe1:3 skipped a verse.\n")


def test_missing_bible_program_is_explained():
    with pytest.raises(RuntimeError, match="bible-kjv bible-kjv-text") as ei:
        load_kjv(bible_exe="definitely-not-a-bible-program")
    assert "apt-get install" in str(ei.value)


def test_heldout_split_disjoint_and_deterministic(kjv):
    train, held = split_heldout(kjv, 20)
    assert len(held) == 1189 // 20
    assert len(train) + len(held) == len(kjv)
    assert {d.doc_id for d in train}.isdisjoint({d.doc_id for d in held})
    train2, held2 = split_heldout(list(kjv), 20)
    assert train2 == train and held2 == held
    assert held[0] == kjv[19]


def test_split_small_and_invalid():
    docs = [Document(str(i), f"text {i}") for i in range(3)]
    train, held = split_heldout(docs, 20)
    assert len(held) == 1 and len(train) == 2
    with pytest.raises(ValueError):
        split_heldout(docs, 1)


def test_load_text_documents(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("first doc\nline two\n\n  \nsecond doc\n\n\n\nthird\n", encoding="utf-8")
    docs = load_text_documents(f)
    assert [d.text for d in docs] == ["first doc\nline two", "second doc", "third"]
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee", encoding="utf-8")
    (d / "sub" / "a.txt").write_text("ay\n\nstill ay", encoding="utf-8")
    (d / "skip.md").write_text("not text", encoding="utf-8")
    (d / "empty.txt").write_text("  \n", encoding="utf-8")
    docs = load_text_documents(d)
    assert [(x.doc_id, x.text) for x in docs] == [("b.txt", "bee"), ("sub/a.txt", "ay\n\nstill ay")]
    with pytest.raises(FileNotFoundError):
        load_text_documents(tmp_path / "nope")


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_unicode(tmp_path):
    from transformers import AutoTokenizer

    corpus = ["In the beginning God created the heaven and the earth."] * 20 + ["hello world"] * 20
    tok = train_tokenizer(corpus, 300)
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    rng = random.Random(0)
    samples = [
        "",
        " leading and trailing spaces  ",
        "héllo wörld — ÆØÅ ß 中文字符 日本語 한국어 Ελληνικά עברית",
        "emoji 🤖👍🏽 and combining e\u0301 and zero\u200bwidth",
        "tabs\tand\nnewlines\r\n\n  indented",
        "In the beginning God created the heaven and the earth.",
        "ctrl \x00\x01\x7f chars",
        "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(300)),
        "".join(chr(rng.choice([rng.randrange(0x1F300, 0x1FAFF), rng.randrange(32, 127)])) for _ in range(200)),
    ]
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
        assert loaded.encode(s, add_special_tokens=False) == ids
        assert loaded.decode(ids) == s
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id


# --------------------------------------------------------------------------- presets / cache


def test_presets_and_names(monkeypatch, tmp_path):
    spec = TINY_SPECS["tiny-kjv"]
    assert spec.threads == 0 and spec.num_layers == 4 and spec.hidden_size == 256
    assert is_embedded_name("tiny-kjv") and is_embedded_name("test")
    assert not is_embedded_name("gpt2") and not is_embedded_name("/some/path")
    assert spec_hash(spec) == spec_hash(TINY_SPECS["tiny-kjv"]) != spec_hash(TINY_SPECS["test"])
    # how a build runs is not what it builds; the recipe is
    # how a build reports is not what it builds; the recipe is, and so is its thread count (resolved)
    assert spec_hash(dataclasses.replace(spec, log_every=7)) == spec_hash(spec)
    assert spec_hash(dataclasses.replace(spec, threads=build_threads(spec))) == spec_hash(spec)
    assert spec_hash(dataclasses.replace(spec, threads=build_threads(spec) + 1)) != spec_hash(spec)
    fewer_steps = dataclasses.replace(spec.optim, max_steps=1299)
    assert spec_hash(dataclasses.replace(spec, optim=fewer_steps)) != spec_hash(spec)
    monkeypatch.setenv("CACHE_AUG_HOME", str(tmp_path / "home"))
    assert cache_home() == tmp_path / "home"
    monkeypatch.delenv("CACHE_AUG_HOME")
    assert cache_home().parts[-2:] == (".cache", "cache-aug")
    with pytest.raises(ValueError, match="tiny-kjv"):
        ensure_tiny_decoder("no-such-model", root=tmp_path)
    with pytest.raises(ValueError, match="tiny-kjv"):
        built_tiny_decoder("no-such-model", root=tmp_path)


def test_same_recipe_and_thread_count_build_the_same_bytes(kjv, tmp_path, monkeypatch):
    """A build is reproducible: the same recipe on the same thread count, twice, gives identical weights (another
    thread count may not, which is why `spec_hash` includes it). The second build runs on a machine that is slow at
    first (its clock runs 200 s a reading for the first 15 readings, inside the cap): the schedule follows the
    steps, never the clock, so other work on the machine cannot change what is built."""
    import time as real_time

    from cache_aug import tiny_pretrain

    docs = kjv[:200]
    spec = dataclasses.replace(TINY_SPECS["test"], optim=dataclasses.replace(TINY_SPECS["test"].optim, max_steps=30),
                               threads=2, max_minutes=60.0)
    built = []
    for run in range(2):
        if run == 1:
            readings = [0]

            def lumpy(readings=readings) -> float:
                readings[0] += 1
                return 1e6 + min(readings[0], 15) * 200.0 + real_time.perf_counter()

            monkeypatch.setattr(tiny_pretrain, "time", type("Clock", (), {
                "time": staticmethod(lumpy), "strftime": staticmethod(real_time.strftime),
                "time_ns": staticmethod(real_time.time_ns)}))
        info = pretrain_tiny(tmp_path / f"run{run}", spec, docs=docs, log=lambda m: None)
        built.append((tmp_path / f"run{run}" / "model.safetensors").read_bytes())
        assert info["stop_reason"] == "max_steps" and info["steps"] == 30
    assert info["train_seconds"] > 0.5 * spec.max_minutes * 60  # the clock ran ahead of the steps
    assert built[0] == built[1]
    assert json.loads((tmp_path / "run0" / "pretrain.json").read_text())["threads"] == 2


def test_failed_build_leaves_nothing(tmp_path):
    docs = [Document(str(i), "tiny") for i in range(4)]
    out = tmp_path / "models" / "broken"
    with pytest.raises(ValueError, match="too small"):
        pretrain_tiny(out, TINY_SPECS["test"], docs=docs, log=lambda _: None)
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("bible") is None:
        pytest.skip("Debian packages bible-kjv bible-kjv-text not installed")
    root = tmp_path_factory.mktemp("tiny_home")
    logs: list[str] = []
    threads = torch.get_num_threads()
    path = ensure_tiny_decoder("test", root=root, log=logs.append)
    assert torch.get_num_threads() == threads  # restored after the build
    return root, path, logs


def test_build_is_loadable_and_learned(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, path, logs = built
    assert path.parent == root / "models" and path.name.startswith("test-")
    assert any("building" in line for line in logs)
    assert (path / "model.safetensors").is_file()
    info = json.loads((path / "pretrain.json").read_text())
    spec = TINY_SPECS["test"]
    assert info["spec"]["hidden_size"] == spec.hidden_size
    assert info["steps"] > 0 and info["params"] > 0
    assert math.isfinite(info["heldout_ppl"])
    assert info["heldout_ppl"] < info["vocab_size"] / 4  # it learned something
    assert "King James" in info["corpus"]

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings
    assert cfg.max_position_embeddings >= 2048
    assert cfg.eos_token_id == cfg.bos_token_id == tok.eos_token_id
    assert cfg.pad_token_id == tok.pad_token_id
    text = "And God said, Let there be light"
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert math.isfinite(out.loss.item()) and out.loss.item() < math.log(info["vocab_size"])
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    # no leftovers of the atomic write next to the model
    assert [p.name for p in (root / "models").iterdir() if not p.name.endswith(".lock")] == [path.name]


def test_second_call_reuses(built):
    root, path, _ = built
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    logs: list[str] = []
    again = ensure_tiny_decoder("test", root=root, log=logs.append)
    assert again == path and logs == []
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_waiter_reuses_concurrent_build(built):
    """While another holder has the lock, a second caller waits, then reuses the result."""
    root, path, _ = built
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    logs: list[str] = []
    result: list = []
    with open(root / "models" / f".{path.name}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        # force=True would rebuild, but a waiter reuses what the lock holder built
        t = threading.Thread(
            target=lambda: result.append(ensure_tiny_decoder("test", root=root, force=True, log=logs.append))
        )
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive()  # blocked on the lock
        fcntl.flock(fh, fcntl.LOCK_UN)
    t.join(timeout=30)
    assert not t.is_alive()
    assert result == [path]
    assert any("waiting" in line for line in logs) and not any("building" in line for line in logs)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------- loading never builds


@pytest.fixture
def no_training(monkeypatch):
    """Any pretraining started from here on fails the test at once (instead of training for minutes)."""
    import cache_aug.tiny

    def refuse(*args, **kwargs):
        raise AssertionError("pretrain_tiny was called: loading a decoder started a build")

    monkeypatch.setattr(cache_aug.tiny, "pretrain_tiny", refuse)


@pytest.mark.parametrize("name", ["test", "tiny-kjv"])
def test_loading_an_unbuilt_embedded_decoder_names_the_build_command_and_builds_nothing(name, tmp_path, monkeypatch,
                                                                                        no_training):
    from cache_aug.config import ModelConfig
    from cache_aug.decoder import load_decoder

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CACHE_AUG_HOME", str(home))
    with pytest.raises(EmbeddedDecoderNotBuilt) as err:
        load_decoder(ModelConfig(path=name))
    message = str(err.value)
    assert f"`cache-aug pretrain-tiny --name {name}`" in message
    assert f"embedded decoder {name!r} is not built" in message
    assert str(home / "models" / f"{name}-{spec_hash(TINY_SPECS[name])}") in message
    assert isinstance(err.value, FileNotFoundError)
    assert list(home.iterdir()) == []  # nothing built, no directory or lock file made


@pytest.mark.parametrize("name", ["test", "tiny-kjv"])
def test_the_named_command_is_the_cli_command_that_builds_that_preset(name, tmp_path, monkeypatch):
    """The command in the error is real: `cache-aug`'s entry point (as pyproject.toml names it) parses it into a
    build of exactly that preset."""
    import importlib
    import shlex
    from pathlib import Path

    import cache_aug.tiny
    from cache_aug.tiny import build_command

    argv = shlex.split(build_command(name))
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    script = rf'^\[project\.scripts\]\n(?:.*\n)*?{re.escape(argv[0])} = "([\w.]+):(\w+)"'
    entry = re.search(script, pyproject, re.MULTILINE)
    assert entry, f"pyproject.toml names no {argv[0]} script"
    module, func = entry.groups()
    built = tmp_path / "built"
    built.mkdir()
    (built / "pretrain.json").write_text("{}")
    asked = []
    monkeypatch.setattr(cache_aug.tiny, "ensure_tiny_decoder", lambda n, **kw: asked.append((n, kw)) or built)
    getattr(importlib.import_module(module), func)(argv[1:])
    assert asked == [(name, {"force": False})]


def test_an_explicit_build_is_found_by_name_and_reused(built, monkeypatch, no_training):
    """After the explicit build, loading by name (what every Ray actor and worker does) finds it and builds nothing;
    `build_if_embedded`, a job's build step, reuses it too and leaves other paths alone."""
    from cache_aug.config import ModelConfig
    from cache_aug.decoder import load_decoder, resolve_checkpoint

    root, path, _ = built
    monkeypatch.setenv("CACHE_AUG_HOME", str(root))
    before = sorted(p.name for p in (root / "models").iterdir())
    assert built_tiny_decoder("test") == resolve_checkpoint("test") == path
    decoder = load_decoder(ModelConfig(path="test"))
    assert decoder.source == "test" and decoder.config.hidden_size == TINY_SPECS["test"].hidden_size
    logs: list[str] = []
    assert build_if_embedded("test", log=logs.append) == path and logs == []
    assert build_if_embedded(str(path)) is None and build_if_embedded("s3://bucket/model") is None
    assert sorted(p.name for p in (root / "models").iterdir()) == before
    with pytest.raises(EmbeddedDecoderNotBuilt, match="pretrain-tiny --name tiny-kjv"):  # another preset: not built
        load_decoder(ModelConfig(path="tiny-kjv"))
