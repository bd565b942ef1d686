"""`python -m jobs.<name>` and `cache-aug <command>` are one definition: same parser code, same function, same flags.

The flags the entrypoints had when each wrote its own argparse parser are what READMEs, cluster/ manifests, job
configs and tests invoke; they must keep parsing to the same call of the pipelines job.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import re
import runpy
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from jobs import cli

ROOT = Path(__file__).resolve().parents[2]

# entrypoint module -> (cache-aug command, parameters it binds instead of exposing)
ENTRYPOINTS = {
    "train": ("train", {}),
    "augment": ("augment", {}),
    "serve": ("serve", {}),
    "evaluate": ("eval", {"ray": True}),
    "sweep": ("sweep", {"ray": True}),
    "compact": ("compact", {"ray": True}),
}

# The flags of the hand-written parsers the entrypoints had (besides -h/--help).
OLD_FLAGS = {
    "train": {"--config", "--set", "--debug-steps", "--num-cpus"},
    "augment": {"--config", "--set", "--num-cpus"},
    "serve": {"--config", "--set", "--host", "--port", "--num-cpus"},
    "evaluate": {"--config", "--set", "--num-cpus"},
    "sweep": {"--config", "--set", "--num-cpus"},
    "compact": {"--config", "--set", "--num-cpus", "--gc-only", "--fingerprint"},  # new: no old parser
}

# entrypoint -> (pipelines module, job function it ends in, argv beyond ARGV, the positional arguments the old
# parser passed the job for ARGV + that, and for no arguments at all). jobs.sweep's old main is now
# pipelines.sweep.sweep_job, moved unchanged.
ARGV = ["--config", "jobs/configs/x.yaml", "--set", "a.b=1", "--set=c.d=two", "--num-cpus", "3"]
CALLS = {
    "train": ("pipelines.train", "train_job", ["--debug-steps", "4"],
              ("jobs/configs/x.yaml", ["a.b=1", "c.d=two"], 4, 3), (None, [], 0, None)),
    "augment": ("pipelines.corpus", "augment_job", [],
                ("jobs/configs/x.yaml", ["a.b=1", "c.d=two"], 3), (None, [], None)),
    "serve": ("pipelines.serve", "serve_job", ["--host", "0.0.0.0", "--port", "8123"],
              ("jobs/configs/x.yaml", ["a.b=1", "c.d=two"], "0.0.0.0", 8123, 3), (None, [], "127.0.0.1", 8000, None)),
    "evaluate": ("pipelines.evaluate", "eval_job", [],
                 ("jobs/configs/x.yaml", ["a.b=1", "c.d=two"], 3), (None, [], None)),
    "sweep": ("pipelines.sweep", "sweep_job", [],
              ("jobs/configs/x.yaml", ["a.b=1", "c.d=two"], 3), (None, [], None)),
    "compact": ("pipelines.compact", "compact_job", ["--gc-only"],
                ("jobs/configs/x.yaml", ["a.b=1", "c.d=two"], True, True, 3, None),
                (None, [], False, True, None, None)),
}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _cache_aug_subparser(command: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def _run_as_main(module: str, argv: list[str], monkeypatch) -> list[argparse.ArgumentParser]:
    """Run `python -m jobs.<module> argv` in this process (runpy, as __main__); returns the parsers that parsed argv."""
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "jobs" / f"{module}.py"), *argv])
    monkeypatch.delitem(sys.modules, f"jobs.{module}", raising=False)  # as a fresh `python -m` finds it
    try:
        runpy.run_module(f"jobs.{module}", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        assert exit_.code == 0, exit_
    return parsers


def _fake_job(monkeypatch, module: str, function: str, calls: list) -> object:
    """Stand in for the pipelines job (no Ray here): records its arguments, returns a marker."""
    result = object()

    def job(*args, **kwargs):
        calls.append(args + tuple(kwargs.values()))
        return result

    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{function: job}))
    return result


@pytest.mark.parametrize("module", sorted(ENTRYPOINTS))
def test_python_m_jobs_and_cache_aug_expose_the_same_flags(module, monkeypatch, capsys):
    """`python -m jobs.<module> --help` parses with a parser whose option strings are the cache-aug command's."""
    command, fixed = ENTRYPOINTS[module]
    (job_parser,) = _run_as_main(module, ["--help"], monkeypatch)
    assert capsys.readouterr().out.startswith("usage:")
    hidden = {f"--{p.replace('_', '-')}" for p in fixed} | {f"--no-{p.replace('_', '-')}" for p in fixed}
    cache_aug_flags = _flags(_cache_aug_subparser(command))
    assert hidden <= cache_aug_flags
    assert _flags(job_parser) == cache_aug_flags - hidden
    assert _flags(cli.command(command, **fixed).parser()) == _flags(job_parser)
    # every flag the old hand-written parser accepted, spelled the same
    assert OLD_FLAGS[module] | {"-h", "--help"} <= _flags(job_parser)


