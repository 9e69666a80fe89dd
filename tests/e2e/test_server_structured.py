"""Structured outputs and tool calling against the real `corral serve` (default model), with
the real `openai` client, LangChain, and httpx for the TGI route."""

from __future__ import annotations

import enum
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from corral.server.launch import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model", "default", "--max-total-tokens", "1024", "--max-n", "24"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=24)
    zip_code: int = Field(ge=0, le=99999)


class Person(BaseModel):
    # bounds keep a 135M model from writing 300-digit numbers: without them an answer may
    # (correctly) end with finish_reason "length" instead
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)
    height_m: float = Field(ge=0, le=3)
    favourite: Color
    address: Address
    hobbies: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)


PROMPTS = [f"Invent a person who lives in {c} and describe them as JSON." for c in (
    "Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Seoul", "Dakar", "Rome")]


def test_parse_pydantic_model_ten_prompts(client):
    def one(prompt):
        r = client.chat.completions.parse(model="default", messages=ask(prompt),
                                          response_format=Person, max_tokens=300,
                                          temperature=0)
        return r.choices[0]

    with ThreadPoolExecutor(10) as pool:
        choices = list(pool.map(one, PROMPTS))
    for c in choices:
        assert c.finish_reason == "stop"
        person = c.message.parsed
        assert isinstance(person, Person) and isinstance(person.address, Address)
        assert isinstance(person.favourite, Color) and len(person.hobbies) <= 3
    assert len({c.message.content for c in choices}) > 1  # the prompts do steer the content


def test_json_object_always_parses(client):
    r = client.chat.completions.create(
        model="default", messages=ask("Give me a JSON object describing a cat."),
        response_format={"type": "json_object"}, max_tokens=80, temperature=0.7, n=4, seed=3)
    finished = [c for c in r.choices if c.finish_reason == "stop"]
    # free-form objects may run past max_tokens: that is "length", never a broken "stop"
    assert finished and all(c.finish_reason in ("stop", "length") for c in r.choices)
    for c in finished:
        assert isinstance(json.loads(c.message.content), dict)


