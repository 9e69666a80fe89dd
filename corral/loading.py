"""Model source -> a local Hugging Face folder (config, safetensors, tokenizer) -> config/tokenizer.

Every source ends as one kind of folder so that one loader serves all:
- a local HF folder is used as it is;
- a hub id is fetched through huggingface_hub's cache (offline: the cache only);
- a `.gguf` file: the engine on CPU runs its blocks memory-mapped (model/gguf_kernels.py) and
  caches only its config and tokenizer (`gguf_metadata_folder`, `resolve_source(weights=False)`);
  callers that need dense weights (tuning, merging, GPU, `--no-gguf-kernels`) get it
  dequantized once by `transformers` into a cached fp32 safetensors folder;
- an alias (`default`) names one of the above (see models.py).
`random:NAME` sources (benchmarks) have a config and no weights or tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corral.errors import CorralError
from corral.models import resolve_alias

TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json"]

# Real architectures for benchmarks with random weights (no large weights can be fetched here).
RANDOM_PRESETS: dict[str, dict] = {
    "llama3-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128009,
    },
    "llama3-1b": {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128009,
    },
    "llama2-7b": {
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    # a mid-size model whose heads split 1, 2, 4 and 8 ways (benchmarks/tp_scaling.py)
    "llama-300m": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "smollm2-135m": {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    },
}


@dataclass
class ModelSource:
    """Where a model's files are. `folder` is None only for random:NAME models."""

    name: str  # what the user asked for
    folder: Path | None
    random_preset: str | None = None
    gguf: Path | None = None  # the .gguf file `folder` was dequantized from
    # the tokenizer, when resolving built it anyway (a .gguf's first load): saves reading back
    # the folder's tokenizer.json (~1 s for a 128k-token vocabulary)
    tokenizer: Any = None


def cache_root() -> Path:
    """Corral's cache folder: $CORRAL_CACHE_DIR or ~/.cache/corral (read when called)."""
    return Path(os.environ.get("CORRAL_CACHE_DIR") or Path.home() / ".cache" / "corral")


