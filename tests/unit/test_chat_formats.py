"""One definition per chat format: the Jinja templates saved with tuned/merged models render
exactly like the format, `<s>`/`</s>` are mapped to a tokenizer's real tokens, Human/Assistant
training text parses back into turns, tool results, stop strings and turn markers."""

from __future__ import annotations

import copy

import pytest

from corral.chat import (
    BUILTINS,
    Specials,
    get_chat_format,
    parse_human_assistant,
    specials_for,
    turn_marker,
    validate_messages,
)
from corral.errors import CorralError
from tests.unit.test_chat import word_tokenizer

CONVS = [[{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"},
          {"role": "user", "content": "again"}],
         [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "q"}],
         [{"role": "user", "content": "it's a \\ 'quote'"}]]
TOOL_CONV = [{"role": "user", "content": "weather?"},
             {"role": "assistant", "content": "get_weather()"},
             {"role": "tool", "content": '{"temp": 21}'}]


@pytest.fixture(scope="module")
def smol_tok(default_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_folder)


@pytest.fixture(scope="module")
def llama2_tok():
    return word_tokenizer("<s>", "</s>", [])


@pytest.mark.parametrize("which", ["smol", "llama2"])
@pytest.mark.parametrize("name", BUILTINS)
def test_saved_template_renders_like_the_format(name, which, smol_tok, llama2_tok):
    tok = copy.deepcopy(smol_tok if which == "smol" else llama2_tok)
    fmt = get_chat_format(name, tok)
    tok.chat_template = fmt.template
    convs = CONVS + ([TOOL_CONV] if name in ("llama3", "chatml") else [])
    for conv in convs:
        for gen in (True, False):
            got = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert got == fmt.render(conv, add_generation_prompt=gen), (name, conv, gen)
    # a model saved with that template is recognised as the format again (and its stops apply)
    assert get_chat_format(None, tok) is fmt and get_chat_format("template", tok).name == "template"


def test_human_assistant_on_a_tokenizer_without_llama2_tokens(smol_tok):
    assert specials_for(smol_tok) == Specials("<|im_start|>", "<|im_end|>")
    f = get_chat_format("human-assistant", smol_tok)
    conv = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert f.render(conv, add_generation_prompt=False) == (
        "<|im_start|>Human: 你好\n<|im_end|><|im_start|>Assistant: 你好！\n<|im_end|>")
    ids = smol_tok(f.render(conv, add_generation_prompt=False))["input_ids"]
    assert ids[-1] == smol_tok.eos_token_id  # the answer ends with the token inference stops on
    assert f.stop_token_ids(smol_tok) == [smol_tok.eos_token_id, smol_tok.bos_token_id]
    # literal markers a model may still write are text stops: cut, never part of an answer
    for marker in ("</s>", "<s>Human:", "\nHuman:"):
        assert marker in f.text_stops(smol_tok)
    # on a Llama 2 vocabulary the format stays as published
    two = word_tokenizer("<s>", "</s>", [])
    assert get_chat_format("human-assistant", two).render(conv).startswith("<s>Human: 你好\n</s>")


def test_parse_human_assistant_round_trips():
    f = get_chat_format("human-assistant", None)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "中国的首都？"},
            {"role": "assistant", "content": "北京。"}, {"role": "user", "content": "And France?"},
            {"role": "assistant", "content": "Paris"}]
    assert parse_human_assistant(f.render(conv, add_generation_prompt=False)) == conv
    # rows written by hand: missing final end, no newline before </s>, no space after ':'
    assert parse_human_assistant("<s>Human:q</s><s>Assistant: a") == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(CorralError, match="empty answer"):
        parse_human_assistant("<s>Human: q\n</s><s>Assistant: \n</s>")
    with pytest.raises(CorralError, match="no '<s>Assistant: ' answer"):
        parse_human_assistant("<s>Human: q\n</s>")
    with pytest.raises(CorralError, match="text before"):
        parse_human_assistant("preamble <s>Human: q\n</s><s>Assistant: a\n</s>")


def test_tool_role_order_and_support():
    validate_messages(TOOL_CONV + [{"role": "assistant", "content": "21 degrees"}])
    with pytest.raises(CorralError, match="'assistant' was expected"):
        validate_messages(TOOL_CONV + [{"role": "user", "content": "thanks"}])
    with pytest.raises(CorralError, match="'assistant' was expected"):
        validate_messages([{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}])
    assert "<|start_header_id|>ipython<|end_header_id|>" in get_chat_format("llama3").render(
        TOOL_CONV)
    for name in ("llama2", "human-assistant"):
        with pytest.raises(CorralError, match="no tool role"):
            get_chat_format(name).render(TOOL_CONV)


def test_turn_markers():
    assert turn_marker("北京。\n</s><s>Human: 下一个") == "</s>"
    assert turn_marker("fine\nHuman: more") == "\nHuman:"
    assert turn_marker("Paris<|im_start|>user") == "<|im_start|>"
    assert turn_marker("Humans are mammals. [not a marker]") is None


def test_engine_adds_the_formats_text_stops(tiny_model_dir):
    from corral import LLM, SamplingParams

    llm = LLM(model=str(tiny_model_dir), device="cpu", dtype="float32",
              chat_format="human-assistant")
    p = llm.chat_params(SamplingParams(stop=["END"]))
    assert p.stop[0] == "END" and {"</s>", "\nHuman:", "<s>Human:"} <= set(p.stop)
    assert llm.tokenizer.eos_token_id in p.stop_token_ids + llm.core.eos_token_ids


def test_every_trained_answer_ends_with_a_token_inference_stops_on(llama2_tok):
    """chatml on a vocab without <|im_end|>: the literal marker is text, so the real EOS follows
    (and the marker is a text stop at inference)."""
    from corral.tune.data import Example, encode_examples

    fmt = get_chat_format("chatml", llama2_tok)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    (enc,), _ = encode_examples([Example("row 1", messages=conv)], llama2_tok, fmt, 512)
    trained = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert trained[-1] == llama2_tok.eos_token_id in fmt.stop_token_ids(llama2_tok)
    assert "<|im_end|>" in fmt.text_stops(llama2_tok)
