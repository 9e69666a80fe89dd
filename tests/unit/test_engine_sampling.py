"""Sampler, stop handling and streaming detokenization."""

from __future__ import annotations

import pytest
import torch

from corral import SamplingParams
from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore
from corral.engine.detokenizer import IncrementalDetokenizer
from corral.engine.sampler import filter_logits


@pytest.fixture(scope="module")
def core(tiny_model_dir):
    return EngineCore(EngineConfig(model=str(tiny_model_dir), max_model_len=256))


def run(core, prompt, params, rid="x"):
    core.add_request(rid, prompt, params)
    deltas, last = [], None
    while core.has_work():
        for out in core.step():
            if out.request_id == rid:
                deltas.append(out.outputs[0].delta_text)
                last = out
    return last, deltas


def test_filter_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    out = filter_logits(logits.clone(), torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 1.0]),
                        torch.tensor([0.0, 0.0, 0.2]))
    keep = torch.isfinite(out)
    assert keep[0].tolist() == [True, True, False, False]  # top-k 2
    assert keep[1].tolist() == [True, True, False, False]  # top-p 0.7: 0.5 + 0.3 reaches it
    assert keep[2].tolist() == [True, True, True, False]  # min-p 0.2 * 0.5 = 0.1


def test_same_seed_same_tokens_different_seed_differs(core):
    p = SamplingParams(temperature=1.0, max_tokens=24, seed=7, ignore_eos=True)
    a, _ = run(core, [5, 6, 7], p, "a")
    b, _ = run(core, [5, 6, 7], p, "b")
    c, _ = run(core, [5, 6, 7], SamplingParams(temperature=1.0, max_tokens=24, seed=8,
                                               ignore_eos=True), "c")
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_seeded_output_does_not_depend_on_batch_neighbours(core):
    p = SamplingParams(temperature=0.9, max_tokens=16, seed=3, ignore_eos=True)
    alone, _ = run(core, [9, 10, 11, 12], p, "alone")
    core.add_request("noise", [40, 41], SamplingParams(temperature=1.0, max_tokens=30))
    together, _ = run(core, [9, 10, 11, 12], p, "together")
    assert together.token_ids == alone.token_ids


def test_n_samples_share_prompt_blocks(core):
    prompt = list(range(3, 3 + 40))  # 2 full blocks of 16
    out, _ = run(core, prompt, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=1,
                                              ignore_eos=True), "n3")
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert out.metrics.num_cached_tokens == 32  # samples 2 and 3 reused the prompt's blocks


def test_repetition_penalty_changes_greedy_path(core):
    plain, _ = run(core, [20, 21, 22], SamplingParams(temperature=0, max_tokens=30,
                                                      ignore_eos=True), "p0")
    pen, _ = run(core, [20, 21, 22], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                    repetition_penalty=5.0), "p1")
    assert len(set(pen.token_ids)) >= len(set(plain.token_ids))
    assert pen.token_ids != plain.token_ids


def test_max_tokens_and_stop_token_ids(core):
    out, _ = run(core, [3, 4], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    first = out.token_ids[2]
    out2, _ = run(core, [3, 4], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                               stop_token_ids=[first]), "s")
    assert out2.finish_reason == "stop" and out2.outputs[0].stop_reason == first
    assert out2.token_ids == out.token_ids[:3]


def test_logprobs_and_prompt_logprobs(core):
    out, _ = run(core, [3, 4, 5, 6], SamplingParams(temperature=0, max_tokens=3, logprobs=2,
                                                    prompt_logprobs=1, ignore_eos=True))
    lp = out.outputs[0].logprobs
    assert len(lp) == 3
    for tok, d in zip(out.token_ids, lp):
        assert tok in d and max(d.values()) == d[tok]  # greedy picks the most likely
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 4
    assert all(t in d for t, d in zip([4, 5, 6], out.prompt_logprobs[1:]))


def test_chinese_streams_without_broken_characters(default_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_folder)
    text = "你好，世界！今天天气很好。骆驼🐪"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # several byte-level tokens per character
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    pieces = [detok.step(ids[: i + 1]) for i in range(len(ids))]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(core):
    free, _ = run(core, [7, 8, 9], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    text = free.text
    assert len(text) > 12
    stop = text[5:12]  # almost surely spans a token boundary
    out, deltas = run(core, [7, 8, 9], SamplingParams(temperature=0, max_tokens=40,
                                                      ignore_eos=True, stop=[stop]), "st")
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert "".join(deltas) == out.text  # the stop string never leaked into the stream


async def test_async_stream_deltas_abort_and_crash(tiny_model_dir):
    from corral import AsyncLLM

    engine = AsyncLLM(model=str(tiny_model_dir), max_model_len=256)
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        pieces, last = [], None
        async for out in engine.stream([5, 6, 7], params):
            pieces.append(out.outputs[0].delta_token_ids)
            last = out
        assert last.finished and [t for piece in pieces for t in piece] == last.token_ids and len(last.token_ids) == 12
        # leaving a stream early aborts the request and frees its blocks
        async for out in engine.stream([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True)):
            break
        for _ in range(100):
            st = engine.stats()
            if st.num_requests == 0 and st.num_free_blocks == st.num_total_blocks:
                break
            await __import__("asyncio").sleep(0.05)
        assert engine.stats().num_free_blocks == engine.stats().num_total_blocks
        # a crash in the engine thread reaches open streams instead of hanging them
        def boom():
            raise RuntimeError("boom")
        engine.core.step = boom
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in engine.stream([5, 6], params):
                pass
        with pytest.raises(RuntimeError, match="stopped after an error"):
            async for _ in engine.stream([5, 6], params):
                pass
    finally:
        engine.shutdown()


def test_async_llm_load_error_reaches_the_caller(tmp_path):
    from corral import AsyncLLM
    from corral.errors import CorralError

    # the model loads on the engine thread; its error must still surface in the constructor
    with pytest.raises(CorralError, match="model not found"):
        AsyncLLM(model=str(tmp_path / "missing.bin"))
