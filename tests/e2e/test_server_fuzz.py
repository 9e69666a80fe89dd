"""Fuzz stage: hypothesis-generated requests, valid and hostile, against the real server.

Every route gets a bounded number of generated requests (NaN/Infinity, huge and negative
numbers, nulls, wrong types, lone surrogates, long lists, junk bodies, wrong methods). Each
answer must be a non-5xx whose body matches the documented schema: OpenAI's own response
types (`openai.types`), TGI's (`text_generation.types`), or the error shape of the route's
family. Afterwards /health is 200 and every KV block is free.

A tiny random Llama with SmolLM2's full tokenizer keeps each generation step cheap; the
examples per POST route are `CORRAL_FUZZ_EXAMPLES` (default 40), derandomized for CI.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.server.launch import ServerProcess
from tests.conftest import save_tiny_model, tiny_config

pytestmark = pytest.mark.slow

STATUSES: Counter = Counter()  # (path, status) over the run: the fuzz must reach the engine
EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_folder):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("fuzz-model")
    tok = AutoTokenizer.from_pretrained(default_folder)
    save_tiny_model(path, tiny_config(vocab_size=len(tok), hidden_size=32,
                                      intermediate_size=64, max_position_embeddings=256))
    tok.save_pretrained(path)
    args = ["--model", str(path), "--served-model-name", "default", "--max-total-tokens", "96",
            "--max-input-tokens", "80", "--max-concurrent-requests", "2", "--max-queue", "4",
            "--max-body-bytes", "65536"]
    with ServerProcess(args) as srv:
        srv.http = httpx.Client(base_url=srv.url, timeout=60)
        yield srv
        srv.http.close()


# ---- strategies -------------------------------------------------------------------------

HOSTILE = st.sampled_from([None, math.nan, math.inf, -math.inf, 1e308, -1e308, 1e-40, 1e-300,
                           0, -1, -5, 2**31, 2**63, 2**64, -(2**63), 10**30, 0.5, "", "x",
                           "\ud800", True, False, [], {}, [math.nan], [1, None]])
TEXT = st.one_of(st.text(max_size=24), st.sampled_from(["a\ud800b", "\udfff", "你好", "\x00",
                                                        "😀" * 5, "<|im_end|>", " " * 30]))


def num(lo: float, hi: float):
    return st.one_of(st.floats(lo, hi), st.integers(int(lo), int(hi)), HOSTILE)


def ints(lo: int, hi: int):
    return st.one_of(st.integers(lo, hi), HOSTILE)


def maybe_list(s, n: int = 6):
    return st.one_of(s, st.lists(s, max_size=n), HOSTILE)


TOKEN_IDS = st.lists(st.one_of(st.integers(0, 49151), st.integers(-3, 10**7), HOSTILE),
                     max_size=8)
SHORT = st.text(max_size=12)  # valid Unicode (hypothesis leaves out surrogates)
GOOD_IDS = st.lists(st.integers(0, 49151), min_size=1, max_size=8)
# field: (a valid value, anything a client might send)
SAMPLING = {
    "temperature": (st.floats(0, 2), num(0, 3)), "top_p": (st.floats(0.05, 1), num(0, 1)),
    "top_k": (st.integers(-1, 50), ints(-2, 100)), "min_p": (st.floats(0, 0.5), num(0, 1)),
    "presence_penalty": (st.floats(-2, 2), num(-3, 3)),
    "frequency_penalty": (st.floats(-2, 2), num(-3, 3)),
    "repetition_penalty": (st.floats(0.5, 2), num(0, 3)),
    "seed": (st.integers(0, 2**64 - 1), ints(0, 2**64)), "n": (st.integers(1, 3), ints(0, 20)),
    "max_tokens": (st.integers(1, 8), ints(-1, 8)), "min_tokens": (st.integers(0, 1),
                                                                  ints(-1, 6)),
    "stop": (st.lists(SHORT.filter(bool), max_size=3), maybe_list(TEXT, 20)),
    "stop_token_ids": (st.lists(st.integers(0, 49151), max_size=3), TOKEN_IDS),
    "ignore_eos": (st.booleans(), st.one_of(st.booleans(), HOSTILE)),
    "stream": (st.booleans(), st.one_of(st.booleans(), HOSTILE)),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}),
                       st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}),
                                 HOSTILE)),
    "user": (SHORT, TEXT),
}
# constrained output and tools: small valid constraints, and anything a client might send
# (broken regexes and grammars, non-schemas, deep JSON, wrong types)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT)
JSON_ANY = st.recursive(JSON_LEAF, lambda c: st.one_of(st.lists(c, max_size=3),
                                                       st.dictionaries(TEXT, c, max_size=3)),
                        max_leaves=12)
SCHEMA = st.one_of(
    st.sampled_from([{"type": "object", "properties": {"a": {"type": "integer"}},
                      "required": ["a"]},
                     {"type": "string", "maxLength": 5}, {"type": "boolean"},
                     {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
                     {"enum": [1, "two", None]}]),
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "object",
                                                    "array", "null", "nope"])},
                          optional={"minimum": num(-10, 10), "maxLength": ints(0, 9),
                                    "pattern": TEXT, "enum": st.lists(JSON_LEAF, max_size=3),
                                    "items": JSON_ANY, "properties": JSON_ANY}))
BAD_SCHEMA = st.one_of(SCHEMA, JSON_ANY, TEXT, HOSTILE)
REGEX = st.sampled_from(["[a-z]{1,5}", "(yes|no)", "\\d+", "a*b?"])
BAD_REGEX = st.one_of(REGEX, TEXT, st.sampled_from(["(", "[z-a]", "a{5,2}", "\\", "(?P<x>a)",
                                                    "a**", ".{0,200}x", "(a|)*"]), HOSTILE)
GRAMMAR = st.sampled_from(['root ::= "yes" | "no"', 'root ::= [0-9]+'])
BAD_GRAMMAR = st.one_of(GRAMMAR, TEXT, st.sampled_from(["root ::=", "root ::= root",
                                                        'x ::= "a"', "root ::= (", '::= "a"']),
                        HOSTILE)
CHOICE = st.lists(st.text("abcxyz ", min_size=1, max_size=6).filter(str.strip), min_size=1,
                  max_size=3)
RESPONSE_FORMAT = (
    st.one_of(st.just({"type": "text"}), st.just({"type": "json_object"}),
              st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema":
                                     st.fixed_dictionaries({"name": st.just("r"),
                                                            "schema": SCHEMA})})),
    st.one_of(st.fixed_dictionaries({"type": st.one_of(st.sampled_from(
        ["text", "json_object", "json_schema", "grammar"]), HOSTILE)},
        optional={"json_schema": st.one_of(st.fixed_dictionaries(
            {}, optional={"name": TEXT, "schema": BAD_SCHEMA, "strict": JSON_LEAF}), HOSTILE)}),
        HOSTILE))
CONSTRAINT_FIELDS = {
    "response_format": RESPONSE_FORMAT,
    "guided_json": (SCHEMA, BAD_SCHEMA), "guided_regex": (REGEX, BAD_REGEX),
    "guided_choice": (CHOICE, maybe_list(TEXT)), "guided_grammar": (GRAMMAR, BAD_GRAMMAR),
    "structured_outputs": (
        st.one_of(st.fixed_dictionaries({"regex": REGEX}), st.fixed_dictionaries({"choice": CHOICE}),
                  st.fixed_dictionaries({"json": SCHEMA})),
        st.one_of(st.fixed_dictionaries({}, optional={
            "json": BAD_SCHEMA, "regex": BAD_REGEX, "choice": maybe_list(TEXT),
            "grammar": BAD_GRAMMAR, "json_object": JSON_LEAF}), HOSTILE))}
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "add"])},
    optional={"description": SHORT, "parameters": SCHEMA})})
BAD_TOOL = st.one_of(TOOL, st.fixed_dictionaries({}, optional={
    "type": st.one_of(st.just("function"), TEXT, HOSTILE),
    "function": st.one_of(st.fixed_dictionaries({}, optional={
        "name": st.one_of(TEXT, HOSTILE), "parameters": BAD_SCHEMA, "strict": JSON_LEAF}),
        HOSTILE)}), HOSTILE)
TOOL_FIELDS = {
    "tools": (st.lists(TOOL, min_size=1, max_size=2, unique_by=lambda t: t["function"]["name"]),
              st.one_of(st.lists(BAD_TOOL, max_size=4), HOSTILE)),
    "tool_choice": (st.sampled_from(["auto", "none", "required",
                                     {"type": "function", "function": {"name": "get_weather"}}]),
                    st.one_of(TEXT, st.fixed_dictionaries({}, optional={
                        "type": st.one_of(st.just("function"), TEXT), "function": st.one_of(
                            st.fixed_dictionaries({"name": st.one_of(TEXT, HOSTILE)}),
                            HOSTILE)}), HOSTILE)),
    "parallel_tool_calls": (st.booleans(), st.one_of(st.booleans(), HOSTILE))}
MODEL = (st.sampled_from(["default", "tgi", "dummy", ""]),
         st.sampled_from(["default", "tgi", "dummy", "", "gpt-4o", None, 3, "\ud800"]))
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "", None]),
     "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": TEXT}), max_size=3),
         HOSTILE)})
WORDS = SHORT.filter(str.strip)
GOOD_MESSAGES = st.one_of(  # the chat format wants [system], user, (assistant, user)*
    st.tuples(WORDS).map(lambda t: [{"role": "user", "content": t[0]}]),
    st.tuples(WORDS, WORDS).map(lambda t: [{"role": "system", "content": t[0]},
                                           {"role": "user", "content": t[1]}]),
    st.tuples(WORDS, WORDS, WORDS).map(lambda t: [{"role": "user", "content": t[0]},
                                                  {"role": "assistant", "content": t[1]},
                                                  {"role": "user", "content": t[2]}]))
CHAT_FIELDS = {
    "model": MODEL,
    "messages": (GOOD_MESSAGES, st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), HOSTILE)),
    **SAMPLING, "max_completion_tokens": (st.integers(1, 8), ints(-1, 8)),
    "logprobs": (st.booleans(), st.one_of(st.booleans(), HOSTILE)),
    "top_logprobs": (st.none(), ints(-1, 25))}  # valid only with logprobs=true
COMPLETION_FIELDS = {
    "model": MODEL,
    "prompt": (st.one_of(SHORT.filter(str.strip), st.lists(SHORT.filter(str.strip), min_size=1,
                                                            max_size=3), GOOD_IDS),
               st.one_of(TEXT, st.lists(TEXT, max_size=4), TOKEN_IDS,
                         st.lists(TOKEN_IDS, max_size=3), HOSTILE)),
    **SAMPLING, "logprobs": (st.integers(0, 5), ints(-1, 25)),
    "echo": (st.booleans(), st.one_of(st.booleans(), HOSTILE)),
    "best_of": (st.just(1), ints(0, 3)), "suffix": (st.just(""), st.one_of(TEXT, HOSTILE))}
TGI_PARAMETERS = {
    "max_new_tokens": (st.integers(1, 8), ints(-1, 8)),
    "temperature": (st.floats(0.1, 2), num(-1, 3)),
    "top_k": (st.integers(1, 50), ints(-1, 50)), "top_p": (st.floats(0.05, 0.99), num(0, 1)),
    "typical_p": (st.floats(0.1, 1), num(0, 1.5)),
    "repetition_penalty": (st.floats(0.5, 2), num(0, 3)),
    "frequency_penalty": (st.floats(-2, 2), num(-3, 3)),
    "stop": (st.lists(SHORT.filter(bool), max_size=3), maybe_list(TEXT, 20)),
    "seed": (st.integers(0, 2**64 - 1), ints(0, 2**64)),
    "do_sample": (st.booleans(), st.one_of(st.booleans(), HOSTILE)),
    "details": (st.booleans(), st.one_of(st.booleans(), HOSTILE)),
    "decoder_input_details": (st.booleans(), st.booleans()),
    "return_full_text": (st.booleans(), st.booleans()),
    "best_of": (st.just(1), ints(0, 2)), "truncate": (st.integers(1, 50), ints(-1, 50)),
    "top_n_tokens": (st.integers(0, 5), ints(-1, 25)), "watermark": (st.just(False),
                                                                    st.booleans()),
    "grammar": (st.one_of(st.fixed_dictionaries({"type": st.just("json"), "value": SCHEMA}),
                          st.fixed_dictionaries({"type": st.just("regex"), "value": REGEX})),
                st.one_of(st.fixed_dictionaries({}, optional={
                    "type": st.one_of(st.sampled_from(["json", "regex", "json_schema"]), TEXT,
                                      HOSTILE), "value": st.one_of(BAD_SCHEMA, BAD_REGEX)}),
                    HOSTILE))}


def requests_for(fields: dict, required: tuple[str, ...], bounded: str):
    """Valid bodies, valid bodies with one field made hostile, and hostile bodies. Valid ones
    always bound their length (`bounded`) so the run stays short; the others may not."""
    def dicts(which: int):
        req = {k: fields[k][which] for k in required + ((bounded,) if which == 0 else ())}
        opt = {k: v[which] for k, v in fields.items() if k not in req}
        return st.fixed_dictionaries(req, optional=opt)

    @st.composite
    def one_bad(draw):
        body = draw(dicts(0))
        key = draw(st.sampled_from(sorted(fields)))
        body[key] = draw(fields[key][1])
        return body

    return dicts(0), dicts(0), one_bad(), dicts(1)  # valid ones twice as often


def with_extras(bodies, groups: list[dict]):
    """Each body, now and then with one field of each group added (valid or hostile): at most
    one constraint a request, so that valid ones reach constrained decoding."""
    @st.composite
    def add(draw, body_strategy):
        body = draw(body_strategy)
        for fields in groups:
            if isinstance(body, dict) and draw(st.integers(0, 2)) == 0:
                key = draw(st.sampled_from(sorted(fields)))
                body[key] = draw(fields[key][draw(st.integers(0, 1))])
        return body

    return tuple(add(b) for b in bodies)


CHAT = with_extras(requests_for(CHAT_FIELDS, ("model", "messages"), "max_tokens"),
                   [CONSTRAINT_FIELDS, TOOL_FIELDS, TOOL_FIELDS])
COMPLETION = with_extras(requests_for(COMPLETION_FIELDS, ("model", "prompt"), "max_tokens"),
                         [CONSTRAINT_FIELDS])
_params = requests_for(TGI_PARAMETERS, (), "max_new_tokens")
_good_tgi = st.fixed_dictionaries({"inputs": SHORT.filter(str.strip),
                                   "parameters": _params[0]}, optional={"stream": st.booleans()})
TGI = (_good_tgi, _good_tgi,
       st.fixed_dictionaries({"inputs": SHORT.filter(str.strip), "parameters": _params[2]}),
       st.fixed_dictionaries({"inputs": st.one_of(TEXT, HOSTILE)},
                             optional={"stream": st.one_of(st.booleans(), HOSTILE),
                                       "parameters": st.one_of(_params[3], HOSTILE)}))
# now and then not a request at all: junk JSON, or not JSON
JUNK = st.one_of(st.none(), st.integers(), TEXT, st.lists(st.integers(), max_size=3),
                 st.dictionaries(TEXT, HOSTILE, max_size=4))


def body_bytes(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


# ---- checking answers -------------------------------------------------------------------

def check_error(path: str, r: httpx.Response) -> None:
    body = r.json()
    if path in ("/generate", "/generate_stream", "/", "/info"):
        assert isinstance(body["error"], str) and isinstance(body["error_type"], str), body
        return
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] is None or isinstance(err["param"], str)


def sse_events(r: httpx.Response) -> list:
    events = []
    for line in r.iter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def as_sdk_completion(e: dict, body: dict) -> dict:
    """A /v1/completions answer or chunk with the nulls OpenAI's API sends where the SDK's
    `Completion` type (shared by both) lists only final values: finish_reason null until a
    choice ends, and an echoed prompt's first token without a logprob. Checked, then filled."""
    choices = []
    for c in e.get("choices", []):
        assert c["finish_reason"] in (None, "stop", "length"), e
        c = {**c, "finish_reason": c["finish_reason"] or "stop"}
        lp = c.get("logprobs")
        if lp and lp.get("token_logprobs") and lp["token_logprobs"][0] is None:
            assert body.get("echo") is True, e
            lp = {**lp, "token_logprobs": [0.0, *lp["token_logprobs"][1:]]}
            if lp.get("top_logprobs") and lp["top_logprobs"][0] is None:
                lp["top_logprobs"] = [{}, *lp["top_logprobs"][1:]]
            c["logprobs"] = lp
        choices.append(c)
    return {**e, "choices": choices}


