"""Supervised fine-tuning: LoRA (default), QLoRA (4-bit NF4 base, CUDA) or full, on the
transformers Trainer (schedules, accumulation, checkpoints, resume, TensorBoard) with PEFT.

Multi-process: under `accelerate launch` / `torchrun` (or `corral tune --num-processes N`) every
process runs this same code; the Trainer wraps the model in DDP (FSDP with accelerate's FSDP
config) and gives each process its share of every batch. Corral's own writes -- the progress
bar, tune_log.jsonl, the tokenizer and corral_tune.json -- happen on the main process only; the
Trainer already saves checkpoints, TensorBoard logs and the adapter from there alone.

Speed and memory: the loss is computed only where labels are trained. With assistant-only
labels most positions are prompt, so the (tokens x vocab) logits -- the largest activation of a
small model -- are built for the answer tokens alone. Batches are grouped by length (little
padding); `packing` uses TRL's best-fit-decreasing packing, padding-free: packed samples sit in
one row with position ids restarting at 0, from which transformers builds a block-diagonal
causal mask (sdpa/eager) or varlen FlashAttention, so samples never attend to each other.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from corral.errors import CorralError

SUMMARY = "corral_tune.json"  # written next to the adapter: what merge and users need to know


@dataclass
class TuneConfig:
    """Every `corral tune` setting (flags and tune.yaml keys have these names)."""

    model: str = "default"
    data: str = ""
    output: str = ""
    data_format: str | None = None  # auto-detected when None
    chat_format: str | None = None  # None: the tokenizer's template
    val_data: str | None = None
    val_split: float = 0.05  # fraction (<1) or number of examples (>=1) held out for eval loss
    train_on_prompt: bool = False
    packing: bool = False
    max_seq_len: int = 1024
    full: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    learning_rate: float | None = None  # 2e-4 with LoRA, 2e-5 full
    lr_scheduler: str = "cosine"
    warmup: float = 0.03  # fraction of the steps (<1) or a number of steps (>=1)
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    eval_steps: int | None = None  # None: at every checkpoint
    save_steps: int = 100
    save_total_limit: int | None = 3
    logging_steps: int = 10
    resume: bool = False
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        """Raise CorralError for settings that cannot work (before anything is loaded)."""
        if not self.data:
            raise CorralError("no training data: give --data PATH (or data: in the config)")
        if not self.output:
            raise CorralError("no output folder: give --output DIR")
        if self.full and self.load_in_4bit:
            raise CorralError("--full and --load-in-4bit exclude each other (QLoRA trains LoRA "
                              "adapters on a frozen 4-bit base)")
        positive = {"max_seq_len": self.max_seq_len, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "save_steps": self.save_steps,
                    "logging_steps": self.logging_steps, "lora_r": self.lora_r}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise CorralError(f"{name.replace('_', '-')} must be a positive integer, "
                                  f"got {value!r}")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise CorralError("give --epochs > 0 or --max-steps > 0")
        if self.val_split < 0:
            raise CorralError("--val-split must be >= 0")


# --- checkpoints ------------------------------------------------------------------------------

def last_checkpoint(output: Path) -> Path | None:
    """The newest *complete* checkpoint (trainer_state.json is written last, so a folder a kill
    interrupted is skipped)."""
    best: tuple[int, Path] | None = None
    for d in output.glob("checkpoint-*"):
        step = d.name.rpartition("-")[2]
        if not step.isdigit() or not (d / "trainer_state.json").is_file():
            continue
        try:
            json.loads((d / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if best is None or int(step) > best[0]:
            best = (int(step), d)
    return best[1] if best else None


def checkpoint_to_resume(cfg: TuneConfig) -> Path | None:
    """The checkpoint --resume continues from; an error if --output holds one without it."""
    out = Path(cfg.output).expanduser()
    resume_from = last_checkpoint(out) if out.is_dir() else None
    if resume_from and not cfg.resume:
        raise CorralError(f"{out} already holds checkpoints ({resume_from.name}); pass --resume "
                          "to continue that run or choose another --output")
    return resume_from


# --- model -------------------------------------------------------------------------------------

def load_model(cfg: TuneConfig, device: torch.device):
    """The base model for training (4-bit NF4 for QLoRA), wrapped with LoRA unless `full`."""
    from transformers import AutoModelForCausalLM

    from corral.loading import load_config, resolve_dtype, resolve_source

    src = resolve_source(cfg.model)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs: dict = {"dtype": dtype}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = nf4_config(device, dtype)
        kwargs["device_map"] = {"": device.index or 0}
    if src.folder is None:  # random:NAME presets (benchmarks)
        if cfg.load_in_4bit:
            raise CorralError("--load-in-4bit needs a model with weights, not random:NAME")
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(load_config(src), dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(src.folder, **kwargs)
        except (OSError, ValueError) as e:
            raise CorralError(f"cannot load {cfg.model}: {str(e).splitlines()[0][:200]}") from None
    if not cfg.load_in_4bit:
        model.to(device)
    model.config.use_cache = False  # training: no KV cache
    if cfg.full:
        return model, src
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise CorralError(f"LoRA setup failed: {str(e).splitlines()[0][:200]}") from None
    return model, src


def nf4_config(device: torch.device, dtype: torch.dtype):
    """bitsandbytes NF4 (double quantization) config; QLoRA needs CUDA."""
    if device.type != "cuda":
        raise CorralError("--load-in-4bit (QLoRA) needs a CUDA GPU: bitsandbytes NF4 does not run "
                          "on CPU; train LoRA in full precision here (drop --load-in-4bit)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise CorralError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype != torch.float32 else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def causal_lm(model):
    """The *ForCausalLM inside a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --- trainer -----------------------------------------------------------------------------------

