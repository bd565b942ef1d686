"""Setup shared by the pipeline tests that run the corpus job against S3."""

from __future__ import annotations

from cache_aug.config import ModelConfig
from cache_aug.coprocessor import build_latent_module, save_latent_module
from cache_aug.decoder import load_decoder
from pipelines.config import load_job_config
from pipelines.storage import upload_dir


def upload_fresh_coprocessor(client, buckets: tuple[str, ...], model_dir, dest: str, local_dir, n_latents: int = 2):
    """Create `buckets`; save a freshly initialised coprocessor for the decoder at `model_dir` to `dest` (s3://).

    Returns (decoder, module in eval mode, the default config for that decoder).
    """
    for b in buckets:
        client.create_bucket(Bucket=b)
    decoder = load_decoder(ModelConfig(path=str(model_dir)))
    cfg = load_job_config(None, overrides=[f"model.path={model_dir}"])
    module = build_latent_module(decoder, cfg.coprocessor, n_latents).eval()
    upload_dir(str(save_latent_module(module, decoder, local_dir)), dest, cfg.s3)
    return decoder, module, cfg
