"""A GGUF file's metadata, read once and fast: the Llama config and the tokenizer transformers
would build from the same file.

transformers reads a Llama GGUF's config with gguf's GGUFReader, which makes numpy objects for
every value (~10 s for a 128k-token vocabulary with 280k merges), and does it twice when asked
for a tokenizer too. Here the header is walked once over an mmap (string arrays decoded with
plain `bytes` slices: ~0.1 s for that vocabulary), then handed to transformers' own tables and
tokenizer converter, so the result is the one `AutoTokenizer.from_pretrained(gguf_file=...)`
and `LlamaConfig.get_config_dict(gguf_file=...)` give (tests compare them).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from corral.errors import CorralError

# GGUF value types: fixed-size scalars (struct format), 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_U64 = struct.Struct("<Q")

# transformers' tokenizer keys (integrations/gguf/gguf_tokenizer_mapping.py: _SPECIAL_TOKENS):
# special token name -> metadata key suffix of its id
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                   "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def read_metadata(path: Path) -> tuple[dict[str, Any], list[str]]:
    """(every metadata key -> value, tensor names) of a GGUF v2/v3 file. Strings are `str`,
    arrays are lists (numbers as Python int/float, as struct gives them: what transformers'
    readers give too). Reads only the header pages."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise CorralError(f"{path} is not a GGUF file (no GGUF magic bytes)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise CorralError(f"{path} is GGUF v{version}; Corral reads v2 and v3")
        pos = 24
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = _string(buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            meta[key], pos = _value(buf, pos + 4, vtype)
        names = []
        for _ in range(n_tensors):
            name, pos = _string(buf, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4 + 8 * n_dims + 12  # dims, type, offset
            names.append(name)
    return meta, names


def _string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = _U64.unpack_from(buf, pos)
    pos += 8
    return buf[pos:pos + n].decode("utf-8"), pos + n


def _value(buf: mmap.mmap, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALARS:
        fmt = struct.Struct("<" + _SCALARS[vtype])
        return fmt.unpack_from(buf, pos)[0], pos + fmt.size
    if vtype == 8:
        return _string(buf, pos)
    if vtype != 9:
        raise CorralError(f"GGUF metadata value of unknown type {vtype}")
    itype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if itype in _SCALARS:
        fmt = struct.Struct(f"<{count}{_SCALARS[itype]}")
        return list(fmt.unpack_from(buf, pos)), pos + fmt.size
    if itype == 8:  # the vocabulary and merges: hundreds of thousands, so a lean loop
        out = [""] * count
        unpack = _U64.unpack_from
        for i in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            out[i] = buf[pos:pos + n].decode("utf-8")
            pos += n
        return out, pos
    values = []
    for _ in range(count):  # arrays of arrays: none in Llama files, read for completeness
        v, pos = _value(buf, pos, itype)
        values.append(v)
    return values, pos


def config_dict(meta: dict[str, Any], tensor_names: list[str], where: str) -> dict[str, Any]:
    """The LlamaConfig dict transformers builds from this metadata (its GGUF_CONFIG_MAPPING
    renames, its defaults, tied embeddings when the file has no output.weight). Raises
    CorralError for an architecture other than Llama."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = meta.get("general.architecture")
    # transformers reads a llama-architecture file named exactly "mistral" as Mistral
    model_type = "mistral" if arch == "llama" and meta.get("general.name") == "mistral" else arch
    if model_type != "llama":
        raise CorralError(f"{where} holds a {model_type!r} model; Corral runs "
                          "Llama-architecture models")
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}).items():
        config.setdefault(key, value)
    for key, value in meta.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed is None or renamed == -1:
            continue
        if isinstance(value, list) and len(value) == 1:  # transformers unwraps one-item lists
            value = value[0]
        config[renamed] = value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in meta:
        config["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    return config


def tokenizer_parts(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer dict, tokenizer config) as transformers' `get_gguf_tokenizer` groups them."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        # sentencepiece files without the flag: llama.cpp adds BOS, so transformers does too
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return tokenizer, tokenizer_config


def build_tokenizer(meta: dict[str, Any], name_or_path: str = ""):
    """The fast tokenizer transformers builds from this metadata (a TokenizersBackend)."""
    from transformers import TokenizersBackend
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokenizer, tokenizer_config = tokenizer_parts(meta)
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
    # As transformers' own tokenizer classes do: the backend set before __init__, which then
    # adopts it. (`tokenizer_object=` would deep-copy it: ~0.9 s for a 128k vocabulary.)
    out = TokenizersBackend.__new__(TokenizersBackend)
    out._tokenizer = backend
    out.__init__(name_or_path=name_or_path, **tokenizer_config, **extra)
    return out
