"""The browser chat: a Gradio Blocks page over one ChatBackend (local engine or endpoint).

Each browser tab is its own Gradio session, so histories are independent; the queue lets
several tabs generate at once (the engine batches them). Stop cancels the Gradio event, which
closes our async generator, which aborts the engine request (or closes the HTTP stream).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import gradio as gr

from corral.errors import CorralError
from corral.sampling_params import SamplingParams
from corral.ui.backends import ChatBackend, Message

log = logging.getLogger(__name__)

ERROR_PREFIX = "⚠️ "  # marks error bubbles, which are never sent back to the model
DEFAULT_SYSTEM = ""
# System fonts only: the default theme pulls Google Fonts, and the page must render offline.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)


def model_line(info: dict[str, Any]) -> str:
    """One Markdown line naming the model, its size, dtype and context length."""
    parts = [f"**{info.get('name') or 'unknown model'}**"]
    if info.get("params"):
        parts.append(f"{_human(int(info['params']))} parameters")
    if info.get("dtype"):
        parts.append(str(info["dtype"]).removeprefix("torch."))
    if info.get("max_model_len"):
        parts.append(f"{int(info['max_model_len']):,}-token context")
    if info.get("endpoint"):
        parts.append(f"via {info['endpoint']}")
    return " · ".join(parts)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def text_of(message: dict[str, Any]) -> str:
    """A chat message's text, whether Gradio gives a string or a list of content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return ""


def is_error(message: dict[str, Any]) -> bool:
    return message.get("role") == "assistant" and text_of(message).startswith(ERROR_PREFIX)


def to_messages(history: list[dict[str, Any]], system: str) -> list[Message]:
    """The conversation the model sees: system prompt first; failed turns (an error bubble and
    the question that caused it) left out, so one bad turn does not poison the next."""
    messages: list[Message] = []
    if system.strip():
        messages.append({"role": "system", "content": system.strip()})
    for i, m in enumerate(history):
        failed = m.get("role") == "user" and i + 1 < len(history) and is_error(history[i + 1])
        if is_error(m) or failed:
            continue
        messages.append({"role": m["role"], "content": text_of(m)})
    return messages


def sampling(temperature: float, top_p: float, top_k: int, max_tokens: int,
             repetition_penalty: float) -> SamplingParams:
    """SamplingParams from the slider values (a bad value raises ValueError)."""
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                          max_tokens=int(max_tokens),
                          repetition_penalty=float(repetition_penalty))


def _plain(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": text_of(m)} for m in history]


def add_user(text: str, history: list[dict[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """Put the typed message into the chat and clear the box."""
    history = _plain(history or [])
    if text.strip():
        history.append({"role": "user", "content": text})
    return "", history


def drop_last_answer(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """For retry: remove the answer(s) after the last user message."""
    history = _plain(history or [])
    while history and history[-1]["role"] == "assistant":
        history.pop()
    return history


async def respond(backend: ChatBackend, history: list[dict[str, Any]], system: str,
                  *sliders: float, should_stop: Callable[[], bool] = lambda: False
                  ) -> AsyncIterator[list[dict[str, str]]]:
    """Stream the answer to the last user message into the chat, one delta at a time.
    `should_stop()` true ends the answer early (the backend stream is closed: engine abort)."""
    history = _plain(history or [])
    if not history or history[-1]["role"] != "user":
        yield history
        return
    answer = {"role": "assistant", "content": ""}
    history.append(answer)
    try:
        params = sampling(*sliders)
        stream = backend.stream_chat(to_messages(history[:-1], system), params)
        async with contextlib.aclosing(stream):
            async for delta in stream:
                if should_stop():
                    break
                answer["content"] += delta
                yield history
    except (CorralError, ValueError) as e:
        answer["content"] = _error_text(answer["content"], str(e))
    except Exception as e:  # any other failure is still a message, never a stack trace
        log.exception("chat request failed")
        answer["content"] = _error_text(answer["content"], f"{type(e).__name__}: {e}")
    if not answer["content"]:
        answer["content"] = "*(empty answer)*"
    yield history


def _error_text(partial: str, reason: str) -> str:
    line = f"{ERROR_PREFIX}{reason.splitlines()[0] if reason else 'request failed'}"
    # Keep what already streamed: it is part of the answer the user saw.
    return f"{partial}\n\n{line}" if partial else line


def build_app(backend: ChatBackend, title: str = "Corral chat",
              max_new_tokens: int = 2048) -> gr.Blocks:
    """The chat page for `backend`; mount it with `gr.mount_gradio_app` or `.launch()` it."""

    # Stop ends the answer from inside the generator, so the event finishes normally:
    # Gradio's `cancels` sometimes left the chat looking busy after the cancel.
    stopping: set[str] = set()

    async def bot(history, system, temperature, top_p, top_k, max_tokens, rep,
                  request: gr.Request):
        sid = request.session_hash if request is not None else ""
        stopping.discard(sid)
        async for h in respond(backend, history, system, temperature, top_p, top_k,
                               max_tokens, rep, should_stop=lambda: sid in stopping):
            yield h

    def stop_answer(request: gr.Request):
        stopping.add(request.session_hash if request is not None else "")

    def header() -> str:
        return model_line(backend.info())

    with gr.Blocks(title=title, analytics_enabled=False, fill_height=True) as demo:
        info_md = gr.Markdown(elem_id="model-info")
        chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", height=480, buttons=["copy"],
                             feedback_options=None, placeholder="Ask anything.")
        with gr.Row():
            box = gr.Textbox(elem_id="user-input", show_label=False, scale=6, autofocus=True,
                             placeholder="Type a message and press Enter")
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
            stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
        with gr.Row():
            retry = gr.Button("Retry", elem_id="retry", size="sm")
            clear = gr.Button("Clear", elem_id="clear", size="sm")
        with gr.Accordion("Advanced options", open=False, elem_id="advanced"):
            system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=3,
                                elem_id="system-prompt",
                                placeholder="e.g. You are a helpful assistant.")
            temperature = gr.Slider(0.0, 2.0, 0.7, step=0.05, label="Temperature",
                                    info="0 = greedy", elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, 0.9, step=0.05, label="Top-p", elem_id="top-p")
            top_k = gr.Slider(0, 200, 50, step=1, label="Top-k", info="0 = off",
                              elem_id="top-k")
            max_tokens = gr.Slider(1, max_new_tokens, min(512, max_new_tokens), step=1,
                                   label="Max new tokens", elem_id="max-tokens")
            rep = gr.Slider(1.0, 2.0, 1.0, step=0.05, label="Repetition penalty",
                            elem_id="repetition-penalty")

        knobs = [chatbot, system, temperature, top_p, top_k, max_tokens, rep]
        events = []
        for trigger in (box.submit, send.click):
            events.append(
                trigger(add_user, [box, chatbot], [box, chatbot], queue=False)
                .then(bot, knobs, chatbot)
            )
        events.append(
            retry.click(drop_last_answer, chatbot, chatbot, queue=False).then(bot, knobs, chatbot)
        )
        stop.click(stop_answer, None, None, queue=False)
        clear.click(list, None, chatbot, queue=False, cancels=events)
        demo.load(header, None, info_md)
    # Several tabs answer at once: the engine batches their requests.
    demo.queue(default_concurrency_limit=32)
    return demo
