"""Serve endpoint on a real local Ray cluster: the official openai client against caches the corpus job
wrote to SeaweedFS. Greedy answers equal offline decoding from the same record, in every storage mode."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import requests
from openai import OpenAI

from cache_aug.augment import augment, decode_steps, generate
from cache_aug.config import to_dict
from cache_aug.coprocessor import latent_fingerprint
from cache_aug.corpus import ensure_embedded_corpus
from cache_aug.records import records_to_table, restore
from cache_aug.store import RUNS, AugmentedCacheReader, bucket_of
from pipelines.config import load_job_config
from pipelines.corpus import run_corpus_job
from pipelines.storage import s3_filesystem
from tests.conftest import free_port
from tests.pipelines.shared import upload_fresh_coprocessor

pytestmark = pytest.mark.usefixtures("ray_cluster")

MODES = ("latents", "latent_kv", "full")
BUCKETS = 4
PROMPT = " And the LORD said"


@pytest.fixture(scope="module")
def served(s3_server, tiny_default_dir, tmp_path_factory):
    from ray import serve

    decoder, module, cfg0 = upload_fresh_coprocessor(s3_server["client"], ("serve-in", "serve-caches", "serve-models"),
                                                     tiny_default_dir, "s3://serve-models/cop",
                                                     tmp_path_factory.mktemp("cop"))

    rows = pq.read_table(ensure_embedded_corpus("kjv") / "train.parquet").slice(0, 8).to_pylist()
    docs = {r["doc_id"]: r["text"][:300] for r in rows}
    stored, late = dict(list(docs.items())[:6]), dict(list(docs.items())[6:])  # `late` arrive after the corpus runs
    import pyarrow as pa

    fs = s3_filesystem(cfg0.s3)
    with fs.open_output_stream("serve-in/docs/part-0.parquet") as f:
        pq.write_table(pa.table({"doc_id": list(stored), "text": list(stored.values())}), f)
    base = {"model.path": str(tiny_default_dir), "augmentation.n_latents": 2, "storage.dtype": "bfloat16",
            "corpus.input_paths": "[s3://serve-in/docs/]", "corpus.coprocessor": "s3://serve-models/cop",
            "corpus.index_buckets": BUCKETS, "corpus.max_tokens": 512}
    for mode in MODES:
        cfg = load_job_config(None, overrides=[f"{k}={v}" for k, v in (base | {"storage.mode": mode, "corpus.output": f"s3://serve-caches/{mode}"}).items()])
        assert run_corpus_job(cfg)["counts"]["written"] == len(stored)
    with fs.open_output_stream("serve-in/docs/part-1.parquet") as f:
        pq.write_table(pa.table({"doc_id": list(late), "text": list(late.values())}), f)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"decoder": decoder, "module": module, "fp": latent_fingerprint(decoder, module), "base": base, "fs": fs,
           "stored": stored, "late": late, "url": f"http://127.0.0.1:{port}", "cfg": cfg0}
    serve.shutdown()


def deploy(served, mode: str, *extra: str, env: dict | None = None) -> str:
    """(Re)deploy the app reading `mode`'s caches; returns the base URL."""
    from ray import serve

    from pipelines.serve import CompletionServer

    over = served["base"] | {"serve.cache_prefix": f"s3://serve-caches/{mode}", "serve.max_tokens": 32,
                             "serve.max_prompt_tokens": 64, "serve.max_request_bytes": 4096}
    cfg = load_job_config(None, overrides=[f"{k}={v}" for k, v in over.items()] + list(extra))
    dep = CompletionServer.options(ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": env or {}}})
    serve.run(dep.bind(to_dict(cfg)), name="cache-aug", route_prefix="/")
    return served["url"]


def oai(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def offline(served, mode: str, doc_id: str, prompt_ids: list[int], n: int) -> list[int]:
    fs = served["fs"]
    record = AugmentedCacheReader(fs, f"serve-caches/{mode}", BUCKETS).get(doc_id)
    return generate(served["decoder"], restore(record, served["decoder"], served["fp"]), prompt_ids, max_new_tokens=n)


def ask(client: OpenAI, doc_id: str | None, prompt: str = PROMPT, n: int = 12, **extra):
    body = {"document_id": doc_id} if doc_id else {}
    return client.completions.create(model="cache-aug", prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body=body | extra)


@pytest.mark.parametrize("mode", MODES)
def test_stored_cache_answers_equal_offline_decoding(served, mode):
    client = oai(deploy(served, mode))
    tok = served["decoder"].tokenizer
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False)
    for doc_id in list(served["stored"])[:3]:
        r = ask(client, doc_id)
        meta = r.model_extra["cache_aug"]
        assert meta["source"] == "stored", meta
        want = offline(served, mode, doc_id, prompt_ids, 12)
        assert meta["token_ids"] == want
        assert r.choices[0].text == tok.decode([t for t in want if t != tok.eos_token_id], skip_special_tokens=True)
        assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(want)
        # the same answer streamed through the same client
        chunks = list(client.completions.create(model="cache-aug", prompt=PROMPT, max_tokens=12, temperature=0,
                                                stream=True, extra_body={"document_id": doc_id}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
        assert chunks[0].model_extra["cache_aug"]["source"] == "stored"
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # an empty prompt continues the document itself, from the stored next-token logits
    doc_id = list(served["stored"])[0]
    r = ask(client, doc_id, prompt="", n=6)
    assert r.model_extra["cache_aug"]["token_ids"] == offline(served, mode, doc_id, [], 6)


def test_fallbacks_answer_and_say_how(served):
    url = deploy(served, "latent_kv")
    client, dec, module, tok = oai(url), served["decoder"], served["module"], served["decoder"].tokenizer
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False)

    # a document added after the corpus run: no cache, its text is found in the corpus -> augmented online
    doc_id, text = next(iter(served["late"].items()))
    r = ask(client, doc_id)
    assert r.model_extra["cache_aug"]["source"] == "online"
    assert "no stored cache" in r.model_extra["cache_aug"]["reason"]
    aug = augment(dec, module, [tok.encode(text, add_special_tokens=False)])[0]
    assert r.model_extra["cache_aug"]["token_ids"] == generate(dec, aug, prompt_ids, max_new_tokens=12)

    # a tampered cache (another model's fingerprint) in a newer run: refused, augmented online instead
    victim = list(served["stored"])[4]
    fs = served["fs"]
    record = AugmentedCacheReader(fs, "serve-caches/latent_kv", BUCKETS).get(victim)
    forged = type(record)(**(record.to_row() | {"fingerprint": "0" * 32}))
    path = f"serve-caches/latent_kv/{RUNS}/99991231T000000Z-forged/kind=record/bucket={bucket_of(victim, BUCKETS)}"
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/part-0.parquet") as f:
        pq.write_table(records_to_table([forged]), f)
    url = deploy(served, "latent_kv", "serve.cache_ttl_s=0")  # a fresh replica: no listing cached
    r = ask(oai(url), victim)
    meta = r.model_extra["cache_aug"]
    assert meta["source"] == "online" and "fingerprint" in meta["reason"], meta
    aug = augment(dec, module, [tok.encode(served["stored"][victim], add_special_tokens=False)])[0]
    assert meta["token_ids"] == generate(dec, aug, prompt_ids, max_new_tokens=12)

    # the request's own document text, for an id nobody stored: online
    r = ask(oai(url), "brand-new-doc", document="In the beginning was the Word.")
    assert r.model_extra["cache_aug"]["source"] == "online"

    # an id with no cache and no known text: plain decoding of the prompt alone, still 200
    r = ask(oai(url), "nowhere-doc")
    meta = r.model_extra["cache_aug"]
    assert meta["source"] == "none" and "unknown" in meta["reason"]
    plain = augment(dec, None, [prompt_ids])[0]
    assert meta["token_ids"] == generate(dec, plain, [], max_new_tokens=12)

    # fallback "none": plain decoding after the document, which equals the model's own generate
    url = deploy(served, "latent_kv", "serve.fallback=none", "serve.online=false")
    r = ask(oai(url), doc_id)
    meta = r.model_extra["cache_aug"]
    assert meta["source"] == "none"
    ids = tok.encode(text, add_special_tokens=False) + prompt_ids
    import torch

    ref = dec.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert meta["token_ids"] == ref[: len(meta["token_ids"])] and len(meta["token_ids"]) >= 1
    # ... while stored caches are still served without the coprocessor in memory
    assert ask(oai(url), list(served["stored"])[0]).model_extra["cache_aug"]["source"] == "stored"


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served):
    url = deploy(served, "latent_kv")
    doc_id = list(served["stored"])[0]
    post = lambda body, **kw: requests.post(f"{url}/v1/completions", data=body, timeout=60, **kw)  # noqa: E731
    good = {"model": "cache-aug", "prompt": PROMPT, "max_tokens": 4, "document_id": doc_id}
    cases = {
        "bad json": (b'{"prompt": "x",', 400),
        "not an object": (json.dumps([1, 2]), 400),
        "wrong type": (json.dumps(good | {"max_tokens": "four"}), 400),
        "unknown field": (json.dumps(good | {"frobnicate": 1}), 400),
        "temperature type": (json.dumps(good | {"temperature": "hot"}), 400),
        "max_tokens over cap": (json.dumps(good | {"max_tokens": 33}), 400),
        "oversized prompt": (json.dumps(good | {"prompt": " the" * 200}), 400),
        "body too large": (json.dumps(good | {"document": "x" * 5000}), 413),
        "path traversal id": (json.dumps(good | {"document_id": "../latents/runs"}), 400),
        "slash id": (json.dumps(good | {"document_id": "a/b"}), 400),
        "control char id": (json.dumps(good | {"document_id": "a\nb"}), 400),
        "unknown model": (json.dumps(good | {"model": "gpt-4"}), 404),
        "n over the limit": (json.dumps(good | {"n": 17}), 400),
        "echo with logprobs": (json.dumps(good | {"echo": True, "logprobs": 1}), 400),
    }
    for name, (body, status) in cases.items():
        r = post(body)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.json()["error"]["message"], name
    r = post(json.dumps(good))
    assert r.status_code == 200 and r.json()["cache_aug"]["source"] == "stored"
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    assert [m.id for m in oai(url).models.list().data] == ["cache-aug"]


def test_bearer_token_auth(served):
    url = deploy(served, "latent_kv", env={"CACHE_AUG_API_TOKEN": "s3cret-token"})
    doc_id = list(served["stored"])[0]
    r = requests.post(f"{url}/v1/completions", json={"prompt": "x", "document_id": doc_id}, timeout=60)
    assert r.status_code == 401
    r = requests.post(f"{url}/v1/completions", json={"prompt": "x", "document_id": doc_id}, timeout=60,
                      headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert ask(oai(url, key="s3cret-token"), doc_id).model_extra["cache_aug"]["source"] == "stored"
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # health checks need no token


CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def _agrees(got: list[int], steps: list, tol: float = 1e-4) -> bool:
    """`got` equals the offline tokens up to the first near tie of the offline logits (batched rounding may pick
    either there), and is not longer."""
    import torch

    for t, (token, logits) in enumerate(steps):
        if t >= len(got):
            return False
        top = torch.topk(logits.float(), 2).values
        if float(top[0] - top[1]) <= tol * max(1.0, float(logits.abs().max())):
            return True
        if got[t] != token:
            return False
    return len(got) == len(steps)


def test_openai_surface_and_concurrent_requests_equal_offline(served):
    """Chat, n, logprobs, lists of prompts, penalties and echo through the official client, each against offline
    decoding; then 12 concurrent requests (stored, online and plain, greedy and seeded) decoded in shared steps,
    each equal to its offline answer alone."""
    import concurrent.futures

    import torch

    url = deploy(served, "latent_kv", f"serve.chat_template={json.dumps(CHAT)}")
    client, dec, module, tok = oai(url), served["decoder"], served["module"], served["decoder"].tokenizer
    doc_id = list(served["stored"])[1]
    record = AugmentedCacheReader(served["fs"], "serve-caches/latent_kv", BUCKETS).get(doc_id)
    cache = restore(record, dec, served["fp"])
    steps = lambda ids, n=8, **kw: list(decode_steps(dec, cache, ids, max_new_tokens=n, **kw))  # noqa: E731

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who spoke?"}]
    chat_ids = tok.encode(tok.apply_chat_template(messages, chat_template=CHAT, tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
    r = client.chat.completions.create(model="cache-aug", messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"document_id": doc_id})
    meta = r.model_extra["cache_aug"]
    want = steps(chat_ids)
    assert meta["source"] == "stored" and _agrees(meta["token_ids"], want), meta
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == tok.decode(
        [t for t in meta["token_ids"] if t != tok.eos_token_id], skip_special_tokens=True)
    lp = r.choices[0].logprobs.content
    for entry, (token, logits) in zip(lp, want, strict=False):
        assert entry.logprob == pytest.approx(float(torch.log_softmax(logits.float(), -1)[token]), abs=1e-4)
        assert len(entry.top_logprobs) == 2
    chunks = list(client.chat.completions.create(model="cache-aug", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"document_id": doc_id}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    prompts = [" And the LORD said", " In the beginning"]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    r = client.completions.create(model="cache-aug", prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=5,
                                  presence_penalty=0.5, frequency_penalty=0.3, extra_body={"document_id": doc_id})
    got = r.model_extra["cache_aug"]["choice_token_ids"]
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    for i in range(2):
        for j in range(2):
            want = steps(ids[i], 6, temperature=1.0, seed=5 + j, presence_penalty=0.5, frequency_penalty=0.3)
            assert _agrees(got[i * 2 + j], want), (i, j)
    assert r.usage.prompt_tokens == sum(map(len, ids))

    r = client.completions.create(model="cache-aug", prompt=prompts[0], max_tokens=4, temperature=0, echo=True,
                                  extra_body={"document_id": doc_id})
    assert r.choices[0].text.startswith(prompts[0]) and len(r.choices[0].text) > len(prompts[0])
    r = client.completions.create(model="cache-aug", prompt=prompts[0], max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"document_id": doc_id})
    assert len(r.choices[0].logprobs.token_logprobs) == len(r.model_extra["cache_aug"]["token_ids"])
    assert all(len(t) == 2 for t in r.choices[0].logprobs.top_logprobs)

    # concurrent requests share decoding steps; each answer is its own, alone
    late_id, late_text = next(iter(served["late"].items()))
    online = augment(dec, module, [tok.encode(late_text, add_special_tokens=False)])[0]
    stored_ids = list(served["stored"])[:3]
    stored = {d: restore(AugmentedCacheReader(served["fs"], "serve-caches/latent_kv", BUCKETS).get(d), dec,
                         served["fp"]) for d in stored_ids}
    jobs = []
    for k in range(12):
        kind = ("stored", "online", "none")[k % 3]
        doc = stored_ids[k % 3] if kind == "stored" else late_id if kind == "online" else None
        prompt = prompts[k % 2] + " " * (k // 6)
        sampling = {"temperature": 0.0} if k % 2 else {"temperature": 0.9, "seed": k}
        jobs.append((kind, doc, prompt, sampling))
    before = requests.get(f"{url}/healthz", timeout=30).json()["decoding"]

    def run(job):
        kind, doc, prompt, sampling = job
        return client.completions.create(model="cache-aug", prompt=prompt, max_tokens=10,
                                         extra_body={"document_id": doc} if doc else {}, **sampling)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(run, jobs))
    for (kind, doc, prompt, sampling), r in zip(jobs, answers, strict=True):
        meta = r.model_extra["cache_aug"]
        assert meta["source"] == kind, meta
        p_ids = tok.encode(prompt, add_special_tokens=False)
        base, feed = ((stored[doc], p_ids) if kind == "stored" else (online, p_ids) if kind == "online"
                      else (augment(dec, None, [p_ids])[0], []))
        want = list(decode_steps(dec, base, feed, max_new_tokens=10, **sampling))
        assert _agrees(meta["token_ids"], want), (kind, prompt, sampling)
    after = requests.get(f"{url}/healthz", timeout=30).json()["decoding"]
    tokens, forwards = after["tokens"] - before["tokens"], after["steps"] - before["steps"]
    assert tokens >= 12 * 2 and forwards < tokens  # steps were shared: fewer forwards than tokens
