"""Per-request fault isolation: a request whose values, logits, forward or detokenizer go
wrong fails alone (with an error), the others run on unchanged, every KV block comes back and
the next request succeeds. The values go straight to the engine, past SamplingParams'
validation, as a Python caller or a bug in a front end could pass them."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from corral import SamplingParams
from corral.engine import core as core_module
from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore
from corral.errors import CorralError


def raw_params(**values) -> SamplingParams:
    """SamplingParams with `values` set after validation (so nothing refuses them)."""
    p = SamplingParams(max_tokens=4, ignore_eos=True, seed=7)
    for k, v in values.items():
        setattr(p, k, v)
    return p


def good_params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.8, seed=100 + i,
                          repetition_penalty=1.1, logprobs=2)


PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42], [17] * 11]


@pytest.fixture(scope="module")
def shared_core(tiny_model_dir):
    c = EngineCore(EngineConfig(model=str(tiny_model_dir), block_size=8, num_kv_blocks=64,
                                max_model_len=256))
    # A random tiny model's logits stay within +-0.5; a trained one's reach tens (SmolLM2's
    # do), which is what makes a 1e-38 repetition penalty overflow. Scale them to that.
    with torch.no_grad():
        c.model.lm_head.weight.mul_(100)
    c.test_start_blocks = c.bm.num_free_blocks
    c.test_expected = reference(c)
    return c


@pytest.fixture
def core(shared_core, monkeypatch):
    """The shared engine, idle and with every block free; tests patch it via monkeypatch."""
    assert not shared_core.has_work()
    assert shared_core.bm.num_free_blocks == shared_core.test_start_blocks
    return shared_core


def run(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        core.add_request(rid, prompt, params)
    done = {}
    for _ in range(500):
        if not core.has_work():
            break
        for out in core.step():
            if out.finished:
                done[out.request_id] = out
    assert not core.has_work()
    return done


def reference(core: EngineCore) -> dict[int, list[int]]:
    """The good requests' tokens when they run without a bad neighbour."""
    done = run(core, {f"ref{i}": (p, good_params(i)) for i, p in enumerate(PROMPTS)})
    return {i: done[f"ref{i}"].outputs[0].token_ids for i in range(len(PROMPTS))}


def check_isolated(core: EngineCore, bad: dict[str, SamplingParams], start: int,
                   expected: dict[int, list[int]], prepare=None) -> dict:
    """Run the good requests with `bad` ones among them: the bad fail, the good are unchanged,
    the blocks come back and a request after that succeeds."""
    for rid, p in bad.items():
        core.add_request(rid, [30, 31, 32, 33], p)
    if prepare is not None:
        prepare()
    done = run(core, {f"good{i}": (p, good_params(i)) for i, p in enumerate(PROMPTS)})
    for i in range(len(PROMPTS)):
        out = done[f"good{i}"]
        assert out.error is None and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == expected[i]
    for rid in bad:
        out = done[rid]
        assert out.finished and out.error, out
        assert all(o.finish_reason == "error" for o in out.outputs)
    assert core.bm.num_free_blocks == start
    assert all(b.ref_count == 0 for b in core.bm.blocks)
    after = run(core, {"after": ([3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True))})
    assert after["after"].error is None and len(after["after"].outputs[0].token_ids) == 4
    assert core.bm.num_free_blocks == start
    return done


# The values from the issue that used to stop the engine for everyone, and a few more.
ENGINE_KILLERS = {
    "temperature=1e-40": {"temperature": 1e-40},
    "temperature=1e-300": {"temperature": 1e-300},
    "repetition_penalty=1e-38": {"repetition_penalty": 1e-38},
    "repetition_penalty=nan": {"repetition_penalty": math.nan},
    "stop_token_ids=[1000000]+min_tokens=2": {"stop_token_ids": [1000000], "min_tokens": 2},
    "temperature=nan": {"temperature": math.nan},
    "temperature=inf": {"temperature": math.inf},
    "frequency_penalty=nan": {"frequency_penalty": math.nan},
    "logprobs=10**6": {"logprobs": 10**6},
}


