"""The engine's host path: packed prefill attention, batched sampler, incremental block tables
and prefix hashing, sliced prompt logprobs, KV sizing from a profiled peak (mocked CUDA)."""

from __future__ import annotations

import pytest
import torch

from corral import SamplingParams
from corral.engine.inputs import BlockTables
from corral.engine.kv_cache import BlockManager
from corral.engine.sampler import apply_penalties, batch_top_logprobs, sample, top_logprobs
from corral.engine.sequence import Sequence
from corral.model import attention
from corral.model.attention import AttentionMetadata, paged_attention, write_kv


def _reference_prefill(q, k_cache, v_cache, tables, qlens, ctxs, scale):
    """The old per-sequence loop: gather each sequence's blocks, offset causal mask."""
    out, start, bs = [], 0, k_cache.shape[1]
    for i, (ql, cl) in enumerate(zip(qlens, ctxs)):
        nblk = (cl + bs - 1) // bs
        ks = attention.gather_blocks(k_cache, tables[i:i + 1, :nblk])[0, :cl]
        vs = attention.gather_blocks(v_cache, tables[i:i + 1, :nblk])[0, :cl]
        out.append(attention._prefill_one(q[start:start + ql], ks, vs, cl - ql, scale))
        start += ql
    return torch.cat(out)


@pytest.mark.parametrize("area", [0, 1 << 30])  # one sequence per call / all in one call
def test_packed_prefill_matches_per_sequence_loop(monkeypatch, area):
    torch.manual_seed(0)
    nh, nkv, hd, bs, nb = 4, 2, 8, 4, 40
    k_cache, v_cache = torch.randn(nb, bs, nkv, hd), torch.randn(nb, bs, nkv, hd)
    # decode row, a fresh prompt, a chunk continuing 5 cached tokens, one continuing 8
    qlens, ctxs = [1, 6, 3, 4], [9, 6, 8, 12]
    perm = torch.randperm(nb - 1)
    tables = torch.full((4, 4), nb - 1, dtype=torch.long)
    used = 0
    for i, c in enumerate(ctxs):
        n = (c + bs - 1) // bs
        tables[i, :n] = perm[used:used + n]
        used += n
    t = sum(qlens)
    q, k, v = torch.randn(t, nh, hd), torch.randn(t, nkv, hd), torch.randn(t, nkv, hd)
    slots = torch.cat([tables[i, p // bs] * bs + p % bs
                       for i, (ql, cl) in enumerate(zip(qlens, ctxs))
                       for p in [torch.arange(cl - ql, cl)]])
    write_kv(k_cache, v_cache, k, v, slots)
    meta = AttentionMetadata(slots, tables, torch.tensor(ctxs), qlens, ctxs, num_decodes=1,
                             decode_mask=attention.build_decode_mask(torch.tensor(ctxs[:1]), 9,
                                                                     torch.float32))
    monkeypatch.setitem(attention.PACK_AREA, "cpu", area)
    got = paged_attention(q, k, v, k_cache, v_cache, meta, 0.3)
    want = _reference_prefill(q[1:], k_cache, v_cache, tables[1:], qlens[1:], ctxs[1:], 0.3)
    torch.testing.assert_close(got[1:], want, rtol=1e-5, atol=1e-5)
    groups = attention.pack_groups(qlens[1:], ctxs[1:], area)
    # with no area allowance a run only grows while packing at most doubles the work
    assert groups == ([range(3)] if area else [range(1), range(1, 3)])


def test_pack_groups_bounds_wasted_work():
    # many tiny chunks share one call; long ones pack only while that at most doubles the work
    assert attention.pack_groups([4] * 10, [4] * 10, 1 << 14) == [range(10)]
    assert attention.pack_groups([2000] * 3, [2000] * 3, 1 << 14) == [range(2), range(2, 3)]


def _seq(i, tokens, params, num_prompt=None, gen_seed=None):
    s = Sequence(i, f"r{i}", 0, list(tokens), num_prompt or len(tokens), params)
    s.generator = torch.Generator().manual_seed(gen_seed if gen_seed is not None else i)
    return s


def _old_penalties(logits, seqs):
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)))
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                            vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            counts = torch.bincount(torch.tensor(seq.output_token_ids), minlength=logits.shape[1])
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def test_batched_penalties_equal_the_per_row_rule():
    torch.manual_seed(1)
    logits = torch.randn(4, 32)
    seqs = [_seq(0, [1, 2, 2, 5, 9, 9, 9], SamplingParams(repetition_penalty=1.3), 3),
            _seq(1, [3, 4, 4, 4, 7], SamplingParams(frequency_penalty=0.5, presence_penalty=0.2), 2),
            _seq(2, [1, 2, 3], SamplingParams()),
            _seq(3, [8, 8, 6, 6, 6, 1], SamplingParams(repetition_penalty=0.8,
                                                         frequency_penalty=-0.3), 1)]
    want = logits.clone()
    _old_penalties(want, seqs)
    got = logits.clone()
    apply_penalties(got, seqs)
    torch.testing.assert_close(got, want)


