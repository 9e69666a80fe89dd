"""`corral eval --perplexity`: llama-perplexity's chunking (non-overlapping n_ctx chunks, BOS
first, second half scored), its PPL +/- error formula, the dense engine against transformers'
loss on the same chunks, and the memory-mapped GGUF path (CLI) against a torch computation on
the same file's dequantized weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from corral.errors import CorralError
from corral.eval.perplexity import (
    NLLAccumulator,
    chunk_nlls,
    first_scored,
    make_chunks,
    perplexity_of_ids,
)


def test_chunks_replace_first_token_and_drop_the_tail():
    ids = list(range(10, 35))  # 25 tokens
    chunks = make_chunks(ids, 8, bos_id=1)
    assert chunks == [[1, *range(11, 18)], [1, *range(19, 26)], [1, *range(27, 34)]]
    assert make_chunks(ids, 8, bos_id=None)[1] == list(range(18, 26))
    assert len(make_chunks(ids, 8, None, max_chunks=2)) == 2
    with pytest.raises(CorralError, match="needs at least 32"):
        make_chunks(ids, 32, None)


def test_second_half_is_scored():
    # entry j is log p(token j+1): with n_ctx 8, rows 4..6 predict tokens 5..7
    assert first_scored(8) == 4 and first_scored(7) == 3
    lps = [-0.1 * j for j in range(7)]
    assert chunk_nlls(lps, 8) == pytest.approx([0.4, 0.5, 0.6])
    with pytest.raises(ValueError):
        chunk_nlls(lps, 9)


def test_error_is_llamacpp_formula():
    rng = np.random.default_rng(0)
    v = rng.gamma(2.0, 1.5, 300)
    acc = NLLAccumulator()
    acc.add(v[:100].tolist())
    acc.add(v[100:].tolist())
    assert acc.ppl() == pytest.approx(math.exp(v.mean()))
    # llama.cpp: sqrt((mean(v^2) - mean(v)^2) / (count - 1)) * ppl
    assert acc.stderr() == pytest.approx(v.std() / math.sqrt(len(v) - 1) * math.exp(v.mean()))


def hf_chunk_ppl(model, chunks: list[list[int]]) -> tuple[float, float]:
    """(PPL from transformers' own loss with the first half masked, PPL from log_softmax by
    hand) over the same chunks; each chunk scores the same count, so the mean of the losses is
    the mean NLL."""
    losses, nlls = [], []
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            labels = ids.clone()
            labels[0, :first_scored(len(chunk)) + 1] = -100  # score tokens n/2+1 .. n-1
            out = model(input_ids=ids, labels=labels)
            losses.append(out.loss.item())
            lp = torch.log_softmax(out.logits[0].double(), -1)
            f = first_scored(len(chunk))
            rows = torch.arange(f, len(chunk) - 1)
            nlls += (-lp[rows, ids[0, rows + 1]]).tolist()
    return math.exp(float(np.mean(losses))), math.exp(float(np.mean(nlls)))


def test_dense_engine_equals_transformers_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from corral.engine.llm import LLM

    n_ctx = 64
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 256, 3 * n_ctx + 17).tolist()
    llm = LLM(str(tiny_model_dir), max_model_len=n_ctx + 1)
    res = perplexity_of_ids(llm, ids, n_ctx, bos_id=1, batch=2)
    assert (res.chunks, res.scored_tokens, res.add_bos) == (3, 3 * (n_ctx - 1 - n_ctx // 2), True)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    loss_ppl, hand_ppl = hf_chunk_ppl(hf, make_chunks(ids, n_ctx, 1))
    assert loss_ppl == pytest.approx(hand_ppl, rel=1e-5)
    assert res.ppl == pytest.approx(loss_ppl, rel=1e-4)
    assert res.ppl > 100  # a random model on random tokens: near the vocabulary size (256)
    # the running estimate ends at the final one; a different chunking gives another value
    assert res.chunk_ppl[-1] == res.ppl
    other = perplexity_of_ids(llm, ids, 32, bos_id=1)
    assert other.chunks == 6 and other.ppl != pytest.approx(res.ppl, rel=1e-4)
    with pytest.raises(CorralError, match="does not fit"):
        perplexity_of_ids(llm, ids, 128)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """A small random Llama GGUF in the types of a Q4_K_M file (SmolLM2's tokenizer)."""
    from corral.model.gguf_write import write_llama_gguf

    def types(name: str) -> str:
        if "attn_v" in name or "ffn_down" in name:
            return "Q6_K"
        return "Q8_0" if "token_embd" in name else "Q4_K"

    path = tmp_path_factory.mktemp("ppl") / "mixed.gguf"
    return write_llama_gguf(path, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2,
                            types=types, seed=11, std=0.05)


def test_cli_gguf_equals_dequantized_reference(mixed_gguf, tmp_path, capsys, monkeypatch):
    """The CLI on the memory-mapped quantized blocks vs transformers on the same file
    dequantized to fp32, same text, same chunks: the weights are equal, only the order of the
    fp32 sums differs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.cli import main
    from corral.loading import cache_root
    from corral.model import gguf_kernels as gk

    assert gk.load_library() is not None  # built once into the usual cache, shared below
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kernels").symlink_to(cache_root() / "kernels", target_is_directory=True)
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(cache))  # the file's metadata goes here
    words = ["the", "a", "river", "stone", "light", "north", "paper", "seven", "quiet", "over"]
    text = " ".join(np.random.default_rng(5).choice(words, 400))
    src = tmp_path / "text.txt"
    src.write_text(text)
    out = tmp_path / "ppl.json"
    assert main(["eval", "--perplexity", str(src), "--model", str(mixed_gguf), "--context",
                 "96", "--chunks", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Final estimate: PPL = " in printed and "[3]" in printed
    assert "memory-mapped" in printed  # the quantized path ran, not a dense copy
    res = json.loads(out.read_text())
    assert res["chunks"] == 3 and res["scored_tokens"] == 3 * 47 and res["add_bos"] is False
    tok = AutoTokenizer.from_pretrained(mixed_gguf.parent, gguf_file=mixed_gguf.name)
    ids = tok.encode(text)
    assert res["text_tokens"] == len(ids)
    hf = AutoModelForCausalLM.from_pretrained(mixed_gguf.parent, gguf_file=mixed_gguf.name,
                                              dtype=torch.float32).eval()
    loss_ppl, _ = hf_chunk_ppl(hf, make_chunks(ids, 96, None, max_chunks=3))
    assert res["ppl"] == pytest.approx(loss_ppl, rel=1e-3)
    assert 0 < res["stderr"] < res["ppl"]


def test_cli_rejects_bad_input(tmp_path):
    from corral.cli import main

    assert main(["eval", "--perplexity", str(tmp_path / "missing.txt")]) != 0
    (tmp_path / "t.txt").write_text("hello")
    assert main(["eval", "--perplexity", str(tmp_path / "t.txt"), "--context", "2"]) != 0
