"""Multi-LoRA: one mixed batch (base + two PEFT adapters, staggered, shared system prompt) gives
each request exactly PEFT's greedy tokens (fp32); adapters are checked, keyed in the prefix
cache, evicted LRU, and compose with the packed-weight kernels."""

from __future__ import annotations

import json

import pytest
import torch

from corral import LLM, LoRARequest, SamplingParams
from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore
from corral.model.lora import LoRAError, LoRALinear, bytes_per_rank, load_adapter
from tests.conftest import save_tiny_model, tiny_config
from tests.unit.test_model_parity import greedy_hf

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir, out_dir, targets, r: int, seed: int, alpha: int = 16):
    """A PEFT LoRA folder with random non-zero A and B (no training needed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero even with init_lora_weights=False in some versions
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out_dir)
    return out_dir


def peft_greedy(base_dir, adapter_dir, prompt, n):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()
    return greedy_hf(model, prompt, n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_folder):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lora")
    base_dir, _ = save_tiny_model(root / "base", tiny_config(max_position_embeddings=256), seed=1)
    AutoTokenizer.from_pretrained(default_folder).save_pretrained(base_dir)
    a = make_adapter(base_dir, root / "a", ALL, r=8, seed=2)
    b = make_adapter(base_dir, root / "b", ["q_proj", "v_proj", "down_proj"], r=4, seed=3,
                     alpha=8)
    return base_dir, a, b


@pytest.mark.parametrize("stack_max", [64, 0], ids=["stacked-small-steps", "ranges-only"])
def test_mixed_batch_matches_peft(setup, stack_max, monkeypatch):
    import corral.model.lora as lora_mod

    monkeypatch.setattr(lora_mod, "STACK_MAX_TOKENS", stack_max)
    base_dir, a_dir, b_dir = setup
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(3, 256, (40,), generator=gen).tolist()  # shared: prefix-cache hits
    prompts = [system + torch.randint(3, 256, (int(k),), generator=gen).tolist()
               for k in (5, 9, 3, 12, 7, 4)]
    loras = [None, "a", "b", "a", None, "b"]
    n = 12
    core = EngineCore(EngineConfig(model=str(base_dir), lora_modules={"a": str(a_dir),
                                                                      "b": str(b_dir)},
                                   max_num_batched_tokens=48, block_size=8))
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    paths = []  # per step with adapters: (stacked decode rows?, range groups?)
    set_step = core.lora.set_step

    def spy(batch):
        out = set_step(batch)
        paths.append((core.lora.step.stacked is not None, bool(core.lora.step.groups)))
        return out

    core.lora.set_step = spy
    done: dict[str, list[int]] = {}
    pending = list(enumerate(zip(prompts, loras)))
    step = 0
    while pending or core.has_work():
        if pending and step % 2 == 0:  # staggered arrivals
            i, (p, lr) = pending.pop(0)
            core.add_request(f"r{i}", p, params, lora=lr)
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    assert core.bm.prefix_cache_hit_rate > 0  # same-adapter requests shared the system prompt
    if stack_max:  # stacked decodes alone, and next to prefill chunks on the range path
        assert (True, False) in paths and (True, True) in paths
    else:
        assert not any(stacked for stacked, _ in paths)
    dirs = {None: None, "a": a_dir, "b": b_dir}
    for i, (p, lr) in enumerate(zip(prompts, loras)):
        assert done[f"r{i}"] == peft_greedy(base_dir, dirs[lr], p, n), (i, lr)
    # the adapters really change the output
    assert peft_greedy(base_dir, a_dir, prompts[1], n) != peft_greedy(base_dir, None, prompts[1], n)
    assert core.bm.num_free_blocks == core.bm.num_blocks


def test_prefix_cache_is_keyed_by_adapter(setup):
    base_dir, a_dir, _ = setup
    core = EngineCore(EngineConfig(model=str(base_dir), lora_modules={"a": str(a_dir)},
                                   block_size=8))
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=2)
    for rid, lora, hit in (("x", None, 0), ("y", "a", 0), ("z", "a", 32), ("w", None, 32)):
        req = core.add_request(rid, prompt, params, lora=lora)
        while core.has_work():
            core.step()
        assert req.seqs[0].num_cached_tokens == hit, rid


def test_llm_api_with_lora_request_and_lru(setup):
    base_dir, a_dir, b_dir = setup
    llm = LLM(model=str(base_dir), enable_lora=True, max_loras=1)
    p = list(range(5, 20))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([p, p, p], params, use_tqdm=False,
                        lora=[LoRARequest("a", str(a_dir)), LoRARequest("b", str(b_dir)), None])
    assert outs[0].outputs[0].token_ids == peft_greedy(base_dir, a_dir, p, 6)
    assert outs[1].outputs[0].token_ids == peft_greedy(base_dir, b_dir, p, 6)
    assert outs[2].outputs[0].token_ids == peft_greedy(base_dir, None, p, 6)
    # one slot: a and b took turns, each loaded into it once
    mgr = llm.core.lora
    assert len(mgr.resident) == 1 and mgr.num_loads == 2
    assert {x["name"] for x in llm.info["loras"]} == {"a", "b"}
    # without enable_lora a LoRA request is refused clearly
    plain = LLM(model=str(base_dir))
    with pytest.raises(LoRAError, match="not enabled"):
        plain.generate([p], params, use_tqdm=False, lora="a")


def test_bad_adapters_are_named(setup, tmp_path):
    base_dir, a_dir, _ = setup
    cfg = tiny_config(max_position_embeddings=256)

    def err(path, max_rank=64, config=cfg):
        with pytest.raises(LoRAError) as e:
            load_adapter("zh", path, config, max_rank)
        assert "'zh'" in str(e.value)
        return str(e.value)

    assert "no such folder" in err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "adapter_config.json is missing" in err(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in err(bad)
    assert "rank 8 is over --max-lora-rank 4" in err(a_dir, max_rank=4)
    wide = tiny_config(max_position_embeddings=256, hidden_size=96)
    assert "do not fit the base" in err(a_dir, config=wide)
    # a target Corral has no module for (lm_head), and modules_to_save
    lm = make_adapter(base_dir, tmp_path / "lm", ["q_proj", "lm_head"], r=4, seed=5)
    assert "target module 'lm_head' is not supported" in err(lm)
    cfgj = json.loads((a_dir / "adapter_config.json").read_text())
    mts = tmp_path / "mts"
    mts.mkdir()
    (mts / "adapter_config.json").write_text(json.dumps({**cfgj, "modules_to_save": ["lm_head"]}))
    assert "modules_to_save" in err(mts)
    nofile = tmp_path / "nofile"
    nofile.mkdir()
    (nofile / "adapter_config.json").write_text(json.dumps(cfgj))
    assert "adapter_model.safetensors is missing" in err(nofile)
    # the engine keeps serving after a refused adapter
    core = EngineCore(EngineConfig(model=str(base_dir), lora_modules={"a": str(a_dir)}))
    with pytest.raises(LoRAError, match="not loaded"):
        core.add_request("q", [5, 6, 7], SamplingParams(max_tokens=2), lora="missing")
    with pytest.raises(LoRAError, match="'zh'"):
        core.add_lora(core.lora.load("zh", tmp_path / "nope"))
    core.add_request("ok", [5, 6, 7], SamplingParams(max_tokens=2), lora="a")
    while core.has_work():
        core.step()


def test_wrapper_composes_with_any_base_module(setup):
    """The wrapper only reads its base module's output: a replaced base (as the GGUF/Q8_0
    kernels install) keeps the adapter's delta."""
    base_dir, a_dir, _ = setup
    core = EngineCore(EngineConfig(model=str(base_dir), lora_modules={"a": str(a_dir)}))
    wrapped = [m for m in core.model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * core.model_config.num_hidden_layers

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    p = list(range(5, 30))
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expect = peft_greedy(base_dir, a_dir, p, 5)
    counters = []
    for m in wrapped:
        m.base = Counting(m.base)
        counters.append(m.base)
    core.add_request("k", p, params, lora="a")
    out = None
    while core.has_work():
        for o in core.step():
            out = o
    assert out.outputs[0].token_ids == expect
    assert all(c.calls > 0 for c in counters)


def test_adapter_memory_per_rank(setup):
    _, a_dir, _ = setup
    cfg = tiny_config(max_position_embeddings=256)
    ad = load_adapter("a", a_dir, cfg, 64)
    # all 7 parts at rank 8 (q/k/v and gate/up stacked; B block-diagonal adds only zeros
    # to the fused ones, counted here as resident bytes)
    assert ad.rank == 8
    per_rank = bytes_per_rank(cfg, torch.float32)
    assert per_rank * 8 <= ad.nbytes


def test_cli_lora_flags():
    import argparse

    from corral.errors import CorralError
    from corral.run.cli import add_model_args, engine_kwargs_from_args, parse_lora_specs

    assert parse_lora_specs(["zh=runs/zh", "runs/en/"]) == {"zh": "runs/zh", "en": "runs/en/"}
    with pytest.raises(CorralError, match="given twice"):
        parse_lora_specs(["a=x", "a=y"])
    with pytest.raises(CorralError, match="NAME=PATH"):
        parse_lora_specs(["=x"])
    p = argparse.ArgumentParser()
    add_model_args(p)
    kw = engine_kwargs_from_args(p.parse_args(["--lora", "zh=runs/zh", "--max-loras", "2"]))
    assert kw["lora_modules"] == {"zh": "runs/zh"} and kw["enable_lora"]
    assert kw["default_lora"] == "zh" and kw["max_loras"] == 2
    assert "enable_lora" not in engine_kwargs_from_args(p.parse_args([]))


def test_default_lora_answers_requests_that_name_none(setup):
    base_dir, a_dir, _ = setup
    llm = LLM(model=str(base_dir), lora_modules={"a": str(a_dir)}, default_lora="a")
    p = list(range(5, 20))
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == peft_greedy(base_dir, a_dir, p, 4)
    with pytest.raises(LoRAError, match="'b' is not loaded"):
        LLM(model=str(base_dir), lora_modules={"a": str(a_dir)}, default_lora="b")


def test_lora_over_q8_0_kernels(setup):
    """Installed after `--quantize q8_0`: the wrappers keep the packed-kernel layers as their
    base, and the adapter still moves the output (by the same delta as on the dense base,
    up to Q8_0 rounding of the base)."""
    from corral.model.gguf_kernels import GGUFLinear, load_library

    if load_library() is None:
        pytest.skip("no C compiler for the Q8_0 kernels")
    base_dir, a_dir, _ = setup
    core = EngineCore(EngineConfig(model=str(base_dir), quantization="q8_0",
                                   lora_modules={"a": str(a_dir)}))
    wrapped = [m for m in core.model.modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(isinstance(m.base, GGUFLinear) for m in wrapped)
    x = torch.randn(3, core.model_config.hidden_size)
    layer = core.model.model.layers[0].self_attn.qkv_proj
    adapter = core.lora.get("a")
    core.lora.activate(adapter, set())
    core.lora.step.groups = [(core.lora.resident[adapter.id][1], 1, 3)]
    y = layer(x)
    core.lora.step.clear()
    y0 = layer(x)
    a, b = adapter.weights["model.layers.0.self_attn.qkv_proj"]
    assert torch.equal(y[0], y0[0])  # row 0 is a base row
    torch.testing.assert_close(y[1:] - y0[1:], (x[1:] @ a.T) @ b.T, rtol=1e-4, atol=1e-5)


def test_unload_frees_the_slot_and_reload_is_a_new_adapter(setup):
    base_dir, a_dir, _ = setup
    core = EngineCore(EngineConfig(model=str(base_dir), lora_modules={"a": str(a_dir)},
                                   block_size=8))
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=2)
    core.add_request("x", prompt, params, lora="a")
    while core.has_work():
        core.step()
    old = core.lora.get("a")
    assert old.id in core.lora.resident
    core.remove_lora("a")
    assert old.id not in core.lora.resident and not core.lora.adapters
    core.add_lora(core.lora.load("a", a_dir))
    req = core.add_request("y", prompt, params, lora="a")
    while core.has_work():
        core.step()
    assert req.seqs[0].num_cached_tokens == 0  # a reloaded adapter never reuses old K/V


def test_base_only_steps_after_a_stacked_step(setup, monkeypatch):
    """The stacked path's per-step state (stacked weights and row masks) belongs to one step:
    a base-only step right after a stacked multi-adapter decode must not see it. Before the
    fix `set_step` returned early for all-base batches and left the last masks in place, so a
    base step of the same token count silently got adapter deltas, and one of another size
    failed on a mask of the old step's rows (what benchmarks/lora_throughput.py hit: 4-row
    mask, 48-token base prefill right after the adapters' warm-up)."""
    import corral.model.lora as lora_mod

    monkeypatch.setattr(lora_mod, "STACK_MAX_TOKENS", 64)
    base_dir, a_dir, b_dir = setup
    core = EngineCore(EngineConfig(model=str(base_dir), block_size=8,
                                   lora_modules={"a": str(a_dir), "b": str(b_dir)}))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    def run(jobs):
        outs = {}
        for rid, prompt, lora in jobs:
            core.add_request(rid, prompt, params, lora=lora)
        while core.has_work():
            for o in core.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0].token_ids
        return outs

    run([("x", list(range(5, 14)), "a"), ("y", list(range(20, 27)), "b")])
    assert core.lora.step.stacked is not None  # the last step (2 decodes) ran stacked
    # two one-token prompts: a 2-token base step, the stale masks' shape
    got = run([("p", [7], None), ("q", [9], None)])
    assert got["p"] == peft_greedy(base_dir, None, [7], 3)
    assert got["q"] == peft_greedy(base_dir, None, [9], 3)
    run([("x2", list(range(5, 14)), "a"), ("y2", list(range(20, 27)), "b")])
    prompt = list(range(30, 52))  # a 22-token base prefill after a 2-row stacked step
    assert run([("z", prompt, None)])["z"] == peft_greedy(base_dir, None, prompt, 3)
    assert core.lora.step.stacked is None and not core.lora.step.groups


