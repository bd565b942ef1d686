"""Ray Train + DeepSpeed: train the coprocessor against a frozen decoder, with checkpoints and resume.

Each worker builds the frozen decoder and the trainable latent module, and wraps only the latter
with `deepspeed.initialize`. It streams its shard of packed blocks from Ray Data, samples B
augmentation points per sequence and takes the one-pass ahead-token loss from `cache_aug`.

Checkpoints: every rank calls `engine.save_checkpoint` into a temp dir, then `ray.train.report`
with it; Ray Train uploads them to `storage_path/run_name` (local or s3://). Re-running with the
same run name resumes from the latest checkpoint at the same optimizer step (the data stream
restarts from its beginning). A failed worker group is restarted up to `max_failures` times, from
the latest checkpoint. At the end, rank 0 exports the trained module in cache_aug format.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from cache_aug.config import from_dict, to_dict
from cache_aug.coprocessor import (
    build_latent_module,
    latent_fingerprint,
    save_latent_module,
)
from cache_aug.decoder import load_decoder
from cache_aug.devices import choose_device
from cache_aug.losses import ahead_sums, one_pass_loss, sample_points
from cache_aug.optim import Schedule
from cache_aug.tiny import build_if_embedded
from pipelines.config import JobConfig
from pipelines.data import training_datasets
from pipelines.ray_session import init_ray
from pipelines.storage import resolve, upload_dir

CKPT_TAG = "ckpt"
FAIL_ONCE_ENV = "CACHE_AUG_FAIL_ONCE"  # "STEP:MARKER_PATH": raise once at STEP (fault-injection tests)


def deepspeed_config(cfg: JobConfig) -> dict:
    """The JSON from `train.deepspeed_config` (ZeRO, precision, optimizer implementation), with the batch sizes,
    clipping and AdamW's settings filled in from the config. The schedule is the library's one
    (:class:`cache_aug.optim.Schedule`, passed to DeepSpeed as its client scheduler), so the JSON holds none."""
    t, o = cfg.train, cfg.optim
    path = Path(t.deepspeed_config)
    if not path.exists():
        raise FileNotFoundError(f"train.deepspeed_config: {path} does not exist (cwd {os.getcwd()})")
    ds = json.loads(path.read_text())
    for key in ("scheduler", "gradient_clipping", "train_batch_size"):
        if key in ds:
            raise ValueError(f"train.deepspeed_config: {path} sets {key!r}, which comes from the job config "
                             f"(optim.* and train.*): remove it from the JSON")
    ds.update(
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        train_batch_size=t.micro_batch_size * t.grad_accum_steps * t.num_workers,
        gradient_clipping=o.grad_clip,
        steps_per_print=10**9,
    )
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = ds["optimizer"].setdefault("params", {})
    for key in ("lr", "betas", "eps", "weight_decay"):
        if key in params:
            raise ValueError(f"train.deepspeed_config: {path} sets optimizer.params.{key}, which comes from "
                             f"optim.{key}: remove it from the JSON")
    params.update(lr=o.lr, betas=list(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if t.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = t.zero_stage
    return ds


def _skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory op (~90 s) on first use; gloo needs none of it."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _maybe_fail(step: int) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if step == int(at) and not os.path.exists(marker):
        Path(marker).write_text(f"failed at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_ONCE_ENV})")


def _has_frozen(module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _evaluate(decoder, engine, cfg: JobConfig, rank: int, world: int, device) -> dict:
    """Held-out ahead loss with and without augmentation, at the same seeded points, over all ranks."""
    t = cfg.train
    batches = ray.train.get_dataset_shard("eval").iter_torch_batches(batch_size=t.micro_batch_size, dtypes=torch.long)
    mine = (b["input_ids"] for i, b in enumerate(islice(batches, t.eval_batches * world)) if i % world == rank)
    loss, _, count = ahead_sums(decoder, engine, mine, cfg.augmentation, torch.Generator().manual_seed(t.seed + 7))
    tot_a, tot_n, count = _all_reduce_sum([loss["augmented"], loss["none"], count], device)
    if count == 0:
        return {}
    return {
        "eval_ahead_loss": tot_a / count,
        "eval_ahead_loss_none": tot_n / count,
        "eval_ppl": math.exp(tot_a / count),
        "eval_ppl_none": math.exp(tot_n / count),
        "eval_targets": int(count),
    }


def _export(engine, module, decoder, cfg: JobConfig, rank: int) -> str | None:
    """Rank 0 writes the trained module in cache_aug format to the export path (all ranks gather under ZeRO-3)."""
    import deepspeed

    dest = cfg.train.export_path or f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.run_name}/export"
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if rank != 0:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            save_latent_module(module, decoder, tmp)
            upload_dir(tmp, dest, cfg.s3)
    return dest


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import deepspeed

    cfg: JobConfig = from_dict(JobConfig, loop_config["config"])
    t, aug = cfg.train, cfg.augmentation
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # train.use_gpu is the device setting; which of the node's GPUs is this rank's, Ray Train says
    device = choose_device(str(ray.train.torch.get_device()) if t.use_gpu else "cpu", cpus=t.torch_threads or None)
    if not t.use_gpu:
        _skip_cpu_shm_build()

    decoder = load_decoder(cfg.model, device=device, s3=cfg.s3)
    module = build_latent_module(decoder, cfg.coprocessor, aug.n_latents)
    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=module, model_parameters=trainable,
                                                   lr_scheduler=lambda opt: Schedule(opt, cfg.optim),
                                                   config=loop_config["deepspeed"])

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            # frozen weights (LoRA's base copy) are not in the checkpoint: they are rebuilt from the decoder
            engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=not _has_frozen(module))
    step = engine.global_steps
    start_step = step
    if rank == 0:
        print(f"[train] rank 0/{world}: {'resumed at' if checkpoint else 'starting at'} step {step}; "
              f"trainable {sum(getattr(p, 'ds_numel', p.numel()) for p in trainable):,} params ({module.mode}), "
              f"decoder {decoder.source}", flush=True)

    shard = ray.train.get_dataset_shard("train")
    g = torch.Generator().manual_seed(t.seed * 1_000_003 + rank * 7919 + step)
    interval_loss, interval_n, tokens, t0 = 0.0, 0, 0, time.perf_counter()
    micro = 0
    while step < cfg.optim.max_steps:
        micro_before = micro
        for batch in shard.iter_torch_batches(batch_size=t.micro_batch_size, dtypes=torch.long, drop_last=True):
            ids = batch["input_ids"].to(device)
            points = sample_points(ids.shape[0], ids.shape[1], aug.points_per_sequence, aug.n_ahead, aug.min_prefix,
                                   g).to(device)
            loss = one_pass_loss(decoder, engine, ids, points, aug.n_ahead).loss
            engine.backward(loss)
            engine.step()
            micro += 1
            interval_loss += loss.item()
            interval_n += 1
            tokens += ids.numel()
            if micro % t.grad_accum_steps:
                continue
            step = engine.global_steps
            _maybe_fail(step)
            last = step >= cfg.optim.max_steps
            if step % t.checkpoint_every and step % t.eval_every and not last:
                continue
            elapsed = time.perf_counter() - t0
            loss_sum, n_sum, tok_sum = _all_reduce_sum([interval_loss, interval_n, tokens], device)
            metrics = {
                "step": step,
                "loss": loss_sum / max(n_sum, 1),
                "tokens_per_s": tok_sum / elapsed,
                "lr": scheduler.get_last_lr()[0],
                "resumed_from_step": start_step,
            }
            if step % t.eval_every == 0 or last:
                metrics |= _evaluate(decoder, engine, cfg, rank, world, device)
            if step % t.checkpoint_every == 0 or last:
                with tempfile.TemporaryDirectory() as tmp:
                    engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"step": step},
                                           exclude_frozen_parameters=True)
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
            if rank == 0:
                print("[train] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in metrics.items()), flush=True)
            interval_loss, interval_n, tokens, t0 = 0.0, 0, 0, time.perf_counter()
            if last:
                break
        if micro == micro_before:  # a whole pass gave no batch: another pass would not either
            raise RuntimeError(
                f"training data: rank {rank}'s shard of {cfg.data.paths} gave no batch of {t.micro_batch_size} blocks "
                f"of {cfg.data.seq_len} tokens in a whole pass (too little text for {world} workers, or every row's "
                f"{cfg.data.text_column!r} null or empty); add text, or lower train.micro_batch_size or data.seq_len")

    export = _export(engine, module, decoder, cfg, rank)
    if rank == 0:
        print(f"[train] exported coprocessor ({latent_fingerprint(decoder, module)}) to {export}", flush=True)


def _ingest_config(cfg: JobConfig) -> DataConfig:
    """Split only the training stream; keep block order when the config asks for reproducible runs."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = cfg.data.preserve_order
    return DataConfig(datasets_to_split=["train"], execution_options=options)


