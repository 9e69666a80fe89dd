"""The Triton paged-decode kernel against the PyTorch decode path (corral.model.attention).

CPU (CI): the kernel runs under Triton's interpreter (TRITON_INTERPRET=1) in a subprocess, so
the env var never reaches the other tests' triton imports. CUDA (marked `cuda`): the compiled
kernel against the CPU reference, and the whole engine on the GPU against the CPU engine.
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

from corral.model.attention import AttentionMetadata, _decode_attention, build_decode_mask

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed "
                                  "(pip install -e '.[dev]' installs it)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CTX_LENS = [1, 15, 16, 17, 100]  # within a block, at and across block edges, several blocks
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (gqa ratio, head_dim, dtype, block_size, num_splits): ratios 1/3/4, head dims 64/128, all
# cache dtypes, forced split-K (3 splits; 4 splits leaves the short sequences' later splits
# empty), and a non-power-of-2 head dim / block size that the kernel pads.
CASES = [
    (1, 64, torch.float32, 16, None), (3, 64, torch.float32, 16, None),
    (4, 128, torch.float32, 16, None), (3, 128, torch.float32, 16, 3),
    (4, 64, torch.float32, 16, 4), (1, 128, torch.bfloat16, 16, None),
    (4, 64, torch.float16, 16, 2), (3, 64, torch.bfloat16, 16, 3),
    (2, 80, torch.float32, 12, 2),
]


def random_case(ratio: int, hd: int, dtype: torch.dtype, block_size: int = 16,
                ctx_lens: list[int] = CTX_LENS, nkv: int = 2, seed: int = 0,
                device: str = "cpu"):
    """Random q and caches; each sequence gets a shuffled, non-contiguous set of blocks."""
    gen = torch.Generator().manual_seed(seed)
    need = [(c + block_size - 1) // block_size for c in ctx_lens]
    num_blocks = 2 * sum(need) + 3  # unused blocks hold random data too
    k_cache = torch.randn(num_blocks, block_size, nkv, hd, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, nkv, hd, generator=gen)
    q = torch.randn(len(ctx_lens), nkv * ratio, hd, generator=gen)
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 is the padding value
    tables = torch.zeros(len(ctx_lens), max(need), dtype=torch.long)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n]
        used += n
    ctx = torch.tensor(ctx_lens, dtype=torch.long)
    to = {"dtype": dtype, "device": device}
    return q.to(**to), k_cache.to(**to), v_cache.to(**to), tables.to(device), ctx.to(device)


def reference(q, k_cache, v_cache, tables, ctx, scale) -> torch.Tensor:
    """The PyTorch decode path, in fp32 on the CPU (the bf16/fp16 kernels accumulate in fp32)."""
    q, k_cache, v_cache = (t.float().cpu() for t in (q, k_cache, v_cache))
    ctx = ctx.cpu()
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long),
                             block_tables=tables.cpu(), context_lens=ctx,
                             query_lens=[1] * len(ctx), context_lens_host=ctx.tolist(),
                             num_decodes=len(ctx),
                             decode_mask=build_decode_mask(ctx, int(ctx.max()), torch.float32))
    return _decode_attention(q, k_cache, v_cache, meta, scale)


def _run_cases(device: str = "cpu") -> list[dict]:
    """Every case through the kernel vs the reference (under the interpreter on the CPU)."""
    from corral.model.triton_attention import paged_decode_attention

    results = []
    for ratio, hd, dtype, block_size, splits in CASES:
        q, k_cache, v_cache, tables, ctx = random_case(ratio, hd, dtype, block_size,
                                                       device=device)
        scale = hd ** -0.5
        got = paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, num_splits=splits)
        want = reference(q, k_cache, v_cache, tables, ctx, scale)
        err = (got.float().cpu() - want).abs()
        results.append({"case": f"gqa={ratio} hd={hd} {dtype} bs={block_size} splits={splits}",
                        "dtype": str(got.dtype), "tol": TOL[dtype], "max_err": err.max().item(),
                        "worst_ctx": CTX_LENS[int(err.amax(dim=(1, 2)).argmax())],
                        "nan": bool(got.isnan().any())})
    return results


def _check(results: list[dict], dtypes: dict[str, str]) -> None:
    assert len(results) == len(CASES)
    for r, case in zip(results, CASES):
        assert r["dtype"] == dtypes[str(case[2])], r  # output keeps q's dtype
        assert not r["nan"] and r["max_err"] < r["tol"], r


@needs_triton
def test_kernel_matches_pytorch_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(json.loads(proc.stdout.strip().splitlines()[-1]),
           {str(d): str(d) for d in TOL})


@needs_triton
def test_interpreter_env_does_not_leak():
    # the interpreter run happens in a child process; this process's triton stays compiled
    assert os.environ.get("TRITON_INTERPRET") in (None, "", "0")


@pytest.mark.cuda
@needs_cuda
@needs_triton
def test_compiled_kernel_matches_pytorch_on_gpu():
    from corral.model.triton_attention import paged_decode_attention

    _check(_run_cases("cuda"), {str(d): str(d) for d in TOL})
    # long contexts at batch 1 take the automatic split-K path
    for dtype in (torch.float32, torch.bfloat16):
        q, k_cache, v_cache, tables, ctx = random_case(4, 128, dtype, ctx_lens=[3000],
                                                       device="cuda")
        got = paged_decode_attention(q, k_cache, v_cache, tables, ctx, 128 ** -0.5)
        want = reference(q, k_cache, v_cache, tables, ctx, 128 ** -0.5)
        assert (got.float().cpu() - want).abs().max().item() < TOL[dtype]


def tiny_gqa_model(path: Path, default_folder: Path) -> Path:
    """A tiny random Llama with head_dim 64 and GQA 2, and SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from tests.conftest import save_tiny_model, tiny_config

    # a wider init than HF's 0.02 keeps greedy choices away from near-ties
    config = tiny_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=64, max_position_embeddings=1024, initializer_range=0.2)
    save_tiny_model(path, config, seed=1)
    AutoTokenizer.from_pretrained(default_folder).save_pretrained(path)
    return path


