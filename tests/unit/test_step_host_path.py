"""The engine's host path: packed prefill attention, batched sampler, incremental block tables
and prefix hashing, sliced prompt logprobs, KV sizing from a profiled peak (mocked CUDA)."""

from __future__ import annotations

import pytest
import torch

from corral import SamplingParams
from corral.engine.inputs import BlockTables
from corral.engine.kv_cache import BlockManager
from corral.engine.sampler import (
    RequestFault,
    apply_penalties,
    batch_top_logprobs,
    sample,
    top_logprobs,
)
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


def _seq(i, tokens, params, num_prompt=None):
    s = Sequence(i, f"r{i}", 0, list(tokens), num_prompt or len(tokens), params)
    s.seed = params.seed
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


def test_seeded_rows_draw_exactly_as_alone():
    torch.manual_seed(2)
    logits = torch.randn(5, 64)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=3, top_k=10),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0.9, seed=5, top_p=0.8),
              SamplingParams(temperature=1.2, min_p=0.05)]
    seqs = [_seq(i, [1], p) for i, p in enumerate(params)]
    got, bad = sample(logits.clone(), seqs)
    assert not bad and got[0] == int(logits[0].argmax())
    for i in (1, 3):  # a seeded row alone draws the same token
        alone = _seq(i, [1], params[i])
        assert sample(logits[i:i + 1].clone(), [alone]) == ([got[i]], {})
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


# ---- sampler: counter-based seeded draws, candidates instead of a full sort ----------------


def _rows(n, params):
    seqs = []
    for i in range(n):
        p = params(i)
        s = Sequence(i, f"r{i}", 0, [1] * (1 + i % 3), 1, p)  # output indices 0, 1, 2
        s.seed = None if p.seed is None else p.seed + 1000 * i
        seqs.append(s)
    return seqs


def test_seeded_uniforms_are_a_function_of_seed_and_position():
    from corral.engine.sampler import seeded_uniforms

    u = seeded_uniforms([7] * 4000, list(range(4000)))
    assert u.dtype.name == "float32" and (u >= 0).all() and (u < 1).all()
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float((u < 0.1).mean()) - 0.1) < 0.02
    again = seeded_uniforms([2**64 - 1, 7, 7], [3, 5, 6])
    assert again[1] == u[5] and again[2] == u[6] and again[1] != again[2]
    assert seeded_uniforms([8], [5])[0] != u[5]


@pytest.mark.parametrize("vocab", [50, 300, 5000])
def test_seeded_row_draws_the_same_in_any_batch(vocab):
    """Every row alone, then in batches with neighbours of other filters (other top_k values,
    flat rows whose top-p cut spills past the candidates, greedy and unseeded rows)."""
    torch.manual_seed(vocab)
    logits = torch.randn(12, vocab) * torch.linspace(0.05, 6, 12)[:, None]  # flat to peaked
    logits[3, :40] = 2.0  # a wide tie at the top

    def params(i):
        kinds = [{"top_k": 10}, {"top_p": 0.9}, {"top_k": 200, "top_p": 0.95},
                 {"top_p": 0.5}, {"min_p": 0.1}, {}, {"top_k": 63}, {"top_k": 64},
                 {"top_p": 0.99, "min_p": 0.02}, {"top_k": 3000}]
        if i == 11:
            return SamplingParams(temperature=0)
        return SamplingParams(temperature=0.7 + 0.1 * (i % 4), seed=5, **kinds[i % len(kinds)])

    seqs = _rows(12, params)
    together, bad = sample(logits.clone(), seqs)
    assert not bad
    for i in range(12):
        alone, _ = sample(logits[i:i + 1].clone(), [seqs[i]])
        assert alone == [together[i]], i
    perm = [5, 0, 11, 3, 9, 1]
    part, _ = sample(logits[perm].clone(), [seqs[i] for i in perm])
    assert part == [together[i] for i in perm]
    unseeded = _rows(3, lambda i: SamplingParams(temperature=1.0, top_k=5))
    mixed, _ = sample(torch.cat([logits[:2], logits[:3]]).clone(), seqs[:2] + unseeded)
    assert mixed[:2] == together[:2]


@pytest.mark.parametrize("vocab", [2000, 64 * 300])  # topk / through the chunks' maxima
def test_candidate_draw_equals_the_full_sort_draw(monkeypatch, vocab):
    """Drawing over the K most likely tokens gives the token the whole sorted row gives."""
    from corral.engine import sampler

    torch.manual_seed(3)
    logits = torch.randn(40, vocab) * torch.linspace(0.1, 5, 40)[:, None]
    seqs = _rows(40, lambda i: SamplingParams(temperature=1.0, seed=11,
                                              top_k=[0, 20, 100][i % 3],
                                              top_p=[0.8, 1.0, 0.97, 0.3][i % 4]))
    widths = []
    real = sampler._ranked_draw

    def ranked(vals, *rest):
        widths.append(vals.shape)
        return real(vals, *rest)

    monkeypatch.setattr(sampler, "_ranked_draw", ranked)
    fast, _ = sample(logits.clone(), seqs)
    # candidates (64, 128 for top_k 100) and, for the flat top-p rows, whole sorted rows
    assert {w[1] for w in widths} == {64, 128, vocab}
    monkeypatch.setattr(sampler, "CANDIDATES", 4096)  # every filtered row: a full sort
    full, _ = sample(logits.clone(), seqs)
    assert fast == full


