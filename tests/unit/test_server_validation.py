"""Validation at the edge: every field's range, finite numbers, valid Unicode, the server's caps,
explicit nulls, model-name placeholders, Retry-After / Allow, and logprob bytes.

In process (httpx over ASGI) on a tiny random Llama with SmolLM2's full tokenizer, so every
request really reaches the engine, and after each bad one the next good one still works."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from corral.sampling_params import MAX_SEED, ParamError, SamplingParams
from corral.server.config import ServerConfig
from tests.conftest import save_tiny_model, tiny_config

GOOD_CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hi"}],
             "max_tokens": 2, "temperature": 0}
GOOD_CMPL = {"model": "default", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
GOOD_TGI = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory, default_folder):
    from transformers import AutoTokenizer

    from corral import AsyncLLM

    path = tmp_path_factory.mktemp("tiny-full-vocab")
    tok = AutoTokenizer.from_pretrained(default_folder)
    save_tiny_model(path, tiny_config(vocab_size=len(tok), hidden_size=32,
                                      intermediate_size=64, max_position_embeddings=256))
    tok.save_pretrained(path)
    eng = AsyncLLM(model=str(path), device="cpu", dtype="float32")
    yield eng
    eng.shutdown()


def make_app(engine, **cfg):
    from corral.server.app import create_app

    return create_app(engine, ServerConfig(model_name="default", max_total_tokens=64,
                                           max_input_tokens=48, **cfg))


@pytest.fixture(scope="module")
def app(engine):
    return make_app(engine, max_n=4, max_prompts=3, max_stop_sequences=4)


def post(app, path: str, body, raw: bytes | None = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            if raw is not None:
                return await c.post(path, content=raw,
                                    headers={"content-type": "application/json"})
            return await c.post(path, json=body)

    return asyncio.run(go())


def raw_json(body: dict) -> bytes:
    """json.dumps writes NaN / Infinity literals, as a hostile client may."""
    return json.dumps(body, allow_nan=True).encode()


def bad(app, path: str, body: dict, param: str | None, status: int = 400) -> dict:
    r = post(app, path, None, raw=raw_json(body))
    assert r.status_code == status, (body, r.status_code, r.text)
    if path.startswith("/v1/"):
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param, (body, err)
        return err
    assert r.json()["error_type"] == "validation"
    return r.json()


def ok(app, path: str = "/v1/chat/completions", body: dict | None = None) -> dict:
    body = body or (GOOD_CHAT if path == "/v1/chat/completions" else
                    GOOD_CMPL if path == "/v1/completions" else GOOD_TGI)
    r = post(app, path, body)
    assert r.status_code == 200, r.text
    return r.json()


# ---- SamplingParams alone ---------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -1),
    ("temperature", 1e308), ("top_p", 0), ("top_p", 1.5), ("top_p", math.nan),
    ("min_p", -0.1), ("min_p", math.inf), ("top_k", -5), ("top_k", 2**63),
    ("repetition_penalty", 0), ("repetition_penalty", 1e-38), ("repetition_penalty", math.nan),
    ("presence_penalty", 2.5), ("frequency_penalty", -math.inf), ("n", 0),
    ("max_tokens", 0), ("min_tokens", -1), ("seed", -1), ("seed", MAX_SEED + 1),
    ("logprobs", 21), ("prompt_logprobs", -1)])
def test_sampling_params_reject(field, value):
    with pytest.raises(ParamError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_sampling_params_edges():
    assert SamplingParams(temperature=1e-40).temperature == 0  # would overflow: greedy
    assert SamplingParams(seed=MAX_SEED, n=2).seed == MAX_SEED
    assert SamplingParams(top_k=-1).top_k == -1  # off, like vLLM
    with pytest.raises(ParamError) as e:
        SamplingParams(max_tokens=2, min_tokens=3)
    assert e.value.param == "min_tokens"
    with pytest.raises(ParamError) as e:
        SamplingParams(stop_token_ids=[5, 300]).validate(vocab_size=256)
    assert e.value.param == "stop_token_ids"


# ---- through the HTTP edge --------------------------------------------------------------

NUMERIC = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "seed": "seed", "n": "n",
    "max_tokens": "max_tokens", "min_tokens": "min_tokens",
}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", sorted(NUMERIC))
def test_non_finite_numbers_are_400_and_the_next_request_works(app, field, value):
    bad(app, "/v1/chat/completions", {**GOOD_CHAT, field: value}, NUMERIC[field])
    bad(app, "/v1/completions", {**GOOD_CMPL, field: value}, NUMERIC[field])
    ok(app)


@pytest.mark.parametrize("body,param", [
    ({"stop_token_ids": [1, math.nan]}, "stop_token_ids"),
    ({"stop": ["a", math.inf]}, "stop"),
    ({"top_logprobs": math.nan, "logprobs": True}, "top_logprobs"),
    ({"max_completion_tokens": math.inf}, "max_completion_tokens"),
])
def test_non_finite_inside_lists_and_other_fields(app, body, param):
    bad(app, "/v1/chat/completions", {**GOOD_CHAT, **body}, param)
    ok(app)


def test_non_finite_prompt_ids_and_tgi(app):
    bad(app, "/v1/completions", {**GOOD_CMPL, "prompt": [1, 2, math.nan]}, "prompt")
    for field in ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty",
                  "seed", "max_new_tokens", "top_n_tokens", "typical_p"):
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2, field: math.nan}}
        bad(app, "/generate", body, None, status=422)
    ok(app, "/generate")


@pytest.mark.parametrize("body,param", [
    ({"temperature": 1e-40}, None), ({"temperature": 1e-300}, None),  # greedy, not a crash
    ({"temperature": 1e308}, "temperature"), ({"top_k": -5}, "top_k"),
    ({"top_k": 9223372036854775808}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 1e-38}, "repetition_penalty"), ({"top_p": 0}, "top_p"),
    ({"min_p": 2}, "min_p"), ({"presence_penalty": -3}, "presence_penalty"),
    ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"n": 1000}, "n"), ({"n": 0}, "n"),
    ({"stop_token_ids": [1000000], "min_tokens": 1}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(5))}, "stop_token_ids"),  # over --max-stop-sequences 4
    ({"stop": ["x"] * 5}, "stop"), ({"stop": ["y" * 300]}, "stop"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 10**12}, "max_tokens"),
    ({"min_tokens": 3, "max_tokens": 2}, "min_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs=true
])
def test_chat_ranges(app, body, param):
    if param is None:
        out = ok(app, body={**GOOD_CHAT, **body})
        assert out["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        bad(app, "/v1/chat/completions", {**GOOD_CHAT, **body}, param)
    ok(app)


@pytest.mark.parametrize("body,param", [
    ({"prompt": ["a", "b", "c", "d"]}, "prompt"),  # over --max-prompts 3
    ({"prompt": [1, 49152]}, "prompt"), ({"prompt": [[1], [-1]]}, "prompt"),
    ({"logprobs": 21}, "logprobs"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 5}, "n"), ({"best_of": 3}, "best_of"),
])
def test_completion_ranges(app, body, param):
    bad(app, "/v1/completions", {**GOOD_CMPL, **body}, param)
    ok(app, "/v1/completions")


def test_lone_surrogate_is_400_not_500(app):
    raw = b'{"model": "default", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = post(app, "/v1/chat/completions", None, raw=raw)
    assert r.status_code == 400 and "Unicode" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "messages"
    raw = b'{"model": "default", "prompt": "a\\udfffb", "max_tokens": 2}'
    r = post(app, "/v1/completions", None, raw=raw)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = post(app, "/generate", None, raw=b'{"inputs": "\\ud83d"}')
    assert r.status_code == 422, r.text
    r = post(app, "/v1/chat/completions", None, raw=raw_json({**GOOD_CHAT, "stop": "\ud800"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    ok(app)


def test_invalid_utf8_and_deep_json_are_400(app):
    r = post(app, "/v1/chat/completions", None, raw=b'{"model": "\xff\xfe"}')
    assert r.status_code == 400, r.text
    r = post(app, "/v1/chat/completions", None, raw=b"[" * 100000 + b"]" * 100000)
    assert r.status_code == 400, r.text
    ok(app)


def test_explicit_null_means_default(app):
    nulls = {k: None for k in ("n", "stream", "logprobs", "top_logprobs", "presence_penalty",
                               "frequency_penalty", "repetition_penalty", "temperature", "top_p",
                               "top_k", "min_p", "seed", "stop", "stop_token_ids", "min_tokens",
                               "ignore_eos", "stream_options", "user", "max_completion_tokens")}
    out = ok(app, body={**GOOD_CHAT, **nulls})
    assert len(out["choices"]) == 1 and out["choices"][0]["logprobs"] is None
    out = ok(app, "/v1/completions", {**GOOD_CMPL, **nulls, "echo": None, "best_of": None,
                                      "suffix": None})
    assert len(out["choices"]) == 1
    out = ok(app, "/generate", {"inputs": "Hi", "parameters": {
        "max_new_tokens": 2, "stop": None, "details": None, "do_sample": None, "seed": None}})
    assert "generated_text" in out


def test_max_tokens_null_is_bounded_by_max_total_tokens(app):
    body = {**GOOD_CMPL, "max_tokens": None, "ignore_eos": True}
    out = ok(app, "/v1/completions", body)
    u = out["usage"]
    assert u["total_tokens"] == 64 and out["choices"][0]["finish_reason"] == "length", u
    out = ok(app, body={**GOOD_CHAT, "max_tokens": None, "ignore_eos": True})
    assert out["usage"]["total_tokens"] == 64


def test_model_placeholders_and_strict_names(engine, app):
    for name in ("tgi", "dummy", "", "TGI"):
        out = ok(app, body={**GOOD_CHAT, "model": name})
        assert out["model"] == "default"
    body = {k: v for k, v in GOOD_CHAT.items() if k != "model"}
    assert ok(app, body=body)["model"] == "default"
    bad(app, "/v1/chat/completions", {**GOOD_CHAT, "model": "gpt-4o"}, "model", status=404)
    strict = make_app(engine, strict_model_names=True)
    bad(strict, "/v1/chat/completions", {**GOOD_CHAT, "model": "tgi"}, "model", status=404)
    bad(strict, "/v1/completions", {**GOOD_CMPL, "model": ""}, "model", status=404)
    ok(strict)


def test_info_reports_the_caps(app):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.get("/info")).json()

    info = asyncio.run(go())
    assert info["max_stop_sequences"] == 4 and info["corral_max_n"] == 4
    assert info["corral_max_prompts"] == 3


def test_retry_after_and_allow(engine):
    from corral.server.errors import ApiError, error_response

    assert error_response("/v1/completions", ApiError(429, "busy")).headers["retry-after"]
    assert error_response("/generate", ApiError(503, "draining")).headers["retry-after"]
    busy = make_app(engine, max_concurrent_requests=1, max_queue=0)
    busy.state.serving.admission.running = 1  # the one slot is taken
    r = post(busy, "/v1/completions", GOOD_CMPL)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    busy.state.serving.admission.running = 0

    async def go():
        transport = httpx.ASGITransport(app=busy)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/v1/chat/completions"), await c.delete("/health")

    r, r2 = asyncio.run(go())
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers
    assert r2.status_code == 405 and "GET" in r2.headers["allow"]


def test_logprob_bytes_rebuild_the_text(app):
    """Byte-level BPE splits 你好 inside characters; the bytes of the tokens rebuild it."""
    s = app.state.serving
    ids = s.encode("你好")
    assert any("\ufffd" in s.token_text(t) for t in ids)  # one token alone is not text
    assert bytes(b for t in ids for b in s.token_bytes(t)).decode() == "你好"
    assert s.token_bytes(s.encode(" Paris")[0]) == list(b" Paris")
    # and through the route: the chosen tokens' bytes decode to the generated text
    out = ok(app, body={**GOOD_CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 2})
    content = out["choices"][0]["logprobs"]["content"]
    assert bytes(b for c in content for b in c["bytes"]).decode(errors="replace") == \
        out["choices"][0]["message"]["content"]


def test_stream_events_stay_one_line_for_line_splitting_readers(app):
    """U+0085, U+2028 and U+2029 are line ends to str.splitlines() and so to httpx's
    iter_lines, not to SSE: the events escape them, so every line of an echoed stream is one
    whole event, and the text comes back unchanged."""
    prompt = "a\x85b\u2028c\u2029d"
    r = post(app, "/v1/completions", {**GOOD_CMPL, "prompt": prompt, "echo": True,
                                      "max_tokens": 1, "stream": True})
    assert r.status_code == 200, r.text
    lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    assert "".join(e["choices"][0]["text"] for e in events).startswith(prompt)


def test_a_constraint_no_token_can_follow_is_a_client_error(app):
    """SmolLM2's byte-level vocabulary has no token for the byte 0xF1 that starts U+40000:
    the regex leaves no token at the first step. The request fails alone, as a 400 (TGI: 422),
    never a 500; the next request runs."""
    body = {**GOOD_CHAT, "guided_regex": "\U00040000"}
    r = post(app, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "generation_failed" and "every token is forbidden" in err["message"]
    assert err["type"] == "invalid_request_error"
    r = post(app, "/generate", {**GOOD_TGI, "parameters": {
        **GOOD_TGI["parameters"], "grammar": {"type": "regex", "value": "\U00040000"}}})
    assert r.status_code == 422 and "every token is forbidden" in r.json()["error"], r.text
    ok(app)


def test_an_unexpected_error_is_a_json_500_that_keeps_the_connection(engine, monkeypatch):
    """Nothing escapes the app (uvicorn would close the keep-alive connection after it)."""
    app = make_app(engine)

    def broken(prompt):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(app.state.serving, "encode", broken)
    r = post(app, "/v1/completions", GOOD_CMPL)  # ASGITransport re-raises what escapes
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    r = post(app, "/generate", GOOD_TGI)
    assert r.status_code == 500 and r.json()["error_type"] == "generation", r.text
    ok(app)
