"""`corral serve` end to end: the real server in a subprocess, the real `openai` client for the
OpenAI routes, plain httpx for TGI routes, SSE, errors, limits, metrics and disconnects."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.server.launch import ServerProcess

pytestmark = pytest.mark.slow

KEY = "sk-corral-test"
HDR = {"Authorization": f"Bearer {KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    # One slot and no queue, so a second concurrent request must be refused at once.
    args = ["--model", "default", "--api-key", KEY, "--max-concurrent-requests", "1",
            "--max-queue", "0", "--max-input-tokens", "64", "--max-total-tokens", "256",
            "--max-body-bytes", "20000"]
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def healthy(server) -> dict:
    """Wait until the server is idle again (all slots and KV blocks back), return /health."""
    deadline = time.monotonic() + 15
    while True:
        h = httpx.get(server.url + "/health", timeout=5).json()
        idle = (h["running_requests"] == 0 and h["num_running"] == 0
                and h["num_free_blocks"] == h["num_total_blocks"])
        if idle or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


def assert_openai_error(resp: httpx.Response, status: int) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


# ---- OpenAI routes through the real openai client ------------------------------------------

def test_models(client):
    assert "default" in [m.id for m in client.models.list().data]


def test_chat_and_stream_agree(client):
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=10,
                                       temperature=0)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model="default", messages=QUESTION, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()


def test_chat_stop_string(client):
    full = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=12,
                                          temperature=0).choices[0].message.content
    words = full.split(" ")
    assert len(words) >= 3, full
    stop = " " + words[2]
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=12,
                                       temperature=0, stop=[stop, "never-seen"])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_chat_n2_seed_reproducible(client):
    def ask(seed):
        return client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=8, temperature=1.0, n=2, seed=seed)

    a, b, c = ask(7), ask(7), ask(8)
    assert sorted(ch.index for ch in a.choices) == [0, 1]
    texts = [ch.message.content for ch in sorted(a.choices, key=lambda x: x.index)]
    assert texts == [ch.message.content for ch in sorted(b.choices, key=lambda x: x.index)]
    assert texts != [ch.message.content for ch in sorted(c.choices, key=lambda x: x.index)]
    assert a.usage.completion_tokens == 16  # ignore-free short answers still fill 8 each
    # n=2 streamed: both indexes appear and each ends with a finish_reason
    finish = {}
    for ch in client.chat.completions.create(
            model="default", messages=QUESTION, max_tokens=4, n=2, seed=1, stream=True):
        for choice in ch.choices:
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert set(finish) == {0, 1}


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert len(tok.top_logprobs) == 3 and tok.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert tok.logprob == pytest.approx(tok.top_logprobs[0].logprob)
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_completions(client):
    prompt = "The capital of France is"
    r = client.completions.create(model="default", prompt=prompt, max_tokens=6, temperature=0)
    text = r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt=prompt, max_tokens=6, temperature=0, stream=True))
    assert text and streamed == text
    two = client.completions.create(model="default", prompt=[prompt, "One, two,"],
                                    max_tokens=6, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == text


def test_completions_echo_logprobs(client):
    """What lm-eval's local-completions sends for multiple-choice scoring."""
    prompt = "The capital of France is Paris"
    r = client.completions.create(model="default", prompt=prompt, max_tokens=1, temperature=0,
                                  logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == r.usage.prompt_tokens + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:])
    # the score of " Paris" equals the greedy logprob of generating it after the context
    ctx = client.completions.create(model="default", prompt="The capital of France is",
                                    max_tokens=1, temperature=0, logprobs=1)
    assert ctx.choices[0].text == " Paris"
    assert lp.token_logprobs[-2] == pytest.approx(ctx.choices[0].logprobs.token_logprobs[0],
                                                  abs=1e-4)


# ---- TGI routes through plain httpx --------------------------------------------------------

