"""Chat formats: a conversation -> the exact prompt text (and token ids) a model was tuned on.

`get_chat_format(None, tokenizer)` uses the tokenizer's own Jinja template (or the built-in
format it is a copy of); the built-ins in `corral.chat.formats` reproduce the published formats
byte for byte and are the one place that knows them: inference, `corral prompt`, tuning
(labels and loss masks) and `corral merge` (the saved Jinja template) all come from here.

Every format is a function from messages to *segments* (text, is_answer); `render` joins them
and `render_for_training` hands them to tuning, so prompts and loss masks cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Literal, TypedDict

from corral.chat.formats import (
    ALIASES,
    KNOWN_END_MARKERS,
    LLAMA2_SPECIALS,
    SPECS,
    TURN_MARKERS,
    Specials,
    looks_like_human_assistant,
    parse_human_assistant,
)
from corral.errors import CorralError

__all__ = [
    "BUILTINS",
    "FORMAT_NAMES",
    "ChatFormat",
    "Message",
    "Segment",
    "Specials",
    "encode_chat",
    "encode_text",
    "get_chat_format",
    "looks_like_human_assistant",
    "parse_human_assistant",
    "render_for_training",
    "specials_for",
    "template_format",
    "token_id",
    "turn_marker",
    "uses_specials",
    "validate_messages",
]


class Message(TypedDict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


Segment = tuple[str, bool]  # (text, is an assistant answer incl. its end token)
SegmentFn = Callable[[list[Message], bool], list[Segment]]

ROLES = ("system", "user", "assistant", "tool")
BUILTINS = tuple(SPECS)
FORMAT_NAMES = ("auto", "template", *BUILTINS, *ALIASES)


@dataclass(frozen=True)
class ChatFormat:
    """A named chat format: how to render messages, which strings end an answer, and the
    Jinja template that renders the same text outside Corral (None: the tokenizer's own)."""

    name: str
    stop_strings: tuple[str, ...]
    segment_fn: SegmentFn
    template: str | None = None

    def segments(self, messages: Sequence[Mapping], add_generation_prompt: bool = True
                 ) -> list[Segment]:
        """Rendered text as (text, is_answer) pieces, after validating `messages`."""
        return _merge(self.segment_fn(validate_messages(messages), add_generation_prompt))

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        """The exact prompt text for `messages` (ending with the assistant header if asked)."""
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt))

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids of this format's stop strings that are single tokens in the vocab, plus EOS."""
        ids = [tid for s in self.stop_strings if (tid := token_id(tokenizer, s)) is not None]
        eos = getattr(tokenizer, "eos_token_id", None)
        for tid in eos if isinstance(eos, list) else [eos]:
            if tid is not None:
                ids.append(tid)
        return list(dict.fromkeys(ids))

    def text_stops(self, tokenizer) -> list[str]:
        """The stop strings that are not single tokens: matched in the generated text."""
        return [s for s in self.stop_strings if token_id(tokenizer, s) is None]


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` when it is one entry of the vocab, else None."""
    if tokenizer is None:
        return None
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def specials_for(tokenizer) -> Specials:
    """Llama 2's `<s>`/`</s>` where the vocab has them, else the tokenizer's own BOS/EOS.

    SmolLM2 -> (<|im_start|>, <|im_end|>), Llama 3 -> (<|begin_of_text|>, its EOS): a model tuned
    on `<s>Human: ...</s>` text then learns to end answers with the token inference stops on.
    """
    if tokenizer is None:
        return LLAMA2_SPECIALS
    bos = "<s>" if token_id(tokenizer, "<s>") is not None else (
        getattr(tokenizer, "bos_token", None) or "")
    eos = "</s>" if token_id(tokenizer, "</s>") is not None else (
        getattr(tokenizer, "eos_token", None) or "</s>")
    return Specials(bos, eos)


def uses_specials(name: str | None) -> bool:
    """Whether the built-in format `name` is written with `<s>`/`</s>` (see specials_for)."""
    key = (name or "").strip().lower()
    spec = SPECS.get(ALIASES.get(key, key))
    return bool(spec and spec.uses_specials)


def turn_marker(text: str) -> str | None:
    """The first marker of another turn (`<s>Human:`, `<|im_start|>`, ...) inside `text`."""
    found = [(p, m) for m in TURN_MARKERS if (p := text.find(m)) >= 0]
    return min(found)[1] if found else None


def validate_messages(messages: Sequence[Mapping]) -> list[Message]:
    """Check roles, content and order; return plain dicts. Raises CorralError (one line).

    Rules: at least one message; roles are system/user/assistant/tool; content is a string;
    a system message may only come first; after it, turns alternate user, assistant, user...
    starting with user, where tool results may follow an assistant turn (the assistant answers
    after them); user messages are not blank.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise CorralError("a conversation must be a list of {role, content} messages")
    if not messages:
        raise CorralError("the conversation is empty: give at least one user message")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise CorralError(f"message {i} must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise CorralError(f"message {i} has role {role!r}; use system, user, assistant or "
                              "tool")
        if not isinstance(content, str):
            raise CorralError(f"message {i} ({role}) content must be a string, "
                              f"not {type(content).__name__}")
        if role == "system" and i != 0:
            raise CorralError(f"message {i} is a system message; only the first may be one")
        if role == "user" and not content.strip():
            raise CorralError(f"message {i} (user) is empty")
        out.append({"role": role, "content": content})
    start = 1 if out[0]["role"] == "system" else 0
    if start == len(out):
        raise CorralError("the conversation has only a system message: add a user message")
    prev = None
    for n in range(start, len(out)):
        role = out[n]["role"]
        allowed = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"),
                   "tool": ("tool", "assistant")}[prev]
        if role not in allowed:
            want = allowed[0] if prev != "tool" else "assistant"
            raise CorralError(f"message {n} is {role!r} but {want!r} was expected "
                              "(turns alternate user, assistant, starting with user)")
        prev = role
    return out


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours with the same flag and drop empty pieces."""
    out: list[Segment] = []
    for text, flag in segments:
        if not text:
            continue
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + text, flag)
        else:
            out.append((text, flag))
    return out


@lru_cache(maxsize=64)
def builtin(name: str, specials: Specials = LLAMA2_SPECIALS) -> ChatFormat:
    """The built-in format `name` written with `specials` (see corral.chat.formats)."""
    spec = SPECS[name]
    sp = specials if spec.uses_specials else LLAMA2_SPECIALS
    stops = tuple(dict.fromkeys(s for s in spec.stops(sp) if s))
    return ChatFormat(name, stops, partial(spec.segments, sp=sp), spec.template(sp))


# --- the tokenizer's own Jinja template ---------------------------------------------------

def template_format(tokenizer) -> ChatFormat:
    """The tokenizer's Jinja chat template as a ChatFormat named "template".

    Stop strings: the tokenizer's EOS token plus known turn-end markers the template uses.
    Training segments assume the template is prefix-stable (true of Llama, ChatML and
    SmolLM templates): rendering messages[:i] with the generation prompt is a prefix of
    rendering messages[:i+1], so the assistant answer is the text between the two.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        raise CorralError("the tokenizer has no chat template; pick one with --chat-format "
                          f"({', '.join(BUILTINS)})")
    stops = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
    stops += [m for m in KNOWN_END_MARKERS if m in template and m not in stops]

    def apply(messages: list[Message], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except (TemplateError, ValueError, TypeError, KeyError) as e:  # raise_exception(...)
            raise CorralError(f"the tokenizer's chat template failed: {e}") from None
        return text

    def segments(messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        full = apply(messages, add_generation_prompt)
        segs: list[Segment] = []
        done = 0  # characters of `full` already assigned to segments
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = apply(messages[:i], True)
            upto = apply(messages[: i + 1], False)
            if not (full.startswith(upto) and upto.startswith(before) and len(before) >= done):
                raise CorralError("the tokenizer's chat template is not prefix-stable; "
                                  "pick a built-in format with --chat-format")
            answer = upto[len(before):]
            cut = _answer_end(answer, m["content"], stops)
            segs += [(full[done:len(before)], False), (answer[:cut], True),
                     (answer[cut:], False)]
            done = len(upto)
        segs.append((full[done:], False))
        return segs

    return ChatFormat("template", tuple(stops), segments, template)


def _answer_end(answer: str, content: str, stops: list[str]) -> int:
    """Where the answer's flagged part ends: after the first stop string that follows the
    content (so a template's trailing newline is not trained on), else the whole piece."""
    text = content.strip()
    found = answer.find(text) if text else -1
    start = found + len(text) if found >= 0 else 0
    hits = [p + len(s) for s in stops if (p := answer.find(s, start)) >= 0]
    return min(hits) if hits else len(answer)


# --- public helpers -------------------------------------------------------------------------

def get_chat_format(name: str | None, tokenizer=None) -> ChatFormat:
    """The chat format `name` for `tokenizer`.

    Built-ins: llama2, llama3, chatml, human-assistant (alias llama2-chinese), their `<s>`/`</s>`
    mapped to the tokenizer's own tokens where it has none. None/"auto": the tokenizer's
    template, or the built-in it is an exact copy of (a model tuned or merged by Corral), so
    that format's stop strings apply; "template" forces the tokenizer's template.
    Unknown names raise CorralError listing the choices.
    """
    key = (name or "auto").strip().lower()
    key = ALIASES.get(key, key)
    if key in SPECS:
        return builtin(key, specials_for(tokenizer))
    if key in ("auto", "template"):
        if tokenizer is None:
            raise CorralError("this model has no tokenizer; pick a chat format with "
                              f"--chat-format ({', '.join(BUILTINS)})")
        if key == "auto":
            template = getattr(tokenizer, "chat_template", None)
            for fmt_name in SPECS:
                fmt = builtin(fmt_name, specials_for(tokenizer))
                if template and template == fmt.template:
                    return fmt
        return template_format(tokenizer)
    raise CorralError(f"unknown chat format {name!r}; choose from {', '.join(FORMAT_NAMES)}")


def encode_chat(tokenizer, fmt: ChatFormat, messages: Sequence[Mapping],
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids for `messages` in `fmt`. Text that already starts with the BOS token is
    tokenized without special tokens, so BOS is never doubled."""
    return encode_text(tokenizer, fmt.render(messages, add_generation_prompt))


def encode_text(tokenizer, text: str) -> list[int]:
    """Tokenize rendered prompt text, adding BOS only when it is not there yet.

    The text is cut at the tokenizer's BOS/EOS tokens and each piece between them encoded on
    its own, as Meta's reference code encodes Llama 2 exchanges: a SentencePiece tokenizer then
    gives the piece after `<s>` its dummy-prefix space ("<s>▁[INST]") in either `legacy` mode.
    For byte-level BPE tokenizers (Llama 3, SmolLM2) this equals encoding the whole text.
    """
    parts = split_specials(tokenizer, text)
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = token_id(tokenizer, bos) if bos else None
    ids: list[int] = []
    if bos_id is None or not parts or parts[0] != (None, bos_id):
        ids += _added_prefix(tokenizer)
    for piece, tid in parts:
        ids += [tid] if tid is not None else list(
            tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def split_specials(tokenizer, text: str) -> list[tuple[str | None, int | None]]:
    """`text` cut at the tokenizer's BOS and EOS tokens: [(text, None) | (None, token id)]."""
    specials = {t: tid for t in (getattr(tokenizer, "bos_token", None),
                                 getattr(tokenizer, "eos_token", None))
                if t and (tid := token_id(tokenizer, t)) is not None}
    if not specials:
        return [(text, None)] if text else []
    pattern = "(" + "|".join(map(re.escape, specials)) + ")"
    return [(None, specials[p]) if p in specials else (p, None)
            for p in re.split(pattern, text) if p]


def _added_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text by itself (its BOS, or nothing)."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    n = len(with_special) - len(plain)
    return with_special[:n] if n > 0 and with_special[n:] == plain else []


def render_for_training(fmt: ChatFormat, messages: Sequence[Mapping]) -> list[Segment]:
    """(text, is_answer) segments that join to exactly `fmt.render(messages, False)`.

    is_answer marks each assistant answer together with its end token (what tuning puts
    loss on); everything else (system, user turns, headers) is False.
    """
    return fmt.segments(messages, add_generation_prompt=False)
