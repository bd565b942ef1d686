"""`cache-aug eval` end to end on a micro model: report schema, identical points, values re-derived independently."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cache_aug.config import CoprocessorConfig, ModelConfig
from cache_aug.coprocessor import build_latent_module, save_latent_module
from cache_aug.decoder import load_decoder
from cache_aug.losses import plain_ahead_loss, reference_loss
from jobs import cli

MAX_AHEAD, N_A, WINDOW = 6, 3, 48
TEXTS = [
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was "
    "upon the face of the deep.",
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: and God divided "
    "the light from the darkness.",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures: he leadeth me beside the "
    "still waters.",
    "short",  # too short for any point: contributes no window
]


@pytest.fixture(scope="module")
def setup(tiny_default_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    decoder = load_decoder(ModelConfig(path=str(tiny_default_dir)))
    torch.manual_seed(0)
    paths = {}
    for name, mode, first in (("pause", "pause", "last_latent"), ("coprocessor", "full", "last_token")):
        module = build_latent_module(decoder, CoprocessorConfig(mode=mode, first_ahead_from=first), n_latents=2)
        paths[name] = save_latent_module(module, decoder, root / name)
    docs = root / "heldout.parquet"
    texts = [*TEXTS, None, " \n"]  # no usable text: left out, and counted
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts}), docs)
    return decoder, paths, docs, root


def _run(setup, out, *extra):
    decoder, paths, docs, _ = setup
    cli.main([
        "eval", "--set", f"model.path={decoder.source}", "--set", f"eval.paths=[{docs}]",
        "--set", f"eval.pause={paths['pause']}", "--set", f"eval.coprocessor={paths['coprocessor']}",
        "--set", f"eval.output={out}", "--set", f"eval.window={WINDOW}", "--set", f"eval.max_ahead={MAX_AHEAD}",
        "--set", "eval.points_per_window=4", "--set", f"augmentation.n_ahead={N_A}", "--set",
        "augmentation.min_prefix=4", "--set", "eval.bootstrap_samples=200", *extra,
    ])
    return json.loads((out / "eval.json").read_text()), json.loads((out / "eval.positions.json").read_text())


def test_eval_end_to_end_schema_and_identical_points(setup, tmp_path, capsys):
    report, positions = _run(setup, tmp_path / "a")
    assert "| coprocessor |" in capsys.readouterr().out

    conds = ["none", "pause", "coprocessor"]
    assert report["format"] == "cache-aug/eval" and report["conditions"] == conds
    assert report["n_latents"] == 2 and report["n_ahead"] == N_A and report["max_ahead"] == MAX_AHEAD
    assert report["modules"]["coprocessor"]["first_ahead_from"] == "last_token"
    assert report["documents"] == 3 and report["windows"] == len(positions)  # "short" holds no window
    assert report["skipped_documents"] == {"null text": 1, "empty text": 1}
    assert report["points"] == sum(len(p["points"]) for p in positions) > 0
    for c in conds:
        lo, hi = report["ppl_ci"][c]
        assert lo <= report["ppl"][c] <= hi
        assert math.isclose(report["ppl"][c], math.exp(report["loss"][c]), rel_tol=1e-12)
        pp = report["per_position"][c]
        assert len(pp["loss"]) == len(pp["ppl"]) == len(pp["ppl_ci"]) == MAX_AHEAD
        assert math.isclose(sum(pp["loss"][:N_A]) / N_A, report["loss"][c], rel_tol=1e-9)
    for c in ("pause", "coprocessor"):
        assert math.isclose(report["relative_reduction"][c], 1 - report["ppl"][c] / report["ppl"]["none"], rel_tol=1e-9)
        lo, hi = report["relative_reduction_ci"][c]
        assert lo <= report["relative_reduction"][c] <= hi
    # every condition was measured at the same points
    assert len(set(report["positions_sha256"].values())) == 1
    assert (tmp_path / "a" / "eval.md").read_text().count("|") > 20
    assert (tmp_path / "a" / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_reported_losses_are_those_at_the_listed_points(setup, tmp_path):
    """Re-derive none and coprocessor per ahead position from the listed points with independent code."""
    decoder, paths, _, _ = setup
    report, positions = _run(setup, tmp_path / "b")
    from cache_aug.coprocessor import load_latent_module

    coprocessor = load_latent_module(paths["coprocessor"], decoder)
    text = {f"d{i}": t for i, t in enumerate(TEXTS)}
    none_sum = torch.zeros(MAX_AHEAD)
    cop_sum = torch.zeros(MAX_AHEAD)
    n = 0
    for w in positions:
        ids = decoder.tokenizer.encode(text[w["doc_id"]])[w["window"] * WINDOW : (w["window"] + 1) * WINDOW]
        ids, points = torch.tensor([ids]), torch.tensor([w["points"]])
        none_sum += plain_ahead_loss(decoder, ids, points, MAX_AHEAD).per_position * points.shape[1]
        with torch.no_grad():  # the naive per-point loop, not the one-pass code the evaluation uses
            cop_sum += reference_loss(decoder, coprocessor, ids, points, MAX_AHEAD).per_position * points.shape[1]
        n += points.shape[1]
    torch.testing.assert_close(none_sum / n, torch.tensor(report["per_position"]["none"]["loss"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cop_sum / n, torch.tensor(report["per_position"]["coprocessor"]["loss"]), rtol=1e-4,
                               atol=1e-5)


def test_points_follow_the_seed(setup, tmp_path):
    """The points come from eval.seed (not fixed by accident): another seed gives other points and losses."""
    a, _ = _run(setup, tmp_path / "s0")
    b, _ = _run(setup, tmp_path / "s1", "--set", "eval.seed=1")
    assert a["positions_sha256"]["none"] != b["positions_sha256"]["none"]
    assert a["loss"]["none"] != b["loss"]["none"]


def test_eval_to_object_storage_uploads_the_report(setup, tmp_path, s3_server):
    """An s3:// eval.output: the report is written locally and copied there, the same files as a local output."""
    s3_server["client"].create_bucket(Bucket="eval-report")
    decoder, paths, docs, _ = setup
    cli.main([
        "eval", "--set", f"model.path={decoder.source}", "--set", f"eval.paths=[{docs}]",
        "--set", f"eval.pause={paths['pause']}", "--set", f"eval.coprocessor={paths['coprocessor']}",
        "--set", "eval.output=s3://eval-report/run", "--set", f"eval.window={WINDOW}",
        "--set", f"eval.max_ahead={MAX_AHEAD}", "--set", "eval.points_per_window=4", "--set",
        f"augmentation.n_ahead={N_A}", "--set", "augmentation.min_prefix=4", "--set", "eval.bootstrap_samples=200",
    ])
    listed = s3_server["client"].list_objects_v2(Bucket="eval-report", Prefix="run/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [f"run/eval.{ext}" for ext in ("json", "md", "png", "positions.json")]
    stored = json.loads(s3_server["client"].get_object(Bucket="eval-report", Key="run/eval.json")["Body"].read())
    local, _ = _run(setup, tmp_path / "local")
    assert stored["ppl"] == local["ppl"] and stored["positions_sha256"] == local["positions_sha256"]