def engine_greedy(folder: str, device: str, max_tokens: int = 24) -> dict[str, list[int]]:
    """Greedy token ids for three prompts (5, 40 and 300 tokens: 1 to 21 blocks) run together."""
    from corral import SamplingParams
    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 40, 300)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    core = EngineCore(EngineConfig(model=folder, device=device, dtype="float32",
                                   num_kv_blocks=128, max_model_len=1024))
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, params)
    done = {}
    while core.has_work():
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert len(done) == len(prompts) and all(len(t) == max_tokens for t in done.values())
    return done


def _engine_with_kernel(folder: str) -> dict:
    """The CPU engine with its decode attention routed to the kernel exactly as the CUDA branch
    of attention._decode_attention does, vs the plain CPU engine."""
    from corral.model import attention

    ref = engine_greedy(folder, "cpu")
    kernel = attention._triton_decode()
    calls = []

    def decode(q, k_cache, v_cache, meta, scale):
        calls.append(q.shape[0])
        b = q.shape[0]
        return kernel(q, k_cache, v_cache, meta.block_tables[:b], meta.context_lens[:b], scale)

    attention._decode_attention = decode
    return {"ref": ref, "triton": engine_greedy(folder, "cpu"), "decode_calls": len(calls),
            "max_decode_batch": max(calls, default=0)}


@needs_triton
def test_engine_greedy_with_kernel_under_interpreter(tmp_path, default_folder):
    folder = tiny_gqa_model(tmp_path, default_folder)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "engine", str(folder)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["decode_calls"] > 0 and res["max_decode_batch"] == 3  # the kernel really ran
    assert res["triton"] == res["ref"]


@pytest.mark.cuda
@needs_cuda
@needs_triton
def test_engine_greedy_on_gpu_matches_cpu(tmp_path, default_folder):
    folder = str(tiny_gqa_model(tmp_path, default_folder))
    assert engine_greedy(folder, "cuda") == engine_greedy(folder, "cpu")


if __name__ == "__main__":  # the interpreter runs (the tests above start these subprocesses)
    if sys.argv[1:2] == ["engine"]:
        print(json.dumps(_engine_with_kernel(sys.argv[2])))
    else:
        print(json.dumps(_run_cases()))
