"""`cache-aug` command line: each subcommand is a plain typed function; `--help` comes from its docstring.

This is the one definition of every command's flags: each `python -m jobs.<name>` entrypoint is one of these
commands (`main = command("train")`), so `ray job submit ... -- python -m jobs.train` and `cache-aug train`
parse the same flags and call the same function.

    cache-aug pretrain-tiny                      build (or reuse) the embedded default decoder
    cache-aug train-local --set optim.max_steps=300   train a coprocessor locally (no Ray) and evaluate it
    cache-aug train --config jobs/configs/tiny_cpu.yaml   train on a Ray cluster (Ray Train + DeepSpeed)
    cache-aug augment --config jobs/configs/augment_tiny.yaml   precompute caches for a corpus (Ray Data)
    cache-aug compact --config jobs/configs/augment_tiny.yaml   fold the corpus job's finished runs into one snapshot
    cache-aug serve --config jobs/configs/serve_tiny.yaml       OpenAI-compatible completions endpoint (Ray Serve)
    cache-aug demo                               the whole system once: train, augment, serve, ask (local Ray)
    cache-aug eval --config jobs/configs/eval_tiny.yaml   none / pause / coprocessor at the same held-out points
    cache-aug sweep --set optim.max_steps=1000       train and evaluate pause and coprocessor at N_L = 4, 8, 16
    cache-aug sweep --ray --config jobs/configs/sweep_tiny.yaml   the same, each condition trained with Ray Train
    cache-aug config                             print the default configuration with every field documented
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import typing
from collections.abc import Callable, Collection, Mapping


def pretrain_tiny(name: str = "tiny-kjv", force: bool = False) -> None:
    """Build (or reuse) an embedded default decoder, pretrained on the KJV Bible (Debian bible-kjv-text).

    Args:
        name: preset to build (tiny-kjv: ~4M parameters, ~11 min on 2 cores, ~20 on one; test: seconds).
        force: rebuild even if a cached build exists.
    """
    from cache_aug.tiny import ensure_tiny_decoder

    path = ensure_tiny_decoder(name, force=force)
    stats = json.loads((path / "pretrain.json").read_text())
    print(f"{name}: {path}")
    print(json.dumps({k: stats[k] for k in stats if k != "spec"}, indent=2, default=str))


def train_local(
    config: str | None = None,
    set: list[str] | None = None,
    data: str | None = None,
    eval_blocks: int = 64,
    output: str = "runs/local-coprocessor",
    threads: int = 0,
) -> None:
    """Train a coprocessor (or pause tokens) in this process, report held-out ahead-token loss, save it.

    The distributed job is `jobs/train.py`; this is the same math on one process, for a quick check, with the
    same settings: optim.* (steps, rate, schedule), data.seq_len, and train.micro_batch_size x
    train.grad_accum_steps sequences per step (what one worker of the job steps on).

    Args:
        config: YAML config file (the job config tree, pipelines.config.JobConfig); defaults when omitted.
        set: config overrides as dotted key=value, e.g. optim.max_steps=300 or augmentation.n_latents=16.
        data: plain-text corpus (file with blank-line-separated documents, or a dir of .txt files);
            default: the KJV Bible with the embedded decoder's held-out chapters.
        eval_blocks: held-out sequences evaluated before and after training.
        output: directory the trained module is saved to.
        threads: torch CPU threads (0: torch's default).
    """
    import torch

    from cache_aug.blocks import iterate_batches, pack_blocks
    from cache_aug.config import dump_config
    from cache_aug.coprocessor import build_latent_module, save_latent_module
    from cache_aug.corpus import load_kjv, load_text_documents, split_heldout
    from cache_aug.decoder import load_decoder
    from cache_aug.tiny import TINY_SPECS, build_if_embedded
    from cache_aug.training import evaluate
    from cache_aug.training import train_local as run
    from pipelines.config import load_job_config

    if threads:
        torch.set_num_threads(threads)
    cfg = load_job_config(config, overrides=set or ())
    print(dump_config(cfg))
    build_if_embedded(cfg.model.path)  # an embedded decoder is built here, explicitly: loading never builds
    decoder = load_decoder(cfg.model)
    every = TINY_SPECS[cfg.model.path].heldout_every if cfg.model.path in TINY_SPECS else 20
    docs = load_text_documents(data) if data else load_kjv()
    train_docs, heldout_docs = split_heldout(docs, every)
    tok, seq_len = decoder.tokenizer, cfg.data.seq_len
    train = pack_blocks((tok.encode(d.text) for d in train_docs), seq_len, tok.eos_token_id)
    heldout = pack_blocks((tok.encode(d.text) for d in heldout_docs), seq_len, tok.eos_token_id)[:eval_blocks]
    module = build_latent_module(decoder, cfg.coprocessor, cfg.augmentation.n_latents)
    before = evaluate(decoder, module, heldout, cfg.augmentation)
    batch_size = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    run(decoder, module, iterate_batches(train, batch_size, seed=cfg.coprocessor.seed), cfg.augmentation,
        cfg.optim, seed=cfg.train.seed)
    after = evaluate(decoder, module, heldout, cfg.augmentation)
    path = save_latent_module(module, decoder, output)
    print(f"held-out ahead-token perplexity (N_A={cfg.augmentation.n_ahead}, {after.n_targets} targets):")
    print(f"  none (decoder alone)      {after.ppl_none:8.3f}")
    print(f"  {cfg.coprocessor.mode:<6} at step 0          {before.ppl_augmented:8.3f}")
    print(f"  {cfg.coprocessor.mode:<6} after {cfg.optim.max_steps:<5} steps   {after.ppl_augmented:8.3f}")
    print(f"saved to {path}")


def train(config: str | None = None, set: list[str] | None = None, debug_steps: int = 0,
          num_cpus: int | None = None) -> dict:
    """Train a coprocessor on a Ray cluster with Ray Train + DeepSpeed (same as `python -m jobs.train`).

    Joins the cluster named by RAY_ADDRESS, or starts a local one.

    Args:
        config: YAML config file, e.g. jobs/configs/tiny_cpu.yaml; defaults when omitted.
        set: config overrides as dotted key=value, e.g. train.storage_path=s3://bucket/runs.
        debug_steps: smoke run with only this many optimizer steps (0: the configured max_steps).
        num_cpus: logical CPUs of a local cluster started here (default: all).
    """
    from pipelines.train import train_job

    return train_job(config, set or [], debug_steps, num_cpus)


def augment(config: str | None = None, set: list[str] | None = None, num_cpus: int | None = None,
            wanted: bool = False) -> dict:
    """Precompute augmented caches for a corpus with Ray Data (same as `python -m jobs.augment`).

    Incremental: only new or changed documents, or all after a model change, are augmented. The documents that
    serving replicas answered without a stored cache (the wanted queue under corpus.output) are taken alongside.

    Args:
        config: YAML config file, e.g. jobs/configs/augment_tiny.yaml; defaults when omitted.
        set: config overrides as dotted key=value, e.g. corpus.output=s3://bucket/caches.
        num_cpus: logical CPUs of a local cluster started here (default: all).
        wanted: augment only the wanted queue's documents (corpus.wanted=only), their text from the input or
            the queue: a quick run between scheduled ones.
    """
    from pipelines.corpus import augment_job

    return augment_job(config, [*(set or []), *(["corpus.wanted=only"] if wanted else [])], num_cpus)


def compact(config: str | None = None, set: list[str] | None = None, gc_only: bool = False, ray: bool = False,
            num_cpus: int | None = None, fingerprint: str | None = None) -> dict:
    """Fold the corpus job's finished runs into one current snapshot, so a lookup reads one bucket of it.

    Reads and writes under corpus.output (options: the compaction section); deletes folded runs and replaced
    snapshots once compaction.grace_s has passed since their replacement became current. Run it after each
    corpus run (or on its own schedule): it folds only runs that finished.

    Args:
        config: YAML config file, the corpus job's, e.g. jobs/configs/augment_tiny.yaml; defaults when omitted.
        set: config overrides as dotted key=value, e.g. compaction.grace_s=600.
        gc_only: only delete what the grace period has freed (no new snapshot).
        ray: each bucket a Ray task (joins RAY_ADDRESS's cluster, or starts a local one); default: this process.
        num_cpus: logical CPUs of a local Ray cluster started here (with --ray).
        fingerprint: the models' fingerprint the snapshot keeps; default: computed from model.path and
            corpus.coprocessor, as the corpus job computes it.
    """
    from pipelines.compact import compact_job

    return compact_job(config, set or [], gc_only=gc_only, use_ray=ray, num_cpus=num_cpus, fingerprint=fingerprint)


def serve(config: str | None = None, set: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          num_cpus: int | None = None, haproxy: bool = False) -> None:
    """Serve OpenAI-compatible completions over stored augmented caches with Ray Serve, until interrupted.

    Same as `python -m jobs.serve`; `serve run cluster/serve/serve_tiny.yaml` deploys the same app.

    Args:
        config: YAML config file, e.g. jobs/configs/serve_tiny.yaml; defaults when omitted.
        set: config overrides as dotted key=value, e.g. serve.cache_prefix=s3://bucket/caches.
        host: address the HTTP proxy binds (0.0.0.0 only on a private network).
        port: HTTP port.
        num_cpus: logical CPUs of a local cluster started here (default: all).
        haproxy: Serve's HAProxy ingress instead of its Python proxy (lower latency). Takes effect on a
            local cluster started here; a running cluster needs RAY_SERVE_ENABLE_HA_PROXY=1 where it was started.
    """
    import os

    from pipelines.serve import serve_job

    if haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    serve_job(config, set or [], host, port, num_cpus)


def demo(storage: str = "runs/demo", steps: int = 120, docs: int = 24, port: int = 8000, num_cpus: int = 2,
         set: list[str] | None = None) -> None:
    """Run the whole system once on the embedded default: train, augment a corpus, serve, ask.

    Builds (or reuses) the tiny decoder, starts a local Ray cluster, trains a coprocessor with Ray Train +
    DeepSpeed, precomputes caches for a few held-out chapters with the Ray Data job, starts the Serve
    endpoint, asks it for one chapter's continuation with and without the stored cache, prints both and
    the held-out perplexity with and without augmentation, then stops Serve and Ray.

    Args:
        storage: where every artefact goes: a local directory, or s3://bucket/prefix (endpoint and keys from
            the AWS_* variables or s3.* overrides).
        steps: coprocessor training steps.
        docs: held-out chapters augmented by the corpus job.
        port: HTTP port of the endpoint on 127.0.0.1.
        num_cpus: logical CPUs of the local Ray cluster.
        set: further config overrides as dotted key=value, e.g. augmentation.n_latents=4.
    """
    from pipelines.demo import run_demo

    run_demo(storage, steps, docs, port, num_cpus, set or [])


def evaluate(config: str | None = None, set: list[str] | None = None, ray: bool = False,
             num_cpus: int | None = None) -> dict:
    """Evaluate none / pause / coprocessor on held-out text at the same sampled points; write JSON, Markdown and a PNG.

    Reports ahead-token perplexity per ahead position (1..eval.max_ahead), overall (1..N_A) and
    relative to none, with bootstrap confidence intervals over the points, to eval.output.

    Args:
        config: YAML config file, e.g. jobs/configs/eval_tiny.yaml; defaults when omitted.
        set: config overrides as dotted key=value, e.g. eval.coprocessor=runs/sweep/nl8-coprocessor/module.
        ray: spread the documents over a Ray Data actor pool (same as `python -m jobs.evaluate`); default: this process.
        num_cpus: logical CPUs of a local Ray cluster started here (with --ray).
    """
    from cache_aug.config import dump_config
    from pipelines.config import load_job_config

    if ray:
        from pipelines.evaluate import eval_job

        return eval_job(config, set or [], num_cpus)
    from cache_aug.evaluate import run_eval
    from cache_aug.report import markdown_table
    from cache_aug.tiny import build_if_embedded
    from pipelines.storage import is_remote, upload_dir

    cfg = load_job_config(config, overrides=set or ())
    print(dump_config(cfg))
    build_if_embedded(cfg.model.path)
    if is_remote(cfg.eval.output):  # the library writes a local directory; this copies it to object storage
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report = run_eval(cfg, output=tmp)
            upload_dir(tmp, cfg.eval.output, cfg.s3)
    else:
        report = run_eval(cfg)
    print(markdown_table(report))
    print(f"written to {cfg.eval.output} in {report['wall_s']:.1f}s")
    return report


def sweep(config: str | None = None, set: list[str] | None = None, threads: int = 0, ray: bool = False,
          num_cpus: int | None = None) -> list[dict]:
    """Train pause tokens and a coprocessor at each N_L of sweep.n_latents with one budget, and evaluate all three.

    Resumable: re-running skips trained conditions and resumes interrupted ones. With --ray (the same as
    `python -m jobs.sweep`) each condition is trained by the Ray Train + DeepSpeed job.

    Args:
        config: YAML config file; defaults when omitted.
        set: config overrides as dotted key=value, e.g. optim.max_steps=2000 or eval.device=cuda.
        threads: torch CPU threads of this process (0: torch's default).
        ray: train each condition with Ray Train + DeepSpeed; default: the library's loop in this process.
        num_cpus: logical CPUs of a local Ray cluster started here (with --ray).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if ray:
        from pipelines.sweep import sweep_job

        return sweep_job(config, set or [], num_cpus)
    from cache_aug.config import dump_config
    from cache_aug.sweep import run_sweep, sweep_table
    from cache_aug.tiny import build_if_embedded
    from pipelines.config import load_job_config

    cfg = load_job_config(config, overrides=set or ())
    print(dump_config(cfg))
    build_if_embedded(cfg.model.path)
    reports = run_sweep(cfg)
    print(sweep_table(reports))
    return reports


def arithmetic(config: str | None = "jobs/configs/arithmetic_tiny.yaml", set: list[str] | None = None,
               work_dir: str = "runs/arithmetic", results_dir: str = "docs/results/arithmetic", op: str = "*",
               digits: int = 2, decoder_steps: int = 1500, threads: int = 2, modules_dir: str | None = None) -> None:
    """Reasoning check: exact match on held-out arithmetic problems, augmented at `=` vs not (docs/RESULTS.md).

    Pretrains a character-level tiny decoder on a synthetic corpus of `a*b=c` (or `a+b=c`) lines, trains pause
    tokens and a coprocessor per N_L (sweep.*) and reports ahead-token perplexity and exact match of
    the answers for none / pause / coprocessor. Resumable: trained parts are reused.

    Args:
        config: YAML config (sweep.n_latents, optim.*, augmentation.*, coprocessor.*).
        set: config overrides as dotted key=value, e.g. optim.max_steps=400.
        work_dir: corpus, decoder and modules go here.
        results_dir: reports (JSON, Markdown, plots) go here.
        op: the operation, "*" or "+" (the decoder learns 3-digit "+" perfectly: nothing left to gain).
        digits: digits of each operand.
        decoder_steps: pretraining steps of the decoder (batch 16 x 256 characters).
        threads: torch CPU threads.
        modules_dir: where the trained modules go (default <work_dir>/sweep); another directory trains another
            set (e.g. another position rule) on the same corpus and decoder.
    """
    import torch

    from cache_aug.arithmetic import ArithmeticSpec, markdown, run_arithmetic
    from pipelines.config import load_job_config

    torch.set_num_threads(threads)
    cfg = load_job_config(config, overrides=set or ())
    report = run_arithmetic(cfg, ArithmeticSpec(op=op, digits=digits, steps=decoder_steps, threads=threads),
                            work_dir=work_dir, results_dir=results_dir, modules_dir=modules_dir)
    print(markdown(report))


def config(file: str | None = None, set: list[str] | None = None) -> None:
    """Print the resolved configuration as YAML, each field with its documentation.

    Args:
        file: YAML config file to load; defaults when omitted.
        set: overrides as dotted key=value.
    """
    from cache_aug.config import dump_config, field_docs
    from pipelines.config import JobConfig, load_job_config

    cfg = load_job_config(file, overrides=set or ())
    for f in dataclasses.fields(JobConfig):
        section = getattr(cfg, f.name)
        print(f"# {f.name}:")
        for name, doc in field_docs(type(section)).items():
            print(f"#   {name}: {' '.join(doc.split())}")
    print(dump_config(cfg))


COMMANDS: dict[str, Callable] = {
    "pretrain-tiny": pretrain_tiny, "train-local": train_local, "train": train, "augment": augment, "compact": compact,
    "serve": serve, "demo": demo, "eval": evaluate, "sweep": sweep, "arithmetic": arithmetic, "config": config,
}


def _arg_docs(fn: Callable) -> tuple[str, dict[str, str]]:
    """(summary, {arg: help}) from a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    summary, _, rest = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    current = None
    for line in rest.splitlines():
        m = re.match(r"^\s{4}(\w+): (.*)$", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2)
        elif current and line.strip():
            helps[current] += " " + line.strip()
    return summary.strip(), helps


def _add_arguments(parser: argparse.ArgumentParser, fn: Callable, fixed: Collection[str] = ()) -> None:
    """One --flag per parameter of fn (except those named in fixed), typed by its annotation, helped by its
    docstring."""
    hints = typing.get_type_hints(fn)
    _, helps = _arg_docs(fn)
    for name, param in inspect.signature(fn).parameters.items():
        if name in fixed:
            continue
        hint = hints[name]
        flag = "--" + name.replace("_", "-")
        kwargs: dict = {"help": helps.get(name, ""), "default": param.default, "dest": name}
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kwargs.update(action="append", type=typing.get_args(base)[0], metavar="KEY=VALUE")
        else:
            kwargs["type"] = base
        if param.default is not None and hint is not bool:
            kwargs["help"] += f" (default: {param.default})"
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cache-aug", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        summary, _ = _arg_docs(fn)
        p = sub.add_parser(name, help=summary.splitlines()[0], description=summary,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_arguments(p, fn)
    return parser


def main(argv: list[str] | None = None) -> None:
    """`cache-aug <command> ...` (the console script: returns nothing, so the exit status is 0 on success)."""
    args = vars(build_parser().parse_args(argv))
    fn = COMMANDS[args.pop("command")]
    fn(**args)


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand as a `python -m jobs.<name>` entrypoint: `main = command("train")`.

    Its parser is built by the same code from the same function as `cache-aug <name>`'s; `fixed` binds
    parameters the entrypoint does not expose (`python -m jobs.evaluate` is `cache-aug eval --ray`).
    """

    name: str
    fixed: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        params = inspect.signature(COMMANDS[self.name]).parameters
        unknown = sorted(set(self.fixed) - set(params))
        if unknown:
            raise TypeError(f"{self.name} has no parameter {', '.join(unknown)}")

    def parser(self) -> argparse.ArgumentParser:
        fn = COMMANDS[self.name]
        summary, _ = _arg_docs(fn)
        parser = argparse.ArgumentParser(description=summary, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_arguments(parser, fn, self.fixed)
        return parser

    def parse(self, argv: list[str] | None = None) -> dict:
        """The keyword arguments `argv` calls the command's function with (fixed ones included)."""
        return {**vars(self.parser().parse_args(argv)), **self.fixed}

    def __call__(self, argv: list[str] | None = None):
        """Parse argv (default: sys.argv[1:]) and run the command; returns what its function returns."""
        return COMMANDS[self.name](**self.parse(argv))


def command(name: str, **fixed) -> Command:
    """The entrypoint `main` of a jobs/<module>.py: `cache-aug <name>`, with `fixed` parameters bound."""
    return Command(name, fixed)


if __name__ == "__main__":
    sys.exit(main())
