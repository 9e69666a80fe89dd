"""Constrained decoding in the engine (tiny random Llama + the SmolLM2 tokenizer it ships with)
and the tool-call parsers, renderers and streamer of the server."""

from __future__ import annotations

import json
import re

import pytest

from corral import SamplingParams, StructuredOutput
from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore
from corral.engine.structured import StructuredOutputError
from corral.server import tools
from corral.server.errors import ApiError


@pytest.fixture(scope="module")
def core(tiny_model_dir):
    return EngineCore(EngineConfig(model=str(tiny_model_dir), max_model_len=256))


def run_all(core, jobs):
    """jobs: {rid: (prompt, params)} run in one batch; returns {rid: RequestOutput}."""
    for rid, (prompt, params) in jobs.items():
        core.add_request(rid, prompt, params)
    done = {}
    while core.has_work():
        for out in core.step():
            if out.finished:
                done[out.request_id] = out
    return done


SCHEMA = {"type": "object", "properties": {
    "n": {"type": "integer", "minimum": 0, "maximum": 999},
    "tag": {"type": "string", "enum": ["a", "b", "c"]}}, "required": ["n", "tag"],
    "additionalProperties": False}


def test_constrained_and_free_requests_share_a_batch(core):
    free_ids = run_all(core, {"solo": ([5, 6, 7], SamplingParams(temperature=0, max_tokens=12,
                                                                 ignore_eos=True))})
    jobs = {
        "json": ([5, 6, 7], SamplingParams(temperature=1.0, max_tokens=40, n=3, seed=1,
                                           logprobs=2,
                                           structured=StructuredOutput(json_schema=SCHEMA))),
        "regex": ([8, 9], SamplingParams(temperature=1.0, max_tokens=20, n=4, seed=2,
                                         structured=StructuredOutput(regex=r"[a-c]{2}-\d"))),
        "choice": ([8, 9], SamplingParams(temperature=0, max_tokens=10,
                                          structured=StructuredOutput(choice=["yes", "no"]))),
        "free": ([5, 6, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
    }
    done = run_all(core, jobs)
    for c in done["json"].outputs:
        assert c.finish_reason == "stop", c.text
        obj = json.loads(c.text)
        assert 0 <= obj["n"] <= 999 and obj["tag"] in "abc"
        assert len(c.logprobs) == len(c.token_ids)
    assert all(re.fullmatch(r"[a-c]{2}-\d", c.text) for c in done["regex"].outputs)
    assert done["choice"].text in ("yes", "no")
    # the unconstrained row is untouched by its constrained neighbours
    assert done["free"].token_ids == free_ids["solo"].token_ids
    assert all(s.matcher is None for r in core.requests.values() for s in r.seqs)
    assert core.bm.num_free_blocks == core.bm.num_blocks


def test_length_cut_and_stop_string(core):
    out = run_all(core, {"cut": ([5, 6], SamplingParams(
        temperature=0, max_tokens=3, structured=StructuredOutput(json_schema=SCHEMA)))})["cut"]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    out = run_all(core, {"s": ([5, 6], SamplingParams(
        temperature=0, max_tokens=30, stop=["-"],
        structured=StructuredOutput(regex=r"ab-cd")))})["s"]
    assert out.text == "ab" and out.finish_reason == "stop"


def test_bad_constraints_raise_before_queueing(core):
    with pytest.raises(StructuredOutputError, match="exactly one"):
        StructuredOutput(regex="a", choice=["b"])
    with pytest.raises(StructuredOutputError, match="choice"):
        StructuredOutput(choice=[])
    for so, what in ((StructuredOutput(regex="(", param="f"), "regex"),
                     (StructuredOutput(json_schema={"type": "nope"}), "JSON schema"),
                     (StructuredOutput(json_schema="{not json"), "not valid JSON"),
                     (StructuredOutput(grammar="root ::= undefined"), "grammar")):
        with pytest.raises(StructuredOutputError, match=what):
            core.add_request("bad", [5], SamplingParams(structured=so))
        assert "bad" not in core.requests
    assert not core.has_work()


def test_compile_cache(core):
    a = StructuredOutput(json_schema=dict(SCHEMA))
    b = StructuredOutput(json_schema=json.loads(json.dumps(SCHEMA)))
    assert core.structured.compile(a) is core.structured.compile(b)


# ---- tools ---------------------------------------------------------------------------------

FN = tools.ToolDef(function=tools.FunctionDef(name="add", parameters={
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"]}))


def test_hermes_parser():
    text = ('Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n'
            '</tool_call>')
    content, calls = tools.parse_hermes(text)
    assert content == "Let me check."
    assert [(n, json.loads(a)) for n, a in calls] == [("add", {"a": 1, "b": 2}),
                                                      ("add", {"a": 3, "b": 4})]
    assert tools.parse_hermes("no calls here") == ("no calls here", [])
    assert tools.parse_hermes("<tool_call>{broken</tool_call>")[1] == []


@pytest.mark.parametrize("text", [
    '{"name": "add", "parameters": {"a": 1, "b": 2}}',
    '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}',
    ' {"name": "add", "arguments": {"a": 1, "b": 2}}'])
def test_llama3_parser(text):
    content, calls = tools.parse_llama3(text)
    assert content is None and calls == [("add", '{"a": 1, "b": 2}')]


def test_llama3_parser_several_and_plain_text():
    _, calls = tools.parse_llama3('{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                                  '{"name": "add", "parameters": {"a": 5, "b": 6}}')
    assert len(calls) == 2
    assert tools.parse_llama3("The answer is 3.") == ("The answer is 3.", [])
    assert tools.parse_llama3('{"no_name": 1}')[1] == []


def feed_all(plan, text, pieces):
    st = plan.streamer()
    content, deltas = "", []
    for i in range(0, len(text), pieces):
        c, d = st.feed(text[i:i + pieces], False)
        content += c
        deltas += d
    c, d = st.feed("", True)
    return content + c, deltas + d


def join_args(deltas):
    args: dict[int, str] = {}
    for d in deltas:
        args[d["index"]] = args.get(d["index"], "") + d["function"].get("arguments", "")
    return args


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_streamed_required_array_fragments_concatenate(step):
    plan = tools.make_plan([FN], "required", None, "hermes")
    text = ('[{"name": "add", "parameters": {"a": 1, "b": "}]\\""}}, '
            '{"name": "add", "parameters": {"a": 2, "b": 3}}]')
    _, calls = plan.parse(text)
    content, deltas = feed_all(plan, text, step)
    assert content == ""
    assert [d["id"] for d in deltas if "id" in d] and len({d["id"] for d in deltas if "id" in d}) == 2
    assert join_args(deltas) == {0: calls[0][1], 1: calls[1][1]}
    assert json.loads(calls[0][1]) == {"a": 1, "b": '}]"'}


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_streamed_named_and_auto(step):
    plan = tools.make_plan([FN], tools.NamedToolChoice(function={"name": "add"}), None, "hermes")
    content, deltas = feed_all(plan, '{"a": 1, "b": 2}', step)
    assert join_args(deltas) == {0: '{"a": 1, "b": 2}'} and deltas[0]["function"]["name"] == "add"
    auto = tools.make_plan([FN], "auto", None, "hermes")
    text = 'Sure.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    content, deltas = feed_all(auto, text, step)
    assert content == "Sure." and join_args(deltas) == {0: '{"a": 1, "b": 2}'}
    content, deltas = feed_all(auto, "Plain <tool answer", step)
    assert content == "Plain <tool answer" and deltas == []


def test_plan_validation():
    with pytest.raises(ApiError, match="not in tools"):
        tools.make_plan([FN], tools.NamedToolChoice(function={"name": "x"}), None, "hermes")
    bad = tools.ToolDef(function=tools.FunctionDef(name="f", parameters={"type": 3}))
    with pytest.raises(ApiError, match="not a valid JSON schema"):
        tools.make_plan([bad], "auto", None, "hermes")
    with pytest.raises(ApiError, match="twice"):
        tools.make_plan([FN, FN], "auto", None, "hermes")
    with pytest.raises(ApiError, match="needs tools"):
        tools.make_plan(None, "required", None, "hermes")
    schema = tools.make_plan([FN], "required", False, "hermes").structured().json_schema
    assert schema["maxItems"] == 1 and schema["items"]["properties"]["name"]["enum"] == ["add"]


def test_convention_rendering_round_trip():
    msgs = [{"role": "user", "content": "Add 1 and 2"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "3"},
            {"role": "tool", "tool_call_id": "c2", "content": "4"}]
    out = tools.convention_messages(msgs, [FN], "hermes")
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert "<tools>" in out[0]["content"] and '"name": "add"' in out[0]["content"]
    assert tools.parse_hermes(out[2]["content"])[1] == [("add", '{"a": 1, "b": 2}')]
    assert out[3]["content"] == "<tool_response>\n3\n</tool_response>\n" \
                                "<tool_response>\n4\n</tool_response>"
    l3 = tools.convention_messages(msgs, [FN], "llama3_json")
    assert tools.parse_llama3(l3[2]["content"])[1] == [("add", '{"a": 1, "b": 2}')]


def test_choose_parser():
    class Tok:
        chat_template = "{{ '<|start_header_id|>' }}...<|eot_id|>"

    assert tools.choose_parser(None, "llama3", None) == "llama3_json"
    assert tools.choose_parser(None, "template", Tok()) == "llama3_json"
    assert tools.choose_parser(None, "chatml", None) == "hermes"
    assert tools.choose_parser("hermes", "llama3", None) == "hermes"
    with pytest.raises(ValueError):
        tools.choose_parser("nope", None, None)
