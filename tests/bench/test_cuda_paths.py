"""bench/cuda_paths.py's equivalence checks, run on CPU: the serving check goes through the stored path and compares
with the library's offline decode of the same record, and any difference fails the run (JSON and exit status)."""

from __future__ import annotations

import json

import pytest

from bench import cuda_paths


@pytest.fixture(autouse=True)
def _device(monkeypatch):
    monkeypatch.setattr(cuda_paths, "DEVICE", cuda_paths.DEVICE)  # main() sets it; put it back afterwards


def _run(tmp_path) -> tuple[int, dict]:
    out = tmp_path / "cuda_paths.json"
    status = cuda_paths.main(["--device", "cpu", "--skip-ttft", "--archs", "llama", "--out", str(out)])
    return status, json.loads(out.read_text())


def test_serving_answers_a_stored_document_as_the_library_decodes_its_record(tmp_path):
    status, results = _run(tmp_path)
    assert status == 0 and results["passed"] is True and results["failures"] == []
    row = results["equivalences"]["llama"]
    assert row["serving_equals_library"] is True and row["loss_within_rtol"] is True
    for mode in cuda_paths.MODES:
        served = row["serving"][mode]
        assert served["source"] == "stored" and served["reason"] is None, mode
        assert served["served"] == served["offline"] and len(served["served"]) == cuda_paths.NEW_TOKENS, mode
        assert row[f"{mode}_tokens_equal"] is True and row[f"{mode}_serving_equals_library"] is True


_request, _decode = cuda_paths.serving_request, cuda_paths.offline_decode


def _no_document_id(doc_id: str) -> dict:
    """The request the bench used to send: plain decoding of the prompt, never the stored path."""
    body = _request(doc_id)
    del body["document_id"]
    return body


def _one_token_off(dec, cache, stop_token_ids):
    tokens = _decode(dec, cache, stop_token_ids)
    return tokens[:-1] + [tokens[-1] + 1]


@pytest.mark.parametrize("fault", ["no document_id", "another answer"])
def test_a_difference_fails_the_run(fault, tmp_path, monkeypatch):
    if fault == "no document_id":
        monkeypatch.setattr(cuda_paths, "serving_request", _no_document_id)
    else:
        monkeypatch.setattr(cuda_paths, "offline_decode", _one_token_off)
    status, results = _run(tmp_path)
    assert status == 1 and results["passed"] is False
    assert "llama: serving_equals_library" in results["failures"]
    row = results["equivalences"]["llama"]
    for mode in cuda_paths.MODES:
        assert row[f"{mode}_serving_equals_library"] is False
        assert f"llama: {mode}_serving_equals_library" in results["failures"]
        if fault == "no document_id":
            assert row["serving"][mode]["source"] == "none"
    assert all(row[f"{mode}_tokens_equal"] for mode in cuda_paths.MODES)  # only the serving check was disturbed
