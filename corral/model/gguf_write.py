"""Write random-weight Llama GGUF files of any shape with the `gguf` package (tests, benchmarks).

The tokenizer metadata is copied from SmolLM2's GGUF (its 49,152-token vocabulary), so the
files load in Corral, transformers and llama.cpp alike. Tensor types are chosen per tensor:
F32/F16/BF16/Q4_0/Q4_1/Q8_0 are quantized from random fp32 weights with `gguf.quants.quantize`;
the K-quants (which that package cannot quantize) are written as random valid blocks with sane
fp16 scales, a random model like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

VOCAB = 49152  # SmolLM2's tokenizer
K_BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _k_blocks(kind: str, n_blocks: int, rng: np.random.Generator, std: float) -> np.ndarray:
    """Random K-quant blocks [n_blocks, bytes] whose weights have roughly `std`."""
    raw = rng.integers(0, 256, (n_blocks, K_BLOCK_BYTES[kind]), dtype=np.uint8)
    if kind == "Q6_K":  # w = d * sc * (q - 32), sc int8, |q - 32| <= 32
        raw[:, 192:208] = rng.integers(8, 24, (n_blocks, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = np.full((n_blocks, 1), std / (16 * 18), np.float16).view(np.uint8)
    else:  # w = d * sc * q - dmin * m, sc, m 6-bit, q 4 or 5 bits
        levels = 15 if kind == "Q4_K" else 31
        d = std / (32 * levels * 0.3)
        raw[:, 0:2] = np.full((n_blocks, 1), d, np.float16).view(np.uint8)
        # dmin * m ~ the mean of d * sc * q, so the weights centre near zero
        raw[:, 2:4] = np.full((n_blocks, 1), d * levels / 2, np.float16).view(np.uint8)
    return raw


def tensor_bytes(kind: str, shape: tuple[int, int], rng: np.random.Generator,
                 std: float = 0.02) -> np.ndarray:
    """The raw data of one tensor, numpy shape (rows, row values) in ggml type `kind`."""
    from gguf import GGMLQuantizationType, quantize

    n, k = shape
    if kind in K_BLOCK_BYTES:
        return _k_blocks(kind, n * k // 256, rng, std).reshape(n, -1)
    w = rng.standard_normal(shape, np.float32) * std
    if kind == "F32":
        return w
    if kind == "F16":
        return w.astype(np.float16)
    return quantize(w, GGMLQuantizationType[kind])


def write_llama_gguf(path: Path, hidden: int, intermediate: int, layers: int, heads: int,
                     kv_heads: int, types: Callable[[str], str] | str = "Q8_0",
                     tie: bool = True, rope_theta: float = 10000.0, context: int = 4096,
                     seed: int = 0, std: float = 0.02, tokenizer_from: Path | None = None) -> Path:
    """A random Llama GGUF with SmolLM2's tokenizer (or the one of the GGUF `tokenizer_from`,
    e.g. llama.cpp's vocab-only ggml-vocab-llama-bpe.gguf; the vocabulary size follows it).
    `types(name)` gives each 2-D weight's ggml type (a string means one type for all); norms
    are F32 ones."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import quant_shape_to_byte_shape

    from corral.models import smollm2_gguf_path

    pick = (lambda _name: types) if isinstance(types, str) else types
    rng = np.random.default_rng(seed)
    path = Path(path)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"random-llama-{hidden}x{layers}")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)
    reader = GGUFReader(tokenizer_from or smollm2_gguf_path())
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    writer.add_vocab_size(vocab)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub)

    # Tensor infos first, then each tensor's data made and written one at a time (in the same
    # order, so the same random stream): a 7B file never sits in memory whole.
    plan: list[tuple[str, tuple[int, int] | None, str]] = []
    hd = hidden // heads
    plan.append(("token_embd.weight", (vocab, hidden), pick("token_embd.weight")))
    for i in range(layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", None, "F32"), (b + "ffn_norm.weight", None, "F32")]
        for name, shape in (("attn_q", (heads * hd, hidden)), ("attn_k", (kv_heads * hd, hidden)),
                            ("attn_v", (kv_heads * hd, hidden)),
                            ("attn_output", (hidden, heads * hd)),
                            ("ffn_gate", (intermediate, hidden)), ("ffn_up", (intermediate, hidden)),
                            ("ffn_down", (hidden, intermediate))):
            plan.append((f"{b}{name}.weight", shape, pick(f"{b}{name}.weight")))
    plan.append(("output_norm.weight", None, "F32"))  # norms: 1-D ones, as converters write
    if not tie:
        plan.append(("output.weight", (vocab, hidden), pick("output.weight")))
    for name, shape, kind in plan:
        if shape is None:
            writer.add_tensor_info(name, (hidden,), np.dtype(np.float32), 4 * hidden)
        elif kind in ("F32", "F16"):
            dt = np.dtype(np.float32 if kind == "F32" else np.float16)
            writer.add_tensor_info(name, shape, dt, shape[0] * shape[1] * dt.itemsize)
        else:  # block data: the byte shape and the ggml type
            qt = GGMLQuantizationType[kind]
            byte_shape = quant_shape_to_byte_shape(shape, qt)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8),
                                   byte_shape[0] * byte_shape[1], raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, shape, kind in plan:
        data = np.ones(hidden, np.float32) if shape is None else tensor_bytes(kind, shape, rng,
                                                                               std)
        writer.write_tensor_data(np.ascontiguousarray(data))
        del data
    writer.close()
    return path

