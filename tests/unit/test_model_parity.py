"""Our Llama against transformers' LlamaForCausalLM: logits and greedy tokens (fp32)."""

from __future__ import annotations

import pytest
import torch

from corral.model.attention import AttentionMetadata, build_decode_mask
from corral.model.llama import LlamaForCausalLM, context_length, head_dim_of
from tests.conftest import save_tiny_model, tiny_config

BLOCK = 16


class OneSequence:
    """Drives our model over one sequence with a paged cache whose blocks are 0..n-1."""

    def __init__(self, model: LlamaForCausalLM, max_len: int):
        cfg = model.config
        nblocks = (max_len + BLOCK - 1) // BLOCK
        shape = (nblocks, BLOCK, cfg.num_key_value_heads, head_dim_of(cfg))
        self.cache = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
        self.table = torch.arange(nblocks)[None]
        self.model = model
        self.len = 0
        self.dynamic = cfg.rope_parameters.get("rope_type") == "dynamic"

    def step(self, ids: list[int]) -> torch.Tensor:
        """Feed `ids` (a prefill chunk or one decode token); returns their logits [n, V]."""
        n = len(ids)
        pos = torch.arange(self.len, self.len + n)
        ctx = self.len + n
        decode = n == 1 and self.len > 0
        meta = AttentionMetadata(
            slot_mapping=pos.clone(), block_tables=self.table,
            context_lens=torch.tensor([ctx]), query_lens=[n], context_lens_host=[ctx],
            num_decodes=int(decode),
            decode_mask=build_decode_mask(torch.tensor([ctx]), ctx, torch.float32) if decode else None,
        )
        rope_lens = torch.full((n,), ctx) if self.dynamic else None
        h = self.model(torch.tensor(ids), pos, meta, self.cache, rope_lens)
        self.len = ctx
        return self.model.compute_logits(h)


def greedy_ours(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    seq = OneSequence(model, len(prompt) + n + 1)
    logits = seq.step(prompt)
    first_logits = logits
    out = []
    for _ in range(n):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = seq.step([tok])
    return out, first_logits


def greedy_hf(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy decoding with its KV cache, never stopping at EOS."""
    out = []
    with torch.no_grad():
        res = hf(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = hf(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("tie", [False, True])
def test_tiny_logits_and_greedy_match_transformers(tmp_path, rope, tie):
    # max_position_embeddings small so dynamic NTK actually rescales within the test
    cfg = tiny_config(ROPES[rope], tie_word_embeddings=tie, max_position_embeddings=48)
    folder, hf = save_tiny_model(tmp_path, cfg)
    from corral.loading import ModelSource, load_config

    ours = LlamaForCausalLM.from_folder(folder, load_config(ModelSource("t", folder)),
                                        torch.float32, torch.device("cpu"), max_len=160)
    prompt = torch.randint(3, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    toks, logits = greedy_ours(ours, prompt, 64)
    assert (logits - ref).abs().max().item() <= 1e-4
    assert toks == greedy_hf(hf, prompt, 64)


def test_chunked_prefill_equals_one_shot(tmp_path):
    cfg = tiny_config()
    folder, _ = save_tiny_model(tmp_path, cfg)
    ours = LlamaForCausalLM.from_folder(folder, cfg, torch.float32, torch.device("cpu"))
    prompt = list(range(3, 53))
    whole = OneSequence(ours, 64).step(prompt)
    seq = OneSequence(ours, 64)
    parts = [seq.step(prompt[:17]), seq.step(prompt[17:33]), seq.step(prompt[33:])]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)


def test_context_length_stretches_dynamic_only():
    assert context_length(tiny_config(ROPES["dynamic"], max_position_embeddings=48)) == 96
    assert context_length(tiny_config(ROPES["linear"], max_position_embeddings=48)) == 48


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(default_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.loading import ModelSource, load_config

    tok = AutoTokenizer.from_pretrained(default_folder)
    hf = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()
    ours = LlamaForCausalLM.from_folder(default_folder, load_config(ModelSource("d", default_folder)),
                                        torch.float32, torch.device("cpu"), max_len=512)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    toks, logits = greedy_ours(ours, prompt, 64)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-3
    assert toks == greedy_hf(hf, prompt, 64)
