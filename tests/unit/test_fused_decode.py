"""The fused C decode step (model/fused_decode.py, csrc/decode_step.c) against the layer-by-layer
Python path on the same packed weights: small random Llama GGUFs written here (Q4_0, Q4_1, Q8_0,
and a K-quant mix with F16 and Q4_0 parts), both math modes, batches of 1, 5 and 20 sequences
whose contexts end on both sides of block boundaries, GQA; hidden states, logits and the KV
cache it writes. Prefill and mixed steps too (a chunk of n tokens is n rows whose contexts grow
by one). Through the engine: greedy tokens equal with and without it, the fast path counted,
and the fallbacks (LoRA rows, long prefill contexts) taken."""

from __future__ import annotations

import pytest
import torch

from corral.model import fused_decode as fdm
from corral.model import gguf_kernels as gk
from corral.model.attention import AttentionMetadata
from tests.conftest import tiny_config

BLOCK = 16
SHAPE = {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2}  # hd 64


def kquant_mix(name: str) -> str:
    """The types of a Q4_K_M-like file, plus an F16 and a Q4_0 part (fused with Q4_K)."""
    for part, kind in (("attn_v", "Q6_K"), ("ffn_down", "Q6_K"), ("attn_k", "Q5_K"),
                       ("ffn_up", "Q4_0"), ("attn_output", "F16"), ("token_embd", "Q8_0"),
                       ("output", "Q6_K")):
        if part in name:
            return kind
    return "Q4_K"


def q4_0_q8_0_embedding(name: str) -> str:
    """Q4_0 with a Q8_0 embedding. An all-Q4_0 random file puts the int8 path on exact rounding
    ties: its embedding values sit on a grid of d*(q-8), unit norm weights keep them there,
    and x*127/amax = 127*k/8 is k*15.875 (k=4: 63.5), so any last-bit difference flips a
    rounding (the norm summed in another order does). Trained norm weights break the grid."""
    return "Q8_0" if "token_embd" in name else "Q4_0"


FAMILIES = {"q4_0": q4_0_q8_0_embedding, "q4_1": "Q4_1", "q8_0": "Q8_0", "kquant": kquant_mix}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    from corral.model.gguf_write import write_llama_gguf

    root = tmp_path_factory.mktemp("fused")
    out = {}
    for i, (name, types) in enumerate(FAMILIES.items()):
        out[name] = write_llama_gguf(root / f"{name}.gguf", **SHAPE, types=types,
                                     tie=name != "kquant", seed=10 + i, std=0.05)
    # head dim 32 (the generic attention path), 4 query heads per kv head
    out["q8_0-hd32"] = write_llama_gguf(root / "hd32.gguf", hidden=256, intermediate=512,
                                        layers=2, heads=8, kv_heads=2, types="Q8_0", seed=20,
                                        std=0.05)
    return out


def config_of(family: str, rope: dict | None = None):
    heads = 8 if family.endswith("hd32") else SHAPE["heads"]
    return tiny_config(rope=rope, hidden_size=SHAPE["hidden"],
                       intermediate_size=SHAPE["intermediate"],
                       num_hidden_layers=SHAPE["layers"], num_attention_heads=heads,
                       num_key_value_heads=SHAPE["kv_heads"], vocab_size=49152,
                       max_position_embeddings=4096, tie_word_embeddings=family != "kquant")


def load(path, family: str, math: str, variant: str | None = None, rope: dict | None = None):
    lib = gk.load_library(variant)
    model, desc = gk.load_gguf_model(path, config_of(family, rope), lib, math=math)
    assert model.fused_decode is not None and desc.endswith(", fused C decode step")
    return model


