"""Chat formats: exact prompt strings and token ids, stop ids, training segments, validation."""

from __future__ import annotations

import pytest

from corral.chat import encode_chat, get_chat_format, render_for_training
from corral.errors import CorralError

SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "Hi"}
A1 = {"role": "assistant", "content": "Hello there"}
U2 = {"role": "user", "content": "Capital of France?"}
A2 = {"role": "assistant", "content": "Paris"}

WORDS = ["[", "]", "/", "<", ">", ":", "?", "\n", " ", "INST", "SYS", "Hi", "Hello", "there",
         "Capital", "of", "France", "Paris", "Be", "brief", ".", "system", "user", "assistant",
         "Human", "Assistant", "System"]


def word_tokenizer(bos: str, eos: str, specials: list[str]):
    """A tiny WordLevel tokenizer that, like Llama's, adds BOS by default.

    Pre-tokenization isolates words, single whitespace characters and punctuation, so the
    expected ids of a rendered prompt can be written down token by token.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for tok in [bos, eos, *specials, *WORDS]:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s|[^\w\s]"), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                      special_tokens=[(bos, vocab[bos])])
    tk.add_special_tokens([bos, eos, *specials])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos,
                                   unk_token="[UNK]")


@pytest.fixture(scope="module")
def llama2_tok():
    return word_tokenizer("<s>", "</s>", [])


@pytest.fixture(scope="module")
def llama3_tok():
    return word_tokenizer("<|begin_of_text|>", "<|end_of_text|>",
                          ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])


@pytest.fixture(scope="module")
def smol_tok(default_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_folder)


def ids(tok, tokens: list[str]) -> list[int]:
    out = tok.convert_tokens_to_ids(tokens)
    assert tok.unk_token_id not in out, tokens  # the test itself must only use known tokens
    return out


def spaced(*words: str) -> list[str]:
    """Tokens of words separated by single spaces (how the word tokenizer splits them)."""
    out: list[str] = []
    for w in words:
        out += [w, " "]
    return out[:-1]


# --- llama2 -----------------------------------------------------------------------------------

def test_llama2_strings():
    f = get_chat_format("llama2", None)
    assert f.render([U1]) == "<s>[INST] Hi [/INST]"
    assert f.render([SYS, U1]) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    assert f.render([SYS, U1, A1, U2]) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello there </s>"
        "<s>[INST] Capital of France? [/INST]")
    assert f.render([U1, A1, U2, A2], add_generation_prompt=False) == (
        "<s>[INST] Hi [/INST] Hello there </s><s>[INST] Capital of France? [/INST] Paris </s>")
    # contents are stripped like Meta's template
    assert f.render([{"role": "user", "content": "  Hi \n"}]) == "<s>[INST] Hi [/INST]"


def test_llama2_ids_single_bos(llama2_tok):
    f = get_chat_format("llama2", llama2_tok)
    inst = ["[", "INST", "]"]
    end_inst = ["[", "/", "INST", "]"]
    got = encode_chat(llama2_tok, f, [U1, A1, U2])
    want = ids(llama2_tok, ["<s>", *inst, " ", "Hi", " ", *end_inst, " ", *spaced("Hello", "there"),
                            " ", "</s>", "<s>", *inst, " ", *spaced("Capital", "of", "France"),
                            "?", " ", *end_inst])
    assert got == want
    assert got.count(llama2_tok.bos_token_id) == 2  # one per exchange, never doubled at start
    assert got[:2] != [llama2_tok.bos_token_id] * 2
    with_sys = encode_chat(llama2_tok, f, [SYS, U1])
    sys_block = ["<", "<", "SYS", ">", ">", "\n", *spaced("Be", "brief"), ".", "\n",
                 "<", "<", "/", "SYS", ">", ">", "\n", "\n"]
    assert with_sys == ids(llama2_tok, ["<s>", *inst, " ", *sys_block, "Hi", " ", *end_inst])
    assert f.stop_strings == ("</s>", "[INST]")  # a model that misses </s> is cut at [INST]
    assert f.stop_token_ids(llama2_tok) == [llama2_tok.eos_token_id]
    assert f.text_stops(llama2_tok) == ["[INST]"]


# --- llama3 -----------------------------------------------------------------------------------

def test_llama3_strings():
    f = get_chat_format("llama3", None)
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert f.render([U1]) == (
        "<|begin_of_text|>" + head.format("user") + "Hi<|eot_id|>" + head.format("assistant"))
    assert f.render([SYS, U1, A1, U2]) == (
        "<|begin_of_text|>" + head.format("system") + "Be brief.<|eot_id|>"
        + head.format("user") + "Hi<|eot_id|>" + head.format("assistant") + "Hello there<|eot_id|>"
        + head.format("user") + "Capital of France?<|eot_id|>" + head.format("assistant"))
    assert f.render([{"role": "user", "content": "\n Hi  "}]).count("\n\nHi<|eot_id|>") == 1
    assert f.render([U1, A1], add_generation_prompt=False).endswith("Hello there<|eot_id|>")


def test_llama3_ids_and_stops(llama3_tok):
    f = get_chat_format("llama3", llama3_tok)
    got = encode_chat(llama3_tok, f, [SYS, U1])

    def head(role):
        return ["<|start_header_id|>", role, "<|end_header_id|>", "\n", "\n"]

    want = ids(llama3_tok, ["<|begin_of_text|>", *head("system"), *spaced("Be", "brief"), ".",
                            "<|eot_id|>", *head("user"), "Hi", "<|eot_id|>", *head("assistant")])
    assert got == want
    assert got.count(llama3_tok.bos_token_id) == 1
    # stops on BOTH <|eot_id|> and the EOS token, and on a header that starts another turn
    assert f.stop_strings[:2] == ("<|eot_id|>", "<|end_of_text|>")
    assert sorted(f.stop_token_ids(llama3_tok)) == sorted(
        ids(llama3_tok, ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>"]))


# --- chatml -----------------------------------------------------------------------------------

def test_chatml_strings():
    f = get_chat_format("chatml", None)
    assert f.render([U1]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert f.render([SYS, U1, A1, U2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello there<|im_end|>\n<|im_start|>user\nCapital of France?"
        "<|im_end|>\n<|im_start|>assistant\n")
    assert f.render([U1, A1], add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n")


def test_chatml_ids_on_smollm2(smol_tok):
    f = get_chat_format("chatml", smol_tok)
    start, end = smol_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    def piece(text):
        return smol_tok(text, add_special_tokens=False)["input_ids"]

    got = encode_chat(smol_tok, f, [SYS, U1])
    # special tokens split the text, so the ids are the pieces' ids laid end to end
    want = ([start, *piece("system\nBe brief."), end, *piece("\n"), start, *piece("user\nHi"), end,
             *piece("\n"), start, *piece("assistant\n")])
    assert got == want
    assert got[:3] == [start, 9690, 198]  # "system", "\n" in SmolLM2's real vocab
    assert f.stop_token_ids(smol_tok) == [end, start]  # <|im_end|> is also SmolLM2's EOS


def test_chatml_on_llama3_tokenizer_gets_one_bos(llama3_tok):
    # chatml text does not start with <|begin_of_text|>, so the tokenizer adds it (once)
    got = encode_chat(llama3_tok, get_chat_format("chatml", llama3_tok), [U1])
    assert got[0] == llama3_tok.bos_token_id and got.count(llama3_tok.bos_token_id) == 1


# --- human-assistant (Llama2-Chinese) -----------------------------------------------------------

def test_human_assistant_strings():
    f = get_chat_format("human-assistant", None)
    assert get_chat_format("llama2-chinese", None) is f
    assert f.render([U1]) == "<s>Human: Hi\n</s><s>Assistant: "
    assert f.render([U1, A1, U2]) == (
        "<s>Human: Hi\n</s><s>Assistant: Hello there\n</s><s>Human: Capital of France?\n</s>"
        "<s>Assistant: ")
    assert f.render([SYS, U1]) == "<s>System: Be brief.\n</s><s>Human: Hi\n</s><s>Assistant: "


def test_human_assistant_ids(llama2_tok):
    f = get_chat_format("human-assistant", llama2_tok)
    got = encode_chat(llama2_tok, f, [U1])
    assert got == ids(llama2_tok, ["<s>", "Human", ":", " ", "Hi", "\n", "</s>",
                                   "<s>", "Assistant", ":", " "])
    # </s> ends the answer; a <s> would open the next turn
    assert f.stop_token_ids(llama2_tok) == [llama2_tok.eos_token_id, llama2_tok.bos_token_id]


# --- the tokenizer's own template (SmolLM2) -----------------------------------------------------

def test_template_is_auto_and_matches_transformers(smol_tok):
    f = get_chat_format(None, smol_tok)
    assert f.name == "template" and get_chat_format("auto", smol_tok).name == "template"
    for conv in ([U1], [SYS, U1], [SYS, U1, A1, U2]):
        text = f.render(conv)
        assert text == smol_tok.apply_chat_template(conv, tokenize=False,
                                                    add_generation_prompt=True)
        assert encode_chat(smol_tok, f, conv) == smol_tok(text, add_special_tokens=False)[
            "input_ids"]
    # SmolLM2's template adds its default system prompt when none is given
    assert f.render([U1]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert f.render([SYS, U1]) == get_chat_format("chatml", None).render([SYS, U1])
    assert "<|im_end|>" in f.stop_strings
    assert f.stop_token_ids(smol_tok) == [smol_tok.convert_tokens_to_ids("<|im_end|>")]


def test_template_missing_asks_for_format(llama2_tok):
    with pytest.raises(CorralError, match="--chat-format"):
        get_chat_format(None, llama2_tok)  # the word tokenizer has no chat template


# --- training segments ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama2", "llama3", "chatml", "human-assistant", "template"])
def test_render_for_training_concatenates(name, smol_tok):
    f = get_chat_format(name, smol_tok)
    conv = [SYS, U1, A1, U2, A2]
    segs = render_for_training(f, conv)
    assert "".join(t for t, _ in segs) == f.render(conv, add_generation_prompt=False)
    answers = [t for t, flag in segs if flag]
    assert len(answers) == 2
    assert "Hello there" in answers[0] and "Paris" in answers[1]
    assert all("Capital" not in a and "Be brief" not in a for a in answers)
    # each answer carries its end token; the next turn's header is not part of it
    stop = f.stop_strings[0]
    assert all(a.rstrip().endswith(stop) for a in answers)


def test_training_segments_exact_chatml():
    segs = render_for_training(get_chat_format("chatml", None), [U1, A1])
    assert segs == [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
                    ("Hello there<|im_end|>", True), ("\n", False)]
    segs = render_for_training(get_chat_format("llama2", None), [U1, A1])
    assert segs == [("<s>[INST] Hi [/INST]", False), (" Hello there </s>", True)]


def test_training_segments_template_skips_trailing_newline(smol_tok):
    segs = render_for_training(get_chat_format("template", smol_tok), [SYS, U1, A1])
    assert segs[1] == ("Hello there<|im_end|>", True) and segs[2] == ("\n", False)


# --- validation and names -----------------------------------------------------------------

@pytest.mark.parametrize("conv, msg", [
    ([], "empty"),
    ("hi", "list"),
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user", "content": 3}], "string"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([U1, SYS], "only the first"),
    ([A1], "'user' was expected"),
    ([U1, U2], "'assistant' was expected"),
    ([SYS], "only a system"),
    ([{"role": "user", "content": "  "}], "empty"),
])
def test_bad_conversations(conv, msg):
    with pytest.raises(CorralError, match=msg):
        get_chat_format("chatml", None).render(conv)


def test_unknown_format_lists_names():
    with pytest.raises(CorralError, match="llama2, llama3, chatml, human-assistant"):
        get_chat_format("vicuna", None)