def check_answer(path: str, body, r: httpx.Response) -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from text_generation.types import Response, StreamResponse

    assert r.status_code < 500, (path, body, r.status_code, r.text[:500])
    if r.status_code != 200:
        if r.headers.get("content-type", "").startswith("application/json"):
            check_error(path, r)
        if r.status_code in (429, 503):
            assert r.headers.get("retry-after")
        return
    streamed = r.headers.get("content-type", "").startswith("text/event-stream")
    if path == "/v1/chat/completions":
        if streamed:
            events = sse_events(r)
            assert events[-1] == "[DONE]"
            for e in events[:-1]:
                ChatCompletionChunk.model_validate(e, strict=False)
        else:
            out = ChatCompletion.model_validate(r.json())
            # every choice's prompt + answer fits the 96-token budget (usage sums the choices)
            budget = 96 - out.usage.prompt_tokens
            assert 0 <= out.usage.completion_tokens <= len(out.choices) * budget
    elif path == "/v1/completions":
        if streamed:
            events = sse_events(r)
            assert events[-1] == "[DONE]"
            for e in events[:-1]:
                Completion.model_validate(as_sdk_completion(e, body))
        else:
            out = Completion.model_validate(as_sdk_completion(r.json(), body))
            assert out.usage.completion_tokens <= len(out.choices) * 96
    elif streamed:  # /generate_stream, or / with stream
        events = sse_events(r)
        for e in events:
            StreamResponse.model_validate(e)
        assert events[-1]["generated_text"] is not None
    else:
        out = r.json()
        for item in (out if path == "/" else [out]):
            assert isinstance(item["generated_text"], str)
            if "details" in item:
                Response.model_validate(item)


