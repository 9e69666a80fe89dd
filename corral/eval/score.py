"""Per-answer scores: main language, empty / truncated / stopped / refusal flags, turn markers,
reference accuracy.

All functions are pure (text in, values out) so they are unit-tested without a model.
"""

from __future__ import annotations

import re
import unicodedata

# Fenced blocks (``` or ~~~), including one left open at the end of a truncated answer.
_FENCED = re.compile(r"(```|~~~)[^\n]*\n?.*?(?:\1|\Z)", re.DOTALL)
_INLINE = re.compile(r"`[^`\n]+`")
# Identifiers written outside backticks (is_prime(7), numpy.array, this.run()) are code too.
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:[._][A-Za-z0-9_]+)+(?:\([^)\n]*\))?"
                    r"|[A-Za-z_][A-Za-z0-9_]*\([^)\n]*\)")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def _is_han(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x2FA1F)


# One Han character carries about as much as three Latin letters (a Chinese sentence and its
# English translation differ by roughly that factor), so letters are weighted down by 3 to
# compare like with like; otherwise one English term would outweigh a Chinese clause.
LETTERS_PER_HAN = 3.0
MAIN_SHARE = 0.7  # a language is "main" when it holds at least this share of the prose


def strip_code(text: str) -> str:
    """The prose of an answer: fenced code blocks, `inline code` and bare identifiers
    (snake_case, dotted.names, calls()) removed."""
    return _IDENT.sub(" ", _INLINE.sub(" ", _FENCED.sub("\n", text)))


def language_counts(text: str) -> dict[str, float]:
    """Weighted units of Chinese (Han chars), English (Latin letters / 3) and other scripts
    in the prose of `text` (code blocks excluded)."""
    prose = strip_code(text)
    han = sum(1 for ch in prose if _is_han(ch))
    latin = len(_LATIN.findall(prose))
    other = sum(1 for ch in prose if ch.isalpha() and not _is_han(ch)) - latin
    return {"zh": float(han), "en": latin / LETTERS_PER_HAN, "other": other / LETTERS_PER_HAN}


def detect_language(text: str) -> str:
    """The main language of an answer's prose: "zh", "en", "mixed", "other" or "none" (no
    prose at all, e.g. empty or only code)."""
    c = language_counts(text)
    total = c["zh"] + c["en"] + c["other"]
    if total == 0:
        return "none"
    for lang in ("zh", "en", "other"):
        if c[lang] / total >= MAIN_SHARE:
            return lang
    return "mixed"


def language_adherent(answer: str, question_language: str) -> bool | None:
    """Whether the answer's main language is the question's. None for a code-only answer
    (nothing to judge); False for an empty one."""
    lang = detect_language(answer)
    if lang == "none":
        return None if answer.strip() else False
    return lang == question_language


_REFUSAL = re.compile(
    r"\b(I'?m sorry,? but|I am sorry,? but|I (?:cannot|can't|can not|won't|am unable to|"
    r"am not able to) (?:help|assist|provide|answer|do|fulfil|fulfill|comply|create|write)|"
    r"as an AI(?: language model)?,? I (?:cannot|can't|don't|do not)|I'm not able to)"
    r"|抱歉，?我(?:不能|无法)|对不起，?我(?:不能|无法)|我(?:不能|无法)(?:回答|提供|帮助|协助|完成)"
    r"|作为一个?(?:AI|人工智能)(?:语言模型|助手)?，?我(?:不能|无法)",
    re.IGNORECASE,
)


def is_refusal(answer: str) -> bool:
    """A refusal phrase near the start of the answer (EN or ZH)."""
    return bool(_REFUSAL.search(answer[:300]))


def is_empty(answer: str) -> bool:
    return not answer.strip()


def is_truncated(finish_reason: str | None) -> bool:
    """The answer hit max_tokens (or the context) before the model ended it."""
    return finish_reason == "length"


def is_stopped(finish_reason: str | None) -> bool | None:
    """The model ended the answer itself (a stop token or stop string); None when the backend
    gave no finish reason."""
    return None if finish_reason is None else finish_reason == "stop"


def turn_marker(answer: str) -> str | None:
    """A marker of another chat turn inside the answer (corral.chat.formats.TURN_MARKERS):
    the model ran on into a turn it should not write."""
    from corral.chat import turn_marker as find

    return find(answer)


def _norm(text: str) -> str:
    # NFKC folds full-width forms (，Ａ１) into ASCII; punctuation and spaces do not count.
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalnum())


def reference_match(answer: str, reference: str | list[str]) -> bool:
    """True when any reference string occurs in the answer (case, width, spacing and
    punctuation ignored)."""
    refs = [reference] if isinstance(reference, str) else list(reference)
    got = _norm(answer)
    return any(_norm(r) and _norm(r) in got for r in refs)


def choice_prediction(scores: list[tuple[float, int]]) -> tuple[int, int]:
    """From (summed logprob, token count) per choice: the index with the highest sum and the
    index with the highest per-token mean (length-normalized)."""
    if not scores:
        raise ValueError("no choices to score")
    best = max(range(len(scores)), key=lambda i: scores[i][0])
    best_norm = max(range(len(scores)), key=lambda i: scores[i][0] / max(scores[i][1], 1))
    return best, best_norm
