"""Ray Data -> Ray Train + DeepSpeed on a real local cluster (2 CPUs) and a real S3 server on loopback."""

from __future__ import annotations

import dataclasses
import io
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cache_aug.augment import augment
from cache_aug.config import ModelConfig, OptimConfig
from cache_aug.coprocessor import latent_fingerprint, load_latent_module
from cache_aug.corpus import ensure_embedded_corpus
from cache_aug.decoder import load_decoder
from cache_aug.optim import learning_rate
from pipelines.config import load_job_config
from pipelines.storage import download_dir
from pipelines.train import FAIL_ONCE_ENV, run_training

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def corpus_bucket(s3_server):
    """KJV training chapters as 3 Parquet shards + held-out chapters, uploaded to a bucket."""
    client = s3_server["client"]
    client.create_bucket(Bucket="corpus")
    root = ensure_embedded_corpus("kjv")
    train = pq.read_table(root / "train.parquet").slice(0, 240)
    for i in range(3):
        buf = io.BytesIO()
        pq.write_table(train.slice(i * 80, 80), buf)
        client.put_object(Bucket="corpus", Key=f"kjv/train/shard-{i}.parquet", Body=buf.getvalue())
    buf = io.BytesIO()
    pq.write_table(pq.read_table(root / "heldout.parquet"), buf)
    client.put_object(Bucket="corpus", Key="kjv/heldout/part-0.parquet", Body=buf.getvalue())
    client.create_bucket(Bucket="runs")
    return "s3://corpus/kjv"


OPTIM = {f.name for f in dataclasses.fields(OptimConfig)}


def _cfg(tiny_default_dir, corpus, run_name, storage, **train):
    """The tiny job config; `train` holds train.* and optim.* settings by name."""
    overrides = {
        "model.path": str(tiny_default_dir),
        "augmentation.n_latents": 2, "augmentation.n_ahead": 4, "augmentation.points_per_sequence": 4,
        "data.paths": f"[{corpus}/train/]", "data.eval_paths": f"[{corpus}/heldout/]",
        "data.seq_len": 64, "data.docs_per_batch": 32,
        "train.run_name": run_name, "train.storage_path": storage, "train.num_workers": 2,
        "train.micro_batch_size": 2, "optim.warmup_steps": 1, "train.eval_batches": 1,
        "train.deepspeed_config": "cluster/deepspeed/cpu.json",
    }
    overrides |= {f"{'optim' if k in OPTIM else 'train'}.{k}": v for k, v in train.items()}
    return load_job_config(None, overrides=[f"{k}={v}" for k, v in overrides.items()])


def test_end_to_end_s3_checkpoint_resume_and_export(tiny_default_dir, corpus_bucket, s3_server, tmp_path):
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(tiny_default_dir, corpus_bucket, name, "s3://runs/train", zero_stage=2, max_steps=3, checkpoint_every=3,
               eval_every=3)
    first = run_training(cfg)
    assert first.metrics["step"] == 3 and first.metrics["resumed_from_step"] == 0
    assert first.metrics["eval_targets"] > 0 and first.metrics["tokens_per_s"] > 0
    keys = [o["Key"] for o in s3_server["client"].list_objects_v2(Bucket="runs", Prefix=f"train/{name}/")["Contents"]]
    assert any(k.endswith("/ckpt/mp_rank_00_model_states.pt") for k in keys), keys
    assert sum("optim_states" in k for k in keys) == 2  # one ZeRO shard per rank

    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=5, eval_every=5),
                                 optim=dataclasses.replace(cfg.optim, max_steps=5))
    second = run_training(longer)
    assert second.metrics["resumed_from_step"] == 3
    assert second.metrics["step"] == 5
    # the library's schedule came back from DeepSpeed's checkpoint: step 5's rate, not a restarted warmup's
    assert first.metrics["lr"] == learning_rate(3, cfg.optim)
    assert second.metrics["lr"] == learning_rate(5, longer.optim) != learning_rate(2, longer.optim)

    local = download_dir(f"s3://runs/train/{name}/export", str(tmp_path / "export"), cfg.s3)
    decoder = load_decoder(ModelConfig(path=str(tiny_default_dir)))
    module = load_latent_module(local, decoder)
    assert module.n_latents == 2
    aug = augment(decoder, module, [decoder.tokenizer.encode("In the beginning God created the heaven")])[0]
    assert aug.seq_len == aug.doc_len + 2 and torch.isfinite(aug.next_logits).all()
    assert latent_fingerprint(decoder, module) == __import__("json").load(open(f"{local}/latents.json"))["fingerprint"]