def test_python_m_jobs_train_and_cache_aug_train_are_one_parser():
    assert _flags(cli.command("train").parser()) == _flags(_cache_aug_subparser("train")) == {
        "-h", "--help", "--config", "--set", "--debug-steps", "--num-cpus"}


@pytest.mark.parametrize("module", sorted(ENTRYPOINTS))
def test_both_routes_make_the_old_parsers_call(module, monkeypatch):
    """`python -m jobs.<module>` and `cache-aug <command>` call the pipelines job as the old parsers did."""
    command, fixed = ENTRYPOINTS[module]
    target, function, extra, expected, defaults = CALLS[module]
    calls: list[tuple] = []
    result = _fake_job(monkeypatch, target, function, calls)
    argv = [*ARGV, *extra]

    assert _run_as_main(module, argv, monkeypatch), "python -m parsed nothing"
    assert _run_as_main(module, [], monkeypatch)
    hidden = [f"--{p}" for p, v in fixed.items() if v is True]
    cli.main([command, *hidden, *argv])
    cli.main([command, *hidden])

    entry = importlib.import_module(f"jobs.{module}")
    # what the old main returned: the job's result (jobs.serve's returned nothing: the endpoint runs until interrupted)
    assert entry.main(argv) is (None if module == "serve" else result)
    assert calls == [expected, defaults, expected, defaults, expected]


def test_each_entrypoint_is_a_cache_aug_command_with_its_submit_command():
    modules = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if p.stem not in ("__init__", "cli"))
    assert modules == sorted(ENTRYPOINTS)
    for module in modules:
        entry = importlib.import_module(f"jobs.{module}")
        command, fixed = ENTRYPOINTS[module]
        assert isinstance(entry.main, cli.Command) and entry.main == cli.command(command, **fixed), module
        assert entry.__doc__ and f"cache-aug {command}" in entry.__doc__, module
        header = (ROOT / "jobs" / f"{module}.py").read_text().split('"""')[0]
        assert f"ray job submit --working-dir . -- python -m jobs.{module} --config jobs/configs/" in header, module


def test_python_m_jobs_runs_from_the_repository_root():
    for module in sorted(ENTRYPOINTS):
        out = subprocess.run([sys.executable, "-m", f"jobs.{module}", "--help"], cwd=ROOT, capture_output=True,
                             text=True, check=False)
        assert out.returncode == 0 and out.stdout.startswith("usage:"), (module, out.stderr)


def test_the_console_script_is_jobs_cli_main():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"cache-aug": "jobs.cli:main"}
    module, _, attr = scripts["cache-aug"].partition(":")
    assert getattr(importlib.import_module(module), attr) is cli.main


