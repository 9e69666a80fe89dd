"""Tensor parallelism (engine/tp.py, model/tp_layers.py) on the CPU over gloo: shards, greedy
parity with one process on a mixed batch with staggered arrivals, per-rank weight bytes, and a
rank that dies."""

from __future__ import annotations

import time

import pytest
import torch

from corral import LLM, SamplingParams
from corral.engine.config import EngineConfig
from corral.engine.tp import TensorParallelError, TPDriver, check_tp_config
from corral.errors import CorralError
from corral.loading import ModelSource
from corral.model.llama import LlamaForCausalLM
from corral.model.tp_layers import _random_shard, load_tp_model, make_shard
from tests.conftest import tiny_config


def _run_staggered(core, prompts, params, arrive_at):
    """Feed prompt i at step arrive_at[i]; returns ({i: token ids}, {i: prompt logprobs})."""
    tokens, prompt_lps, step = {}, {}, 0
    waiting = list(range(len(prompts)))
    while waiting or core.has_work():
        for i in [i for i in waiting if arrive_at[i] <= step]:
            core.add_request(f"r{i}", prompts[i], params[i])
            waiting.remove(i)
        for out in core.step():
            assert out.error is None, out.error
            if out.finished:
                i = int(out.request_id[1:])
                tokens[i] = out.outputs[0].token_ids
                prompt_lps[i] = out.prompt_logprobs
        step += 1
    return tokens, prompt_lps


def _mixed_batch(vocab: int, outputs: tuple[int, ...]):
    gen = torch.Generator().manual_seed(1)
    lens = [3, 41, 7, 19, 1]
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, prompt_logprobs=2
                             if i == 2 else None) for i, m in enumerate(outputs)]
    return prompts, params, [0, 0, 2, 3, 5]


def _compare(folder_or_name: str, n: int, vocab: int, outputs=(6, 4, 9, 5, 7), **kw):
    prompts, params, arrive = _mixed_batch(vocab, outputs)
    with LLM(folder_or_name, **kw) as ref:
        want, want_lp = _run_staggered(ref.core, prompts, params, arrive)
        total = sum(p.numel() * p.element_size() for p in ref.core.model.parameters())
    with LLM(folder_or_name, tensor_parallel_size=n, **kw) as tp:
        got, got_lp = _run_staggered(tp.core, prompts, params, arrive)
        per_rank = tp.core.tp.rank_param_bytes
        assert tp.info["tensor_parallel_size"] == n
    assert got == want
    for a, b in zip(got_lp[2][1:], want_lp[2][1:]):  # the chunked prompt's logprobs too
        assert a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert len(per_rank) == n
    for b in per_rank:  # each rank holds its 1/N (plus the small replicated norms)
        assert total / n <= b < total / n * 1.02, (b, total)
    return got


def test_tp2_tiny_matches_one_process(tiny_model_dir):
    # a small token budget: prefills are chunked and mixed with decodes
    got = _compare(str(tiny_model_dir), 2, 256, num_kv_blocks=64, max_num_batched_tokens=24)
    assert len(got) == 5


@pytest.mark.slow
def test_tp3_smollm2_matches_one_process(default_folder):
    # SmolLM2: 9 query / 3 KV heads split 3 ways; its dense fp32 weights on both sides
    _compare(str(default_folder), 3, 49152, outputs=(4, 3, 5, 3, 4), num_kv_blocks=64,
             max_num_batched_tokens=48)


def test_heads_that_do_not_divide_are_refused():
    cfg = tiny_config(num_attention_heads=9, num_key_value_heads=3, hidden_size=72,
                      intermediate_size=144)
    with pytest.raises(CorralError, match="attention heads \\(9\\)"):
        make_shard(cfg, 0, 2)
    make_shard(cfg, 0, 3)  # 9 / 3 and 3 / 3 split
    with pytest.raises(CorralError, match="KV heads \\(2\\)"):
        make_shard(tiny_config(num_attention_heads=4, num_key_value_heads=2), 0, 4)


def test_unsupported_combinations_are_refused():
    cpu = torch.device("cpu")
    with pytest.raises(CorralError, match="LoRA"):
        check_tp_config(EngineConfig(tensor_parallel_size=2, enable_lora=True), cpu)
    with pytest.raises(CorralError, match="quantize"):
        check_tp_config(EngineConfig(tensor_parallel_size=2, quantization="q8_0"), cpu)
    with pytest.raises(CorralError, match="positive"):
        check_tp_config(EngineConfig(tensor_parallel_size=0), cpu)
    with pytest.raises(CorralError, match="does not divide"):  # before any process starts
        LLM("random:smollm2-135m", tensor_parallel_size=2)


