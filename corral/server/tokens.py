"""A token's real bytes, for logprobs' `bytes` field.

Decoding one token of a multi-byte character gives U+FFFD; OpenAI's `bytes` are the token's
own bytes, so a client can join them and decode "你好" again. Byte-level BPE tokenizers (GPT-2,
Llama 3, SmolLM2) spell bytes as printable characters (`bytes_to_unicode`); SentencePiece ones
(Llama 2) have `<0xE4>` byte tokens and `▁` for a space.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte map (the inverse of `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


def token_bytes(tokenizer, token_id: int, text: str, byte_level: bool) -> list[int]:
    """The bytes of `token_id` (`text` is its decoded text, the fallback)."""
    try:
        piece = tokenizer.convert_ids_to_tokens(token_id)
    except (IndexError, ValueError, TypeError):
        piece = None
    if isinstance(piece, str):
        if m := _BYTE_TOKEN.fullmatch(piece):
            return [int(m.group(1), 16)]
        if byte_level and piece not in getattr(tokenizer, "all_special_tokens", ()):
            dec = byte_decoder()
            if all(ch in dec for ch in piece):
                return [dec[ch] for ch in piece]
        elif not byte_level and "\ufffd" not in text:
            return list(text.encode())
        elif not byte_level:
            return list(piece.replace("▁", " ").encode())
    return list(text.encode())