def test_top_k_beyond_the_vocabulary_keeps_every_token(core):
    """top_k = 2**63 (it used to overflow the sampler) means what top_k >= vocab means: off."""
    huge = run(core, {"huge": ([30, 31, 32], raw_params(temperature=1.0, top_k=2**63))})
    off = run(core, {"off": ([30, 31, 32], raw_params(temperature=1.0, top_k=0))})
    assert huge["huge"].error is None
    assert huge["huge"].outputs[0].token_ids == off["off"].outputs[0].token_ids


@pytest.mark.parametrize("values", ENGINE_KILLERS.values(), ids=ENGINE_KILLERS.keys())
def test_engine_killing_value_fails_only_its_request(core, values):
    start, expected = core.test_start_blocks, core.test_expected
    done = check_isolated(core, {"bad": raw_params(**values)}, start, expected)
    assert done["bad"].error


def test_engine_killing_value_in_an_n2_request(core):
    start, expected = core.test_start_blocks, core.test_expected
    done = check_isolated(core, {"bad": raw_params(temperature=1e-40, n=2)}, start, expected)
    assert len(done["bad"].outputs) == 2


def test_nan_row_fails_only_that_request(core, monkeypatch):
    """A NaN row in the logits (injected after the forward) mid-generation."""
    start, expected = core.test_start_blocks, core.test_expected
    orig = core.runner.execute

    def execute(batch):
        out = orig(batch)
        for j, r in enumerate(out.sample_rows):
            seq = batch.seqs[r]
            if seq.request_id == "bad" and seq.num_output_tokens >= 2:
                out.logits[j] = float("nan")
        return out

    monkeypatch.setattr(core.runner, "execute", execute)
    done = check_isolated(core, {"bad": raw_params()}, start, expected)
    assert "NaN" in done["bad"].error
    assert len(done["bad"].outputs[0].token_ids) == 2  # what it had before the NaN


def test_sampler_exception_after_other_rows_sampled_keeps_their_tokens(core, monkeypatch):
    """The sampler raises after it has drawn every row: the retry without the bad request
    draws the seeded rows' numbers again, so the others' tokens do not change."""
    start, expected = core.test_start_blocks, core.test_expected
    real = core_module.sample

    def sample(logits, seqs, *rest):
        tokens = real(logits, seqs, *rest)
        if any(s.request_id == "bad" for s in seqs):
            raise RuntimeError("injected sampler fault")
        return tokens

    monkeypatch.setattr(core_module, "sample", sample)
    done = check_isolated(core, {"bad": raw_params(temperature=0.7)}, start, expected)
    assert "injected sampler fault" in done["bad"].error


def test_forward_failing_with_one_request_is_retried_without_it(core, monkeypatch):
    start, expected = core.test_start_blocks, core.test_expected
    orig, calls = core.runner.execute, []

    def execute(batch):
        calls.append(len(batch.seqs))
        if any(s.request_id in ("bad", "bad2") for s in batch.seqs):
            raise RuntimeError("injected forward fault")
        return orig(batch)

    monkeypatch.setattr(core.runner, "execute", execute)
    done = check_isolated(core, {"bad": raw_params(), "bad2": raw_params()}, start, expected)
    assert "injected forward fault" in done["bad"].error and done["bad2"].error
    assert max(calls) == len(PROMPTS) + 2  # the whole batch first, then its parts


def test_forward_failing_for_everyone_fails_that_step_only(core, monkeypatch):
    start = core.bm.num_free_blocks
    orig, fail = core.runner.execute, [True]

    def execute(batch):
        if fail[0]:
            raise RuntimeError("out of memory (injected)")
        return orig(batch)

    monkeypatch.setattr(core.runner, "execute", execute)
    done = run(core, {f"r{i}": (p, good_params(i)) for i, p in enumerate(PROMPTS)})
    assert all(o.error and "out of memory" in o.error for o in done.values())
    assert core.bm.num_free_blocks == start
    fail[0] = False
    after = run(core, {"after": ([3, 4, 5], SamplingParams(max_tokens=4))})
    assert after["after"].error is None


