"""Incremental detokenization that never splits a UTF-8 character.

Byte-level BPE can spend several tokens on one Chinese character; decoding a token alone then
gives U+FFFD. We decode a short window of tokens and emit only the text that is complete
(vLLM's prefix/read offsets). Stop strings are found in the text and cut, and the last
`len(longest stop) - 1` characters are held back from a stream until they cannot begin a stop.
"""

from __future__ import annotations

import functools

from corral.engine.sequence import Sequence


class TokenDecoder:
    """`tokenizer.decode(ids, skip_special_tokens=skip)`, faster: straight through the Rust
    tokenizer when transformers would add nothing to its answer (a fast tokenizer whose decode
    is the stock one, with no space clean-up), and one-token windows (the common case of a
    stream: the last token read) cached by id. One per engine and `skip` value."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.backend = _plain_backend(tokenizer)
        owner = self.backend if self.backend is not None else tokenizer
        self.decode = functools.partial(owner.decode, skip_special_tokens=skip_special_tokens)
        self.single: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> str:
        if len(ids) == 1:
            text = self.single.get(ids[0])
            if text is None:
                text = self.single[ids[0]] = self.decode(ids)
            return text
        return self.decode(ids)


def _plain_backend(tokenizer):
    """The `tokenizers.Tokenizer` behind `tokenizer` when its `decode` returns exactly what
    the backend's does (transformers 5's TokenizersBackend, not overridden, no clean-up), else
    None."""
    try:
        import tokenizers
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    if not isinstance(backend, tokenizers.Tokenizer) or not isinstance(tokenizer, TokenizersBackend):
        return None
    if cls.decode is not PreTrainedTokenizerBase.decode or cls._decode is not TokenizersBackend._decode:
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # transformers skips the clean-up for BPE models unless forced (it corrupts them)
        force = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
        if not (type(backend.model).__name__ == "BPE" and hasattr(tokenizer, force)
                and not getattr(tokenizer, force)):
            return None
    return backend


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True,
                 decoder: TokenDecoder | None = None):
        self.decoder = decoder or TokenDecoder(tokenizer, skip_special_tokens)
        self.decode = self.decoder.decode  # windows of several tokens: no cache to look in
        self.read_offset = len(prompt_ids)
        self.prefix_offset = max(len(prompt_ids) - 5, 0)  # context for leading-space rules
        self.prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset])

    def step(self, ids: list[int], final: bool = False) -> str:
        """Text newly completed by the tokens appended to `ids` since the last call."""
        prefix = self.prefix_text
        if prefix is None:  # after a read: the tokens just read, often just one
            prefix = self.prefix_text = self.decoder(ids[self.prefix_offset:self.read_offset])
        full = self.decode(ids[self.prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            self.prefix_text = None
            return full[len(prefix):]
        return ""


def check_stop_strings(seq: Sequence, delta: str) -> bool:
    """Append `delta` to the sequence text; True (text cut) when a stop string appears."""
    seq.text += delta
    stops = seq.params.stop
    if not stops or not delta:
        return False
    for stop in stops:
        start = max(0, len(seq.text) - len(delta) - len(stop) + 1)
        idx = seq.text.find(stop, start)
        if idx != -1:
            keep = idx + len(stop) if seq.params.include_stop_str_in_output else idx
            seq.text = seq.text[:keep]
            seq.stop_reason = stop
            return True
    return False


def streamable_text_end(seq: Sequence) -> int:
    """How much of `seq.text` may be streamed now (hold back a possible stop-string start)."""
    if seq.finish_reason is not None or not seq.params.stop:
        return len(seq.text)
    hold = max(len(s) for s in seq.params.stop) - 1
    return max(seq.num_text_sent, len(seq.text) - hold)
