"""Incremental detokenization that never splits a UTF-8 character.

Byte-level BPE can spend several tokens on one Chinese character; decoding a token alone then
gives U+FFFD. We decode a short window of tokens and emit only the text that is complete
(vLLM's prefix/read offsets). Stop strings are found in the text and cut, and the last
`len(longest stop) - 1` characters are held back from a stream until they cannot begin a stop.
"""

from __future__ import annotations

from corral.engine.sequence import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.read_offset = len(prompt_ids)
        self.prefix_offset = max(len(prompt_ids) - 5, 0)  # context for leading-space rules

    def step(self, ids: list[int], final: bool = False) -> str:
        """Text newly completed by the tokens appended to `ids` since the last call."""
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=self.skip)
        full = self.tokenizer.decode(ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
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
