"""Chat formats: a conversation -> the exact prompt text (and token ids) a model was tuned on.

`get_chat_format(None, tokenizer)` uses the tokenizer's own Jinja template; the built-ins
below reproduce the published formats byte for byte:

    llama2           <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>...
    llama3           <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{text}...
    chatml           <|im_start|>{role}\\n{text}<|im_end|>\\n...<|im_start|>assistant\\n
    human-assistant  <s>Human: {user}\\n</s><s>Assistant: {answer}\\n</s>...   (Llama2-Chinese)

Every format is a function from messages to *segments* (text, is_answer); `render` joins them
and `render_for_training` hands them to tuning, so prompts and loss masks cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

from corral.errors import CorralError


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


Segment = tuple[str, bool]  # (text, is an assistant answer incl. its end token)
SegmentFn = Callable[[list[Message], bool], list[Segment]]

ROLES = ("system", "user", "assistant")
# Turn-end markers we recognise inside a tokenizer's own template (for its stop strings).
KNOWN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>")


@dataclass(frozen=True)
class ChatFormat:
    """A named chat format: how to render messages and which strings end an answer."""

    name: str
    stop_strings: tuple[str, ...]
    segment_fn: SegmentFn

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


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` when it is one entry of the vocab, else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def validate_messages(messages: Sequence[Mapping]) -> list[Message]:
    """Check roles, content and order; return plain dicts. Raises CorralError (one line).

    Rules: at least one message; roles are system/user/assistant; content is a string;
    a system message may only come first; after it, turns alternate user, assistant, user...
    starting with user; user messages are not blank.
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
            raise CorralError(f"message {i} has role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise CorralError(f"message {i} ({role}) content must be a string, "
                              f"not {type(content).__name__}")
        if role == "system" and i != 0:
            raise CorralError(f"message {i} is a system message; only the first may be one")
        if role == "user" and not content.strip():
            raise CorralError(f"message {i} (user) is empty")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise CorralError("the conversation has only a system message: add a user message")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            n = i + len(out) - len(turns)
            raise CorralError(f"message {n} is {m['role']!r} but {want!r} was expected "
                              "(turns alternate user, assistant, starting with user)")
    return out


def _split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    if messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


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


# --- built-in formats ---------------------------------------------------------------------

def _llama2(messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
    # Meta's / HF's Llama-2-chat template: contents stripped, the system block folded into the
    # first user turn, every exchange wrapped in <s>...</s>. The prompt always ends at [/INST].
    system, turns = _split_system(messages)
    segs: list[Segment] = []
    for i, m in enumerate(turns):
        text = m["content"].strip()
        if m["role"] == "user":
            if i == 0 and system is not None:
                text = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{text}"
            segs.append((f"<s>[INST] {text} [/INST]", False))
        else:
            segs.append((f" {text} </s>", True))
    return segs


def _llama3(messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
    # Meta's Llama-3-Instruct template: <|begin_of_text|> once, contents trimmed.
    segs: list[Segment] = [("<|begin_of_text|>", False)]
    for m in messages:
        segs.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
        segs.append((f"{m['content'].strip()}<|eot_id|>", m["role"] == "assistant"))
    if add_generation_prompt:
        segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segs


def _chatml(messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
    # ChatML keeps contents as given (no stripping); no default system prompt is added.
    segs: list[Segment] = []
    for m in messages:
        segs.append((f"<|im_start|>{m['role']}\n", False))
        segs.append((f"{m['content']}<|im_end|>", m["role"] == "assistant"))
        segs.append(("\n", False))
    if add_generation_prompt:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


def _human_assistant(messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
    # FlagAlpha's Llama2-Chinese format. It has no system role; ours becomes a leading
    # "<s>System: {system}\n</s>" turn written like the others. Contents are stripped so the
    # "\n</s>" turn ending stays exact.
    segs: list[Segment] = []
    for m in messages:
        text = m["content"].strip()
        if m["role"] == "assistant":
            segs += [("<s>Assistant: ", False), (f"{text}\n</s>", True)]
        else:
            speaker = "Human" if m["role"] == "user" else "System"
            segs.append((f"<s>{speaker}: {text}\n</s>", False))
    if add_generation_prompt:
        segs.append(("<s>Assistant: ", False))
    return segs


BUILTINS: dict[str, ChatFormat] = {
    "llama2": ChatFormat("llama2", ("</s>",), _llama2),
    "llama3": ChatFormat("llama3", ("<|eot_id|>", "<|end_of_text|>"), _llama3),
    "chatml": ChatFormat("chatml", ("<|im_end|>",), _chatml),
    "human-assistant": ChatFormat("human-assistant", ("</s>",), _human_assistant),
}
ALIASES = {"llama2-chinese": "human-assistant"}
FORMAT_NAMES = ("auto", "template", *BUILTINS, *ALIASES)


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
        raise CorralError("the tokenizer has no chat template; pick one with --format "
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
                                  "pick a built-in format with --format")
            answer = upto[len(before):]
            cut = _answer_end(answer, m["content"], stops)
            segs += [(full[done:len(before)], False), (answer[:cut], True),
                     (answer[cut:], False)]
            done = len(upto)
        segs.append((full[done:], False))
        return segs

    return ChatFormat("template", tuple(stops), segments)


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
    """The chat format `name`; None/"auto" means the tokenizer's own template.

    Built-ins: llama2, llama3, chatml, human-assistant (alias llama2-chinese); "template"
    forces the tokenizer's template. Unknown names raise CorralError listing the choices.
    """
    key = (name or "auto").strip().lower()
    key = ALIASES.get(key, key)
    if key in BUILTINS:
        return BUILTINS[key]
    if key in ("auto", "template"):
        if tokenizer is None:
            raise CorralError("this model has no tokenizer; pick a chat format with --format "
                              f"({', '.join(BUILTINS)})")
        return template_format(tokenizer)
    raise CorralError(f"unknown chat format {name!r}; choose from {', '.join(FORMAT_NAMES)}")


def encode_chat(tokenizer, fmt: ChatFormat, messages: Sequence[Mapping],
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids for `messages` in `fmt`. Text that already starts with the BOS token is
    tokenized without special tokens, so BOS is never doubled."""
    return encode_text(tokenizer, fmt.render(messages, add_generation_prompt))


def encode_text(tokenizer, text: str) -> list[int]:
    """Tokenize rendered prompt text, adding special tokens only when BOS is not there yet."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def render_for_training(fmt: ChatFormat, messages: Sequence[Mapping]) -> list[Segment]:
    """(text, is_answer) segments that join to exactly `fmt.render(messages, False)`.

    is_answer marks each assistant answer together with its end token (what tuning puts
    loss on); everything else (system, user turns, headers) is False.
    """
    return fmt.segments(messages, add_generation_prompt=False)