@pytest.mark.slow
@pytest.mark.parametrize("stages", [(0, 3), (0, 1)], ids=lambda s: f"zero{s[0]}-vs-{s[1]}")
def test_zero_stages_give_the_same_loss(stages, tiny_default_dir, corpus_bucket, tmp_path):
    """Same data, seed and points: ZeRO partitioning must not change the math, for the embeds channel (only with
    -m slow: the default suite holds ZeRO-3 == ZeRO-0 for the kv channel, and runs stage 2 end to end)."""
    losses = {}
    for stage in stages:
        cfg = _cfg(tiny_default_dir, corpus_bucket, f"zero{stage}", str(tmp_path), zero_stage=stage, max_steps=2,
                   checkpoint_every=2, eval_every=2)
        result = run_training(cfg)
        assert result.metrics["step"] == 2
        losses[stage] = result.metrics["loss"]
    print(f"loss after 2 steps by ZeRO stage: {losses}")
    assert losses[stages[1]] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.slow
def test_worker_failure_restarts_from_checkpoint(tiny_default_dir, corpus_bucket, tmp_path):
    """LoRA run killed at step 2: restarted from the step-1 checkpoint, which holds only the trainable weights."""
    marker = tmp_path / "failed-once"
    cfg = _cfg(tiny_default_dir, corpus_bucket, "faulty", str(tmp_path), zero_stage=2, max_steps=3, checkpoint_every=1,
               eval_every=3, max_failures=1)
    cfg = dataclasses.replace(cfg, coprocessor=dataclasses.replace(cfg.coprocessor, mode="lora", lora_rank=4))
    result = run_training(cfg, worker_env={FAIL_ONCE_ENV: f"2:{marker}"})
    assert marker.read_text() == "failed at step 2\n"  # the failure really happened
    assert result.metrics["step"] == 3
    assert result.metrics["resumed_from_step"] == 1  # restarted from the step-1 checkpoint, not from scratch
    states = torch.load(next(tmp_path.glob("faulty/checkpoint_*/ckpt/mp_rank_00_model_states.pt")),
                        weights_only=False)["module"]
    assert states and all("lora_" in k or k == "soft_tokens" for k in states), sorted(states)[:5]
    exported = load_latent_module(str(tmp_path / "faulty" / "export"),
                                  load_decoder(ModelConfig(path=str(tiny_default_dir))))
    assert exported.mode == "lora"


@pytest.mark.slow
def test_kv_channel_under_zero3_equals_zero0_and_exports(tiny_default_dir, corpus_bucket, tmp_path):
    """latent_channel="kv" freezes the coprocessor tensors that cannot reach the latent KV (the last layer's
    attention output, MLP and final norm): ZeRO-3 partitions the rest without changing the math, and the
    exported module writes KV."""
    losses = {}
    for stage in (0, 3):
        cfg = _cfg(tiny_default_dir, corpus_bucket, f"kv{stage}", str(tmp_path), zero_stage=stage, max_steps=2,
                   checkpoint_every=2, eval_every=2)
        cfg = dataclasses.replace(cfg, coprocessor=dataclasses.replace(cfg.coprocessor, first_ahead_from="last_token",
                                                                       latent_channel="kv"))
        losses[stage] = run_training(cfg).metrics["loss"]
    assert losses[3] == pytest.approx(losses[0], rel=1e-4)
    decoder = load_decoder(ModelConfig(path=str(tiny_default_dir)))
    exported = load_latent_module(str(tmp_path / "kv3" / "export"), decoder)
    assert exported.latent_channel == "kv" and exported.reread == 1
    aug = augment(decoder, exported, [decoder.tokenizer.encode("In the beginning God created the heaven")])[0]
    assert aug.latents is None and aug.seq_len == aug.doc_len + 3 and torch.isfinite(aug.next_logits).all()


def test_too_little_text_fails_naming_it_instead_of_looping(tiny_default_dir, tmp_path):
    """A shard that makes no micro-batch used to restart its empty pass forever; now the run fails and says why."""
    for split in ("train", "heldout"):
        (tmp_path / "tiny" / split).mkdir(parents=True)
        pq.write_table(pa.table({"text": ["In the beginning God created the heaven", None]}),
                       tmp_path / "tiny" / split / "part-0.parquet")
    cfg = _cfg(tiny_default_dir, str(tmp_path / "tiny"), "starved", str(tmp_path / "runs"), zero_stage=0, max_steps=2,
               max_failures=0)
    with pytest.raises(Exception, match="gave no batch of 2 blocks of 64 tokens in a whole pass"):
        run_training(cfg)
