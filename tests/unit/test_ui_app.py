"""The chat page's logic: header line, history handling, streaming and errors in the chat."""

from __future__ import annotations

import asyncio

import gradio as gr

from corral.errors import CorralError
from corral.ui.app import (
    ERROR_PREFIX,
    add_user,
    build_app,
    drop_last_answer,
    model_line,
    respond,
    to_messages,
)

SLIDERS = (0.0, 1.0, 0, 8, 1.0)  # temperature, top_p, top_k, max_tokens, repetition_penalty


class ScriptedBackend:
    """Answers with fixed pieces, or fails with `error` after `fail_after` pieces."""

    def __init__(self, pieces=("Hel", "lo", "!"), error: Exception | None = None,
                 fail_after: int = 0):
        self.pieces, self.error, self.fail_after = pieces, error, fail_after
        self.calls: list[tuple[list, object]] = []

    def info(self):
        return {"name": "scripted", "params": 7_000_000_000, "dtype": "torch.bfloat16",
                "max_model_len": 4096}

    async def stream_chat(self, messages, params):
        self.calls.append((messages, params))
        for i, piece in enumerate(self.pieces):
            if self.error is not None and i == self.fail_after:
                raise self.error
            await asyncio.sleep(0)
            yield piece
        if self.error is not None and self.fail_after >= len(self.pieces):
            raise self.error


async def run(backend, history, system="", sliders=SLIDERS):
    return [[dict(m) for m in h] async for h in respond(backend, history, system, *sliders)]


def test_model_line_names_size_dtype_context():
    line = model_line(ScriptedBackend().info())
    assert line == "**scripted** · 7B parameters · bfloat16 · 4,096-token context"
    assert model_line({"name": "x", "endpoint": "http://h:1/v1"}) == "**x** · via http://h:1/v1"


def test_add_user_and_retry_history():
    box, hist = add_user("hi", [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                                {"role": "assistant", "content": "b"}])
    assert box == "" and hist[-1] == {"role": "user", "content": "hi"}
    assert hist[0] == {"role": "user", "content": "a"}  # Gradio's content parts flattened
    assert add_user("   ", [])[1] == []
    assert drop_last_answer(hist + [{"role": "assistant", "content": "x"}]) == hist


def test_to_messages_puts_system_first_and_skips_failed_turns():
    hist = [{"role": "user", "content": "q1"},
            {"role": "assistant", "content": ERROR_PREFIX + "Cannot reach x"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "q3"}]
    assert to_messages(hist, "  Be terse. ") == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"}]
    # Retry drops the error bubble, so the failed question is asked again.
    assert to_messages(drop_last_answer(hist[:2]), "") == [{"role": "user", "content": "q1"}]


async def test_respond_streams_growing_answer_with_params():
    backend = ScriptedBackend()
    steps = await run(backend, [{"role": "user", "content": "hi"}], "Be nice.",
                      (0.5, 0.9, 40, 99, 1.3))
    answers = [h[-1]["content"] for h in steps]
    assert answers[:3] == ["Hel", "Hello", "Hello!"]
    assert steps[-1] == [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "Hello!"}]
    messages, params = backend.calls[0]
    assert messages == [{"role": "system", "content": "Be nice."},
                        {"role": "user", "content": "hi"}]
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens,
            params.repetition_penalty) == (0.5, 0.9, 40, 99, 1.3)


async def test_respond_shows_errors_as_chat_messages():
    refused = ScriptedBackend(error=CorralError("Cannot reach http://h:1: connection refused"))
    steps = await run(refused, [{"role": "user", "content": "hi"}])
    assert steps[-1][-1] == {"role": "assistant",
                             "content": ERROR_PREFIX + "Cannot reach http://h:1: connection refused"}
    # A failure mid-answer keeps what already streamed.
    broken = ScriptedBackend(error=RuntimeError("boom\nTraceback..."), fail_after=2)
    last = (await run(broken, [{"role": "user", "content": "hi"}]))[-1][-1]["content"]
    assert last == "Hello\n\n" + ERROR_PREFIX + "RuntimeError: boom"
    # A bad slider value is a message too, and the backend is never called.
    bad = ScriptedBackend()
    last = (await run(bad, [{"role": "user", "content": "hi"}], sliders=(0, 0, 0, 8, 1)))[-1]
    assert last[-1]["content"].startswith(ERROR_PREFIX + "top_p must be in (0, 1]")
    assert bad.calls == []


async def test_respond_without_a_pending_question_does_nothing():
    backend = ScriptedBackend()
    hist = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert await run(backend, hist) == [hist]
    assert backend.calls == []


def test_build_app_has_the_controls():
    demo = build_app(ScriptedBackend(), max_new_tokens=300)
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    for elem_id in ("model-info", "chatbot", "user-input", "send", "stop", "retry", "clear",
                    "advanced", "system-prompt", "temperature", "top-p", "top-k", "max-tokens",
                    "repetition-penalty"):
        assert elem_id in ids, elem_id
    assert ids["max-tokens"].maximum == 300
    # Three streaming events (Enter, Send, Retry); Stop ends them from inside (see app.py),
    # Clear cancels them.
    bots = {i for i, d in demo.fns.items() if d.name == "bot"}
    stop_fns = [d.name for d in demo.fns.values() if (ids["stop"]._id, "click") in d.targets]
    clear_cancels = [set(d.cancels) for d in demo.fns.values()
                     if (ids["clear"]._id, "click") in d.targets and d.cancels]
    assert len(bots) == 3 and stop_fns == ["stop_answer"] and clear_cancels == [bots]


async def test_should_stop_ends_the_answer_and_closes_the_stream():
    closed = []

    class Endless:
        async def stream_chat(self, messages, params):
            try:
                while True:
                    yield "x"
            finally:
                closed.append(True)

    hist = [{"role": "user", "content": "q"}]
    seen = []
    async for h in respond(Endless(), hist, "", 0.7, 0.9, 0, 16, 1.0,
                           should_stop=lambda: len(seen) >= 3):
        seen.append(h[-1]["content"])
    assert seen[-1] == "xxx" and closed == [True]
