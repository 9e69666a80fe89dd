"""Merge a LoRA adapter into its base: full-precision base + adapter -> one safetensors folder
(config, weights, tokenizer with the chat template, generation config with the stop tokens)
that `transformers.AutoModelForCausalLM.from_pretrained` and Corral load.

The base is always loaded unquantized, also for adapters trained on a 4-bit (QLoRA) base:
folding LoRA deltas into NF4 weights would re-quantize them and lose most of the update.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from corral.errors import CorralError


def read_summary(adapter: Path) -> dict:
    path = adapter / "corral_tune.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def merge(base: str | None, adapter: str, output: str, dtype: str = "auto") -> Path:
    """Merge `adapter` into `base` (full precision) and save a loadable folder at `output`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from corral.chat import get_chat_format
    from corral.loading import load_tokenizer, resolve_dtype, resolve_source

    adapter_dir = Path(adapter).expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        if (adapter_dir / "config.json").is_file():
            raise CorralError(f"{adapter_dir} is a full model (from `corral tune --full`), not a "
                              "LoRA adapter: load it directly, there is nothing to merge")
        raise CorralError(f"{adapter_dir} has no adapter_config.json: not a LoRA adapter folder")
    summary = read_summary(adapter_dir)
    base = base or summary.get("base_model")
    if not base:
        raise CorralError("no base model: give --base (the model the adapter was trained on)")
    src = resolve_source(base)
    if src.folder is None:
        raise CorralError(f"{base} has no weights to merge into")
    out = Path(output).expanduser()
    if out.resolve() == adapter_dir.resolve():
        raise CorralError("--output must differ from --adapter")
    # merge in fp32 (exact sum of base and LoRA delta), then store in the base's own dtype
    model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch.float32)
    stored = getattr(model.config, "dtype", None)
    target = (stored if isinstance(stored, torch.dtype) else torch.float32) if dtype == "auto" \
        else resolve_dtype(dtype, torch.device("cpu"))
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CorralError(f"adapter {adapter_dir} does not fit base {base}: "
                          f"{str(e).splitlines()[0][:200]}") from None
    model = model.merge_and_unload(safe_merge=True).to(target)
    model.config.use_cache = True
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    # the tuned run saved its tokenizer (and chat template) next to the adapter
    tokenizer = _tokenizer_from(adapter_dir) if has_tokenizer else load_tokenizer(src)
    fmt = get_chat_format(summary.get("chat_format"), tokenizer)
    template = fmt.template  # the Jinja copy of the format it was trained on
    if template:
        tokenizer.chat_template = template
    set_generation_stops(model, tokenizer, fmt)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "corral_merge.json").write_text(json.dumps(
        {"base": base, "adapter": str(adapter_dir), "chat_format": fmt.name,
         "dtype": str(target).removeprefix("torch.")}, indent=2))
    return out


def _tokenizer_from(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def set_generation_stops(model, tokenizer, fmt) -> None:
    """EOS ids = the model's EOS plus the format's single-token stop strings, so plain
    `generate` stops where the tuned model was taught to (no endless answers)."""
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    ids += [i for i in fmt.stop_token_ids(tokenizer) if i not in ids]
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
