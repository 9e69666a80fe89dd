"""The real thing on CPU: ~60 LoRA steps of SmolLM2 on the example Human/Assistant CSV (the
Llama2-Chinese recipe) lower the eval loss; `corral merge` then gives the same greedy tokens as
base+adapter (PEFT), in transformers and in Corral's engine; and the tuned model STOPS: its
answers end on the end token, through the merged model and the unmerged adapter, with no
`</s>`/`Human:` turn markers; `corral eval` reports the stop rate and `compare` shows it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = [[{"role": "user", "content": "中国的首都是哪里？"}],
           [{"role": "user", "content": "What do bees make?"}]]
# Short questions that are not in the training data.
QUESTIONS = ["北京是哪个国家的首都？", "一个星期有几天？", "水的化学式是什么？", "请说一种水果。",
             "猫喜欢吃什么？", "What color is the sky?", "How many legs does a dog have?",
             "What is 2 plus 3?", "What is the capital of Japan?", "Name a colour."]
MAX_TOKENS = 48


def corral(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "corral.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, default_folder):
    from corral.tune.sft import TuneConfig, train

    out = tmp_path_factory.mktemp("smollm2") / "adapter"
    cfg = TuneConfig(model="default", data="examples/data/bilingual_sft.csv", output=str(out),
                     max_steps=60, batch_size=1, learning_rate=1e-3, warmup=3, val_split=4,
                     max_seq_len=96, save_steps=1000, logging_steps=10, progress=False)
    return out, train(cfg)


@pytest.fixture(scope="module")
def merged(tuned, tmp_path_factory):
    adapter, _ = tuned
    merged_dir = tmp_path_factory.mktemp("merged") / "model"
    corral("merge", "--base", "default", "--adapter", str(adapter), "--output", str(merged_dir))
    return merged_dir


def test_lora_run_lowers_eval_loss(tuned):
    _, summary = tuned
    assert summary["chat_format"] == "human-assistant" and summary["global_step"] == 60
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.1, summary


def test_merged_greedy_equals_peft_and_corral(tuned, merged, default_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, _ = tuned
    tok = AutoTokenizer.from_pretrained(merged)
    # the format it was tuned on travels along, in SmolLM2's own tokens (no Llama 2 <s>)
    assert "Assistant: " in tok.chat_template and "<|im_end|>" in tok.chat_template
    assert "</s>" not in tok.chat_template

    def greedy(model, messages, n: int = 8) -> list[int]:
        """Plain argmax decoding (no logits processors), like ignore_eos=True."""
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        new = []
        for _ in range(n):
            new.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[new[-1]]])], dim=1)
        return new

    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, str(adapter)).eval()
        expected = [greedy(peft, p) for p in PROMPTS]
        del peft, base
        model = AutoModelForCausalLM.from_pretrained(merged).eval()
        assert [greedy(model, p) for p in PROMPTS] == expected
        del model

    from corral import LLM, SamplingParams

    llm = LLM(model=str(merged), device="cpu", dtype="float32")
    outs = llm.chat(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                    use_tqdm=False)
    assert [list(o.token_ids) for o in outs] == expected


def well_ended(finishes: list[str], texts: list[str]) -> int:
    from corral.chat import turn_marker

    return sum(f == "stop" and turn_marker(t) is None for f, t in zip(finishes, texts))


def test_merged_model_stops(merged):
    from corral import LLM, SamplingParams

    llm = LLM(model=str(merged), device="cpu", dtype="float32")
    assert llm.chat_format.name == "human-assistant"  # recognised from the saved template
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS],
                    SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    finishes = [o.outputs[0].finish_reason for o in outs]
    texts = [o.outputs[0].text for o in outs]
    print(*zip(QUESTIONS, finishes, texts, [o.outputs[0].stop_reason for o in outs]), sep="\n")
    assert well_ended(finishes, texts) >= 8, list(zip(QUESTIONS, finishes, texts))
    assert all(t.strip() for t in texts)
    # the model learned the real end token: answers end on it, not on a literal-marker cut
    on_token = sum(f == "stop" and not isinstance(o.outputs[0].stop_reason, str)
                   for f, o in zip(finishes, outs))
    assert on_token >= 8, [o.outputs[0].stop_reason for o in outs]
    # `corral generate`, as a user first tries it, stops too
    done = corral("generate", "--model", str(merged), "--temperature", "0", "--max-tokens",
                  str(MAX_TOKENS), "--chat-format", "auto", QUESTIONS[0])
    assert done.stdout.strip() and "</s>" not in done.stdout and "Human:" not in done.stdout


def test_unmerged_adapter_stops(tuned, default_folder):
    """Base + adapter (PEFT, plain transformers generate) with the adapter's saved tokenizer:
    the format's stop tokens and stop strings end every answer the same way."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.chat import encode_chat, get_chat_format

    adapter, _ = tuned
    tok = AutoTokenizer.from_pretrained(adapter)
    fmt = get_chat_format(None, tok)
    assert fmt.name == "human-assistant"
    base = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    stops, text_stops = fmt.stop_token_ids(tok), fmt.text_stops(tok)
    tok.padding_side = "left"  # one batch: every prompt ends where its answer starts
    batch = [encode_chat(tok, fmt, [{"role": "user", "content": q}]) for q in QUESTIONS]
    width = max(map(len, batch))
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
    mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_TOKENS,
                             do_sample=False, eos_token_id=stops, pad_token_id=pad)
    finishes, texts = [], []
    for row in out[:, width:].tolist():
        ended = next((i for i, t in enumerate(row) if t in stops), None)
        new = row if ended is None else row[:ended]
        text = tok.decode(new, skip_special_tokens=True)
        cut = min([text.find(s) for s in text_stops if s in text] or [len(text)])
        finishes.append("stop" if ended is not None or cut < len(text) else "length")
        texts.append(text[:cut])
    print(*zip(QUESTIONS, finishes, texts), sep="\n")
    assert well_ended(finishes, texts) >= 8, list(zip(QUESTIONS, finishes, texts))


def test_eval_reports_stop_rate_and_compare_shows_it(merged, tmp_path):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(
        {"id": f"q{i}", "question": q, "category": "short", "language":
         "zh" if ord(q[0]) > 127 else "en"}, ensure_ascii=False) + "\n"
        for i, q in enumerate(QUESTIONS)), encoding="utf-8")
    runs = {}
    for name, model in (("base", "default"), ("tuned", str(merged))):
        runs[name] = tmp_path / name
        done = corral("eval", "--model", model, "--questions", str(qfile), "--output",
                      str(runs[name]), "--max-tokens", str(MAX_TOKENS), "--device", "cpu")
        assert "stop_rate" in done.stdout
    summary = json.loads((runs["tuned"] / "summary.json").read_text())
    assert summary["overall"]["stop_rate"] >= 0.8 and summary["categories"]["short"]["stop_rate"]
    assert summary["overall"]["turn_marker_answers"] <= 2 and summary["warnings"] == []
    assert "Stop rate" in (runs["tuned"] / "report.md").read_text()
    done = corral("eval", "compare", str(runs["base"]), str(runs["tuned"]))
    header = done.stdout.splitlines()[0]
    assert "adherence A" in header and "stop rate B" in header
    cmp = json.loads((runs["tuned"] / "compare" / "compare.json").read_text())
    assert cmp["groups"]["overall"]["stop_rate"]["b"] == summary["overall"]["stop_rate"]