def test_cli_generate_and_eval_take_lora(tmp_path, capsys, default_folder):
    """`corral generate --lora NAME=PATH` answers under the adapter (the same text as the
    Python API's LoRARequest, not the base's); eval refuses --lora with --endpoint."""
    from transformers import AutoTokenizer

    from corral.cli import main

    base_dir, _ = save_tiny_model(tmp_path / "base", tiny_config(max_position_embeddings=256,
                                                                 vocab_size=49152), seed=6)
    AutoTokenizer.from_pretrained(default_folder).save_pretrained(base_dir)
    a_dir = make_adapter(base_dir, tmp_path / "zh", ALL, r=8, seed=7)

    def cli(*extra):
        argv = ["generate", "--raw", "hello there", "--model", str(base_dir), "--temperature",
                "0", "--max-new-tokens", "6", *extra]
        assert main(argv) == 0
        return capsys.readouterr().out.strip()

    llm = LLM(model=str(base_dir), enable_lora=True)
    params = SamplingParams(temperature=0, max_tokens=6)

    def api(lora):
        return llm.generate(["hello there"], params, use_tqdm=False,
                            lora=lora)[0].outputs[0].text.strip()

    tuned = api(LoRARequest("zh", str(a_dir)))
    assert tuned != api(None)
    assert cli("--lora", f"zh={a_dir}") == tuned
    assert cli() == api(None)
    rc = main(["eval", "--endpoint", "http://127.0.0.1:9/v1", "--lora", f"zh={a_dir}",
               "--output", str(tmp_path / "ev")])
    assert rc != 0 and "--lora applies to a local model" in capsys.readouterr().err