def test_regex_and_choice_at_temperature_one(client):
    pattern = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
    r = client.chat.completions.create(
        model="default", messages=ask("Name a street and a house number."), n=24,
        temperature=1.0, max_tokens=20, extra_body={"structured_outputs": {"regex": pattern}})
    assert len(r.choices) == 24
    for c in r.choices:
        assert re.fullmatch(pattern, c.message.content), c.message.content
    options = ["positive", "negative", "neutral"]
    r = client.chat.completions.create(
        model="default", messages=ask("Sentiment of: 'I love this phone!'"), n=24,
        temperature=1.0, max_tokens=10, extra_body={"structured_outputs": {"choice": options}})
    got = [c.message.content for c in r.choices]
    assert len(got) == 24 and set(got) <= set(options)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 32}},
                   "required": ["tz"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
WEATHER_Q = ask("What is the weather in Berlin for the next three days?")


def check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.id and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_time"}}])
def test_forced_tool_calls_validate_streamed_and_not(client, choice):
    kw = {"model": "default", "messages": WEATHER_Q, "tools": [WEATHER, TIME],
          "tool_choice": choice, "max_tokens": 120, "temperature": 1.0, "seed": 11,
          # one call: a 135M model asked for a free-length array repeats calls until length
          "parallel_tool_calls": False}
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and not c.message.content
    check_calls(c.message.tool_calls)
    if isinstance(choice, dict):
        assert [t.function.name for t in c.message.tool_calls] == ["get_time"]

    chunks = list(client.chat.completions.create(**kw, stream=True))
    frags: dict[int, list[str]] = {}
    heads: dict[int, tuple[str, str]] = {}
    fragment_chunks = 0
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            if tc.id:
                heads[tc.index] = (tc.id, tc.function.name)
            if tc.function and tc.function.arguments:
                frags.setdefault(tc.index, []).append(tc.function.arguments)
                fragment_chunks += 1
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # same seed, same request: the stream carries the same calls, piece by piece
    assert [heads[k][1] for k in sorted(heads)] == [t.function.name for t in c.message.tool_calls]
    assert ["".join(frags[k]) for k in sorted(frags)] == \
        [t.function.arguments for t in c.message.tool_calls]
    assert fragment_chunks > len(heads)  # arguments really arrived in several pieces


def test_tool_result_round_trip(client):
    history = WEATHER_Q + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": "get_weather",
                "arguments": '{"city": "Berlin", "unit": "celsius", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sunny, 21 C"}'},
    ]
    r = client.chat.completions.create(model="default", messages=history, tools=[WEATHER],
                                       max_tokens=16, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    bare = client.chat.completions.create(model="default", messages=WEATHER_Q, tools=[WEATHER],
                                          max_tokens=1, temperature=0)
    # the call and its result are part of the prompt
    assert r.usage.prompt_tokens > bare.usage.prompt_tokens + 20


def test_schema_cut_by_max_tokens_ends_with_length(client):
    r = client.chat.completions.create(
        model="default", messages=ask("Describe a person."), max_tokens=4, temperature=0,
        response_format={"type": "json_schema", "json_schema": {
            "name": "p", "schema": Person.model_json_schema()}})
    assert r.choices[0].finish_reason == "length"


def test_bad_constraints_are_400_naming_the_field(server):
    def post(body):
        base = {"model": "default", "messages": ask("hi"), "max_tokens": 4}
        return httpx.post(server.url + "/v1/chat/completions", json={**base, **body}, timeout=60)

    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "frobnicate"}}}}, "response_format.json_schema"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "root ::= missing_rule"}},
         "structured_outputs.grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": 5}}}]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "tool_choice"),
    ]
    for body, param in cases:
        resp = post(body)
        assert resp.status_code == 400, (body, resp.text)
        err = resp.json()["error"]
        assert err["param"] and err["param"].startswith(param), (body, err)
    for stream in (False, True):
        resp = post({"stream": stream, "structured_outputs": {"regex": "(unclosed"}})
        assert resp.status_code == 400 and "regex" in resp.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_tgi_grammar(server):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 16}},
              "required": ["answer"]}
    r = httpx.post(server.url + "/generate", timeout=120, json={
        "inputs": "Q: What is the capital of France?\nA:",
        "parameters": {"max_new_tokens": 40, "grammar": {"type": "json", "value": schema}}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["generated_text"]), schema)
    with httpx.stream("POST", server.url + "/generate_stream", timeout=120, json={
            "inputs": "My phone number is", "parameters": {
                "max_new_tokens": 20, "do_sample": True, "seed": 1,
                "grammar": {"type": "regex", "value": r"\d{3}-\d{4}"}}}) as resp:
        events = [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data:")]
    assert re.fullmatch(r"\d{3}-\d{4}", events[-1]["generated_text"])
    r = httpx.post(server.url + "/generate", timeout=60, json={
        "inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "[a-"}}})
    assert r.status_code in (400, 422) and "regex" in r.json()["error"]  # TGI: validation


def test_langchain_structured_output_and_bind_tools(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="default",
                     temperature=0, max_tokens=300, max_retries=0)
    person = llm.with_structured_output(Person).invoke("Invent a person from Madrid.")
    assert isinstance(person, Person)

    class GetWeather(BaseModel):
        """Current weather for a city."""

        city: str = Field(max_length=24)
        days: int = Field(ge=1, le=7)

    msg = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke(
        "What is the weather in Rome for two days?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "GetWeather"
    GetWeather(**msg.tool_calls[0]["args"])
    msg = llm.bind_tools([GetWeather], tool_choice="required").invoke("Weather in Oslo?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "GetWeather"


SOAK_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                      "maximum": 999},
                                                "b": {"type": "string", "maxLength": 8}},
               "required": ["a", "b"], "additionalProperties": False}
SOAK_CONSTRAINTS = [
    None, {"guided_regex": "[a-z]{1,6}"}, {"guided_choice": ["yes", "no", "maybe"]},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "r",
                                                                "schema": SOAK_SCHEMA}}},
    {"guided_grammar": 'root ::= "x" [0-9]+'}]
