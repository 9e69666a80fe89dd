"""Decode through the CUDA-graph buffers (corral/engine/cuda_graphs.py) against the eager runner.

On the CPU `capture` keeps the callable, so these tests run the exact padded static-buffer path
that a graph records (padding rows, spare KV block, full-width block tables, in-graph mask),
eagerly; the PyTorch decode path and, under Triton's interpreter in a subprocess, the Triton
kernel. The recording itself needs a GPU: the `cuda` test at the bottom (skipped here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corral.engine.cuda_graphs import graph_batch_sizes
from corral.engine.kv_cache import BlockManager
from corral.engine.runner import ModelRunner
from corral.engine.scheduler import ScheduledBatch
from corral.engine.sequence import Sequence
from corral.model.llama import LlamaForCausalLM
from corral.sampling_params import SamplingParams
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
BS = 16
NUM_BLOCKS = 40
MAX_LEN = 128  # 8 blocks per table
DYNAMIC = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = graph_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35


def make_runner(rope: dict | None = None, graphs: bool = True, seed: int = 0) -> ModelRunner:
    # max_position_embeddings 32: dynamic NTK rescales once contexts pass 32 tokens
    config = tiny_config(rope=rope, max_position_embeddings=32 if rope else MAX_LEN)
    model = LlamaForCausalLM.random(config, torch.float32, torch.device("cpu"), seed=seed,
                                    max_len=MAX_LEN)
    # wider weights than the 0.02 init, so logits differ clearly between tokens
    for p in model.parameters():
        if p.dim() == 2:
            p.data.mul_(10)
    runner = ModelRunner(model, NUM_BLOCKS, BS, torch.float32, torch.device("cpu"))
    if graphs:
        runner.capture_decode_graphs(max_num_seqs=8, max_model_len=MAX_LEN)
    return runner


def prefilled(runner: ModelRunner, prompt_lens: list[int], seed: int = 0):
    """Sequences whose prompts are in the cache, each with one sampled token to decode next."""
    gen = torch.Generator().manual_seed(seed)
    bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=False)
    seqs = []
    for i, n in enumerate(prompt_lens):
        ids = torch.randint(3, 256, (n,), generator=gen).tolist()
        seqs.append(Sequence(i, f"r{i}", 0, ids, n, SamplingParams(temperature=0)))
        assert bm.allocate_slots(seqs[-1], n)
    out = runner.execute(ScheduledBatch(seqs, list(prompt_lens)))
    for seq, tok in zip(seqs, out.logits.argmax(-1).tolist()):
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(tok)
        assert bm.allocate_slots(seq, 1)
    return seqs, bm


def snapshot(runner: ModelRunner) -> list[torch.Tensor]:
    return [t.clone() for kv in runner.kv_cache for t in kv]


def written_slots(seqs) -> list[tuple[int, int]]:
    return [(s.block_table[s.num_computed_tokens // BS], s.num_computed_tokens % BS) for s in seqs]


@pytest.mark.parametrize("rope", [None, DYNAMIC], ids=["default-rope", "dynamic-rope"])
@pytest.mark.parametrize("prompt_lens", [[5, 16, 40], [3, 15, 17, 33, 60]],
                         ids=["batch3->4", "batch5->8"])
def test_padded_decode_matches_eager(prompt_lens, rope):
    runner = make_runner(rope)
    seqs, _ = prefilled(runner, prompt_lens)
    decode = ScheduledBatch(seqs, [1] * len(seqs))
    assert runner.graphs.fits(decode)
    before = snapshot(runner)

    graphs, runner.graphs = runner.graphs, None  # the same runner, eager
    eager = runner.execute(decode)
    eager_cache = snapshot(runner)
    for t, b in zip((t for kv in runner.kv_cache for t in kv), before):
        t.copy_(b)
    runner.graphs = graphs
    out = runner.execute(decode)
    assert graphs.num_replays == 1
    assert out.sample_rows == eager.sample_rows == list(range(len(seqs)))
    assert out.prompt_logprobs == {}
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-4, atol=1e-4)
    assert out.logits.argmax(-1).tolist() == eager.logits.argmax(-1).tolist()

    # real blocks: exactly the new tokens' slots changed, to what eager wrote; padded rows
    # wrote only to the spare block
    slots = written_slots(seqs)
    pad = runner.pad_block
    for now, old, ref in zip(snapshot(runner), before, eager_cache):
        changed = (now != old).flatten(2).any(-1).nonzero().tolist()  # [block, slot] pairs
        assert {tuple(c) for c in changed if c[0] != pad} <= set(slots)
        assert any(c[0] == pad for c in changed)  # the padding really ran
        torch.testing.assert_close(now[:pad], ref[:pad], rtol=1e-5, atol=1e-5)


def test_padding_stays_harmless_over_steps():
    """Several decode steps in a row at shrinking batch sizes (stale table columns and rows
    left from wider steps) give the eager runner's greedy tokens."""
    lens = [3, 15, 17, 33, 60]
    ref, graph = make_runner(graphs=False), make_runner()
    tokens = {}
    for runner in (ref, graph):
        seqs, bm = prefilled(runner, lens)
        out_tokens = []
        for step in range(20):
            live = seqs[: 5 - step // 5]  # 5, 4, 3, 2 sequences: graphs 8, 4, 4, 2
            out = runner.execute(ScheduledBatch(live, [1] * len(live)))
            toks = out.logits.argmax(-1).tolist()
            out_tokens.append(toks)
            for seq, tok in zip(live, toks):
                seq.num_computed_tokens += 1
                seq.token_ids.append(tok)
                assert bm.allocate_slots(seq, 1)
        tokens[runner is graph] = out_tokens
    assert graph.graphs.num_replays == 20
    assert tokens[True] == tokens[False]


def test_other_steps_run_eagerly():
    runner = make_runner()
    seqs, bm = prefilled(runner, [5, 20, 9])
    # a decode next to a prefill chunk; a one-token chunk that is not the prompt's end;
    # a batch bigger than the largest graph
    late = Sequence(9, "late", 0, list(range(3, 13)), 10, SamplingParams())
    assert bm.allocate_slots(late, 4)
    assert not runner.graphs.fits(ScheduledBatch(seqs + [late], [1, 1, 1, 4]))
    assert not runner.graphs.fits(ScheduledBatch([late], [1]))
    many = ScheduledBatch(seqs * 3, [1] * 9)
    assert not runner.graphs.fits(many)
    out = runner.execute(ScheduledBatch(seqs + [late], [1, 1, 1, 4]))
    assert runner.graphs.num_replays == 0 and out.sample_rows == [0, 1, 2]


def test_spare_block_is_outside_the_block_manager():
    runner = make_runner(graphs=False)
    assert runner.kv_cache[0][0].shape[0] == NUM_BLOCKS + 1 and runner.pad_block == NUM_BLOCKS
    bm = BlockManager(NUM_BLOCKS, BS)
    seq = Sequence(0, "r", 0, [1] * (NUM_BLOCKS * BS), NUM_BLOCKS * BS, SamplingParams())
    assert bm.allocate_slots(seq, NUM_BLOCKS * BS) and bm.num_free_blocks == 0
    assert max(seq.block_table) == NUM_BLOCKS - 1


def engine_greedy(folder: str, device: str, graphs: bool):
    """Greedy ids for five prompts of different lengths finishing at different times, with
    chunked prefill (a 48-token budget) so prefill chunks and decodes share steps. Returns
    (ids by request, number of steps, the runner's DecodeGraphs or None)."""
    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 40, 17, 3, 70)]
    core = EngineCore(EngineConfig(model=folder, device=device, dtype="float32",
                                   num_kv_blocks=64, max_model_len=256, max_num_seqs=8,
                                   max_num_batched_tokens=48, cuda_graphs=graphs))
    if graphs and device == "cpu":  # EngineCore captures on CUDA only: take the path by hand
        core.runner.capture_decode_graphs(8, core.max_model_len)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=6 + 3 * i,
                                                    ignore_eos=True))
    done, steps = {}, 0
    while core.has_work():
        steps += 1
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert len(done) == len(prompts)
    return done, steps, core.runner.graphs