@pytest.mark.slow
def test_mixed_batch_on_the_gguf_default_model_matches_peft(tmp_path, default_folder):
    """The default model runs on its memory-mapped GGUF blocks (fused qkv and gate/up row
    tables); base rows and rows of two adapters decode together (stacked decode rows next to
    range-path prefill chunks), and each request's greedy tokens equal PEFT's on the same
    GGUF dequantized (as the base alone equals transformers' there)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.model.gguf_kernels import GGUFLinear

    def adapter(out, targets, r, seed):
        base = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32)
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        model.save_pretrained(out)
        return out

    dirs = {"a": adapter(tmp_path / "a", ALL, 8, 11),
            "b": adapter(tmp_path / "b", ["q_proj", "v_proj", "up_proj", "down_proj"], 4, 12)}
    tok = AutoTokenizer.from_pretrained(default_folder)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
               for q in ("What is the capital of France?", "Name three primary colors.",
                         "Write a haiku about the sea.", "What is 7 times 8?")]
    loras = ["a", None, "b", "a"]
    core = EngineCore(EngineConfig(model="default", max_model_len=512,
                                   lora_modules={k: str(v) for k, v in dirs.items()}))
    assert core.info["weights"].startswith("GGUF q4_1/q8_0 memory-mapped")
    assert all(isinstance(m.base, GGUFLinear) for m in core.model.modules()
               if isinstance(m, LoRALinear))
    stacked_steps = []
    set_step = core.lora.set_step
    core.lora.set_step = lambda b: (set_step(b), stacked_steps.append(
        core.lora.step.stacked is not None))[0]
    n = 10
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    done, pending, step = {}, list(enumerate(zip(prompts, loras))), 0
    while pending or core.has_work():
        if pending and step % 2 == 0:
            i, (p, lr) = pending.pop(0)
            core.add_request(f"r{i}", p, params, lora=lr)
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    assert any(stacked_steps)
    hf = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()
    for i, (p, lr) in enumerate(zip(prompts, loras)):
        model = hf if lr is None else PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32),
            dirs[lr]).eval()
        assert done[f"r{i}"] == greedy_hf(model, p, n), (i, lr)
    # the adapters move the output (so the parity above says something)
    assert any(done[f"r{i}"] != greedy_hf(hf, prompts[i], n) for i, lr in enumerate(loras) if lr)