def test_top_candidates_through_chunk_maxima_equal_topk():
    from corral.engine.sampler import _top_candidates

    torch.manual_seed(4)
    x = torch.randn(6, 64 * 400)
    x[1, 100:300] = 9.0  # a tie wider than k, across chunks
    x[2] = x[2].round()  # many ties
    x[3, 5000] = float("nan")
    for k in (1, 64, 100):
        vals, ids = _top_candidates(x, k)
        want, _ = x.topk(k, dim=-1)
        same = {"rtol": 0, "atol": 0, "equal_nan": True}
        torch.testing.assert_close(vals, want, **same)  # NaN ranks first in both
        torch.testing.assert_close(x.gather(1, ids), vals, **same)


def _frequencies(logits_row, params, n):
    seqs = []
    for i in range(n):
        s = Sequence(i, "f", 0, [1], 1, params)
        s.seed = None if params.seed is None else params.seed + i  # as n > 1 samples do
        seqs.append(s)
    tokens, bad = sample(logits_row.expand(n, -1).clone(), seqs)
    assert not bad
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.shape[0]).float() / n


@pytest.mark.parametrize("kw, keep", [
    ({}, [0, 1, 2, 3, 4, 5]),
    ({"top_k": 3}, [0, 1, 2]),
    ({"top_p": 0.7}, [0, 1, 2]),  # 0.35 + 0.25 < 0.7: the third token completes it
    ({"min_p": 0.5}, [0, 1]),
    ({"top_k": 4, "top_p": 0.9, "min_p": 0.2}, [0, 1, 2, 3]),
])
def test_draws_follow_the_filtered_distribution(kw, keep):
    probs = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.07])
    logits = probs.log()
    n = 20000
    freq = _frequencies(logits, SamplingParams(temperature=1.0, seed=123, **kw), n)
    want = torch.zeros_like(probs)
    want[keep] = probs[keep] / probs[keep].sum()
    assert (freq[[i for i in range(6) if i not in keep]] == 0).all()
    assert (freq - want).abs().max() < 0.015  # ~4 standard deviations at n = 20000
    hot = _frequencies(logits, SamplingParams(temperature=2.0, seed=9), n)
    flat = (logits / 2).softmax(-1)
    assert (hot - flat).abs().max() < 0.015


def test_unsampleable_rows_are_reported_and_others_kept():
    logits = torch.randn(4, 32)
    logits[1, 5] = float("nan")
    logits[2] = float("-inf")
    seqs = _rows(4, lambda i: SamplingParams(temperature=[0, 1.0, 0, 0.5][i], seed=1))
    seqs[3].params.temperature = 1e-40  # past validation: the scaled logits overflow
    tokens, bad = sample(logits, seqs)
    assert tokens[0] == int(logits[0].argmax()) and set(bad) == {1, 2, 3}
    assert "NaN" in bad[1] and "forbidden" in bad[2] and "temperature" in bad[3]
    # the model's NaN is the server's fault; the others lie in the request's own values
    assert [isinstance(bad[i], RequestFault) for i in (1, 2, 3)] == [False, True, True]


# ---- outputs as views, detokenizer -----------------------------------------------------


def test_output_views_hold_their_step_while_the_sequence_grows():
    from corral.outputs import CompletionOutput

    ids, lps = [9, 9, 1, 2], [{1: -0.1}, {2: -0.2}]
    first = CompletionOutput.view(0, "ab", 2, ids, 2, 4, lps, 0, 0, None, None)
    ids.append(3)
    lps.append({3: -0.3})
    second = CompletionOutput.view(0, "abc", 3, ids, 2, 5, lps, 2, 2, "length", None)
    assert (first.token_ids, first.text, first.logprobs) == ([1, 2], "ab", lps[:2])
    assert (first.delta_token_ids, first.delta_text) == ([1, 2], "ab")
    assert (second.token_ids, second.delta_token_ids, second.delta_text) == ([1, 2, 3], [3], "c")
    assert second.delta_logprobs == [{3: -0.3}] and second.num_tokens == 3
    plain = CompletionOutput(0, "abc", [1, 2, 3], lps, "length", None, "c", [3], [{3: -0.3}])
    assert plain == second and "token_ids=[1, 2, 3]" in repr(second)
    plain.text = "x"
    assert plain.text == "x" and plain != second


def test_token_decoder_equals_the_tokenizer(default_folder):
    from transformers import AutoTokenizer

    from corral.engine.detokenizer import TokenDecoder

    tok = AutoTokenizer.from_pretrained(default_folder)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, len(tok), (n,), generator=g).tolist() for n in (1, 2, 3, 7) * 25]
    windows += [[0, 1, 2], [tok.eos_token_id], [1, 50, 2]]  # special tokens
    for skip in (True, False):
        dec = TokenDecoder(tok, skip)
        assert dec.backend is not None  # SmolLM2's tokenizer takes the direct path
        for w in windows + windows:  # the second pass reads the one-token cache
            assert dec(w) == tok.decode(w, skip_special_tokens=skip)


def test_step_reports_only_requests_with_news(tiny_model_dir):
    """A prompt still being prefilled in chunks yields no output; every token is in exactly
    one delta and the final cumulative fields equal the deltas joined."""
    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore

    core = EngineCore(EngineConfig(model=str(tiny_model_dir), max_model_len=256,
                                   max_num_batched_tokens=16))
    core.add_request("long", [(i * 11) % 250 + 3 for i in range(60)],
                     SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1))
    seen, steps = [], 0
    while core.has_work():
        seen += core.step()
        steps += 1
    assert steps == 4 + 5 and len(seen) == 6  # 4 chunks (the last one samples) + 5 decodes
    last = seen[-1].outputs[0]
    assert [t for o in seen for t in o.outputs[0].delta_token_ids] == last.token_ids
    assert "".join(o.outputs[0].delta_text for o in seen) == last.text
    assert [d for o in seen for d in o.outputs[0].delta_logprobs] == last.logprobs