def _full_slices(full: torch.Tensor, name: str, shard, cfg) -> torch.Tensor:
    """What rank `shard.rank` should hold of the fused, unsplit parameter `full`."""
    hd, r, w = shard.head_dim, shard.rank, shard.world
    if name.endswith("qkv_proj.weight"):
        q, k, v = full.split([cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd,
                              cfg.num_key_value_heads * hd])
        return torch.cat([x.chunk(w)[r] for x in (q, k, v)])
    if name.endswith("gate_up_proj.weight"):
        return torch.cat([x.chunk(w)[r] for x in full.split(cfg.intermediate_size)])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return full.chunk(w, dim=1)[r]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        rows = full[r * shard.vocab_per_rank:(r + 1) * shard.vocab_per_rank]
        pad = shard.vocab_per_rank - rows.shape[0]
        return torch.cat([rows, rows.new_zeros(pad, rows.shape[1])]) if pad else rows
    return full


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_the_slices_of_the_whole(tmp_path, world):
    """Safetensors slices (get_slice) and random shards equal the unsplit model's slices; the
    vocab (250) does not divide by 3: the last rank's rows are padded with zeros."""
    from tests.conftest import save_tiny_model

    cfg = tiny_config(num_attention_heads=12, num_key_value_heads=6, hidden_size=48,
                      intermediate_size=96, vocab_size=250)
    folder, _ = save_tiny_model(tmp_path, cfg)
    cpu = torch.device("cpu")
    full = dict(LlamaForCausalLM.from_folder(folder, cfg, torch.float32, cpu).named_parameters())
    rand = dict(LlamaForCausalLM.random(cfg, torch.float32, cpu, seed=3).named_parameters())
    for rank in range(world):
        shard = make_shard(cfg, rank, world)
        part = load_tp_model(ModelSource("t", folder), cfg, shard, torch.float32, cpu, 128)
        for name, p in part.named_parameters():
            torch.testing.assert_close(p, _full_slices(full[name], name, shard, cfg),
                                       rtol=0, atol=0, msg=name)
        rstate = _random_shard(cfg, shard, 3, tie=False)
        for name, t in rstate.items():
            torch.testing.assert_close(t.float(), _full_slices(rand[name], name, shard, cfg),
                                       rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("noticed_by", ["watchdog", "collective"])
def test_a_dead_rank_stops_the_engine_with_a_clear_error(tiny_model_dir, monkeypatch,
                                                         noticed_by):
    """An idle engine's watchdog sees the dead process; without it, the next step's broken
    collective does (gloo: a closed peer), and the error names the rank either way."""
    if noticed_by == "collective":
        monkeypatch.setattr(TPDriver, "_watchdog", lambda self: None)
    p = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm = LLM(str(tiny_model_dir), tensor_parallel_size=2, num_kv_blocks=32)
    try:
        assert len(llm.generate([[5, 6, 7]], p, use_tqdm=False)[0].outputs[0].token_ids) == 3
        worker = llm.core.tp.procs[0]
        worker.kill()
        worker.wait()
        if noticed_by == "watchdog":
            deadline = time.monotonic() + 10
            while llm.core.tp.failed is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert llm.core.tp.failed is not None
        else:
            assert llm.core.tp.failed is None
        start = time.monotonic()
        with pytest.raises(TensorParallelError,
                           match=f"rank 1 \\(pid {worker.pid}\\) was killed by signal 9"):
            llm.generate([[8, 9]], p, use_tqdm=False)
        assert time.monotonic() - start < 10
    finally:
        llm.close()


@pytest.mark.parametrize("cmd", ["generate", "chat", "eval", "serve"])
def test_the_flag_reaches_the_engine_kwargs(cmd):
    from corral.cli import build_parser
    from corral.cli_args import parallel_kwargs_from_args

    extra = {"generate": ["hi"], "eval": ["--output", "x"]}.get(cmd, [])
    args = build_parser(cmd).parse_args([cmd, *extra, "--tensor-parallel-size", "3"])
    assert parallel_kwargs_from_args(args) == {"tensor_parallel_size": 3}
    args = build_parser(cmd).parse_args([cmd, *extra])
    assert parallel_kwargs_from_args(args) == {}
    args = build_parser(cmd).parse_args([cmd, *extra, "--tensor-parallel-size", "0"])
    with pytest.raises(CorralError, match="at least 1"):
        parallel_kwargs_from_args(args)
