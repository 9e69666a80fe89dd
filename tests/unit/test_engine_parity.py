"""The engine's greedy output equals transformers' greedy output for each prompt alone (fp32),
for a mixed batch of prompts of different lengths, some sharing a prefix, arriving staggered."""

from __future__ import annotations

import pytest
import torch

from corral import SamplingParams
from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore
from tests.unit.test_model_parity import greedy_hf


def run_staggered(core: EngineCore, prompts: list[list[int]], params: SamplingParams,
                  every: int = 2) -> dict[str, list[int]]:
    """Submit one prompt every `every` steps while the engine runs; collect token ids."""
    done: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or core.has_work():
        if pending and step % every == 0:
            i, p = pending.pop(0)
            core.add_request(f"r{i}", p, params)
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    return done


@pytest.mark.slow
def test_mixed_batch_greedy_matches_transformers(default_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_folder)
    hf = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()
    system = ("You are a careful assistant. Answer briefly and precisely, and say when you do "
              "not know something. ")
    questions = ["What is the capital of France?", "Name three primary colors.",
                 "Write a haiku about the sea.", "What is 12 times 12?",
                 "Who wrote Hamlet?", "Explain photosynthesis in one sentence.",
                 "List the planets of the solar system.", "Translate 'good morning' to Spanish.",
                 "What is the boiling point of water?", "Give me a synonym for happy.",
                 "Why is the sky blue?", "What is Python?", "How many legs does a spider have?",
                 "Tell me a fun fact about cats.", "What is the largest ocean?", "Say hello."]
    prompts = []
    for i, q in enumerate(questions):
        msgs = [{"role": "user", "content": q}]
        if i % 2 == 0:  # half share a long system prompt (prefix cache hits)
            msgs.insert(0, {"role": "system", "content": system * 2})
        prompts.append(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
    # a small token budget forces chunked prefill next to running decodes
    core = EngineCore(EngineConfig(model="default", max_num_batched_tokens=96,
                                   max_model_len=512))
    got = run_staggered(core, prompts, SamplingParams(temperature=0, max_tokens=64,
                                                      ignore_eos=True))
    assert core.bm.prefix_cache_hit_rate > 0.2
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == greedy_hf(hf, p, 64), f"prompt {i} differs"
    assert core.bm.num_free_blocks == core.bm.num_blocks
