"""The run CLI in-process: parser and shared flags, `prompt` exactness, `models`, error exits.

No model weights are loaded here; `prompt` on the default model reads only its tokenizer.
"""

from __future__ import annotations

import json

import pytest

from corral.cli import build_parser, main
from corral.errors import CorralError
from corral.models import KNOWN_FAMILIES
from corral.run.cli import engine_kwargs_from_args, sampling_params_from_args
from corral.run.repl import ChatSession, handle_command


def parse(argv: list[str]):
    return build_parser(argv[0]).parse_args(argv)


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# --- shared flags ----------------------------------------------------------------------------

def test_sampling_flags_defaults_and_values():
    p = sampling_params_from_args(parse(["generate", "hi"]))
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (256, 0.7, 0, 0.9, 0.0)
    assert p.repetition_penalty == 1.0 and p.seed is None and p.stop == []
    args = parse(["generate", "hi", "--max-new-tokens", "7", "--temperature", "0", "--top-k",
                  "5", "--top-p", "0.5", "--min-p", "0.1", "--repetition-penalty", "1.3",
                  "--seed", "42", "--stop", "END", "--stop", "\n\n"])
    p = sampling_params_from_args(args)
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (7, 0.0, 5, 0.5, 0.1)
    assert p.repetition_penalty == 1.3 and p.seed == 42 and p.stop == ["END", "\n\n"]
    assert p.greedy


def test_bad_sampling_value_is_a_corral_error():
    with pytest.raises(CorralError, match=r"temperature must be in \[0, 100\]"):
        sampling_params_from_args(parse(["chat", "--temperature", "-0.5"]))


def test_engine_kwargs():
    kw = engine_kwargs_from_args(parse(["chat", "--model", "/m", "--dtype", "bfloat16",
                                        "--device", "cpu", "--format", "llama3",
                                        "--rope-scaling", "linear:2", "--max-model-len", "512"]))
    assert kw == {"model": "/m", "dtype": "bfloat16", "device": "cpu", "chat_format": "llama3",
                  "max_model_len": 512, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    kw = engine_kwargs_from_args(parse(["generate", "x"]))
    assert kw["model"] == "default" and kw["chat_format"] is None and kw["rope_scaling"] is None


@pytest.mark.parametrize("cmd", ["generate", "chat", "prompt", "models"])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: corral {cmd}" in capsys.readouterr().out


# --- prompt ------------------------------------------------------------------------------------

def test_prompt_keeps_turn_order_exactly(capsys):
    rc, out, _ = run(capsys, ["prompt", "--format", "llama2", "--system", "Be brief.", "--user",
                              "Hi", "--assistant", "Hello", "--user", "Capital of France?"])
    assert rc == 0
    # the default model (SmolLM2) has no <s>/</s>: its own BOS/EOS are what would be sent
    assert out == ("<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello <|im_end|>"
                   "<|im_start|>[INST] Capital of France? [/INST]\n")


def test_prompt_no_generation_prompt(capsys):
    rc, out, _ = run(capsys, ["prompt", "--format", "chatml", "--user", "Hi", "--assistant",
                              "Yo", "--no-generation-prompt"])
    assert rc == 0
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n\n"


def test_prompt_messages_file_then_flags(tmp_path, capsys):
    f = tmp_path / "conv.json"
    f.write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "A"},
                             {"role": "assistant", "content": "B"}]))
    rc, out, _ = run(capsys, ["prompt", "--format", "human-assistant", "--messages", str(f),
                              "--user", "C"])
    assert rc == 0
    b, e = "<|im_start|>", "<|im_end|>"  # SmolLM2's BOS/EOS stand in for <s>/</s>
    assert out == (f"{b}System: S\n{e}{b}Human: A\n{e}{b}Assistant: B\n{e}{b}Human: C\n{e}"
                   f"{b}Assistant: \n")


def test_prompt_default_model_template_and_ids(capsys, default_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_folder)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rc, out, _ = run(capsys, ["prompt", "--system", "Be brief.", "--user", "Hi", "--ids"])
    assert rc == 0
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert out.startswith(text + "\n")
    ids = json.loads(out[len(text) + 1:])
    # transformers' own tokenization of the template (it does not add BOS for SmolLM2 either)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 3  # system, user, assistant


def test_prompt_on_a_gguf_reads_only_its_metadata(capsys, monkeypatch):
    """The default model is a GGUF: its tokenizer comes from the file's metadata, and no dense
    copy of the weights (538 MB for SmolLM2, ~27 GB for a 7B) is written to show a prompt."""
    import corral.loading

    def refuse(path):
        raise AssertionError(f"prompt materialized {path}")

    monkeypatch.setattr(corral.loading, "materialize_gguf", refuse)
    rc, out, _ = run(capsys, ["prompt", "--user", "Hi", "--ids"])
    assert rc == 0 and "<|im_start|>user\nHi<|im_end|>" in out
    assert json.loads(out.strip().splitlines()[-1])[0] > 0


# --- models ------------------------------------------------------------------------------------

