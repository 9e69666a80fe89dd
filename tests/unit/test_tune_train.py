"""Tune training pieces on a tiny random Llama: packing isolation, loss scaling under gradient
accumulation, settings, checkpoints."""

from __future__ import annotations

import argparse

import pytest
import torch

from corral.errors import CorralError
from corral.tune.sft import TuneConfig, answer_loss, last_checkpoint
from tests.conftest import tiny_config


def tiny_model(attn: str = "sdpa", seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(attn_implementation=attn)).eval()


def sample(n: int, n_answer: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (n,), generator=g).tolist()
    return {"input_ids": ids, "labels": [-100] * (n - n_answer) + ids[n - n_answer:]}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_do_not_attend_to_each_other(attn):
    """TRL's BFD packing + padding-free collation: each packed sample's logits and loss equal
    those of the sample run alone."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    samples = [sample(12, 5, 1), sample(9, 4, 2), sample(7, 3, 3)]
    ds = pack_dataset(Dataset.from_list(samples), seq_length=32, strategy="bfd")
    assert len(ds) == 1  # all three share one row
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([ds[0]])
    assert "attention_mask" not in batch
    model = tiny_model(attn)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]  # a cache would disable packed masks
        row = batch["input_ids"][0].tolist()
        for s in samples:  # find each sample in the packed row (BFD reorders them)
            n = len(s["input_ids"])
            start = next(i for i in range(len(row)) if row[i:i + n] == s["input_ids"])
            alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-4)
        # the loss over the packed row is the token-weighted loss of the samples alone
        loss_packed = answer_loss(model, batch)
        total, count = 0.0, 0
        for s in samples:
            t = {k: torch.tensor([v]) for k, v in s.items()}
            k = sum(x != -100 for x in s["labels"][1:])
            total += answer_loss(model, t).item() * k
            count += k
    assert loss_packed.item() == pytest.approx(total / count, rel=1e-5)


def test_answer_loss_matches_transformers_loss():
    model = tiny_model()
    s = sample(10, 4, 5)
    t = {k: torch.tensor([v]) for k, v in s.items()}
    with torch.no_grad():
        ref = model(input_ids=t["input_ids"], labels=t["labels"]).loss
        assert answer_loss(model, t).item() == pytest.approx(ref.item(), rel=1e-5)


def one_sgd_step(tmp_path, batch_size: int, grad_accum: int, samples) -> dict:
    """LoRA params after one SGD optimizer step of CorralTrainer."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from corral.tune.sft import make_trainer_class, training_args

    model = tiny_model(seed=1)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules="all-linear", init_lora_weights=False))
    cfg = TuneConfig(data="x", output=str(tmp_path), batch_size=batch_size,
                     grad_accum=grad_accum, max_steps=1, learning_rate=0.5)
    args = training_args(cfg, tmp_path, torch.device("cpu"), False, optim="sgd",
                         max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0,
                         train_sampling_strategy="sequential", report_to=[], save_strategy="no")
    ds = Dataset.from_list(samples)
    trainer = make_trainer_class()(model=model, args=args, train_dataset=ds,
                                   data_collator=DataCollatorForLanguageModeling(pad_token_id=0))
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """2 micro-batches of 1 with accumulation == 1 batch of 2: the loss is divided by the trained
    tokens of the whole step, not averaged per micro-batch (samples differ a lot in length)."""
    samples = [sample(20, 16, 7), sample(6, 2, 8)]
    big = one_sgd_step(tmp_path / "a", 2, 1, samples)
    accum = one_sgd_step(tmp_path / "b", 1, 2, samples)
    start = one_sgd_step(tmp_path / "c", 1, 1, samples[:1])  # a different step, for contrast
    for name in big:
        torch.testing.assert_close(accum[name], big[name], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(start[n], big[n], atol=1e-6) for n in big)


def test_qlora_on_cpu_is_a_clear_error(tmp_path):
    from corral.tune.sft import train

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    cfg = TuneConfig(model=str(tmp_path / "nothing"), data=str(data), output=str(tmp_path / "o"),
                     load_in_4bit=True)
    with pytest.raises(CorralError, match="needs a CUDA GPU"):
        train(cfg)


def test_settings_are_checked():
    with pytest.raises(CorralError, match="exclude each other"):
        TuneConfig(data="d", output="o", full=True, load_in_4bit=True).check()
    with pytest.raises(CorralError, match="max-seq-len must be a positive integer"):
        TuneConfig(data="d", output="o", max_seq_len=0).check()


def test_yaml_config_and_flags(tmp_path):
    from corral.tune.cli import config_from_args, register

    (tmp_path / "tune.yaml").write_text("model: m\ndata: d.csv\noutput: out\nlora-r: 8\n"
                                        "target-modules: q_proj,v_proj\nepochs: 2\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["tune", "--config", str(tmp_path / "tune.yaml"), "--lora-r", "4",
                              "--packing"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.data, cfg.lora_r, cfg.epochs, cfg.packing) == ("m", "d.csv", 4, 2, True)
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.max_seq_len == 1024
    (tmp_path / "bad.yaml").write_text("lora_rank: 8\n")
    args = parser.parse_args(["tune", "--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(CorralError, match="unknown settings: lora_rank"):
        config_from_args(args)


def test_example_yaml_is_valid():
    from corral.tune.cli import load_yaml

    TuneConfig(**load_yaml("examples/tune.yaml")).check()


def test_last_checkpoint_skips_incomplete(tmp_path):
    for step, complete in [(5, True), (10, True), (15, False)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    assert last_checkpoint(tmp_path).name == "checkpoint-10"


def test_full_finetune_with_packing_saves_a_loadable_model(tmp_path, default_folder):
    """--full --packing end to end in-process: packed rows, eval loss, a full model folder with
    the chat template, and a clear answer when it is then given to merge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.tune.merge import merge
    from corral.tune.sft import train
    from tests.conftest import save_tiny_model

    tok = AutoTokenizer.from_pretrained(default_folder)
    base = tmp_path / "base"
    save_tiny_model(base, tiny_config(vocab_size=len(tok)))
    tok.save_pretrained(base)
    out = tmp_path / "out"
    summary = train(TuneConfig(model=str(base), data="examples/data/bilingual_sft.jsonl",
                               output=str(out), full=True, packing=True, max_seq_len=128,
                               batch_size=2, max_steps=3, val_split=4, save_steps=100,
                               learning_rate=1e-3, progress=False))
    assert summary["method"] == "full" and summary["global_step"] == 3
    assert summary["train_rows"] < summary["train_examples"]  # samples were packed together
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(tok)
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    with pytest.raises(CorralError, match="full model"):
        merge(str(base), str(out), str(tmp_path / "merged"))


def test_same_seed_same_adapter(tmp_path, default_folder):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from corral.tune.sft import train
    from tests.conftest import save_tiny_model

    tok = AutoTokenizer.from_pretrained(default_folder)
    base = tmp_path / "base"
    save_tiny_model(base, tiny_config(vocab_size=len(tok)))
    tok.save_pretrained(base)

    def run(name: str, seed: int) -> dict:
        train(TuneConfig(model=str(base), data="examples/data/bilingual_sft.csv",
                         output=str(tmp_path / name), max_steps=2, batch_size=2, val_split=0,
                         max_seq_len=64, seed=seed, learning_rate=1e-2, progress=False))
        return load_file(tmp_path / name / "adapter_model.safetensors")

    a, b, c = run("a", 1), run("b", 1), run("c", 2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