def send(server, path: str, body) -> None:
    raw = body_bytes(body) if body is not ... else b"{not json"
    with server.http.stream("POST", path, content=raw,
                            headers={"content-type": "application/json"}) as r:
        r.read()
        STATUSES[path, r.status_code] += 1
        check_answer(path, body if isinstance(body, dict) else {}, r)


# ---- the runs ---------------------------------------------------------------------------

@FUZZ
@given(body=st.one_of(*CHAT, JUNK))
def test_fuzz_chat(server, body):
    send(server, "/v1/chat/completions", body)


@FUZZ
@given(body=st.one_of(*COMPLETION, JUNK))
def test_fuzz_completions(server, body):
    send(server, "/v1/completions", body)


@FUZZ
@given(path=st.sampled_from(["/generate", "/generate_stream", "/"]),
       body=st.one_of(*TGI, JUNK))
def test_fuzz_tgi(server, path, body):
    send(server, path, body)


@settings(FUZZ, max_examples=max(10, EXAMPLES // 3))
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       path=st.one_of(st.sampled_from(["/v1/models", "/info", "/health", "/metrics",
                                       "/v1/chat/completions", "/generate", "/nothing"]),
                      st.text(max_size=12).map(lambda s: "/v1/models/" + quote(s, ""))))
def test_fuzz_other_routes(server, method, path):
    r = server.http.request(method, path)
    assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
    if r.status_code == 405:
        assert r.headers.get("allow"), r.headers
    if r.status_code == 200 and path == "/v1/models":
        assert r.json()["data"][0]["id"] == "default"


def test_after_the_fuzz_the_server_is_healthy_and_all_blocks_are_free(server):
    """Runs last in this module (pytest keeps file order)."""
    deadline = time.monotonic() + 30
    while True:
        r = server.http.get("/health")
        h = r.json()
        if h["num_free_blocks"] == h["num_total_blocks"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200 and h["status"] == "ok", h
    assert h["num_free_blocks"] == h["num_total_blocks"], h
    assert h["running_requests"] == h["queued_requests"] == h["num_running"] == 0, h
    send(server, "/v1/chat/completions", {"model": "default", "max_tokens": 2,
                                          "messages": [{"role": "user", "content": "Hi"}]})
    assert "Traceback" not in server.output(), server.output()[-3000:]
    # Not only refusals: each POST route answered a good share of generated requests with 200.
    for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
        total = sum(n for (p, _), n in STATUSES.items() if p == path)
        assert STATUSES[path, 200] >= 0.1 * total, STATUSES