def test_models_json(capsys):
    rc, out, _ = run(capsys, ["models", "--json"])
    assert rc == 0
    data = json.loads(out)
    assert set(data["aliases"]) >= {"default", "smollm2-135m-instruct"}
    assert data["aliases"]["default"].endswith(".gguf")
    assert [f["name"] for f in data["families"]] == [f.name for f in KNOWN_FAMILIES]
    l7 = next(f for f in data["families"] if f["name"] == "Llama-2-7B-Chat")
    assert l7["weights_gib"]["bf16"] == pytest.approx(6.74e9 * 2 / 2**30, abs=0.01)
    assert l7["weights_gib"]["int4"] == pytest.approx(6.74e9 * 0.5 / 2**30, abs=0.01)
    assert l7["smallest_gpu"]["bf16"] == "RTX 4090 24GB"  # 12.6 GiB (+20%) > 12 GiB
    l70 = next(f for f in data["families"] if f["name"] == "Llama-3-70B-Instruct")
    assert l70["smallest_gpu"]["int4"] == "A100 40GB" and l70["chat_format"] == "llama3"


def test_models_table(capsys):
    rc, out, _ = run(capsys, ["models"])
    assert rc == 0
    for f in KNOWN_FAMILIES:
        assert f.name in out
    row = next(line for line in out.splitlines() if "Llama-2-13B-Chat " in line)
    assert "24.21" in row and "A100 40GB" in row and "llama2" in row


# --- errors: one line, non-zero, before any model is loaded ------------------------------------

@pytest.mark.parametrize("argv, msg", [
    (["generate", "   "], "the prompt is empty"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be in [0, 100]"),
    (["generate", "hi", "--max-new-tokens", "0"], "max_tokens must be in [1, "),
    (["generate", "hi", "--format", "vicuna"], "unknown chat format 'vicuna'"),
    (["chat", "--format", "nope"], "unknown chat format"),
    (["generate", "hi", "--rope-scaling", "warp:2"], "unknown rope scaling type"),
    (["generate", "hi", "--raw", "--system", "S"], "--system has no effect with --raw"),
    (["prompt"], "no conversation"),
    (["prompt", "--format", "chatml", "--assistant", "A"], "'user' was expected"),
    (["prompt", "--format", "chatml", "--user", "A", "--system", "S"], "only the first"),
    (["prompt", "--format", "chatml", "--user", "A", "--user", "B"], "'assistant' was expected"),
    (["prompt", "--format", "bogus", "--user", "A"], "unknown chat format"),
])
def test_bad_input_exits_with_one_line(argv, msg, capsys):
    rc, out, err = run(capsys, argv)
    assert rc == 1 and out == ""
    assert err.startswith(f"corral {argv[0]}: error: ") and msg in err
    assert err.count("\n") == 1


def test_bad_messages_files(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{'role': 'user'}")
    obj = tmp_path / "obj.json"
    obj.write_text('{"role": "user", "content": "x"}')
    role = tmp_path / "role.json"
    role.write_text('[{"role": "robot", "content": "x"}]')
    for path, msg in [(bad, "not valid JSON"), (obj, "JSON list"), (role, "role 'robot'"),
                      (tmp_path / "missing.json", "not found")]:
        rc, _, err = run(capsys, ["prompt", "--format", "chatml", "--messages", str(path)])
        assert rc == 1 and msg in err and err.count("\n") == 1, (path, err)


def test_stdin_prompt(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n \n"))
    rc, _, err = run(capsys, ["generate", "-"])
    assert rc == 1 and "the prompt is empty" in err


def test_argparse_rejects_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--dtype", "int3"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


# --- the chat session (what the REPL sends) -----------------------------------------------------

class CountingEngine:
    """Just enough engine for ChatSession.fit: chatml ids are one id per character."""

    max_model_len = 300

    def encode_chat(self, messages):
        from corral.chat import get_chat_format

        return list(range(len(get_chat_format("chatml", None).render(messages))))


def test_session_commands_and_history():
    notes: list[str] = []
    s = ChatSession(system="Be brief.")
    s.add("Hi", "Hello")
    assert s.messages("Next") == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello"},
                                  {"role": "user", "content": "Next"}]
    assert handle_command(s, "/system Answer in French.", notes.append)
    assert s.system == "Answer in French." and len(s.history) == 2
    assert handle_command(s, "/reset", notes.append)
    assert s.history == [] and s.system == "Answer in French."
    assert handle_command(s, "/system", notes.append) and s.system is None
    assert handle_command(s, "/what", notes.append) and "/reset" in notes[-1]
    assert not handle_command(s, "/exit", notes.append)


def test_session_drops_oldest_exchanges_to_fit():
    s = ChatSession()
    for i in range(5):
        s.add(f"question {i}", f"answer {i}")
    ids = s.fit(CountingEngine(), "last", room=20)
    assert len(ids) + 20 <= CountingEngine.max_model_len
    # only whole exchanges go, oldest first, and the newest ones stay
    assert len(s.history) == 4  # 2 of 5 exchanges (79 characters each) fit
    assert s.history[-1] == {"role": "assistant", "content": "answer 4"}
