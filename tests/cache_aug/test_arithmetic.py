"""The arithmetic reasoning check: corpus disjointness, exact-match decoding, accounting, end to end on a micro run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cache_aug.arithmetic import (
    ArithmeticSpec,
    eval_problems,
    exact_match,
    make_corpus,
    position_gap_ppl,
    run_arithmetic,
    summarise_exact,
)
from cache_aug.config import load_config
from cache_aug.coprocessor import build_latent_module
from cache_aug.testing import tiny_decoder


def _pairs(docs, op):
    return {tuple(map(int, line.split("=")[0].split(op))) for d in docs for line in d.text.splitlines()}


@pytest.mark.parametrize("op", ["+", "*"])
def test_corpus_lines_are_right_and_eval_pairs_never_train(op):
    spec = ArithmeticSpec(op=op, digits=2, problems_per_doc=5, train_docs=300, eval_docs=20)
    train, held = make_corpus(spec)
    assert len(train) == 300 and len(held) == 20
    for d in train + held:
        lines = d.text.splitlines()
        assert len(lines) == 5
        for line in lines:
            q, c = line.split("=")
            a, b = map(int, q.split(op))
            assert (a + b if op == "+" else a * b) == int(c) and 10 <= a <= 99 and 10 <= b <= 99
    assert len(_pairs(held, op)) == 100 and not _pairs(held, op) & _pairs(train, op)
    assert make_corpus(spec) == (train, held)  # seeded


def test_corpus_refuses_an_eval_set_that_would_starve_training():
    with pytest.raises(ValueError, match="too few"):
        make_corpus(ArithmeticSpec(digits=1, problems_per_doc=10, eval_docs=10))
    with pytest.raises(ValueError, match="op"):
        make_corpus(ArithmeticSpec(op="-", digits=2, train_docs=1, eval_docs=1))


def test_eval_problems_cut_at_the_equals_sign():
    _, held = make_corpus(ArithmeticSpec(op="+", digits=3, problems_per_doc=4, train_docs=1, eval_docs=3))
    probs = eval_problems(held, start=1)
    assert len(probs) == 3 * 3
    for p in probs:
        assert p["context"].endswith("=") and p["context"].count("\n") == p["index"]
        a, b = map(int, p["context"].splitlines()[-1][:-1].split("+"))
        assert int(p["answer"]) == a + b


def test_exact_match_none_equals_greedy_generate_and_accounts_every_problem():
    torch.manual_seed(0)
    dec = tiny_decoder("llama")
    _, held = make_corpus(ArithmeticSpec(digits=2, problems_per_doc=3, train_docs=1, eval_docs=3))
    probs = eval_problems(held, start=1)
    cop = build_latent_module(dec, load_config(None).coprocessor, 2).eval()
    rows = exact_match(dec, {"none": None, "coprocessor": cop}, probs, batch_size=4)
    assert len(rows) == 2 * len(probs)
    tok = dec.tokenizer
    stop = tok.encode("\n", add_special_tokens=False)[-1]
    for r in (r for r in rows if r["condition"] == "none"):
        p = next(p for p in probs if (p["doc_id"], p["index"]) == (r["doc_id"], r["index"]))
        ids = torch.tensor([tok.encode(p["context"], add_special_tokens=False)])
        out = dec.model.generate(ids, max_new_tokens=len(p["answer"]) + 2, do_sample=False, pad_token_id=0,
                                 eos_token_id=[stop, tok.eos_token_id])[0, ids.shape[1]:].tolist()
        want = tok.decode([t for t in out if t not in (stop, tok.eos_token_id)], skip_special_tokens=True)
        assert r["output"] == want and r["correct"] == (want == p["answer"])


def test_position_gap_zero_is_the_plain_ahead_perplexity():
    """gap 0 is the decoder's own perplexity on the tokens after each point; a gap changes positions only."""
    torch.manual_seed(0)
    dec = tiny_decoder("llama")
    _, held = make_corpus(ArithmeticSpec(op="+", digits=2, problems_per_doc=3, train_docs=1, eval_docs=2))
    got = position_gap_ppl(dec, held, [0, 4], n_ahead=2, stride=5)
    nll, n = 0.0, 0
    for d in held:
        ids = torch.tensor([dec.tokenizer.encode(d.text, add_special_tokens=False)])
        logp = torch.log_softmax(dec.model(input_ids=ids).logits[0].float(), -1)
        for p in range(8, ids.shape[1] - 2, 5):
            nll -= sum(logp[p + k, ids[0, p + 1 + k]].item() for k in range(2))
            n += 2
    assert abs(got[0]["all"] - math.exp(nll / n)) < 1e-4
    assert got[4]["all"] != got[0]["all"]