def make_trainer_class():
    from transformers import Trainer

    class CorralTrainer(Trainer):
        """Trainer whose loss builds logits only at trained positions (see module docstring)."""

        loss_is_scaled_for_ga = True  # we divide by num_items_in_batch (tokens in the full step)
        tokens_seen = 0

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            if (self.args.train_sampling_strategy != "group_by_length"
                    or "length" not in getattr(ds, "column_names", ())):
                return super()._get_train_sampler(train_dataset)
            a = self.args
            return StepLengthSampler(a.train_batch_size * a.gradient_accumulation_steps
                                     * a.world_size, ds["length"], a.data_seed or a.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            distributed = self.accelerator.num_processes > 1
            if model.training:
                self.tokens_seen += self._tokens(inputs, distributed)
            if distributed:
                # DDP/FSDP sync gradients inside the wrapper's forward, so the model runs
                # whole (logits at every position). The Trainer divides by the step's trained
                # tokens summed over all processes and multiplies by their number, so DDP's
                # gradient average equals one process's gradient over the union of the batches.
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = answer_loss(model, inputs, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

        def _tokens(self, inputs: dict, distributed: bool) -> int:
            """Tokens in this micro-batch; summed over all processes when distributed."""
            mask = inputs.get("attention_mask")
            n = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
            if not distributed:
                return int(n)
            return int(self.accelerator.gather(n.reshape(1).to(self.accelerator.device)).sum())

    return CorralTrainer


class StepLengthSampler:
    """Length-grouped order (transformers' `get_length_grouped_indices`) over whole optimizer
    steps, seeded by (seed, epoch).

    transformers groups by the per-device batch and draws from the global RNG; here the groups
    span the step across all processes, and the order depends only on the seed and the epoch.
    So N processes with batch b (accelerate gives process r the b-slices r, r+N, ...) see in
    each step exactly the examples one process with batch N*b sees, every process computes the
    same order, and a resumed run replays its epoch's order before skipping the done steps.
    """

    def __init__(self, step_size: int, lengths: list[int], seed: int):
        self.step_size, self.lengths, self.seed, self.epoch = step_size, list(lengths), seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer through accelerate
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.step_size, generator=g))


