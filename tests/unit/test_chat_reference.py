"""External anchors for the built-in formats.

llama3: token for token against Meta's own reference (`llama-models`: its Llama 3 tokenizer
model and ChatFormat), with and without a system prompt, multi-turn and a tool result.
llama2: against the exact procedure of Meta's reference code for the Llama 2 paper's format
(`[INST]`, `<<SYS>>`, each exchange encoded as BOS + "[INST] {user} [/INST] {answer} " + EOS),
through a real SentencePiece Llama tokenizer trained here (byte fallback, dummy prefix,
control symbols <s> </s>) and loaded by transformers, in both of its `legacy` modes."""

from __future__ import annotations

import json

import pytest

from corral.chat import encode_chat, get_chat_format, render_for_training
from corral.tune.data import SegmentTokenizer

SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "Hi"}
A1 = {"role": "assistant", "content": "Hello there"}
U2 = {"role": "user", "content": "Capital of France?"}
A2 = {"role": "assistant", "content": "Paris is the capital."}
TOOL = {"role": "tool", "content": '{"temperature": 21, "unit": "C"}'}
CONVS = {"single": [U1], "system": [SYS, U1], "multi": [U1, A1, U2],
         "system-multi": [SYS, U1, A1, U2, A2, {"role": "user", "content": "中国的首都？"}]}


# --- llama3 vs Meta's llama-models ---------------------------------------------------------

class MetaTokenizer:
    """Meta's tiktoken Llama 3 tokenizer behind the few tokenizer methods corral.chat uses."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|eot_id|>"
        self.eos_token_id = tok.special_tokens["<|eot_id|>"]
        self.unk_token = self.unk_token_id = None

    def convert_tokens_to_ids(self, token: str):
        return self.tok.special_tokens.get(token)

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": self.tok.encode(text, bos=add_special_tokens, eos=False,
                                             allowed_special="all")}


@pytest.fixture(scope="module")
def meta():
    # a dev dependency (pyproject.toml): missing, this fails rather than skips
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    tok = Tokenizer.get_instance()  # the Llama 3 tokenizer.model shipped in the package
    return tok, ChatFormat(tok)


def meta_ids(meta, messages) -> list[int]:
    from llama_models.datatypes import RawMessage, StopReason

    _, chat_format = meta
    raw = [RawMessage(role=m["role"], content=m["content"],
                      **({"stop_reason": StopReason.end_of_turn}
                         if m["role"] == "assistant" else {})) for m in messages]
    return chat_format.encode_dialog_prompt(raw).tokens


@pytest.mark.parametrize("name", [*CONVS, "tool"])
def test_llama3_matches_meta_token_for_token(meta, name):
    messages = CONVS[name] if name != "tool" else [
        U1, {"role": "assistant", "content": "get_weather(city='Paris')"}, TOOL]
    tok = MetaTokenizer(meta[0])
    fmt = get_chat_format("llama3", tok)
    got = encode_chat(tok, fmt, messages)
    assert got == meta_ids(meta, messages)
    assert meta[0].decode(got).count("<|begin_of_text|>") == 1
    if name == "tool":  # Meta calls the tool-result role "ipython"
        assert "<|start_header_id|>ipython<|end_header_id|>" in meta[0].decode(got)


def test_llama3_stops_on_metas_stop_tokens(meta):
    tok = MetaTokenizer(meta[0])
    assert set(meta[0].stop_tokens) <= set(get_chat_format("llama3", tok).stop_token_ids(tok))


# --- llama2 vs the Llama 2 paper's format on a real SentencePiece tokenizer ---------------------

CORPUS = ["Hi", "Hello there", "Capital of France?", "Paris is the capital.", "Be brief.",
          "[INST] [/INST] <<SYS>> <</SYS>>", "The quick brown fox jumps over the lazy dog.",
          "What is the capital of France? Paris is the capital of France.", "中国的首都是北京。",
          "Tell me a joke about cats and dogs, please."]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece BPE model trained with Llama 2's settings."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2)
    return d / "tokenizer.model"


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def llama2_tok(request, sp_model, tmp_path_factory):
    """transformers' LlamaTokenizer from that .model file, as a Llama 2 checkpoint ships it."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("llama2-tok")
    (d / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
         "legacy": request.param}))
    return AutoTokenizer.from_pretrained(d)


def paper_ids(sp_model, messages, add_generation_prompt: bool = True) -> list[int]:
    """Meta's llama `chat_completion` encoding, with its exact strings."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    b_inst, e_inst, b_sys, e_sys = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    if messages[0]["role"] == "system":
        messages = [{"role": messages[1]["role"], "content": b_sys + messages[0]["content"]
                     + e_sys + messages[1]["content"]}] + messages[2:]
    ids: list[int] = []
    for prompt, answer in zip(messages[::2], messages[1::2]):
        text = f"{b_inst} {prompt['content'].strip()} {e_inst} {answer['content'].strip()} "
        ids += [sp.bos_id(), *sp.encode(text), sp.eos_id()]
    if len(messages) % 2 and add_generation_prompt:
        ids += [sp.bos_id(), *sp.encode(f"{b_inst} {messages[-1]['content'].strip()} {e_inst}")]
    return ids


@pytest.mark.parametrize("name", list(CONVS))
def test_llama2_prompt_ids_match_the_paper_format(llama2_tok, sp_model, name):
    fmt = get_chat_format("llama2", llama2_tok)
    assert encode_chat(llama2_tok, fmt, CONVS[name]) == paper_ids(sp_model, CONVS[name])


@pytest.mark.parametrize("name", ["multi", "system-multi"])
def test_llama2_training_ids_match_the_paper_format(llama2_tok, sp_model, name):
    """What tuning trains on (whole exchanges) is the paper's encoding too, and the trained
    labels are exactly each answer and its </s>."""
    conv = CONVS[name][:-1]  # end on an answer
    fmt = get_chat_format("llama2", llama2_tok)
    ids, labels = SegmentTokenizer(llama2_tok).encode(render_for_training(fmt, conv))
    assert ids == paper_ids(sp_model, conv, add_generation_prompt=False)
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert [r[-1] for r in runs] == [llama2_tok.eos_token_id] * len(answers)
    assert [llama2_tok.decode(r[:-1]).strip() for r in runs] == answers
