"""Terminal streaming: one answer token by token (`generate`), and the `chat` REPL around it."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from corral.errors import CorralError
from corral.sampling_params import SamplingParams

HELP = "commands: /system TEXT (set; empty clears), /reset (forget the conversation), /exit"


@dataclass
class AnswerStats:
    text: str
    prompt_tokens: int
    num_tokens: int
    ttft_s: float  # time to first token
    total_s: float
    finish_reason: str | None

    def line(self) -> str:
        rate = self.num_tokens / self.total_s if self.total_s > 0 else 0.0
        return (f"[prompt {self.prompt_tokens} tokens, {self.num_tokens} tokens, "
                f"{rate:.1f} tok/s, TTFT {self.ttft_s * 1000:.0f} ms, "
                f"finish: {self.finish_reason}]")


async def stream_answer(engine, prompt: str | list[int], params: SamplingParams,
                        write: Callable[[str], None]) -> AnswerStats:
    """Stream one request's text through `write` as it arrives; return what came back.

    Cancelling the task (Ctrl-C) closes the stream, which aborts the engine request.
    """
    request_id = f"cli-{uuid.uuid4().hex[:12]}"
    start = time.perf_counter()
    first = None
    last = None
    # aclosing: leaving early (Ctrl-C cancels the task) closes the stream at once, and a
    # stream closed before its end aborts the engine request.
    try:
        async with aclosing(engine.stream(prompt, params, request_id=request_id)) as stream:
            async for out in stream:
                last = out
                delta = out.outputs[0].delta_text
                if first is None and (delta or out.outputs[0].delta_token_ids):
                    first = time.perf_counter()
                if delta:
                    write(delta)
    except ValueError as e:  # the engine refusing the request's parameters
        raise CorralError(str(e)) from None
    end = time.perf_counter()
    if last is not None and last.error:
        raise CorralError(f"generation failed: {last.error}")
    comp = last.outputs[0] if last is not None else None
    return AnswerStats(
        text=comp.text if comp else "",
        prompt_tokens=len(last.prompt_token_ids) if last is not None else 0,
        num_tokens=len(comp.token_ids) if comp else 0,
        ttft_s=(first or end) - start,
        total_s=end - start,
        finish_reason=comp.finish_reason if comp else None,
    )


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@dataclass
class ChatSession:
    """The conversation so far; `messages()` is what the next request renders."""

    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.history, {"role": "user", "content": user}]

    def add(self, user: str, answer: str) -> None:
        self.history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]

    def fit(self, engine, user: str, room: int) -> list[int]:
        """Prompt ids for `user`, dropping the oldest exchanges until `room` tokens are left."""
        while True:
            ids = engine.encode_chat(self.messages(user))
            if len(ids) + room <= engine.max_model_len or not self.history:
                return ids
            del self.history[:2]


def handle_command(session: ChatSession, line: str, note: Callable[[str], None]) -> bool:
    """Apply a /command; returns False when the REPL should exit."""
    cmd, _, rest = line.partition(" ")
    if cmd in ("/exit", "/quit"):
        return False
    if cmd == "/system":
        session.system = rest.strip() or None
        note(f"[system prompt {'set' if session.system else 'cleared'}]")
    elif cmd == "/reset":
        session.history = []
        note("[conversation reset]")
    else:
        note(HELP)
    return True


def run_repl(engine, params: SamplingParams, system: str | None = None,
             verbose: bool = False) -> int:
    """Read lines, answer each with the whole conversation as context, until /exit or EOF.

    Ctrl-C while answering stops that answer (the engine request is aborted) and keeps the
    part already shown in the history; Ctrl-C at the prompt clears the line; Ctrl-D exits.
    """
    # A parent may hand us SIGINT blocked or ignored (both are inherited across exec: e.g. a
    # launcher thread's signal mask); Ctrl-C must still stop an answer here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  line editing and history for input()

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    params = engine.chat_params(params)  # the format's stop tokens and strings
    session = ChatSession(system=system)
    if interactive:
        note(f"chatting with {engine.info.get('name', 'the model')}; {HELP}; Ctrl-D exits")
    shown: list[str] = []  # what the current answer has printed so far

    def write(text: str) -> None:
        shown.append(text)
        write_stdout(text)

    with asyncio.Runner() as runner:
        while True:
            try:
                line = input("> " if interactive else "").strip()
            except EOFError:
                break
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not handle_command(session, line, note):
                    break
                continue
            shown.clear()
            room = min(params.max_tokens or 1, engine.max_model_len // 4)
            try:
                prompt = session.fit(engine, line, room)
                stats = runner.run(stream_answer(engine, prompt, params, write))
            except CorralError as e:  # e.g. the message alone exceeds the context
                note(f"error: {e}")
                continue
            except KeyboardInterrupt:
                write_stdout("\n")
                note("[stopped]")
                if "".join(shown).strip():
                    session.add(line, "".join(shown))
                continue
            write_stdout("\n")
            session.add(line, stats.text)
            if verbose:
                note(stats.line())
    return 0