def test_seeded_rows_draw_exactly_as_alone_and_one_transfer():
    torch.manual_seed(2)
    logits = torch.randn(5, 64)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=3, top_k=10),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0.9, seed=5, top_p=0.8),
              SamplingParams(temperature=1.2, min_p=0.05)]
    seqs = [_seq(i, [1], p, gen_seed=(p.seed or 0) * 10 + i) for i, p in enumerate(params)]
    got = sample(logits.clone(), seqs)
    assert got[0] == int(logits[0].argmax())
    for i in (1, 3):  # a seeded row alone, on a fresh generator with the same seed
        alone = _seq(i, [1], params[i], gen_seed=(params[i].seed or 0) * 10 + i)
        assert sample(logits[i:i + 1].clone(), [alone]) == [got[i]]
    assert all(isinstance(t, int) for t in got)


def test_batch_top_logprobs_matches_single_rows():
    lp = torch.log_softmax(torch.randn(3, 50), dim=-1)
    chosen, ns = [4, 17, 0], [2, 0, 5]
    assert batch_top_logprobs(lp, chosen, ns) == [top_logprobs(lp[i], chosen[i], ns[i])
                                                  for i in range(3)]
    for d, c, n in zip(batch_top_logprobs(lp, chosen, ns), chosen, ns):
        assert c in d and len(d) in (n, n + 1)


def test_block_tables_follow_growth_preemption_and_reuse():
    bt = BlockTables(pad_block=99, rows=2, width=2)
    a, b, c = (_seq(i, [1], SamplingParams()) for i in range(3))
    a.block_table, b.block_table = [5], [7, 8]
    tab, w = bt.gather([a, b])
    assert w == 2 and tab.tolist() == [[5, 99], [7, 8]]
    a.block_table += [6, 11]  # grows past the width
    assert bt.gather([a, b])[0].tolist() == [[5, 6, 11], [7, 8, 99]]
    b.block_table, b.num_preemptions = [3], 1  # preempted and recomputed elsewhere
    c.block_table = [4, 2]  # a third sequence: a row is reclaimed from a finished one
    assert bt.gather([b, c])[0].tolist() == [[3, 99], [4, 2]]
    assert bt.gather([a, b, c])[0].tolist() == [[5, 6, 11], [3, 99, 99], [4, 2, 99]]


def test_prefix_hashing_is_incremental_and_equal_to_full():
    bm = BlockManager(16, 4)
    seq = _seq(0, list(range(10, 23)), SamplingParams())
    assert bm.allocate_slots(seq, 13)
    for n in (3, 8, 13):
        seq.num_computed_tokens = n
        bm.commit_full_blocks(seq)
    hashes = [bm.blocks[b].hash for b in seq.block_table[:3]]
    parent, want = None, []
    for i in range(3):
        parent = BlockManager.block_hash(parent, tuple(seq.token_ids[i * 4:(i + 1) * 4]))
        want.append(parent)
    assert hashes == want and seq.num_hashed_blocks == 3
    other = _seq(1, list(range(10, 23)) + [5], SamplingParams())
    assert bm.allocate_prefix(other) == 12 and other.num_hashed_blocks == 3


def test_prompt_logprobs_in_slices_equal_one_slice(tiny_model_dir):
    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore

    core = EngineCore(EngineConfig(model=str(tiny_model_dir), max_model_len=256))
    prompt = [(i * 37) % 250 + 3 for i in range(70)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    results = []
    for chunk in (1000, 7):
        core.runner.prompt_logprobs_chunk = chunk
        core.add_request(f"c{chunk}", prompt, params)
        while core.has_work():
            outs = core.step()
        results.append(outs[-1].prompt_logprobs)
    big, small = results
    assert len(big) == 70 and big[0] is None
    for a, b in zip(big[1:], small[1:]):
        assert a.keys() == b.keys()
        assert all(abs(a[t] - b[t]) < 1e-5 for t in a)
    assert all(prompt[i] in big[i] for i in range(1, 70))


def test_kv_blocks_sized_from_profiled_peak(monkeypatch, tiny_model_dir):
    """CUDA mocked: the budget is utilization x card - in use now - the dummy step's peak."""
    from corral.engine import runner as runner_mod

    gib = 2**30
    calls = []
    allocated = iter([20 * gib])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("device", str(d))))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: next(allocated))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 26 * gib)
    # an 80 GiB card with 22 GiB in use (weights + another process)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (58 * gib, 80 * gib))
    seen = {}

    def dummy(model, device, dtype, tokens, rows, block_size):
        calls.append("dummy")
        seen.update(tokens=tokens, rows=rows)

    monkeypatch.setattr(runner_mod, "_dummy_step", dummy)
    budget = runner_mod.profiled_kv_budget(None, torch.device("cuda", 1), torch.bfloat16, 0.9,
                                           8192, 256, 4096, 16)
    assert calls == [("device", "cuda:1"), "reset", "dummy"]
    assert seen == {"tokens": 4095, "rows": 256}  # capped by the context
    assert budget == pytest.approx(0.9 * 80 * gib - 22 * gib - 6 * gib)


def test_dummy_step_runs_the_model_on_cpu(tiny_model_dir):
    """The profiling step itself (device-independent): a real forward on the tiny model."""
    from corral.engine.runner import _dummy_step
    from corral.loading import load_config, resolve_source
    from corral.model.llama import LlamaForCausalLM

    src = resolve_source(str(tiny_model_dir))
    model = LlamaForCausalLM.from_folder(src.folder, load_config(src), torch.float32,
                                         torch.device("cpu"), max_len=256)
    _dummy_step(model, torch.device("cpu"), torch.float32, 40, 3, 16)
