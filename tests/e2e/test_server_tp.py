"""`corral serve --tensor-parallel-size 2`: a chat completion through the real `openai` client
answers the same greedy tokens as one process; killing a worker rank ends the server, with
/health and the log naming the rank, within a bounded time."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from corral.server.launch import ServerProcess

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Say something about the sea."}]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def _greedy(url: str) -> tuple[str, str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].message.content, r.choices[0].finish_reason


def test_serve_tp2_answers_then_stops_when_a_rank_dies(tiny_model_dir):
    common = ["--model", str(tiny_model_dir), "--served-model-name", "tiny",
              "--kv-cache-memory-gb", "0.05"]
    with ServerProcess(common) as one:
        want = _greedy(one.url)
    with ServerProcess([*common, "--tensor-parallel-size", "2"]) as srv:
        assert _greedy(srv.url) == want
        info = httpx.get(srv.url + "/info", timeout=10).json()
        assert "tensor parallel over 2 ranks" in str(info), info
        workers = _children(srv.proc.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        saw_503 = None
        while srv.proc.poll() is None and time.monotonic() - start < 30:
            try:
                r = httpx.get(srv.url + "/health", timeout=2)
                if r.status_code == 503:
                    saw_503 = r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        assert srv.proc.poll() == 1, srv.output()[-2000:]
        assert elapsed < 30
        log = srv.output()
        assert f"tensor-parallel rank 1 (pid {workers[0]}) was killed by signal 9" in log, log[-2000:]
        assert "corral serve: stopped:" in log
        if saw_503 is not None:  # the window between the watchdog and the exit is short
            assert "rank 1" in saw_503["error"]