def test_detokenizer_error_fails_only_that_request(core):
    start, expected = core.test_start_blocks, core.test_expected

    def broken(ids, final=False):
        raise TypeError("injected detokenizer fault")

    def prepare():
        core.requests["bad"].seqs[0].detok.step = broken

    done = check_isolated(core, {"bad": raw_params()}, start, expected, prepare)
    assert "injected detokenizer fault" in done["bad"].error


def test_llm_generate_returns_the_failed_request_and_goes_on(tiny_model_dir):
    from corral import LLM

    llm = LLM(model=str(tiny_model_dir), block_size=8, num_kv_blocks=64, max_model_len=256)
    start = llm.core.bm.num_free_blocks
    outs = llm.generate([[5, 6, 7], [8, 9, 10]],
                        [raw_params(temperature=math.nan), SamplingParams(max_tokens=3, ignore_eos=True)],
                        use_tqdm=False)
    assert outs[0].error and outs[0].finish_reason == "error"
    assert outs[1].error is None and len(outs[1].token_ids) == 3
    assert llm.core.bm.num_free_blocks == start
    # a refused batch leaves nothing queued behind it
    with pytest.raises(CorralError, match="empty"):
        llm.generate([[5, 6], []], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.core.has_work()


async def test_nan_row_in_one_of_nine_streams(tiny_model_dir):
    """The issue's done-when: one request killed inside the sampler (a NaN row) while 8 others
    stream; those 8 finish normally, the bad one gets an error, blocks return to their start."""
    from corral import AsyncLLM

    engine = AsyncLLM(model=str(tiny_model_dir), block_size=8, num_kv_blocks=128,
                      max_model_len=256)
    try:
        start = engine.stats().num_free_blocks
        prompts = [[10 + i, 20 + i, 30 + i, 40 + i] for i in range(8)]

        def params(i):
            return SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, seed=i)

        async def collect(rid, prompt, p):
            outs = [out async for out in engine.stream(prompt, p, request_id=rid)]
            return outs

        alone = await asyncio.gather(*(collect(f"ref{i}", p, params(i))
                                       for i, p in enumerate(prompts)))
        orig = engine.core.runner.execute

        def execute(batch):  # runs on the engine thread
            out = orig(batch)
            for j, r in enumerate(out.sample_rows):
                seq = batch.seqs[r]
                if seq.request_id == "bad" and seq.num_output_tokens >= 5:
                    out.logits[j, 3] = float("nan")
            return out

        engine.core.runner.execute = execute
        results = await asyncio.gather(
            collect("bad", [50, 51, 52], params(99)),
            *(collect(f"good{i}", p, params(i)) for i, p in enumerate(prompts)))
        bad, good = results[0], results[1:]
        assert bad[-1].finished and bad[-1].error and "NaN" in bad[-1].error
        assert bad[-1].outputs[0].finish_reason == "error"
        assert len(bad[-1].outputs[0].token_ids) == 5
        for ref, outs in zip(alone, good):
            assert len(outs) > 2  # it streamed
            assert outs[-1].error is None and outs[-1].outputs[0].finish_reason == "length"
            assert outs[-1].outputs[0].token_ids == ref[-1].outputs[0].token_ids
        after = await engine.generate([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
        assert after.error is None and len(after.outputs[0].token_ids) == 3
        for _ in range(100):  # stats are refreshed after each engine-loop turn
            if engine.stats().num_free_blocks == start:
                break
            await asyncio.sleep(0.02)
        assert engine.stats().num_free_blocks == start
        assert engine.error is None
    finally:
        engine.shutdown()
