"""Supervised fine-tuning: dataset rows -> chat-format token ids + loss masks -> LoRA/QLoRA/full
training (transformers Trainer + PEFT + TRL's packing) -> adapter -> merged safetensors folder.

data.py   rows of CSV/JSON/JSONL/Parquet/HF datasets -> validated examples -> input_ids, labels
sft.py    TuneConfig and train(): model, PEFT, Trainer, checkpoints, resume, progress
merge.py  merge(): full-precision base + adapter -> a folder transformers and Corral load
cli.py    `corral tune` and `corral merge`
"""
