"""bf16 / fp32 correctness on a CUDA GPU (marked `cuda`; skipped where there is none).

Corral's bf16 logits against transformers' bf16 logits (a tolerance: the two sum in different
orders), greedy fp32 tokens token-for-token, for a tiny config, SmolLM2 and the first layers of
an 8B-shaped random Llama; the engine's CUDA-graph decode against eager decode at bf16. The
Triton kernel against the PyTorch path at bf16 is in test_triton_attention.py.
"""

from __future__ import annotations

import pytest
import torch

from corral.loading import RANDOM_PRESETS, ModelSource, load_config
from corral.model.attention import AttentionMetadata
from corral.model.llama import LlamaForCausalLM, head_dim_of
from tests.conftest import save_tiny_model, tiny_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BLOCK = 16


def paged_greedy(model: LlamaForCausalLM, prompt: list[int], n: int, device: torch.device):
    """Prefill `prompt` then decode n greedy tokens through the paged cache; returns
    (tokens, the prefill's logits [len(prompt), V] fp32)."""
    cfg = model.config
    nblocks = (len(prompt) + n + BLOCK) // BLOCK + 1
    shape = (nblocks, BLOCK, cfg.num_key_value_heads, head_dim_of(cfg))
    dtype = next(model.parameters()).dtype
    cache = [(torch.zeros(shape, dtype=dtype, device=device),
              torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.num_hidden_layers)]
    table = torch.arange(nblocks, device=device)[None]
    done, ids, toks, first = 0, list(prompt), [], None
    with torch.inference_mode():
        for _ in range(n + 1):
            new = ids[done:]
            ctx = len(ids)
            pos = torch.arange(done, ctx, device=device)
            meta = AttentionMetadata(pos.clone(), table, torch.tensor([ctx], device=device),
                                     [len(new)], [ctx], num_decodes=int(done > 0))
            h = model(torch.tensor(new, device=device), pos, meta, cache, None)
            logits = model.compute_logits(h)
            first = logits.float() if first is None else first
            done = ctx
            if len(toks) == n:
                break
            toks.append(int(logits[-1].argmax()))
            ids.append(toks[-1])
    return toks, first


def hf_greedy(hf, prompt: list[int], n: int, device) -> tuple[list[int], torch.Tensor]:
    with torch.inference_mode():
        res = hf(torch.tensor([prompt], device=device), use_cache=True)
        logits, out = res.logits[0].float(), []
        for _ in range(n):
            out.append(int(res.logits[0, -1].argmax()))
            res = hf(torch.tensor([[out[-1]]], device=device), past_key_values=res.past_key_values,
                     use_cache=True)
    return out, logits


def compare(folder, hf_dtype_model_fn, prompt, device, n_greedy=32):
    """bf16: logits close (relative to their scale) and the top-1 agrees on almost every
    position; fp32: greedy tokens identical."""
    cfg = load_config(ModelSource("t", folder))
    for dtype in (torch.bfloat16, torch.float32):
        hf = hf_dtype_model_fn(dtype)
        ours = LlamaForCausalLM.from_folder(folder, cfg, dtype, device, max_len=len(prompt) + 64)
        n = n_greedy if dtype == torch.float32 else 0
        toks, logits = paged_greedy(ours, prompt, n, device)
        ref_toks, ref = hf_greedy(hf, prompt, n, device)
        if dtype == torch.bfloat16:
            err = (logits - ref).abs().max() / ref.abs().max()
            agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
            assert err < 0.03 and agree >= 0.9, (float(err), float(agree))
        else:
            assert (logits - ref).abs().max() < 1e-3
            assert toks == ref_toks
        del hf, ours
        torch.cuda.empty_cache()


def _hf_from(folder, device):
    from transformers import AutoModelForCausalLM

    return lambda dtype: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def test_tiny_bf16_logits_and_fp32_greedy(tmp_path):
    device = torch.device("cuda")
    folder, _ = save_tiny_model(tmp_path, tiny_config(max_position_embeddings=256))
    prompt = torch.randint(3, 256, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    compare(folder, _hf_from(folder, device), prompt, device)


def test_smollm2_bf16_logits_and_fp32_greedy(default_folder):
    from transformers import AutoTokenizer

    device = torch.device("cuda")
    tok = AutoTokenizer.from_pretrained(default_folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    compare(default_folder, _hf_from(default_folder, device), prompt, device)


def test_llama3_8b_shaped_first_layers(tmp_path):
    """The real 8B shapes (4096 hidden, 32/8 heads, 14336 MLP, 128k vocab), two layers."""
    device = torch.device("cuda")
    kw = dict(RANDOM_PRESETS["llama3-8b"], num_hidden_layers=2)
    from transformers import LlamaConfig

    folder, _ = save_tiny_model(tmp_path, LlamaConfig(**kw))
    prompt = torch.randint(100, 128000, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    compare(folder, _hf_from(folder, device), prompt, device, n_greedy=16)


def test_cuda_graphs_match_eager_at_bf16(tmp_path, default_folder):
    from corral import SamplingParams
    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore
    from tests.unit.test_triton_attention import tiny_gqa_model

    folder = str(tiny_gqa_model(tmp_path, default_folder))
    results = []
    for graphs in (False, True):
        core = EngineCore(EngineConfig(model=folder, device="cuda", dtype="bfloat16",
                                       max_model_len=256, cuda_graphs=graphs, max_num_seqs=8))
        assert (core.runner.graphs is not None) == graphs
        prompts = [[5 + i, 6, 7 + 2 * i] * (i + 1) for i in range(6)]
        for i, p in enumerate(prompts):
            core.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=24,
                                                       ignore_eos=True, detokenize=False))
        done = {}
        while core.has_work():
            for out in core.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
        if graphs:
            assert core.runner.graphs.num_replays > 0
        results.append(done)
    assert results[0] == results[1]
