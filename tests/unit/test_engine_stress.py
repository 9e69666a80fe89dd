"""Randomized engine run: many requests, random lengths, random aborts, forced preemption.
Every request ends finished or aborted and every KV block comes back."""

from __future__ import annotations

import random

from corral import SamplingParams
from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore


def test_random_requests_aborts_and_preemption_return_every_block(tiny_model_dir):
    rng = random.Random(0)
    # a cache far too small for the load: 48 blocks of 8 tokens, so preemption must happen
    core = EngineCore(EngineConfig(model=str(tiny_model_dir), block_size=8,
                                   num_kv_blocks=48,
                                   max_num_seqs=24, max_num_batched_tokens=64,
                                   max_model_len=256))
    assert core.bm.num_blocks == 48
    start_free = core.bm.num_free_blocks
    shared = [rng.randrange(3, 256) for _ in range(24)]  # some prompts share a prefix
    outcome: dict[str, str] = {}
    submitted = 0
    live: list[str] = []
    steps = 0
    while submitted < 520 or core.has_work():
        for _ in range(rng.randint(0, 6)):
            if submitted >= 520:
                break
            prompt = [rng.randrange(3, 256) for _ in range(rng.randint(1, 90))]
            if rng.random() < 0.3:
                prompt = shared + prompt
            params = SamplingParams(temperature=rng.choice([0, 0.8]), max_tokens=rng.randint(1, 40),
                                    n=rng.choice([1, 1, 1, 2]), seed=rng.randrange(1000),
                                    ignore_eos=rng.random() < 0.5)
            rid = f"r{submitted}"
            core.add_request(rid, prompt, params)
            live.append(rid)
            submitted += 1
        if live and rng.random() < 0.15:
            rid = live.pop(rng.randrange(len(live)))
            if core.abort(rid) is not None:
                outcome[rid] = "abort"
        for out in core.step():
            if out.finished:
                outcome[out.request_id] = "finished"
                assert all(o.finish_reason in ("stop", "length") for o in out.outputs)
                if out.request_id in live:
                    live.remove(out.request_id)
        steps += 1
        assert steps < 20000
    assert len(outcome) == 520
    assert core.scheduler.num_preemptions > 0
    assert core.bm.num_free_blocks == start_free
    assert all(b.ref_count == 0 for b in core.bm.blocks)