def test_engine_greedy_through_graph_path(tiny_model_dir):
    """The whole engine (scheduler, mixed prefill/decode steps, requests finishing at different
    times) with the graph path on gives the eager engine's greedy tokens."""
    ref, _, none = engine_greedy(str(tiny_model_dir), "cpu", graphs=False)
    got, steps, graphs = engine_greedy(str(tiny_model_dir), "cpu", graphs=True)
    assert none is None and got == ref
    assert 0 < graphs.num_replays < steps  # chunked prefills ran eagerly, decodes replayed


def test_no_cuda_graphs_flag():
    import argparse

    from corral.run.cli import add_model_args, engine_kwargs_from_args
    from corral.server.cli import register

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert "cuda_graphs" not in engine_kwargs_from_args(p.parse_args([]))
    assert engine_kwargs_from_args(p.parse_args(["--no-cuda-graphs"]))["cuda_graphs"] is False
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    serve = sub.choices["serve"]
    assert serve.parse_args(["--no-cuda-graphs"]).no_cuda_graphs


# ---- the Triton kernel inside the padded path, under the interpreter --------------------------

def _triton_padded_vs_eager() -> dict:
    """Route decode attention to the Triton kernel (forced to 3 splits, so split-K runs over the
    full-width tables) as attention._decode_attention's CUDA branch does; compare with the plain
    PyTorch eager runner."""
    from corral.model import attention

    lens = [3, 15, 17, 33, 60]
    ref = make_runner(graphs=False)
    seqs, _ = prefilled(ref, lens)
    want = ref.execute(ScheduledBatch(seqs, [1] * 5)).logits

    kernel = attention._triton_decode()
    widths = []

    def decode(q, k_cache, v_cache, meta, scale):
        b = q.shape[0]
        widths.append(meta.block_tables.shape[1])
        return kernel(q, k_cache, v_cache, meta.block_tables[:b], meta.context_lens[:b], scale,
                      num_splits=3)

    attention._decode_attention = decode
    runner = make_runner()
    seqs, _ = prefilled(runner, lens)
    got = runner.execute(ScheduledBatch(seqs, [1] * 5)).logits
    return {"max_err": (got - want).abs().max().item(), "same_argmax":
            got.argmax(-1).tolist() == want.argmax(-1).tolist(),
            "replays": runner.graphs.num_replays, "decode_widths": sorted(set(widths))}


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_in_padded_path_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # the graph step ran the kernel on the full-width (8-block) static tables
    assert res["replays"] == 1 and MAX_LEN // BS in res["decode_widths"]
    assert res["same_argmax"] and res["max_err"] < 1e-3, res


# ---- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_graph_engine_matches_eager_on_gpu(tmp_path, default_folder):
    from tests.unit.test_triton_attention import tiny_gqa_model

    folder = str(tiny_gqa_model(tmp_path, default_folder))
    eager, _, none = engine_greedy(folder, "cuda", graphs=False)
    got, steps, graphs = engine_greedy(folder, "cuda", graphs=True)
    assert none is None and 0 < graphs.num_replays < steps
    assert got == eager


if __name__ == "__main__":  # the interpreter run (the test above starts this subprocess)
    print(json.dumps(_triton_padded_vs_eager()))