def test_tgi_generate_and_stream(server, client):
    prompt = "The capital of France is"
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 5, "details": True}}
    r = httpx.post(server.url + "/generate", json=body, headers=HDR, timeout=60).json()
    oa = client.completions.create(model="default", prompt=prompt, max_tokens=5, temperature=0)
    assert r["generated_text"] == oa.choices[0].text
    d = r["details"]
    assert d["generated_tokens"] == len(d["tokens"]) == oa.usage.completion_tokens
    assert d["finish_reason"] in ("length", "eos_token")

    events = []
    with httpx.stream("POST", server.url + "/generate_stream", json=body, headers=HDR,
                      timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert "".join(e["token"]["text"] for e in events) == r["generated_text"]
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == r["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == len(events)
    assert [e["token"]["id"] for e in events] == [t["id"] for t in d["tokens"]]


def test_tgi_info_and_health(server):
    info = httpx.get(server.url + "/info", headers=HDR).json()
    assert info["max_input_tokens"] == 64 and info["max_total_tokens"] == 256
    assert info["max_concurrent_requests"] == 1
    assert info["corral_weights"].startswith("GGUF ") and "no dense copy" in info["corral_weights"]
    assert info["corral_kv_cache_dtype"] == "float32"  # the suite pins fp32 math (conftest.py)
    assert httpx.get(server.url + "/health").status_code == 200  # open without a key


# ---- errors: each answered with its status and a message; the server stays healthy ---------

def test_auth(server, client):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert_openai_error(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert healthy(server)["status"] == "ok"


def test_bad_requests(server, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="default", messages=QUESTION, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    url = server.url + "/v1/chat/completions"
    assert_openai_error(httpx.post(url, content=b"{not json", headers=HDR), 400)
    assert_openai_error(httpx.post(url, json={"model": "default"}, headers=HDR), 400)
    assert_openai_error(httpx.get(server.url + "/v1/nothing-here", headers=HDR), 404)
    r = httpx.post(server.url + "/generate", json={"inputs": "hi", "parameters":
                   {"temperature": -1}}, headers=HDR)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert healthy(server)["status"] == "ok"


def test_too_long(server, client):
    long_prompt = "word " * 200
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="default", prompt=long_prompt, max_tokens=2)
    assert e.value.status_code == 413 and "limit is 64" in e.value.message
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="default", prompt="hi", max_tokens=1000)
    big = {"model": "default", "prompt": "x" * 30000}
    assert_openai_error(httpx.post(server.url + "/v1/completions", json=big, headers=HDR), 413)
    assert healthy(server)["status"] == "ok"


def _start_long_stream(server):
    """A 200-token stream, started; returns (client, response, line iterator). The caller
    keeps the iterator: dropping it closes the connection (which aborts the request)."""
    body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 200,
            "ignore_eos": True, "stream": True}
    http = httpx.Client(timeout=60, headers=HDR)
    resp = http.send(http.build_request("POST", server.url + "/v1/completions", json=body),
                     stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    assert next(line for line in lines if line.startswith("data:"))  # generating now
    return http, resp, lines


def test_full_queue_is_refused_at_once(server):
    http, resp, _lines = _start_long_stream(server)
    try:
        h = httpx.get(server.url + "/health").json()
        assert h["running_requests"] == 1 and h["num_running"] == 1, h
        t = time.monotonic()
        r = httpx.post(server.url + "/v1/completions", headers=HDR, timeout=10,
                       json={"model": "default", "prompt": "hi", "max_tokens": 2})
        assert time.monotonic() - t < 2
        assert_openai_error(r, 429)
        r = httpx.post(server.url + "/generate", headers=HDR, timeout=10,
                       json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
    finally:
        resp.close()
        http.close()
    assert healthy(server)["status"] == "ok"


def metric(server, name: str, labels: dict | None = None) -> float:
    text = httpx.get(server.url + "/metrics", headers=HDR).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    raise KeyError(name)


def test_disconnect_frees_blocks(server):
    before = healthy(server)
    generated = metric(server, "corral_generation_tokens_total")
    http, resp, _lines = _start_long_stream(server)
    busy = httpx.get(server.url + "/health").json()
    assert busy["num_free_blocks"] < before["num_free_blocks"]  # the stream holds blocks
    resp.close()
    http.close()
    after = healthy(server)
    assert after["num_free_blocks"] == before["num_free_blocks"] == after["num_total_blocks"]
    assert after["running_requests"] == 0 and after["num_running"] == 0
    # aborted long before its 200 tokens
    assert metric(server, "corral_generation_tokens_total") - generated < 200


def test_metrics_and_logs(server):
    assert metric(server, "corral_requests_total",
                  {"route": "/v1/chat/completions", "status": "200"}) >= 3
    assert metric(server, "corral_requests_total", {"status": "429"}) >= 1
    assert metric(server, "corral_prompt_tokens_total") > 0
    assert metric(server, "corral_time_to_first_token_seconds_count") > 0
    assert metric(server, "corral_inter_token_latency_seconds_count") > 0
    assert metric(server, "corral_kv_cache_usage_ratio") == 0
    for name in ("corral_queue_length", "corral_running_sequences"):
        assert metric(server, name) == 0
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    chat = [rec for rec in lines if rec["path"] == "/v1/chat/completions"
            and rec["status"] == 200]
    assert chat and all(rec["prompt_tokens"] > 0 and rec["ttft_ms"] is not None
                        for rec in chat)
    assert {rec["status"] for rec in lines} >= {200, 400, 401, 404, 413, 429}
    assert "capital of France" not in server.output()  # no prompts without --log-prompts
