"""A GGUF's config and tokenizer read by Corral's one-pass reader (corral/gguf_metadata.py) equal
what transformers builds from the same file with its own readers: the config dict, the
tokenizer's backend, token ids on varied text (Chinese, emoji, whitespace, special tokens),
special tokens and chat template; before and after the cache folder round trip. Files: the
default model's real GGUF (SmolLM2, byte-level BPE with a chat template) and small vocab-only
files written here in the two layouts of Llama GGUFs: sentencepiece (Llama 2: scores, byte
tokens, no merges) and byte-level BPE with Llama 3's pre-tokenizer and control tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral import gguf_metadata as gm
from corral.errors import CorralError

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "中文测试，你好世界！机器学习",
    "emoji 🙂🚀 and tabs\t\tnew\n\nlines\r\n",
    "numbers 1234567 3.14159 and CAPS SHOUT's they're",
    "<|begin_of_text|>hi<|eot_id|><|start_header_id|>user",
    "<s> x </s> <unk> <think>why</think>",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]
LLAMA3_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                   "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}")


def _llama_keys(writer) -> None:
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)


def _write(path: Path, fill) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("vocab-only")
    _llama_keys(writer)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    """Llama 2's layout: sentencepiece pieces with scores, <0xNN> byte tokens, no merges."""
    pieces = ["▁", "▁t", "he", "▁the", "▁w", "or", "ld", "▁wor", "▁world", "▁H", "ello",
              "▁Hello", "▁a", "nd", "▁and", "in", "▁in", "▁中", "文", "▁中文", "你好", "世界",
              "学习", "机器", "er", "es", "on", "▁s", "▁sp", "ace", "▁space", "s", "t", "h", "e",
              "w", "o", "r", "l", "d", "H", "a", "n", "i", "中", "你", "好", "世", "界", "学", "习",
              "机", "器", "c", "p", "x", "y", "1", "2", "3", "4", "."]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))] + [0.0]

    def fill(w):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    return _write(tmp_path_factory.mktemp("spm") / "spm.gguf", fill)


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """Llama 3's layout: byte-level BPE with merges, pre-tokenizer "llama-bpe", control and
    user-defined tokens, a chat template (SmolLM2's vocabulary stands in for Llama 3's)."""
    from corral.models import smollm2_gguf_path

    meta, _ = gm.read_metadata(smollm2_gguf_path())
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tokens = list(meta["tokenizer.ggml.tokens"]) + specials + ["<think>"]
    types = [1] * len(meta["tokenizer.ggml.tokens"]) + [3] * len(specials) + [4]
    first = len(meta["tokenizer.ggml.tokens"])

    def fill(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(meta["tokenizer.ggml.merges"])
        w.add_bos_token_id(first)
        w.add_eos_token_id(first + 4)
        w.add_chat_template(LLAMA3_TEMPLATE)

    return _write(tmp_path_factory.mktemp("bpe") / "bpe.gguf", fill)


@pytest.fixture(scope="module", params=["smollm2", "spm", "llama3-bpe"])
def gguf_file(request, spm_file, bpe_file):
    from corral.models import smollm2_gguf_path

    return {"smollm2": smollm2_gguf_path(), "spm": spm_file, "llama3-bpe": bpe_file}[request.param]


@pytest.fixture(scope="module")
def reference(gguf_file):
    """transformers' own tokenizer and config dict for the file."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config, _ = LlamaConfig.get_config_dict(gguf_file.parent, gguf_file=gguf_file.name)
    return tok, config


def assert_same_tokenizer(ours, ref, reloaded: bool = False) -> None:
    """`reloaded`: `ours` was read back from a saved folder, where transformers keeps BOS/EOS in
    tokenizer.json's post-processor and drops the add_bos/add_eos attributes (any saved HF
    folder does that); the ids below still show whether BOS is added."""
    assert type(ours) is type(ref)
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    attrs = ["bos_token", "eos_token", "unk_token", "pad_token", "all_special_tokens",
             "all_special_ids", "chat_template"]
    for attr in attrs if reloaded else [*attrs, "add_bos_token", "add_eos_token"]:
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref)
    for text in TEXTS:
        ids = ref.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids,
                                                                        skip_special_tokens=True)
    if ref.chat_template:
        conv = [{"role": "user", "content": "你好 there"}, {"role": "assistant", "content": "hi"}]
        assert ours.apply_chat_template(conv, tokenize=False) == \
            ref.apply_chat_template(conv, tokenize=False)


def test_config_equals_transformers(gguf_file, reference):
    meta, names = gm.read_metadata(gguf_file)
    assert gm.config_dict(meta, names, gguf_file.name) == reference[1]


def test_config_of_untied_weights_file_equals_transformers(tmp_path):
    """A file with tensors and its own output.weight (untied, as Llama 2 7B / Llama 3 8B)."""
    from transformers import LlamaConfig

    from corral.model.gguf_write import write_llama_gguf

    path = write_llama_gguf(tmp_path / "untied.gguf", hidden=64, intermediate=128, layers=2,
                            heads=4, kv_heads=2, types="Q8_0", tie=False, rope_theta=5e5,
                            context=512)
    meta, names = gm.read_metadata(path)
    ours = gm.config_dict(meta, names, path.name)
    assert ours == LlamaConfig.get_config_dict(path.parent, gguf_file=path.name)[0]
    assert ours["tie_word_embeddings"] is False and ours["num_hidden_layers"] == 2


def test_tokenizer_equals_transformers(gguf_file, reference):
    meta, _ = gm.read_metadata(gguf_file)
    assert_same_tokenizer(gm.build_tokenizer(meta, str(gguf_file.parent)), reference[0])


def test_cached_folder_round_trip(gguf_file, reference, tmp_path, monkeypatch):
    """The first load builds and caches; a second load reads the cache folder back: both give
    transformers' tokenizer, and neither parses the file with gguf's GGUFReader."""
    import gguf

    from corral.loading import load_config, load_tokenizer, resolve_source

    def refuse(*_a, **_k):
        raise AssertionError("GGUFReader used: the metadata is parsed the slow way")

    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gguf.GGUFReader, "__init__", refuse)
    first = resolve_source(str(gguf_file), weights=False)
    assert first.tokenizer is not None  # built here, handed on: not read back from disk
    assert_same_tokenizer(load_tokenizer(first), reference[0])
    again = resolve_source(str(gguf_file), weights=False)
    assert again.folder == first.folder and again.tokenizer is None
    assert_same_tokenizer(load_tokenizer(again), reference[0], reloaded=True)
    config = load_config(again)
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size",
                "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(config, key) == reference[1][key], key


def test_reader_values_match_gguf_reader():
    """Every key of a real file, read both ways: same keys, same values."""
    from gguf import GGUFReader

    from corral.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    meta, names = gm.read_metadata(path)
    reader = GGUFReader(path)
    assert names == [t.name for t in reader.tensors]
    assert set(meta) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count",
                                              "GGUF.kv_count"}
    for key, value in meta.items():
        assert value == reader.fields[key].contents(), key


def test_not_llama_or_not_gguf_is_a_clear_error(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "qwen.gguf"
    w = GGUFWriter(str(path), "qwen2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    meta, names = gm.read_metadata(path)
    with pytest.raises(CorralError, match="'qwen2' model; Corral runs Llama"):
        gm.config_dict(meta, names, path.name)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(CorralError, match="not a GGUF file"):
        gm.read_metadata(bad)
