"""`corral serve --tensor-parallel-size 2`: a chat completion through the real `openai` client
answers what one process (in-process LLM) answers; killing a worker rank ends the server, with
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
from tests.conftest import save_tiny_model, tiny_config

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Say something about the sea."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_folder):
    """A tiny random Llama with SmolLM2's tokenizer and vocabulary (chat text tokenizes)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tp-serve")
    save_tiny_model(path, tiny_config(max_position_embeddings=256, vocab_size=49152), seed=2)
    AutoTokenizer.from_pretrained(default_folder).save_pretrained(path)
    return path


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


def test_serve_tp2_answers_then_stops_when_a_rank_dies(model_dir):
    common = ["--model", str(model_dir), "--served-model-name", "tiny",
              "--kv-cache-memory-gb", "0.05"]
    from corral import LLM, SamplingParams

    with LLM(str(model_dir), kv_cache_memory_gb=0.05) as one:  # the same answer, one process
        out = one.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
        want = (out.text, out.finish_reason)
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
