"""Engine settings: one plain dataclass, passed in explicitly."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class EngineConfig:
    model: str = "default"
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    device: str = "auto"
    chat_format: str | None = None  # None: the tokenizer's template (see chat.py)
    max_model_len: int | None = None  # default: the model's context length
    rope_scaling: dict | str | None = None  # e.g. "linear:2" or {"rope_type": "yarn", ...}
    revision: str | None = None
    block_size: int = 16
    kv_cache_memory_gb: float | None = None  # CPU default 1 GiB (capped by what can be used)
    num_kv_blocks: int | None = None  # exact block count (overrides the memory settings)
    gpu_memory_utilization: float = 0.90  # CUDA: fraction of GPU memory for weights + cache
    max_num_seqs: int | None = None  # default 64 on CPU, 256 on CUDA
    max_num_batched_tokens: int | None = None  # per-step token budget (chunked prefill)
    enable_prefix_caching: bool = True
    # KV cache values: "float32" | "float16" | "auto" (CPU models on int8 quantized matmuls: fp16,
    # llama.cpp's default, half the bytes a step streams; otherwise the model's dtype)
    kv_cache_dtype: str = "auto"
    quantization: str | None = None  # "q8_0": CPU fp32 decode on Q8_0 weights made at load
    gguf_kernels: bool = True  # CPU fp32 .gguf model: small steps read the quantized blocks
    # quantized matmuls on CPU: "int8" (activations quantized to 8 bits, integer dot products,
    # as llama.cpp) or "fp32" (weights rebuilt exactly, fp32 dot products); None: the
    # CORRAL_GGUF_MATH environment variable, else "int8"
    gguf_math: str | None = None
    cuda_graphs: bool = True  # CUDA: replay recorded graphs for decode steps (False: eager)
    seed: int = 0  # seeds the generator of requests that give no seed
    enable_lora: bool = False  # serve LoRA adapters on the base (implied by lora_modules)
    lora_modules: dict[str, str] | None = None  # adapters loaded at start: name -> PEFT folder
    max_loras: int = 4  # adapters resident at once (LRU beyond that)
    max_lora_rank: int = 64  # larger adapters are refused
    default_lora: str | None = None  # adapter for requests that name none (the CLI's --lora)
    tensor_parallel_size: int = 1  # ranks (processes) the weights are split over (engine.tp)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)
