"""Tool calling for the chat route: request shapes, prompt rendering, output parsing, streaming.

Rendering: a tokenizer whose chat template knows `tools` gets them through
`apply_chat_template(tools=...)`; otherwise the parser's own convention is written into the
conversation (tools in the system message, assistant calls and tool results as text turns), so
every chat format works.

Parsers (chosen from the chat format, or `--tool-parser`):
    hermes       <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>   (ChatML, SmolLM2)
    llama3_json  [<|python_tag|>]{"name": ..., "parameters": {...}}            (Llama 3.1/3.2)

With tool_choice "required" or a named function the output is grammar-constrained instead
(as in vLLM): a named function generates its arguments object only; "required" generates a
JSON array `[{"name": ..., "parameters": {...}}, ...]`. Either way the arguments string is the
exact text the model produced, so streamed fragments concatenate to it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from corral.engine.structured import StructuredOutput
from corral.server.errors import ApiError

PARSERS = ("hermes", "llama3_json")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class _FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: _FunctionName


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ---- the plan for one request ----------------------------------------------------------------

@dataclass
class ToolPlan:
    """What the tools of one chat request mean for its prompt, constraint and output."""

    tools: list[ToolDef]
    mode: Literal["auto", "none", "required", "named"]
    parser: str
    parallel: bool = True
    named: str | None = None

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def structured(self) -> StructuredOutput | None:
        if self.mode == "named":
            fn = next(t.function for t in self.tools if t.function.name == self.named)
            return StructuredOutput(json_schema=_params_schema(fn), param="tool_choice")
        if self.mode == "required":
            items = [{"type": "object",
                      "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                     "parameters": _params_schema(t.function)},
                      "required": ["name", "parameters"], "additionalProperties": False}
                     for t in self.tools]
            schema: dict = {"type": "array", "minItems": 1,
                            "items": items[0] if len(items) == 1 else {"anyOf": items}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput(json_schema=schema, param="tools")
        return None

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """(content, [(name, arguments)]) of a finished answer."""
        if self.mode == "named":
            try:
                json.loads(text)
            except ValueError:
                return text, []
            return None, [(self.named, text)]
        if self.mode == "required":
            calls = [(n, text[a:b]) for n, a, b in scan_array_calls(text) if b is not None]
            if not calls or not _complete_array(text):
                return text, []
            return None, calls
        if self.mode == "none":
            return text, []
        return parse_hermes(text) if self.parser == "hermes" else parse_llama3(text)

    def streamer(self) -> ToolStreamer:
        return ToolStreamer(self)


def _params_schema(fn: FunctionDef) -> dict:
    return fn.parameters if fn.parameters else {"type": "object", "properties": {}}


def make_plan(tools: list[ToolDef] | None, tool_choice, parallel: bool | None,
              parser: str) -> ToolPlan | None:
    """Validate tools + tool_choice (ApiError 400) and return the plan, or None without tools."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None
    names = []
    for i, t in enumerate(tools):
        fn = t.function
        if not _NAME.match(fn.name):
            raise ApiError(400, f"tools[{i}].function.name {fn.name!r} must be 1-64 letters, "
                                "digits, '_', '.' or '-'", param="tools")
        if fn.name in names:
            raise ApiError(400, f"tools[{i}]: the function name {fn.name!r} is used twice",
                           param="tools")
        names.append(fn.name)
        if fn.parameters is not None:
            _check_schema(fn.parameters, f"tools[{i}].function.parameters")
    par = True if parallel is None else parallel
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan(tools, "auto", parser, par)
    if tool_choice in ("none", "required"):
        return ToolPlan(tools, tool_choice, parser, par)
    if isinstance(tool_choice, NamedToolChoice):
        if tool_choice.function.name not in names:
            raise ApiError(400, f"tool_choice names the function {tool_choice.function.name!r}, "
                                f"which is not in tools ({', '.join(names)})",
                           param="tool_choice")
        return ToolPlan(tools, "named", parser, par, tool_choice.function.name)
    raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or "
                        "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")


def _check_schema(schema: dict, where: str) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise ApiError(400, f"{where} is not a valid JSON schema: {e.message}",
                       param="tools") from None
    if schema.get("type", "object") != "object":
        raise ApiError(400, f"{where} must describe an object (type 'object')", param="tools")


def choose_parser(override: str | None, fmt_name: str | None, tokenizer) -> str:
    """The tool-call parser: --tool-parser if given, else the chat format's convention."""
    if override:
        if override not in PARSERS:
            raise ValueError(f"unknown tool parser {override!r}; choose from {', '.join(PARSERS)}")
        return override
    if fmt_name == "llama3":
        return "llama3_json"
    if fmt_name == "template":
        tpl = getattr(tokenizer, "chat_template", None) or ""
        if isinstance(tpl, str) and ("<|python_tag|>" in tpl or "<|eot_id|>" in tpl) \
                and "<tool_call>" not in tpl:
            return "llama3_json"
    return "hermes"