def decode_batch(config, ctx_lens: list[int], seed: int):
    """A pure-decode step: token ids, positions, metadata and a random cache whose blocks are
    shuffled between the sequences."""
    g = torch.Generator().manual_seed(seed)
    nkv, hd = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    width = max(-(-c // BLOCK) for c in ctx_lens) + 1
    n_blocks = len(ctx_lens) * width + 2
    tables = torch.randperm(n_blocks, generator=g)[:len(ctx_lens) * width].view(-1, width)
    cache = [(torch.randn(n_blocks + 1, BLOCK, nkv, hd, generator=g),
              torch.randn(n_blocks + 1, BLOCK, nkv, hd, generator=g))
             for _ in range(config.num_hidden_layers)]
    pos = torch.tensor([c - 1 for c in ctx_lens])
    slots = tables[torch.arange(len(ctx_lens)), pos // BLOCK] * BLOCK + pos % BLOCK
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables,
                             context_lens=torch.tensor(ctx_lens), query_lens=[1] * len(ctx_lens),
                             context_lens_host=list(ctx_lens), num_decodes=len(ctx_lens))
    ids = torch.randint(100, 49000, (len(ctx_lens),), generator=g)
    return ids, pos, meta, cache


def mixed_batch(config, decodes: list[int], chunks: list[tuple[int, int]], seed: int):
    """A step of `decodes` (context lengths, one new token each) followed by prefill chunks
    (tokens cached before, new tokens), as the runner lays them out: per-token slots and
    positions, per-sequence tables and lengths."""
    g = torch.Generator().manual_seed(seed)
    nkv, hd = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    seqs = [(c - 1, 1) for c in decodes] + list(chunks)  # (cached, new)
    width = max(-(-(c + n) // BLOCK) for c, n in seqs) + 1
    n_blocks = len(seqs) * width + 2
    tables = torch.randperm(n_blocks, generator=g)[:len(seqs) * width].view(-1, width)
    cache = [(torch.randn(n_blocks + 1, BLOCK, nkv, hd, generator=g),
              torch.randn(n_blocks + 1, BLOCK, nkv, hd, generator=g))
             for _ in range(config.num_hidden_layers)]
    pos = torch.cat([torch.arange(c, c + n) for c, n in seqs])
    row = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([n for _, n in seqs]))
    slots = tables[row, pos // BLOCK] * BLOCK + pos % BLOCK
    ctx = [c + n for c, n in seqs]
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables,
                             context_lens=torch.tensor(ctx), query_lens=[n for _, n in seqs],
                             context_lens_host=ctx, num_decodes=len(decodes))
    ids = torch.randint(100, 49000, (len(pos),), generator=g)
    return ids, pos, meta, cache


def both_paths(model, ids, pos, meta, cache, rope_lens=None):
    """(hidden, cache) of the fused step and of the layer-by-layer path, from the same cache."""
    fused = model.fused_decode
    c_fused = [(k.clone(), v.clone()) for k, v in cache]
    c_layers = [(k.clone(), v.clone()) for k, v in cache]
    steps = fused.steps
    h_fused = model(ids, pos, meta, c_fused, rope_lens)
    assert fused.steps == steps + 1, "the fused step did not run"
    model.fused_decode = None
    try:
        h_layers = model(ids, pos, meta, c_layers, rope_lens)
    finally:
        model.fused_decode = fused
    return h_fused, c_fused, h_layers, c_layers


def assert_close_to_scale(model, h_fused, c_fused, h_layers, c_layers, tol: float = 1e-5):
    """Hidden states, logits and every layer's K/V cache within `tol` of their scale."""
    torch.testing.assert_close(h_fused, h_layers, rtol=0, atol=tol * h_layers.abs().max())
    logits_f, logits_l = model.compute_logits(h_fused), model.compute_logits(h_layers)
    torch.testing.assert_close(logits_f, logits_l, rtol=0, atol=tol * logits_l.abs().max())
    for (kf, vf), (kl, vl) in zip(c_fused, c_layers):
        torch.testing.assert_close(kf, kl, rtol=0, atol=tol * kl.abs().max())
        torch.testing.assert_close(vf, vl, rtol=0, atol=tol * vl.abs().max())


BATCHES = {"one": [7], "five": [1, 16, 17, 33, 50],  # the last four straddle block edges
           "twenty": [1 + (7 * i) % 70 for i in range(20)],  # rows x D > 4096: shared buffers
           # few (sequence, kv head) pairs over long contexts: attention split into parts
           "long": [300], "long3": [1, 130, 300]}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("family", list(FAMILIES) + ["q8_0-hd32"])
def test_fp32_step_equals_layer_path(gguf_files, family, batch):
    """fp32 math: the same matmuls (bit for bit) with norms, rope, SiLU and attention summed
    in another order: hidden states, logits and cache within 1e-5 of their scale (measured
    at most 1.2e-6)."""
    model = load(gguf_files[family], family, "fp32")
    ids, pos, meta, cache = decode_batch(model.config, BATCHES[batch], seed=len(batch))
    h_fused, c_fused, h_layers, c_layers = both_paths(model, ids, pos, meta, cache)
    assert_close_to_scale(model, h_fused, c_fused, h_layers, c_layers)
    slots = meta.slot_mapping
    k0 = c_fused[0][0].view(-1, *c_fused[0][0].shape[2:])
    assert not torch.equal(k0[slots], cache[0][0].view_as(k0)[slots])  # this step's keys landed


@pytest.mark.parametrize("batch", ["one", "twenty", "long3"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_int8_step_equals_layer_path(gguf_files, family, batch):
    """int8 math: the matmuls are bit for bit the same given the same activations, but the
    activations are rounded to 1/254 of their block's max, so a last-bit difference from a
    norm or SiLU summed in another order can flip one rounding and move a matmul output by a
    step of that size. Bound: hidden states and logits within 1% of their scale. Measured
    here: at most 3e-7 of it (no rounding flipped); each flip moves values by ~1e-3 of it
    (the all-Q4_0 tie grid below flipped 10 of 256 and moved them by 1.5%)."""
    model = load(gguf_files[family], family, "int8")
    ids, pos, meta, cache = decode_batch(model.config, BATCHES[batch], seed=3)
    h_fused, _, h_layers, _ = both_paths(model, ids, pos, meta, cache)
    scale = h_layers.abs().max().item()
    assert (h_fused - h_layers).abs().max() < 0.01 * scale
    logits_f, logits_l = model.compute_logits(h_fused), model.compute_logits(h_layers)
    assert (logits_f - logits_l).abs().max() < 0.01 * logits_l.abs().max()


STEPS = {"prefill": ([], [(0, 37)]),  # one fresh prompt over three blocks
         "prefills": ([], [(0, 5), (16, 20), (3, 1)]),  # two continue a cached prefix
         "mixed": ([9, 40, 17], [(0, 12), (30, 33)]),  # decodes, then chunks
         "long": ([300], [(250, 70)])}  # parts of a long decode beside a long chunk


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("family", list(FAMILIES) + ["q8_0-hd32"])
def test_prefill_and_mixed_steps_equal_layer_path(gguf_files, family, step):
    """Prefill chunks in the fused step: each token a row attending to its own prefix, every
    row's k/v in the cache before any row attends. fp32 math: hidden states, logits of every
    row and the cache within 1e-5 of their scale of the layer path (SDPA for the chunks).
    int8 math: a chunk's rows read each other's k/v, so one flipped 8-bit rounding (see
    test_int8_step_equals_layer_path) spreads to the rows after it (measured: up to 2% of the
    scale apart, 0.2-0.4 of int8's own error on average); so the check is that the fused step
    is as close to the fp32 result as the layer path is (measured: equal to 1%)."""
    model = load(gguf_files[family], family, "fp32")
    ids, pos, meta, cache = mixed_batch(model.config, *STEPS[step], seed=len(step))
    h_fused, c_fused, h_layers, c_layers = both_paths(model, ids, pos, meta, cache)
    assert h_fused.shape[0] == len(pos)
    assert_close_to_scale(model, h_fused, c_fused, h_layers, c_layers)
    scale = h_layers.abs().max().item()
    reference = h_layers
    model = load(gguf_files[family], family, "int8")
    h_fused, _, h_layers, _ = both_paths(model, ids, pos, meta, cache)
    err_fused, err_layers = (h_fused - reference).abs(), (h_layers - reference).abs()
    assert err_layers.mean() > 1e-4 * scale  # int8 math did run
    assert err_fused.mean() <= 1.05 * err_layers.mean()
    assert err_fused.max() <= 1.25 * err_layers.max()


@pytest.mark.parametrize("math", ["fp32", "int8"])
def test_rows_do_not_depend_on_the_batch_or_threads(gguf_files, math):
    """A sequence's hidden state is the same bit for bit alone, in a batch of 5 (buffers per
    thread) or of 20 (shared buffers), and on 1 or 2 threads: every row runs the same
    arithmetic whoever computes it."""
    model = load(gguf_files["kquant"], "kquant", math)
    ctx = BATCHES["twenty"]
    ids, pos, meta, cache = decode_batch(model.config, ctx, seed=5)
    full = model(ids, pos, meta, [(k.clone(), v.clone()) for k, v in cache])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = model(ids, pos, meta, [(k.clone(), v.clone()) for k, v in cache])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, full)
    for rows in ([3], [0, 4, 5, 9, 19]):
        sub = AttentionMetadata(slot_mapping=meta.slot_mapping[rows],
                                block_tables=meta.block_tables[rows],
                                context_lens=meta.context_lens[rows], query_lens=[1] * len(rows),
                                context_lens_host=[ctx[r] for r in rows], num_decodes=len(rows))
        part = model(ids[rows], pos[rows], sub, [(k.clone(), v.clone()) for k, v in cache])
        assert torch.equal(part, full[rows])


@pytest.mark.parametrize("variant", gk.cpu_variants())
def test_every_kernel_variant(gguf_files, variant):
    """The library is built per instruction set with the matmul kernels it includes; each
    one's step equals the layer path on that variant, on fp32 and fp16 caches."""
    model = load(gguf_files["kquant"], "kquant", "int8", variant=variant)
    assert fdm._variant_of(model.model.layers[0].self_attn.o_proj.fast.lib) == variant
    ids, pos, meta, cache = decode_batch(model.config, BATCHES["five"], seed=6)
    for kv_dtype in (torch.float32, torch.float16):  # fp16: the variant's conversions both ways
        kv = [(k.to(kv_dtype), v.to(kv_dtype)) for k, v in cache]
        h_fused, c_fused, h_layers, c_layers = both_paths(model, ids, pos, meta, kv)
        assert (h_fused - h_layers).abs().max() < 0.01 * h_layers.abs().max()
        for (kf, vf), (kl, vl) in zip(c_fused, c_layers):
            torch.testing.assert_close(kf.float(), kl.float(), rtol=0,
                                       atol=1e-2 * kl.float().abs().max())
            torch.testing.assert_close(vf.float(), vl.float(), rtol=0,
                                       atol=1e-2 * vl.float().abs().max())


@pytest.mark.parametrize("rope,ctx", [
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, [40, 70, 5000]),
    ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, [40, 70, 3000]),
], ids=["dynamic", "llama3"])
def test_rope_types_come_from_the_model(gguf_files, rope, ctx):
    """cos/sin rows are the model's own (dynamic NTK: per sequence length, here past the
    original 4096 positions): scaled ropes give the layer path's numbers too."""
    model = load(gguf_files["q8_0"], "q8_0", "fp32", rope=rope)
    ids, pos, meta, cache = decode_batch(model.config, ctx, seed=7)
    rope_lens = meta.context_lens if rope["rope_type"] == "dynamic" else None
    h_fused, _, h_layers, _ = both_paths(model, ids, pos, meta, cache, rope_lens)
    torch.testing.assert_close(h_fused, h_layers, rtol=0, atol=1e-5 * h_layers.abs().max())


def test_not_taken_for_long_prefills_bf16_or_too_many_rows(gguf_files):
    """Mixed steps run fused; prefill chunks attending to more than MAX_PREFILL_CONTEXT keys or
    of a model without GQA, bf16 activations and (fp32 math) steps above max_rows run the layer path; the checks are on
    the step, not on the model."""
    model = load(gguf_files["q4_0"], "q4_0", "fp32")
    fused = model.fused_decode
    _, _, meta, _ = decode_batch(model.config, [5, 9], seed=8)
    x = torch.zeros(2, SHAPE["hidden"])
    assert fused.applies(x, meta)
    mixed = AttentionMetadata(meta.slot_mapping, meta.block_tables, meta.context_lens,
                              query_lens=[1, 4], context_lens_host=[5, 9], num_decodes=1)
    assert fused.applies(torch.zeros(5, SHAPE["hidden"]), mixed)
    n = fdm.MAX_PREFILL_CONTEXT
    long = AttentionMetadata(meta.slot_mapping, meta.block_tables, meta.context_lens,
                             query_lens=[1, 4], context_lens_host=[n + 5, n + 1], num_decodes=1)
    assert not fused.applies(torch.zeros(5, SHAPE["hidden"]), long)
    assert fused.applies(x, AttentionMetadata(meta.slot_mapping, meta.block_tables,
                                              meta.context_lens, query_lens=[1, 1],
                                              context_lens_host=[n + 5, n + 1], num_decodes=2))
    assert not fused.applies(x.bfloat16(), meta)
    fused.gqa = False  # one query head per kv head (Llama 2 7B): decodes only
    assert not fused.applies(torch.zeros(5, SHAPE["hidden"]), mixed) and fused.applies(x, meta)
    fused.gqa = True
    fused.max_rows = 1
    assert not fused.applies(x, meta)


def test_attach_needs_every_linear_packed():
    """A dense model, or one with a single dense layer left, gets no fused step."""
    from corral.model.llama import LlamaForCausalLM
    from corral.model.quantize import attach_quantized

    cfg = tiny_config()
    dense = LlamaForCausalLM.random(cfg, torch.float32, torch.device("cpu"))
    assert fdm.attach(dense) is None and dense.fused_decode is None
    desc = attach_quantized(dense, "q8_0", math="fp32")
    assert desc.endswith(", fused C decode step") and dense.fused_decode is not None
    assert dense.fused_decode.gqa  # 4 heads over 2 kv heads
    mha = LlamaForCausalLM.random(tiny_config(num_key_value_heads=4), torch.float32,
                                  torch.device("cpu"))
    attach_quantized(mha, "q8_0", math="fp32")
    assert not mha.fused_decode.gqa
    partial = LlamaForCausalLM.random(cfg, torch.float32, torch.device("cpu"))
    attach_quantized(partial, "q8_0", math="fp32")
    partial.model.layers[1].mlp.down_proj = torch.nn.Linear(cfg.intermediate_size,
                                                            cfg.hidden_size, bias=False)
    assert fdm.attach(partial) is None


# ---- through the engine -------------------------------------------------------------------------

def engine_tokens(core, prompts, fused: bool, max_tokens: int = 12):
    from corral import SamplingParams
    from tests.unit.test_engine_parity import run_staggered

    keep = core.model.fused_decode
    core.model.fused_decode = keep if fused else None
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return run_staggered(core, prompts, params, every=3)
    finally:
        core.model.fused_decode = keep


def test_engine_greedy_equal_with_and_without(gguf_files):
    """Staggered requests (prefills joining running decodes: mixed steps, then pure decode
    steps of up to 4 sequences across block edges) on the K-quant mix (fused matmuls of
    several part types, an untied head), fp32 math as the suite pins: the same greedy tokens
    either way, with the fused step taken on every step."""
    family = "kquant"
    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore

    core = EngineCore(EngineConfig(model=str(gguf_files[family]), max_model_len=256,
                                   gguf_math="fp32", block_size=BLOCK))
    assert core.info["weights"].endswith(", fused C decode step")
    fused = core.model.fused_decode
    decode_steps = []
    execute = core.runner.execute
    core.runner.execute = lambda b: (decode_steps.append(sum(b.num_new_tokens) == len(b.seqs)),
                                     execute(b))[1]
    prompts = [list(range(200 + 13 * i, 200 + 13 * i + n)) for i, n in enumerate((5, 14, 30, 9))]
    with_fused = engine_tokens(core, prompts, fused=True)
    assert fused.steps == len(decode_steps) > 12
    assert not all(decode_steps)  # mixed and prefill steps ran too
    without = engine_tokens(core, prompts, fused=False)
    assert fused.steps == len(decode_steps) / 2  # the same steps again, none fused
    assert with_fused == without
    assert all(len(t) == 12 for t in with_fused.values())


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory, default_folder):
    from transformers import AutoTokenizer

    from tests.conftest import save_tiny_model
    from tests.unit.test_lora import ALL, make_adapter

    root = tmp_path_factory.mktemp("fused-lora")
    base_dir, _ = save_tiny_model(root / "base", tiny_config(max_position_embeddings=256), seed=4)
    AutoTokenizer.from_pretrained(default_folder).save_pretrained(base_dir)
    return base_dir, make_adapter(base_dir, root / "a", ALL, r=8, seed=5)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_folder_with_lora_rows_falls_back(lora_setup, kind):
    """`--quantize` models get the fused step too. A step with a LoRA row runs the layer path
    (the adapter's deltas live there); base-only decode steps of the same engine run fused;
    every request's greedy tokens equal the run without the fused step."""
    from corral import SamplingParams
    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore

    base_dir, a_dir = lora_setup
    core = EngineCore(EngineConfig(model=str(base_dir), quantization=kind, gguf_math="fp32",
                                   lora_modules={"a": str(a_dir)}, block_size=8))
    fused = core.model.fused_decode
    assert fused is not None and core.info["weights"].endswith(", fused C decode step")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def run(use_fused: bool, with_lora: bool) -> dict:
        core.model.fused_decode = fused if use_fused else None
        lora_rows = []
        execute = core.runner.execute

        def spy(batch):
            lora_rows.append(any(s.lora is not None for s in batch.seqs))
            return execute(batch)

        core.runner.execute = spy
        core.add_request("base", list(range(5, 25)), params)
        if with_lora:
            core.add_request("lora", list(range(30, 41)), params, lora="a")
        out = {}
        while core.has_work():
            for o in core.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
        core.runner.execute = execute
        return out, lora_rows

    steps = fused.steps
    alone, _ = run(True, with_lora=False)
    assert fused.steps - steps == 10  # every step of the base request, its prefill too
    steps = fused.steps
    mixed, lora_rows = run(True, with_lora=True)
    assert any(lora_rows) and fused.steps - steps == 0  # the LoRA request ran every step
    reference, _ = run(False, with_lora=True)
    assert mixed == reference and mixed["base"] == alone["base"]


@pytest.mark.parametrize("step", ["decode", "mixed"])
@pytest.mark.parametrize("family", ["q4_1", "kquant", "q8_0-hd32"])
def test_fp16_cache_equals_layer_path(gguf_files, family, step):
    """An fp16 KV cache (the engine's default under int8 math): both paths write the new keys
    and values rounded to fp16 (to nearest even) and attend over fp16 values. fp32 math, so
    the only differences are float rounding, and a k/v value a last fp32 bit apart can round
    to neighbouring fp16 values (1e-3 apart): hidden states, logits and caches within 1e-3 of
    their scale (measured: hidden states at most 1e-4 of it, caches 3.3e-4: a few roundings
    moved in the prefill chunks). Against the same step on an fp32 cache of the same values:
    within 5e-3 (measured at most 7.7e-4)."""
    model = load(gguf_files[family], family, "fp32")
    if step == "decode":
        ids, pos, meta, cache = decode_batch(model.config, BATCHES["long3"] + BATCHES["five"],
                                             seed=11)
    else:
        ids, pos, meta, cache = mixed_batch(model.config, *STEPS["mixed"], seed=12)
    cache = [(k.half(), v.half()) for k, v in cache]
    h_fused, c_fused, h_layers, c_layers = both_paths(model, ids, pos, meta, cache)
    assert c_fused[0][0].dtype == torch.float16
    slots = meta.slot_mapping
    k0 = c_fused[0][0].view(-1, *c_fused[0][0].shape[2:])
    assert not torch.equal(k0[slots], cache[0][0].view_as(k0)[slots])  # this step's keys landed
    assert_close_to_scale(model, h_fused, [(k.float(), v.float()) for k, v in c_fused], h_layers,
                          [(k.float(), v.float()) for k, v in c_layers], tol=1e-3)
    # and the fp16 cache is close to the fp32 one: the same step on fp32 copies of the values
    h32, _, _, _ = both_paths(model, ids, pos, meta, [(k.float(), v.float()) for k, v in cache])
    torch.testing.assert_close(h_fused, h32, rtol=0, atol=5e-3 * h32.abs().max())