SOAK_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
    "required": ["city"]}}}]


def soak_request(rng) -> tuple[str, dict]:
    """A random mix: chat or completion, streamed or not, n 1-3, one constraint or tools."""
    body = {"model": "default", "max_tokens": rng.randint(1, 24), "stream": rng.random() < 0.6,
            "temperature": rng.choice([0, 0.7, 1.2]), "n": rng.choice([1, 1, 2, 3])}
    if c := rng.choice(SOAK_CONSTRAINTS):
        body.update(c)
    if rng.random() < 0.6:
        body["messages"] = ask(rng.choice(["Hi", "Name a city.", "Count to five.", "你好"]))
        if c is None and rng.random() < 0.4:
            body.update(tools=SOAK_TOOLS, tool_choice=rng.choice(["auto", "required", "none"]))
        return "/v1/chat/completions", body
    body["prompt"] = rng.choice(["Once upon a time", "The capital of France is", "1, 2, 3,"])
    return "/v1/completions", body


def check_soak_answer(body: dict, out: dict) -> int:
    """Whole answers keep their constraint (unless cut by max_tokens); returns how many
    constrained choices it checked."""
    checked = 0
    for ch in out["choices"]:
        text = ch["message"]["content"] if "message" in ch else ch["text"]
        if ch["finish_reason"] != "stop":
            continue
        if "guided_regex" in body:
            assert re.fullmatch("[a-z]{1,6}", text), text
        elif "guided_choice" in body:
            assert text in body["guided_choice"], text
        elif "guided_grammar" in body:
            assert re.fullmatch(r"x[0-9]+", text), text
        elif body.get("response_format", {}).get("type") == "json_schema":
            jsonschema.validate(json.loads(text), SOAK_SCHEMA)
        elif "response_format" in body:
            assert isinstance(json.loads(text), dict), text
        else:
            continue
        checked += 1
    return checked


def test_concurrent_mixed_traffic_with_disconnects(server):
    """16 clients for 15 s: constrained and free requests, tools, n > 1, streams of which a
    third hang up after a few events, all batched together on the GGUF kernels. No answer is
    a 5xx, whole answers keep their constraints, and afterwards every KV block is free."""
    import asyncio
    import random
    import time

    statuses: dict = {}
    checked = [0]

    async def one_client(i: int, http: httpx.AsyncClient, deadline: float) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            path, body = soak_request(rng)
            if body["stream"]:
                cut = rng.randint(1, 6) if rng.random() < 0.33 else None
                async with http.stream("POST", path, json=body) as r:
                    k = 0
                    async for line in r.aiter_lines():
                        k += bool(line)
                        if cut and k >= cut:
                            break
                status = r.status_code
            else:
                r = await http.post(path, json=body)
                status = r.status_code
                if status == 200:
                    checked[0] += check_soak_answer(body, r.json())
            statuses[status] = statuses.get(status, 0) + 1

    async def run() -> dict:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            deadline = time.monotonic() + 15
            await asyncio.gather(*(one_client(i, http, deadline) for i in range(16)))
            for _ in range(60):  # aborts of the hung-up streams land within a step or two
                health = (await http.get("/health")).json()
                if health["num_free_blocks"] == health["num_total_blocks"]:
                    break
                await asyncio.sleep(0.5)
            return health

    health = asyncio.run(run())
    assert set(statuses) == {200} and sum(statuses.values()) > 50, statuses
    assert checked[0] > 10, checked
    assert health["status"] == "ok" and health["num_free_blocks"] == health["num_total_blocks"]