def build_trainer(cfg: JobConfig, *, datasets: dict | None = None, tokenizer=None,
                  worker_env: dict | None = None) -> TorchTrainer:
    """A TorchTrainer for the config (datasets built from cfg.data unless given).

    worker_env: extra environment variables for the training workers.
    """
    t = cfg.train
    if datasets is None:
        if tokenizer is None:
            from transformers import AutoTokenizer

            from cache_aug.decoder import resolve_checkpoint

            local = resolve_checkpoint(cfg.model.path, cfg.model.revision_cache_dir, cfg.s3)
            tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=cfg.model.trust_remote_code)
        datasets = training_datasets(cfg.data, cfg.s3, tokenizer)
    fs, storage = resolve(t.storage_path, cfg.s3)
    resources = {"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "deepspeed": deepspeed_config(cfg)},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        datasets=datasets,
        dataset_config=_ingest_config(cfg),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=storage,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            worker_runtime_env={"env_vars": dict(worker_env)} if worker_env else None,
        ),
    )


def run_training(cfg: JobConfig, **kwargs):
    """Fit, and return Ray Train's Result (metrics of the last report, latest checkpoint)."""
    return build_trainer(cfg, **kwargs).fit()


def apply_debug_steps(cfg: JobConfig, steps: int) -> JobConfig:
    """A smoke-run variant: `steps` optimizer steps, evaluated and checkpointed at the end."""
    import dataclasses

    train = dataclasses.replace(cfg.train, checkpoint_every=steps, eval_every=steps, eval_batches=1)
    optim = dataclasses.replace(cfg.optim, max_steps=steps, warmup_steps=min(cfg.optim.warmup_steps, steps))
    return dataclasses.replace(cfg, train=train, optim=optim)


def train_job(config: str | None, overrides: list[str], debug_steps: int = 0, num_cpus: int | None = None) -> dict:
    """The training job as `ray job submit` and `cache-aug train` run it; returns the final metrics."""
    from cache_aug.config import dump_config
    from pipelines.config import load_job_config

    cfg = load_job_config(config, overrides=overrides)
    if debug_steps:
        cfg = apply_debug_steps(cfg, debug_steps)
    print(dump_config(cfg), flush=True)
    build_if_embedded(cfg.model.path)  # here, before any worker loads it: loading never builds
    init_ray(num_cpus)
    result = run_training(cfg)
    summary = {
        "metrics": result.metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": cfg.train.export_path or f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.run_name}/export",
    }
    print(json.dumps(summary, indent=2, default=str), flush=True)
    return summary