def test_summary_accuracy_and_paired_intervals():
    rows = [{"doc_id": "d", "index": i, "condition": c, "correct": ok}
            for i in range(10) for c, ok in (("none", i < 4), ("pause", i < 4), ("coprocessor", i < 7))]
    s = summarise_exact(rows, ["none", "pause", "coprocessor"], samples=500)
    assert s["problems"] == 10
    assert s["accuracy"] == {"none": 0.4, "pause": 0.4, "coprocessor": 0.7}
    assert s["minus_none"]["pause"] == 0 and s["minus_none_ci"]["pause"] == [0.0, 0.0]  # paired: identical rows
    lo, hi = s["minus_none_ci"]["coprocessor"]
    assert 0 <= lo <= 0.3 <= hi  # right on 3 more and never worse: no resample puts it below none


def test_run_arithmetic_end_to_end_micro(tmp_path):
    spec = ArithmeticSpec(digits=2, problems_per_doc=4, train_docs=400, eval_docs=4, eval_from_problem=2,
                          hidden_size=32, num_layers=1, steps=4, threads=1)
    overrides = ["sweep.n_latents=[2]", "optim.max_steps=2", "sweep.batch_size=4", "optim.warmup_steps=1",
                 "sweep.curve_every=1", "augmentation.n_ahead=3",
                 "augmentation.points_per_sequence=2", "eval.bootstrap_samples=50",
                 "coprocessor.first_ahead_from=last_token"]
    cfg = load_config(None, overrides=overrides)
    report = run_arithmetic(cfg, spec, work_dir=tmp_path / "work", results_dir=tmp_path / "results", log=lambda s: None)
    saved = json.loads((tmp_path / "results" / "arithmetic.json").read_text())
    assert saved["format"] == "cache-aug/arithmetic" and saved == json.loads(json.dumps(report))
    (nl,) = saved["by_n_latents"]
    assert nl["n_latents"] == 2 and nl["problems"] == 4 * 2
    assert set(nl["accuracy"]) == {"none", "pause", "coprocessor"}
    answers = json.loads((tmp_path / "results" / "arithmetic_nl2.answers.json").read_text())
    assert len(answers) == 3 * 8
    ppl = json.loads((tmp_path / "results" / "nl2.json").read_text())
    assert set(ppl["ppl"]) == {"none", "pause", "coprocessor"}
    training = json.loads((tmp_path / "work" / "sweep" / "nl2-coprocessor" / "training.json").read_text())
    assert [c["step"] for c in training["curve"]] == [0, 1, 2]  # held-out checks from the untrained module on
    assert "| 2 |" in (tmp_path / "results" / "arithmetic.md").read_text()
    assert set(saved["position_gap_ppl"]) == {"0", "1", "3"}  # none, one, and N_L + the re-read token
    # the same corpus and decoder, modules of the other position rule in a directory of their own
    pretrained = (tmp_path / "work" / "decoder" / "pretrain.json").stat().st_mtime_ns
    keep_cfg = load_config(None, overrides=[*overrides, "coprocessor.position_rule=keep"])
    keep = run_arithmetic(keep_cfg, spec, work_dir=tmp_path / "work", results_dir=tmp_path / "keep",
                          modules_dir=tmp_path / "work" / "keep", log=lambda s: None)
    assert (tmp_path / "work" / "decoder" / "pretrain.json").stat().st_mtime_ns == pretrained
    assert (tmp_path / "work" / "keep" / "nl2-coprocessor" / "module" / "latents.json").exists()
    assert keep["modules"]["position_rule"] == "keep" and saved["modules"]["position_rule"] == "shift"
    assert set(keep["position_gap_ppl"]) == {"0", "1"}  # "keep" moves nothing
    assert keep["by_n_latents"][0]["accuracy"]["none"] == nl["accuracy"]["none"]  # same decoder, same problems