def answer_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy summed over trained labels / num_items_in_batch.

    `num_items_in_batch` is the trained-token count of the whole optimizer step (all
    accumulated micro-batches), so accumulation gives the same gradient as one big batch.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    lm = causal_lm(model)
    # use_cache=False matters: with a cache transformers ignores packed position_ids
    hidden = lm.model(**inputs, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
    targets = labels[:, 1:]  # position t predicts token t+1
    keep = targets != -100
    logits = lm.lm_head(hidden[keep]).float()  # (N, V): trained positions only
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / torch.clamp(torch.as_tensor(n, device=loss.device), min=1)


def make_progress_callback(trainer, log_path: Path, show: bool):
    """tqdm bar with loss, lr and tokens/s; every log line also goes to tune_log.jsonl (both on
    the main process only)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        bar = None
        t0 = 0.0
        tokens0 = 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.tokens0 = time.perf_counter(), trainer.tokens_seen
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step",
                            desc="tune", disable=not (show and state.is_world_process_zero),
                            dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            if self.bar:
                self.bar.update(state.global_step - self.bar.n)

        def tokens_per_s(self) -> float:
            dt = time.perf_counter() - self.t0
            return (trainer.tokens_seen - self.tokens0) / dt if dt > 0 else 0.0

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero:
                return
            logs = dict(logs or {})
            logs["step"] = state.global_step
            if "loss" in logs:
                logs["tokens_per_s"] = round(self.tokens_per_s(), 1)
                if self.bar:
                    self.bar.set_postfix(loss=f"{logs['loss']:.4f}",
                                         lr=f"{logs.get('learning_rate', 0):.2e}",
                                         tok_s=f"{logs['tokens_per_s']:.0f}")
            with log_path.open("a") as f:
                f.write(json.dumps(logs) + "\n")

        def on_train_end(self, args, state, control, **kw):
            if self.bar:
                self.bar.close()

    return Progress()


def build_datasets(cfg: TuneConfig, tokenizer, chat_format, train_examples, val_examples,
                   say=print):
    """HF datasets of input_ids/labels (train packed when asked); `say` reports dropped
    examples (None: quiet, as on the processes other than the main one)."""
    from datasets import Dataset

    from corral.tune.data import encode_examples

    def to_dataset(examples, name):
        encoded, dropped = encode_examples(examples, tokenizer, chat_format, cfg.max_seq_len,
                                           cfg.train_on_prompt)
        if not encoded:
            raise CorralError(f"no {name} example keeps a trained token within --max-seq-len "
                              f"{cfg.max_seq_len}")
        if dropped and say:
            say(f"corral tune: {dropped} {name} example(s) dropped: no answer token within "
                  f"--max-seq-len {cfg.max_seq_len}")
        return Dataset.from_dict({"input_ids": [e.input_ids for e in encoded],
                                  "labels": [e.labels for e in encoded],
                                  "length": [len(e.input_ids) for e in encoded]})

    train = to_dataset(train_examples, "training")
    val = to_dataset(val_examples, "validation") if val_examples else None
    if cfg.packing:
        from trl.data_utils import pack_dataset

        train = pack_dataset(train.select_columns(["input_ids", "labels"]), cfg.max_seq_len, "bfd")
    return train, val


def split_validation(cfg: TuneConfig, examples: list):
    """(train, val) examples: --val-data, or a seeded random hold-out of --val-split."""
    import random

    from corral.tune.data import load_examples

    if cfg.val_data:
        return examples, load_examples(cfg.val_data, cfg.data_format)
    n_val = int(cfg.val_split) if cfg.val_split >= 1 else round(len(examples) * cfg.val_split)
    if cfg.val_split > 0:
        n_val = max(n_val, 1)
    if n_val >= len(examples):
        raise CorralError(f"--val-split {cfg.val_split} leaves no training examples "
                          f"({len(examples)} in all)")
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def training_args(cfg: TuneConfig, out: Path, device: torch.device, has_val: bool,
                  **overrides):
    from transformers import TrainingArguments

    lr = cfg.learning_rate if cfg.learning_rate is not None else (2e-5 if cfg.full else 2e-4)
    bf16 = device.type == "cuda" and (cfg.load_in_4bit or cfg.dtype in ("auto", "bf16",
                                                                         "bfloat16"))
    kwargs = {
        "output_dir": str(out), "learning_rate": lr, "lr_scheduler_type": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup, "weight_decay": cfg.weight_decay,
        "num_train_epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,  # packing: rows of max_seq_len
        "per_device_eval_batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
        "activation_checkpointing": cfg.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "eval_strategy": "steps" if has_val else "no",
        "eval_steps": cfg.eval_steps or cfg.save_steps, "save_strategy": "steps",
        "save_steps": cfg.save_steps, "save_total_limit": cfg.save_total_limit,
        "logging_steps": cfg.logging_steps,  # TensorBoard: OUTPUT/runs/<date>
        "report_to": ["tensorboard"], "seed": cfg.seed, "data_seed": cfg.seed, "bf16": bf16,
        "remove_unused_columns": False, "prediction_loss_only": True,
        "train_sampling_strategy": "random" if cfg.packing else "group_by_length",
        "use_cpu": device.type == "cpu", "dataloader_num_workers": 0, "save_only_model": False,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(cfg: TuneConfig) -> dict:
    """Run one fine-tuning job; returns (and saves as corral_tune.json) a summary."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from corral.chat import get_chat_format
    from corral.loading import load_tokenizer, resolve_device, resolve_source
    from corral.tune.data import data_chat_format, load_examples

    cfg.check()
    # 1. data first: every bad row is reported before a model is touched
    examples = load_examples(cfg.data, cfg.data_format)
    train_ex, val_ex = split_validation(cfg, examples)
    out = Path(cfg.output).expanduser()
    resume_from = checkpoint_to_resume(cfg)
    device = resolve_device(cfg.device)
    if cfg.load_in_4bit:
        nf4_config(device, torch.bfloat16)  # clear error on CPU before loading anything
    # The Trainer's arguments set up the process group under accelerate launch / torchrun.
    args = training_args(cfg, out, device, bool(val_ex))
    world, main = args.world_size, args.process_index == 0
    if world > 1:
        device = args.device  # this process's GPU (cuda:LOCAL_RANK), or the CPU
    say = print if main else None
    if cfg.resume and not resume_from and main:
        print(f"corral tune: no complete checkpoint in {out} yet; starting at step 0")
    batch = describe_batch(cfg, world)
    if main and (world > 1 or cfg.grad_accum > 1):
        print(f"corral tune: {batch['description']}", file=sys.stderr)
    # 2. tokenizer, chat format, token ids
    src = resolve_source(cfg.model)
    tokenizer = load_tokenizer(src) or _stand_in_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fmt_name = cfg.chat_format
    written_in = data_chat_format(examples)
    if written_in:  # already rendered: the saved template must match it
        if fmt_name and get_chat_format(fmt_name, tokenizer).name != written_in:
            raise CorralError(f"{cfg.data} holds text rendered in the {written_in} chat format; "
                              f"--chat-format must be {written_in} (or left out)")
        fmt_name = written_in
    chat_format = get_chat_format(fmt_name, tokenizer)
    train_ds, val_ds = build_datasets(cfg, tokenizer, chat_format, train_ex, val_ex, say)
    # 3. model and trainer
    torch.manual_seed(cfg.seed)
    model, src = load_model(cfg, device)
    if cfg.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    out.mkdir(parents=True, exist_ok=True)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id,
                                               padding_free=cfg.packing)
    trainer = make_trainer_class()(
        model=model, args=args,
        train_dataset=train_ds, eval_dataset=val_ds, data_collator=collator,
        processing_class=tokenizer)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)  # ours shows tokens/s too
    trainer.remove_callback(PrinterCallback)
    progress = make_progress_callback(trainer, out / "tune_log.jsonl", cfg.progress)
    trainer.add_callback(progress)
    # 4. train (eval loss before and after, for the summary)
    eval_before = trainer.evaluate()["eval_loss"] if val_ds is not None and not resume_from \
        else None
    start_step = int(resume_from.name.rpartition("-")[2]) if resume_from else 0
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - t0
    eval_after = trainer.evaluate()["eval_loss"] if val_ds is not None else None
    # 5. save: adapter (or full model), tokenizer with the chat template, summary (the
    # Trainer writes the model from the main process; every process takes part for FSDP)
    trainer.save_model(str(out))
    summary = {
        "base_model": cfg.model, "base_folder": str(src.folder) if src.folder else None,
        "method": "full" if cfg.full else ("qlora" if cfg.load_in_4bit else "lora"),
        "chat_format": chat_format.name, "stop_strings": list(chat_format.stop_strings),
        "train_examples": len(train_ex), "val_examples": len(val_ex),
        "train_rows": len(train_ds), "start_step": start_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "global_step": trainer.state.global_step, "train_loss": result.training_loss,
        "eval_loss_before": eval_before, "eval_loss_after": eval_after,
        "train_seconds": round(seconds, 2), "tokens_seen": trainer.tokens_seen,
        "tokens_per_s": round(trainer.tokens_seen / seconds, 1) if seconds > 0 else None,
        "num_processes": world, "distributed": str(args.distributed_state.distributed_type.value),
        "per_device_batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "effective_batch_size": batch["effective"],
        "config": asdict(cfg),
    }
    if main:
        save_tokenizer(tokenizer, chat_format, out)
        (out / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    finish_processes(args)
    return summary


def describe_batch(cfg: TuneConfig, world: int) -> dict:
    """The optimizer step's size: per-device batch x processes x accumulation."""
    effective = cfg.batch_size * world * cfg.grad_accum
    unit = "packed rows" if cfg.packing else "examples"
    return {"effective": effective,
            "description": f"{world} process(es) x batch {cfg.batch_size} x accumulation "
                           f"{cfg.grad_accum} = {effective} {unit} per optimizer step"}


def is_main_process() -> bool:
    """True outside a multi-process launch and on its global rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def finish_processes(args) -> None:
    """Let every process reach the end (the main one writes last), then leave the process
    group so torch does not warn about it at exit."""
    if args.world_size <= 1:
        return
    args.distributed_state.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def save_tokenizer(tokenizer, chat_format, out: Path) -> None:
    """Save the tokenizer with the chat template the run used, so prompts match training."""
    template = chat_format.template
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))


def _stand_in_tokenizer():
    """random:NAME models have no tokenizer; SmolLM2's tokenizes text (benchmarks only)."""
    from corral.loading import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source("default", weights=False))
