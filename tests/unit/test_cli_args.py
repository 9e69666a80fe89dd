"""Shared CLI flags: one name per flag in every command, old spellings as aliases, the same
choices everywhere."""

from __future__ import annotations

import pytest

from corral.cli import build_parser

# command -> the arguments it needs besides the flag under test
COMMANDS = {"generate": ["hi"], "chat": [], "prompt": ["--user", "hi"], "serve": [],
            "eval": ["--output", "x"], "ui": [], "tune": []}


def parse(cmd: str, *flags: str):
    return build_parser(cmd).parse_args([cmd, *COMMANDS[cmd], *flags])


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_chat_format_has_one_name_and_the_old_alias(cmd):
    assert parse(cmd, "--chat-format", "llama3").chat_format == "llama3"
    assert parse(cmd, "--format", "chatml").chat_format == "chatml"


@pytest.mark.parametrize("cmd", ["generate", "chat", "serve", "eval", "ui", "tune"])
def test_dtype_has_the_same_choices_everywhere(cmd, capsys):
    assert parse(cmd, "--dtype", "bfloat16").dtype == "bfloat16"
    assert parse(cmd, "--device", "cpu").device == "cpu"
    with pytest.raises(SystemExit):
        parse(cmd, "--dtype", "fp8")
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_max_tokens_alias():
    assert parse("generate", "--max-tokens", "9").max_new_tokens == 9
    assert parse("eval", "--max-new-tokens", "9").max_new_tokens == 9


def test_unknown_chat_format_is_refused_before_loading(capsys):
    from corral.cli import main

    for argv in (["serve", "--chat-format", "vicuna"], ["ui", "--format", "vicuna"]):
        assert main(argv) == 1
        assert "unknown chat format 'vicuna'" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["generate", "chat", "serve", "eval"])  # the kernel flags' commands
def test_kv_cache_dtype_reaches_the_engine_config(cmd, capsys):
    from corral.cli_args import kernel_kwargs_from_args

    args = parse(cmd, "--kv-cache-dtype", "float16")
    assert kernel_kwargs_from_args(args)["kv_cache_dtype"] == "float16"
    assert "kv_cache_dtype" not in kernel_kwargs_from_args(parse(cmd))  # the engine's auto
    with pytest.raises(SystemExit):
        parse(cmd, "--kv-cache-dtype", "int8")
    assert "invalid choice: 'int8'" in capsys.readouterr().err
