"""Request fields that constrain the output, and their StructuredOutput.

- OpenAI `response_format`: {"type": "text" | "json_object"} or
  {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
- vLLM's `structured_outputs` extra: {"json" | "regex" | "choice" | "grammar" | "json_object"}
  (and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields)
- TGI's `parameters.grammar`: {"type": "json" | "regex", "value": ...}

Only one constraint per request; two at once is a 400 naming both fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.engine.structured import StructuredOutput, StructuredOutputError
from corral.server.errors import ApiError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class JsonSchemaSpec(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StructuredOutputsBody(_Body):
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class TGIGrammar(_Body):
    type: Literal["json", "regex", "json_schema"]
    value: Any


def _make(param: str, **kw) -> StructuredOutput:
    try:
        return StructuredOutput(param=param, **kw)
    except StructuredOutputError as e:
        raise ApiError(400, str(e), param=param) from None


def from_response_format(rf: ResponseFormat | None) -> StructuredOutput | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return _make("response_format", json_object=True)
    spec = rf.json_schema
    if spec is None or spec.schema_ is None:
        raise ApiError(400, "response_format.json_schema.schema is required for type "
                            "json_schema", param="response_format")
    return _make("response_format.json_schema.schema", json_schema=spec.schema_)


def from_structured_outputs(so: StructuredOutputsBody | None) -> StructuredOutput | None:
    if so is None:
        return None
    kw = {k: v for k, v in (("json_schema", so.json_), ("regex", so.regex),
                            ("choice", so.choice), ("grammar", so.grammar),
                            ("json_object", so.json_object or None)) if v is not None}
    if not kw:
        return None
    field = {"json_schema": "json"}.get(next(iter(kw)), next(iter(kw)))
    return _make(f"structured_outputs.{field}" if len(kw) == 1 else "structured_outputs", **kw)


def from_guided(body) -> StructuredOutput | None:
    """vLLM's older top-level guided_* fields."""
    for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"),
                       ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        v = getattr(body, name, None)
        if v is not None:
            return _make(name, **{kind: v})
    return None


def from_tgi_grammar(g: TGIGrammar | None) -> StructuredOutput | None:
    if g is None:
        return None
    if g.type == "regex":
        if not isinstance(g.value, str):
            raise ApiError(400, "grammar.value must be a string for type regex", param="grammar")
        return _make("grammar.value", regex=g.value)
    value = g.value
    if g.type == "json_schema" and isinstance(value, dict) and "schema" in value:
        value = value["schema"]  # {"name", "schema"} like OpenAI's json_schema
    if not isinstance(value, (dict, str)):
        raise ApiError(400, "grammar.value must be a JSON schema", param="grammar")
    return _make("grammar.value", json_schema=value)


def body_constraint(body) -> StructuredOutput | None:
    """The one constraint an OpenAI chat/completions body asks for, or None."""
    found = [(name, so) for name, so in (
        ("response_format", from_response_format(getattr(body, "response_format", None))),
        ("structured_outputs", from_structured_outputs(getattr(body, "structured_outputs", None))),
        ("guided_*", from_guided(body))) if so is not None]
    if len(found) > 1:
        raise ApiError(400, f"give only one of {' and '.join(n for n, _ in found)}",
                       param=found[1][0])
    return found[0][1] if found else None