# ---- prompt rendering -----------------------------------------------------------------------

def _args_obj(arguments) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def template_knows_tools(tokenizer) -> bool:
    tpl = getattr(tokenizer, "chat_template", None)
    return isinstance(tpl, str) and "tools" in tpl


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as HF chat templates expect them (arguments as objects)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"id": c.get("id"), "type": "function",
                                "function": {"name": c["function"]["name"],
                                             "arguments": _args_obj(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def tools_system_text(tools: list[ToolDef], parser: str) -> str:
    specs = [t.model_dump(exclude_none=True) for t in tools]
    if parser == "llama3_json":
        return ("You have access to the following functions. To call a function, respond only "
                'with JSON of the form {"name": function name, "parameters": dictionary of '
                "argument name and its value}. Do not use variables.\n\n"
                + "\n\n".join(json.dumps(s) for s in specs))
    return ("You are a function calling AI model. You are provided with function signatures "
            "within <tools></tools> XML tags. You may call one or more functions to assist "
            "with the user query. Don't make assumptions about what values to plug into "
            "functions. Here are the available tools: <tools>\n"
            + "\n".join(json.dumps(s) for s in specs)
            + "\n</tools>\nFor each function call return a json object with function name and "
              "arguments within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-dict>}\n</tool_call>')


def _call_text(call: dict, parser: str) -> str:
    name, args = call["function"]["name"], _args_obj(call["function"]["arguments"])
    if parser == "llama3_json":
        return json.dumps({"name": name, "parameters": args})
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def convention_messages(messages: list[dict], tools: list[ToolDef] | None,
                        parser: str) -> list[dict]:
    """Plain system/user/assistant messages that carry tools, calls and results as text
    in the parser's convention (for chat formats that know nothing of tools)."""
    out: list[dict] = []
    if tools:
        text = tools_system_text(tools, parser)
        if messages and messages[0]["role"] == "system":
            text = messages[0]["content"] + "\n\n" + text
            messages = messages[1:]
        out.append({"role": "system", "content": text})
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            sep = "; " if parser == "llama3_json" else "\n"
            calls = sep.join(_call_text(c, parser) for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        if role == "tool":
            text = (content if parser == "llama3_json"
                    else f"<tool_response>\n{content}\n</tool_response>")
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + text  # several results answer one turn
            else:
                out.append({"role": "user", "content": text, "_tool": True})
            continue
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    return out


# ---- parsing finished text ------------------------------------------------------------------

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _call_from_obj(obj) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def parse_hermes(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    calls, kept, pos = [], [], 0
    for m in _HERMES.finditer(text):
        try:
            call = _call_from_obj(json.loads(m.group(1)))
        except ValueError:
            call = None
        if call is None:
            continue
        calls.append(call)
        kept.append(text[pos:m.start()])
        pos = m.end()
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def parse_llama3(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].lstrip()
    if not body.startswith("{"):
        return text, []
    dec, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            obj, end = dec.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _call_from_obj(obj)
        if call is None:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;,":
            pos += 1
    return None, calls


# ---- the constrained "required" array ---------------------------------------------------------

def value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object/array/string starting at `start`; None if unfinished."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                if depth == 0:
                    return i + 1
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:\s*')


def scan_array_calls(text: str) -> list[tuple[str, int, int | None]]:
    """(name, arguments start, arguments end or None) for each call seen so far in the
    constrained array `[{"name": "f", "parameters": {...}}, ...]`."""
    out, pos = [], 0
    while True:
        m = _CALL_HEAD.search(text, pos)
        if m is None:
            return out
        start = m.end()
        if start >= len(text):
            return out  # the arguments have not begun
        end = value_end(text, start)
        out.append((json.loads(m.group(1)), start, end))
        if end is None:
            return out
        pos = end


def _complete_array(text: str) -> bool:
    s = text.strip()
    return s.startswith("[") and value_end(s, 0) == len(s)


# ---- streaming ------------------------------------------------------------------------------

@dataclass
class ToolStreamer:
    """Turns one choice's growing text into content deltas and delta.tool_calls entries."""

    plan: ToolPlan
    text: str = ""
    content_sent: int = 0  # chars of plain content already sent
    calls: list[dict] = field(default_factory=list)  # [{"id", "name", "sent": args chars}]
    done: bool = False

    def feed(self, delta: str, finished: bool) -> tuple[str, list[dict]]:
        """(content delta, tool_call deltas) for new text; `finished` flushes."""
        self.text += delta
        mode = self.plan.mode
        if mode == "none":
            return delta, []
        if mode == "named":
            return "", self._named(finished)
        if mode == "required":
            return "", self._required(finished)
        return self._auto(finished)

    def _open(self, name: str) -> dict:
        call = {"id": call_id(), "name": name, "sent": 0}
        self.calls.append(call)
        return call

    def _head(self, k: int, call: dict, args: str = "") -> dict:
        return {"index": k, "id": call["id"], "type": "function",
                "function": {"name": call["name"], "arguments": args}}

    def _named(self, finished: bool) -> list[dict]:
        out = []
        if not self.calls:
            out.append(self._head(0, self._open(self.plan.named)))
        call = self.calls[0]
        if len(self.text) > call["sent"]:
            out.append({"index": 0, "function": {"arguments": self.text[call["sent"]:]}})
            call["sent"] = len(self.text)
        return out

    def _required(self, finished: bool) -> list[dict]:
        out = []
        for k, (name, start, end) in enumerate(scan_array_calls(self.text)):
            if k >= len(self.calls):
                out.append(self._head(k, self._open(name)))
            call = self.calls[k]
            stop = end if end is not None else len(self.text)
            if stop - start > call["sent"]:
                out.append({"index": k, "function": {
                    "arguments": self.text[start + call["sent"]:stop]}})
                call["sent"] = stop - start
        return out

    def _auto(self, finished: bool) -> tuple[str, list[dict]]:
        if not finished:
            safe = self._safe_content_end()
            piece = self.text[self.content_sent:safe]
            self.content_sent = max(self.content_sent, safe)
            return piece, []
        content, calls = self.plan.parse(self.text)
        deltas = []
        for name, args in calls:
            call = self._open(name)
            deltas.append(self._head(len(self.calls) - 1, call, args))
            call["sent"] = len(args)
        rest = ""
        if not calls:
            rest = self.text[self.content_sent:]
        elif content and content.startswith(self.text[:self.content_sent]):
            rest = content[self.content_sent:]
        return rest, deltas

    def _safe_content_end(self) -> int:
        """How much of the text is surely plain content (not the start of a call)."""
        t = self.text
        if self.plan.parser == "llama3_json":
            s = t.lstrip()
            tag = "<|python_tag|>"
            if not s or s.startswith(("{", tag)) or tag.startswith(s[:len(tag)]):
                return self.content_sent  # may be a call: hold until the end
            return len(t)
        tag = "<tool_call>"
        i = t.find(tag, self.content_sent)
        if i >= 0:
            return i
        for k in range(min(len(tag) - 1, len(t)), 0, -1):  # a partial tag at the end
            if t.endswith(tag[:k]):
                return len(t) - k
        return len(t)


def message_calls(calls: list[tuple[str, str]], ids: list[str] | None = None) -> list[dict]:
    return [{"id": ids[k] if ids else call_id(), "type": "function",
             "function": {"name": n, "arguments": a}} for k, (n, a) in enumerate(calls)]


# ---- chat route glue ------------------------------------------------------------------------

def request_messages(messages) -> list[dict]:
    """protocol.ChatMessage list -> dicts with role, content and any tool fields."""
    out = []
    for m in messages:
        d: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name,
                                             "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def encode_messages(engine, messages: list[dict], plan: ToolPlan | None,
                    parser: str) -> list[int]:
    """Token ids for a chat request that may carry tools, tool calls and tool results."""
    from corral.chat import encode_text

    tools = plan.tools if plan is not None and plan.mode != "none" else None
    has_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if tools is None and not has_tool_turns:
        return list(engine.encode_chat([{"role": m["role"], "content": m["content"]}
                                        for m in messages]))
    fmt, tok = engine.chat_format, engine.tokenizer
    if getattr(fmt, "name", None) == "template" and template_knows_tools(tok):
        from jinja2 import TemplateError

        kw = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
        try:
            text = tok.apply_chat_template(template_messages(messages), tokenize=False,
                                           add_generation_prompt=True, **kw)
        except (TemplateError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"the tokenizer's chat template failed: {e}") from None
        return encode_text(tok, text)
    return list(engine.encode_chat(convention_messages(messages, tools, parser)))


def final_choice(plan: ToolPlan | None, c) -> tuple[dict, str | None]:
    """(message, finish_reason) for a finished CompletionOutput."""
    if plan is None or plan.mode == "none":
        return {"role": "assistant", "content": c.text}, c.finish_reason
    content, calls = plan.parse(c.text) if c.finish_reason != "length" or not plan.constrained \
        else (c.text, [])
    msg: dict = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = message_calls(calls)
        return msg, "tool_calls" if c.finish_reason == "stop" else c.finish_reason
    return msg, c.finish_reason