def resolve_source(source: str, revision: str | None = None, weights: bool = True) -> ModelSource:
    """Turn a model argument (alias, folder, .gguf file, hub id, random:NAME) into files.

    weights=False: a .gguf's folder holds only its config and tokenizer (no dense copy is
    made); the caller reads the tensors from `ModelSource.gguf`."""
    if not source:
        raise CorralError("no model given")
    if source.startswith("random:"):
        preset = source.split(":", 1)[1]
        if preset not in RANDOM_PRESETS:
            raise CorralError(f"unknown random model {preset!r}; known: {', '.join(RANDOM_PRESETS)}")
        return ModelSource(source, None, preset)
    aliased = resolve_alias(source)
    path = Path(aliased or source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CorralError(f"GGUF file not found: {path}")
        if weights:
            return ModelSource(source, materialize_gguf(path), gguf=path)
        folder, tokenizer = _gguf_metadata(path)
        return ModelSource(source, folder, gguf=path, tokenizer=tokenizer)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CorralError(f"{path} has no config.json: not a Hugging Face model folder")
        return ModelSource(source, path)
    if path.exists():
        raise CorralError(f"{path} is neither a model folder nor a .gguf file")
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise CorralError(f"model not found: {source!r} is no local path, alias or hub id "
                          "(hub ids look like 'owner/name'; 'corral models' lists aliases)")
    return ModelSource(source, download_from_hub(source, revision))


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a hub model (config, safetensors, tokenizer) through huggingface_hub's cache."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   local_files_only=offline)
    except Exception as online_error:  # noqa: BLE001 - network down, gated repo, missing repo ...
        try:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                       local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure becomes one readable CorralError
            reason = str(online_error).strip().splitlines()[0][:160] if str(online_error) else ""
            raise CorralError(
                f"cannot fetch {repo_id!r} from the Hugging Face Hub and it is not in the "
                f"local cache ({type(online_error).__name__}: {reason}); pass a local folder "
                "or .gguf path with --model instead"
            ) from None
    return Path(folder)


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()
    return cache_root() / "gguf" / f"{path.stem}-{key[:16]}"


def gguf_metadata_folder(path: Path) -> Path:
    """A cached folder with the GGUF's config, generation config and tokenizer only (small
    files, built from the file's metadata as transformers builds them; the tensors stay in the
    file)."""
    return _gguf_metadata(path)[0]


def _gguf_metadata(path: Path) -> tuple[Path, Any]:
    """(the metadata folder, the tokenizer when this call built it, else None)."""
    dense = _gguf_cache_dir(path)
    if (dense / "config.json").is_file() and (dense / "model.safetensors").is_file():
        return dense, None  # already materialized: it holds the same config and tokenizer
    out = cache_root() / "gguf-meta" / dense.name
    if (out / "config.json").is_file():
        return out, None
    from transformers import GenerationConfig, LlamaConfig

    from corral import gguf_metadata as gm

    try:
        meta, tensor_names = gm.read_metadata(path)
        config = LlamaConfig.from_dict(gm.config_dict(meta, tensor_names, str(path)))
        tokenizer = gm.build_tokenizer(meta, str(path.parent))
    except CorralError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure becomes one readable CorralError
        raise CorralError(f"cannot read GGUF file {path}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e) else ''}") from None

    def save(tmp: Path) -> None:
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _note_added_tokens(tmp, tokenizer)

    folder = _write_cache_folder(out, path, save)
    release_freed_memory()  # the metadata's Python strings (~100 MB for a 128k vocabulary)
    return folder, tokenizer


def _note_added_tokens(folder: Path, tokenizer) -> None:
    """Write the added tokens into tokenizer_config.json, as Hugging Face folders have them:
    transformers 5 leaves them out for a tokenizers-backed tokenizer, and then every load
    parses the whole tokenizer.json in Python to find them (0.5 s and ~150 MB transient for a
    128k vocabulary; the Rust tokenizer reads the file anyway)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {str(i): t.__getstate__()
                                      for i, t in tokenizer.added_tokens_decoder.items()}
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def materialize_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached fp32 safetensors folder and return it."""
    out = _gguf_cache_dir(path)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any failure becomes one readable CorralError
        raise CorralError(f"cannot read GGUF file {path}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e) else ''}") from None
    if getattr(model.config, "model_type", None) != "llama":
        raise CorralError(f"{path} holds a {model.config.model_type!r} model; Corral runs "
                          "Llama-architecture models")
    # transformers marks GGUF-loaded models quantized and then refuses save_pretrained/training;
    # the weights are already dequantized, so dropping the quantizer is exact.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _write_cache_folder(out, path, save)


def _write_cache_folder(out: Path, gguf: Path, save) -> Path:
    """Fill a temporary folder beside `out` with `save(tmp)` and the source note, then rename
    it into place atomically (a process that finished first wins; ours is dropped)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        save(tmp)
        (tmp / "corral_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_config(src: ModelSource, rope_scaling: dict | None = None):
    """The model's `transformers` LlamaConfig, with an optional RoPE-scaling override."""
    from transformers import LlamaConfig

    if src.random_preset:
        config = LlamaConfig(**RANDOM_PRESETS[src.random_preset])
    else:
        path = src.folder / "config.json"
        try:
            model_type = json.loads(path.read_text()).get("model_type")
        except (OSError, ValueError) as e:
            raise CorralError(f"cannot read {path}: {e}") from None
        if model_type != "llama":
            raise CorralError(f"{src.name} is a {model_type!r} model; Corral runs "
                              "Llama-architecture models (model_type 'llama')")
        try:  # LlamaConfig directly: AutoConfig would import every architecture's module
            config = LlamaConfig.from_pretrained(src.folder)
        except Exception as e:  # noqa: BLE001 - any failure becomes one readable CorralError
            raise CorralError(f"cannot read {path}: {e}") from None
    if rope_scaling:
        apply_rope_scaling(config, rope_scaling)
    return config


def parse_rope_scaling(text: str) -> dict:
    """`--rope-scaling` value: JSON (`{"rope_type": "yarn", "factor": 4}`) or `TYPE:FACTOR`."""
    text = text.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorralError(f"--rope-scaling is not valid JSON: {e}") from None
    else:
        kind, _, factor = text.partition(":")
        try:
            d = {"rope_type": kind, "factor": float(factor)}
        except ValueError:
            raise CorralError(f"--rope-scaling expects TYPE:FACTOR or JSON, got {text!r}") from None
    d.setdefault("rope_type", d.pop("type", None))
    if d["rope_type"] not in ("linear", "dynamic", "yarn", "llama3", "default"):
        raise CorralError(f"unknown rope scaling type {d['rope_type']!r} "
                          "(linear, dynamic, yarn, llama3)")
    if d["rope_type"] != "default" and not float(d.get("factor", 0)) > 0:
        raise CorralError("--rope-scaling needs a positive factor")
    return d


def apply_rope_scaling(config, scaling: dict) -> None:
    """Stretch the context: merge `scaling` into rope_parameters and grow the position limit."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    original = config.max_position_embeddings
    params = {"rope_theta": theta, **scaling}
    if params["rope_type"] in ("yarn", "llama3", "dynamic"):
        params.setdefault("original_max_position_embeddings", original)
    if params["rope_type"] == "llama3":
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    config.rope_parameters = params
    # dynamic NTK reads max_position_embeddings as the original length (transformers' rule);
    # the engine stretches its context by the factor instead (model.llama.context_length).
    if params["rope_type"] not in ("default", "dynamic"):
        config.max_position_embeddings = int(original * float(params["factor"]))


def load_tokenizer(src: ModelSource):
    """The model's tokenizer (None for random:NAME models, which take token ids)."""
    if src.folder is None:
        return None
    if src.tokenizer is not None:
        return src.tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src.folder)
    except Exception as e:  # noqa: BLE001 - any failure becomes one readable CorralError
        raise CorralError(f"cannot load the tokenizer in {src.folder}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e) else ''}") from None
    release_freed_memory()  # the parsed JSON (~150 MB transient for a 128k vocabulary)
    return tokenizer


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc keeps freed heap pages; a
    tokenizer's transient Python objects would stay resident beside the weights); a no-op
    where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (find_library runs ldconfig in a subprocess)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (exact, and CPU bf16 matmuls are no faster here) and bf16 on CUDA."""
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise CorralError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CorralError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def iter_safetensors(folder: Path):
    """Yield (name, tensor) from every *.safetensors file in `folder` (memory-mapped)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CorralError(f"{folder} has no *.safetensors weights (pytorch .bin files are not "
                          "loaded for safety; convert them with transformers' save_pretrained)")
    for f in files:
        try:
            with safe_open(f, framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not iterable
                    yield name, fh.get_tensor(name)
        except CorralError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure becomes one readable CorralError
            raise CorralError(f"cannot read weights file {f}: {type(e).__name__}: {e}") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_index(folder: Path) -> dict[str, tuple[Path, str, list[int], int, int]]:
    """name -> (file, dtype, shape, first byte, end byte) over a folder's *.safetensors, from
    their JSON headers only."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CorralError(f"{folder} has no *.safetensors weights")
    index = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise CorralError(f"cannot read weights file {f}: {e}") from None
        header.pop("__metadata__", None)
        for name, e in header.items():
            start, end = e["data_offsets"]
            index[name] = (f, e["dtype"], e["shape"], 8 + n + start, 8 + n + end)
    return index


def read_tensor(entry: tuple[Path, str, list[int], int, int],
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor of `safetensors_index` (or its rows [r0, r1)), read with plain file reads into
    its own memory (no mapping: pages of the file never count in this process's RSS)."""
    path, dtype, shape, start, end = entry
    if dtype not in _SAFETENSORS_DTYPES:
        raise CorralError(f"{path}: weights of dtype {dtype} (Corral reads F32, F16, BF16)")
    if rows is not None:
        row_bytes = (end - start) // shape[0]
        start, end = start + rows[0] * row_bytes, start + rows[1] * row_bytes
        shape = [rows[1] - rows[0], *shape[1:]]
    with open(path, "rb") as fh:
        fh.seek(start)
        raw = np.fromfile(fh, dtype=np.uint8, count=end - start)
    return torch.from_numpy(raw).view(_SAFETENSORS_DTYPES[dtype]).reshape(shape)
