"""`corral generate` and `corral chat` as real subprocesses on the real default model (SmolLM2)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.slow

CORRAL = [sys.executable, "-m", "corral.cli"]
STATS = re.compile(r"\[prompt (\d+) tokens, (\d+) tokens, [\d.]+ tok/s, TTFT \d+ ms, "
                   r"finish: (\w+)\]")


def test_generate_greedy_paris():
    proc = subprocess.run([*CORRAL, "generate", "What is the capital of France?",
                           "--temperature", "0", "--max-new-tokens", "24", "--verbose"],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and proc.stdout.endswith("\n")
    stats = STATS.search(proc.stderr)
    assert stats, proc.stderr
    assert 0 < int(stats[2]) <= 24 and stats[3] in ("stop", "length")


class Pipe:
    """Collects a stream in a thread so the test can wait for text to appear."""

    def __init__(self, stream):
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: stream.read(1), ""):
            self.text += chunk

    def wait_for(self, pattern: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            assert time.monotonic() < end, f"no {pattern!r} in {self.text!r}"
            time.sleep(0.05)


def test_chat_repl_commands_history_and_ctrl_c(default_folder):
    from transformers import AutoTokenizer

    proc = subprocess.Popen([*CORRAL, "chat", "--temperature", "0", "--max-new-tokens", "400",
                             "--verbose"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    out, err = Pipe(proc.stdout), Pipe(proc.stderr)
    try:
        # Ctrl-C in the middle of a long answer stops it without leaving the REPL
        proc.stdin.write("Write a very long story about a dragon.\n")
        proc.stdin.flush()
        out.wait_for(r"\w+ \w+ \w+ \w+", timeout=240)
        proc.send_signal(signal.SIGINT)
        err.wait_for(r"\[stopped\]", timeout=60)
        proc.stdin.write("/reset\nWhat is the capital of France?\nWhat about Germany?\n"
                         "/system Always answer in French.\n/reset\nWhat is 2+2?\n")
        proc.stdin.close()  # EOF = Ctrl-D: leaves after the queued lines
        assert proc.wait(timeout=240) == 0, err.text
    finally:
        proc.kill()
    story, _, answers = out.text.partition("\n")  # the stopped story ends with one newline
    assert "Paris" in answers and "Paris" not in story, out.text
    assert "[conversation reset]" in err.text and "[system prompt set]" in err.text
    stats = [(int(p), int(n), f) for p, n, f in STATS.findall(err.text)]
    assert len(stats) == 3, err.text  # no stats line for the interrupted answer
    # the prompt token counts show what each request carried
    tok = AutoTokenizer.from_pretrained(default_folder)

    def n_prompt(messages):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    q1 = {"role": "user", "content": "What is the capital of France?"}
    assert stats[0][0] == n_prompt([q1])  # /reset dropped the stopped story
    assert stats[1][0] > stats[0][0] + stats[0][1]  # the follow-up carries Q1 and its answer
    sys_q3 = [{"role": "system", "content": "Always answer in French."},
              {"role": "user", "content": "What is 2+2?"}]
    assert stats[2][0] == n_prompt(sys_q3)  # new system prompt, history reset
