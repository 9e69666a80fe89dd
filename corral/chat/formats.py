"""The built-in chat formats, each in one place: its segments, the special tokens it needs,
its stop strings and its Jinja template for merged models.

    llama2           <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>...
    llama3           <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{text}<|eot_id|>...
    chatml           <|im_start|>{role}\\n{text}<|im_end|>\\n...<|im_start|>assistant\\n
    human-assistant  <s>Human: {user}\\n</s><s>Assistant: {answer}\\n</s>...   (Llama2-Chinese)

llama2 and human-assistant are written with Llama 2's `<s>`/`</s>`. On a tokenizer without
those tokens (SmolLM2, Llama 3, every ChatML model) they are `Specials` mapped to the
tokenizer's own BOS and EOS, so a model tuned on them learns the token inference stops on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from corral.errors import CorralError

Message = dict  # {"role": ..., "content": ...}, validated by corral.chat.validate_messages
Segment = tuple[str, bool]  # (text, is an assistant answer incl. its end token)


@dataclass(frozen=True)
class Specials:
    """The begin/end-of-turn tokens a format is written with (Llama 2's by default)."""

    bos: str = "<s>"
    eos: str = "</s>"


LLAMA2_SPECIALS = Specials()


def _lit(s: str) -> str:
    """`s` as a Jinja string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    if messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _no_tool(name: str, messages: list[Message]) -> None:
    if any(m["role"] == "tool" for m in messages):
        raise CorralError(f"the {name} chat format has no tool role; use llama3, chatml or the "
                          "model's own template for tool results")


# --- llama2 ----------------------------------------------------------------------------------

def llama2_segments(messages: list[Message], add_generation_prompt: bool, sp: Specials
                    ) -> list[Segment]:
    # Meta's / HF's Llama-2-chat format: contents stripped, the system block folded into the
    # first user turn, every exchange wrapped in <s>...</s>. The prompt always ends at [/INST].
    _no_tool("llama2", messages)
    system, turns = _split_system(messages)
    segs: list[Segment] = []
    for i, m in enumerate(turns):
        text = m["content"].strip()
        if m["role"] == "user":
            if i == 0 and system is not None:
                text = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{text}"
            segs.append((f"{sp.bos}[INST] {text} [/INST]", False))
        else:
            segs.append((f" {text} {sp.eos}", True))
    return segs


def llama2_template(sp: Specials) -> str:
    return (
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] | trim %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = none %}{% set msgs = messages %}"
        "{% endif %}{% for m in msgs %}{% if m['role'] == 'user' %}"
        "{% if loop.first and sys is not none %}"
        f"{{{{ {_lit(sp.bos + '[INST] <<SYS>>' + chr(10))} + sys + '\\n<</SYS>>\\n\\n' + "
        "m['content'] | trim + ' [/INST]' }}"
        f"{{% else %}}{{{{ {_lit(sp.bos + '[INST] ')} + m['content'] | trim + ' [/INST]' }}}}"
        "{% endif %}"
        f"{{% else %}}{{{{ ' ' + m['content'] | trim + {_lit(' ' + sp.eos)} }}}}"
        "{% endif %}{% endfor %}")


def llama2_stops(sp: Specials) -> tuple[str, ...]:
    # "[INST]" is the next user turn: a model that missed its </s> is cut there
    return (sp.eos, "</s>", "[INST]")


# --- llama3 ----------------------------------------------------------------------------------

LLAMA3_ROLE = {"system": "system", "user": "user", "assistant": "assistant",
               "tool": "ipython"}  # Meta's name for a tool result


def llama3_segments(messages: list[Message], add_generation_prompt: bool, sp: Specials
                    ) -> list[Segment]:
    # Meta's Llama-3-Instruct format: <|begin_of_text|> once, contents trimmed.
    segs: list[Segment] = [("<|begin_of_text|>", False)]
    for m in messages:
        segs.append((f"<|start_header_id|>{LLAMA3_ROLE[m['role']]}<|end_header_id|>\n\n",
                     False))
        segs.append((f"{m['content'].strip()}<|eot_id|>", m["role"] == "assistant"))
    if add_generation_prompt:
        segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segs


def llama3_template(sp: Specials) -> str:
    return (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + ('ipython' if m['role'] == 'tool' else m['role']) + "
        "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}")


def llama3_stops(sp: Specials) -> tuple[str, ...]:
    # <|eom_id|> ends a tool call (Llama 3.1); a new header means the model began another turn
    return ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|start_header_id|>")


# --- chatml ----------------------------------------------------------------------------------

def chatml_segments(messages: list[Message], add_generation_prompt: bool, sp: Specials
                    ) -> list[Segment]:
    # ChatML keeps contents as given (no stripping); no default system prompt is added.
    segs: list[Segment] = []
    for m in messages:
        segs.append((f"<|im_start|>{m['role']}\n", False))
        segs.append((f"{m['content']}<|im_end|>", m["role"] == "assistant"))
        segs.append(("\n", False))
    if add_generation_prompt:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


def chatml_template(sp: Specials) -> str:
    return (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml_stops(sp: Specials) -> tuple[str, ...]:
    return ("<|im_end|>", "<|im_start|>")


# --- human-assistant (FlagAlpha's Llama2-Chinese) ----------------------------------------------

HA_SPEAKER = {"user": "Human", "assistant": "Assistant", "system": "System"}


def human_assistant_segments(messages: list[Message], add_generation_prompt: bool,
                             sp: Specials) -> list[Segment]:
    # It has no system role; ours becomes a leading "<s>System: {system}\n</s>" turn written
    # like the others. Contents are stripped so the "\n</s>" turn ending stays exact.
    _no_tool("human-assistant", messages)
    segs: list[Segment] = []
    for m in messages:
        text = m["content"].strip()
        if m["role"] == "assistant":
            segs += [(f"{sp.bos}Assistant: ", False), (f"{text}\n{sp.eos}", True)]
        else:
            segs.append((f"{sp.bos}{HA_SPEAKER[m['role']]}: {text}\n{sp.eos}", False))
    if add_generation_prompt:
        segs.append((f"{sp.bos}Assistant: ", False))
    return segs


def human_assistant_template(sp: Specials) -> str:
    bos, end = _lit(sp.bos), _lit("\n" + sp.eos)
    return (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        f"{{{{ {bos} + 'Assistant: ' + m['content'] | trim + {end} }}}}"
        f"{{% else %}}{{{{ {bos} + ('Human' if m['role'] == 'user' else 'System') + ': ' + "
        f"m['content'] | trim + {end} }}}}"
        "{% endif %}{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {bos} + 'Assistant: ' }}}}{{% endif %}}")


def human_assistant_stops(sp: Specials) -> tuple[str, ...]:
    # the end token first, then the token that opens every turn; then the literal markers of
    # another turn a model may still write as text (a Llama 2 `</s>`, a new "Human:" turn)
    return (sp.eos, sp.bos, "</s>", f"{sp.bos}Human:", "<s>Human:", "\nHuman:", f"{sp.bos}Assistant:",
            "<s>Assistant:")


HA_MARKER = re.compile(r"<s>(Human|Assistant|System): ?")


def looks_like_human_assistant(text: str) -> bool:
    """True when `text` is pre-rendered Llama2-Chinese training text."""
    return HA_MARKER.search(text) is not None


def parse_human_assistant(text: str) -> list[Message]:
    """A formatted training text (`<s>Human: q\\n</s><s>Assistant: a\\n</s>...`) -> messages.

    Each turn's `</s>` (with or without its newline, or missing at the very end) is the end of
    the turn, not part of its content. Raises CorralError for text outside the turns, no
    answer, or an empty answer.
    """
    parts = HA_MARKER.split(text)
    if len(parts) == 1 or "Assistant" not in parts[1::2]:
        raise CorralError("no '<s>Assistant: ' answer in column 'text' (the other rows use the "
                          "'<s>Human: ...\\n</s><s>Assistant: ...\\n</s>' format)")
    if parts[0].strip():
        raise CorralError(f"text before the first '<s>Human: ' turn: {parts[0].strip()[:40]!r}")
    role_of = {v: k for k, v in HA_SPEAKER.items()}
    messages: list[Message] = []
    for speaker, body in zip(parts[1::2], parts[2::2]):
        content = body.rstrip().removesuffix("</s>").strip()
        if speaker == "Assistant" and not content:
            raise CorralError("empty answer after '<s>Assistant: ' in column 'text'")
        messages.append({"role": role_of[speaker], "content": content})
    return messages


# --- the table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FormatSpec:
    """Everything one built-in format is: segments, template and stops, given its Specials.

    `uses_specials`: written with `<s>`/`</s>`, mapped to the tokenizer's own tokens when its
    vocabulary has no such tokens."""

    segments: Callable[[list[Message], bool, Specials], list[Segment]]
    template: Callable[[Specials], str]
    stops: Callable[[Specials], tuple[str, ...]]
    uses_specials: bool = False


SPECS: dict[str, FormatSpec] = {
    "llama2": FormatSpec(llama2_segments, llama2_template, llama2_stops, uses_specials=True),
    "llama3": FormatSpec(llama3_segments, llama3_template, llama3_stops),
    "chatml": FormatSpec(chatml_segments, chatml_template, chatml_stops),
    "human-assistant": FormatSpec(human_assistant_segments, human_assistant_template,
                                  human_assistant_stops, uses_specials=True),
}
ALIASES = {"llama2-chinese": "human-assistant"}

# Markers that begin or end a turn in some format: an answer containing one ran into
# another turn (eval counts them; they are never part of a good answer).
TURN_MARKERS = ("<s>Human:", "\nHuman:", "<s>Assistant:", "</s>", "[INST]", "<|start_header_id|>",
                "<|eot_id|>", "<|im_start|>", "<|im_end|>")
# Turn-end markers we recognise inside a tokenizer's own template (for its stop strings).
KNOWN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>")