def documented_invocations() -> list[tuple[str, str, list[str]]]:
    """(file, command line, argv for cli.main) of every `python -m jobs.<name> ...` and `cache-aug <command> ...`
    written in the repository's tracked files (docs, READMEs, cluster/ manifests, job configs, scripts, docstrings;
    tests invoke theirs themselves). A command line ends at a backtick, a comment, a shell operator or two spaces
    (an aligned comment column) or a closing string quote; shell expansions like "${overrides[@]}" are left out."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    commands = "|".join(sorted(map(re.escape, cli.COMMANDS), key=len, reverse=True))
    pattern = re.compile(r"(?:python3? -m jobs\.(\w+)|cache-aug (" + commands + r"))(?![\w-])"
                         r"((?:(?! {2}| *[`#|;&\n]| *\"(?=,))[^\n])*)")
    found = []
    for name in files:
        if name.startswith(("tests/", "docs/results/", "bench/results/")):
            continue
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        text = re.sub(r"[ \t]*\\\n\s*(?:#\s*)?", " ", text)  # shell line continuations (also in comments)
        for m in pattern.finditer(text):
            module, command, rest = m.groups()
            if rest.count('"') % 2:  # the quote that closes the string the command is written in (code, YAML)
                rest = rest[: rest.rindex('"')]
            args = [t for t in shlex.split(rest) if not t.startswith("$")]
            if module is None:
                found.append((name, m.group(0).strip(), [command, *args]))
            elif module == "cli":
                found.append((name, m.group(0).strip(), args))
            else:
                found.append((name, m.group(0).strip(), [f"jobs.{module}", *args]))
    return found


def test_every_documented_invocation_parses():
    invocations = documented_invocations()
    where = {name for name, _, _ in invocations}
    assert {"README.md", "docs/RESULTS.md", "cluster/kuberay/train-rayjob.yaml", "cluster/kuberay/augment-cronjob.yaml",
            "jobs/configs/tiny_cpu.yaml", "bench/real_model_gpu.sh"} <= where
    assert {argv[0] for _, _, argv in invocations if argv[0].startswith("jobs.")} == {f"jobs.{m}" for m in ENTRYPOINTS}
    parsers = {f"jobs.{m}": importlib.import_module(f"jobs.{m}").main.parser() for m in ENTRYPOINTS}
    cache_aug = cli.build_parser()
    failed = []
    for name, line, argv in invocations:
        if argv[0].startswith("jobs."):
            assert argv[0] in parsers, f"{name}: {line}: no such entrypoint"
            parser, args = parsers[argv[0]], argv[1:]
        else:
            parser, args = cache_aug, argv
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(args)
        except SystemExit:
            failed.append(f"{name}: {line}\n    {err.getvalue().strip().splitlines()[-1]}")
    assert not failed, "documented command lines the parsers refuse:\n" + "\n".join(failed)


def argument_parsers(path: Path) -> list[str]:
    """`file:line` of every argparse.ArgumentParser constructed in the file (also through `from argparse import`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {"ArgumentParser"} | {
        alias.asname for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "argparse"
        for alias in node.names if alias.name == "ArgumentParser" and alias.asname}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in names:
                found.append(f"{path.name}:{node.lineno}")
    return sorted(found, key=lambda hit: int(hit.rsplit(":", 1)[1]))


def test_only_jobs_cli_constructs_an_argument_parser():
    files = sorted((ROOT / "jobs").rglob("*.py"))
    assert argument_parsers(ROOT / "jobs" / "cli.py"), "the scanner finds the one definition's parsers"
    found = [hit for p in files if p.name != "cli.py" for hit in argument_parsers(p)]
    assert not found, (
        "an entrypoint builds its own parser (define the flags once, in jobs/cli.py):\n" + "\n".join(found))


def test_the_parser_scanner_sees_every_form(tmp_path):
    probe = tmp_path / "probe.py"
    lines = [
        "import argparse",                                        # 1
        "from argparse import ArgumentParser as AP",              # 2
        "ap = argparse.ArgumentParser()",                         # 3 found
        "def main():",                                            # 4
        "    return AP(description='x')",                         # 5 found
        "p = ArgumentParser",                                     # 6 a name, no construction
        "n = argparse.Namespace()",                               # 7
    ]
    probe.write_text("\n".join(lines) + "\n")
    assert argument_parsers(probe) == ["probe.py:3", "probe.py:5"]


def test_augment_wanted_takes_only_the_queue(monkeypatch):
    """`cache-aug augment --wanted` is the corpus job with corpus.wanted=only, after the user's overrides."""
    calls: list[tuple] = []
    _fake_job(monkeypatch, "pipelines.corpus", "augment_job", calls)
    cli.main(["augment", "--set", "a.b=1", "--wanted"])
    cli.main(["augment", "--set", "a.b=1"])
    assert calls == [(None, ["a.b=1", "corpus.wanted=only"], None), (None, ["a.b=1"], None)]
